"""The transformers + PEFT peer: greedy decoding with a KV cache on a PyTorch causal LM
(transformers' own cache, eager), one step at a time so that each step can be timed.

One step is ``model(input_ids=<last token>, cache=cache, use_cache=True)`` and an
argmax over the last position's logits, as transformers' greedy ``generate`` does, without its
stopping rules: exactly the steps asked for. (transformers before 5.x names the cache
``past_key_values``, in and out: :func:`cache_key`.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeadapt.bench.generation.decoding import Step


def cache_key() -> str:
    """The name transformers gives the KV cache in a causal LM's arguments and outputs."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    return "cache" if "cache" in fields else "past_key_values"


class _Greedy:
    """One greedy conversation on ``model``: :meth:`prefill`, then :meth:`step` per token."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.key = cache_key()
        self.cache = None
        self.token: int | None = None

    @torch.no_grad()
    def prefill(self, prompt: np.ndarray) -> int:
        ids = torch.from_numpy(np.asarray(prompt, dtype=np.int64))[None]
        out = self.model(input_ids=ids, use_cache=True)
        return self._take(out)

    @torch.no_grad()
    def step(self) -> int:
        ids = torch.tensor([[self.token]], dtype=torch.int64)
        out = self.model(input_ids=ids, use_cache=True, **{self.key: self.cache})
        return self._take(out)

    def _take(self, out) -> int:
        self.cache = getattr(out, self.key)
        self.token = int(out.logits[0, -1].argmax())
        return self.token


class TorchCase:
    """The transformers peer: ``model`` (a Hugging Face causal LM: the base, or a PEFT model
    around it with an unfused LoRA active) in eager PyTorch at the threads torch was set to."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def greedy(self, prompt: np.ndarray, n: int) -> list[int]:
        run = _Greedy(self.model)
        out = [run.prefill(prompt)]
        while len(out) < n:
            out.append(run.step())
        return out

    def first_token(self, prompt: np.ndarray) -> object:
        return _Greedy(self.model).prefill(prompt)

    def decoder_at(self, prompt: np.ndarray, steps: int) -> Step:
        run = _Greedy(self.model)
        run.prefill(prompt)
        return run.step
