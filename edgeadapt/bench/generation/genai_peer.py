"""The onnxruntime-genai peer at run time: its base model and its LoRA model with the adapter
active (:mod:`.genai_build` built them), each a :class:`~.decoding.DecodeCase`.

genai's loop: ``append_tokens`` runs the prompt and leaves its logits; each
``generate_next_token`` then picks a token from the logits it has and, from the second call
on, first runs the model on the previous token. So a first token is ``append_tokens`` + one
``generate_next_token``, and every later ``generate_next_token`` is one decode step, the same
work as one of edgeadapt's stream steps. Timed series set ``min_length`` = ``max_length`` so
that no end-of-turn token ends them early (``ignore_eos``, as edgeadapt's timed streams).
"""

from __future__ import annotations

import numpy as np

from edgeadapt.bench.generation.decoding import Step
from edgeadapt.bench.generation.genai_build import GenaiModels
from edgeadapt.errors import MissingPackageError

ADAPTER_NAME = "lora"


def _og():
    try:
        import onnxruntime  # noqa: F401 - genai runs on the onnxruntime library loaded here
        import onnxruntime_genai as og
    except ImportError as exc:
        raise MissingPackageError(f"onnxruntime-genai cannot be imported: {exc}") from exc
    return og


def version() -> str:
    """onnxruntime-genai's version."""
    return str(getattr(_og(), "__version__", "?"))


class GenaiCase:
    """One genai model (and, for the LoRA model, its loaded adapters and the one to activate)
    generating greedily on the CPU."""

    def __init__(self, model_dir, adapter_file=None) -> None:
        og = _og()
        self._og = og
        self.model = og.Model(str(model_dir))
        self.adapters = None
        if adapter_file is not None:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter_file), ADAPTER_NAME)

    def _generator(self, prompt: np.ndarray, new: int, run_to_end: bool = False):
        """A generator that has read ``prompt`` (its logits computed), room for ``new``
        tokens; ``run_to_end``: no end-of-turn token stops it before that."""
        params = self._og.GeneratorParams(self.model)
        length = int(prompt.size) + new
        options = {"max_length": length, "do_sample": False}
        if run_to_end:
            options["min_length"] = length
        params.set_search_options(**options)
        gen = self._og.Generator(self.model, params)
        if self.adapters is not None:
            gen.set_active_adapter(self.adapters, ADAPTER_NAME)
        gen.append_tokens(np.asarray(prompt, dtype=np.int32)[None])
        return gen

    def logits(self, prompt: np.ndarray) -> np.ndarray:
        """The last prompt position's logits (vocab,)."""
        return np.array(self._generator(prompt, 1).get_logits()[0, -1], dtype=np.float32)

    def greedy(self, prompt: np.ndarray, n: int) -> list[int]:
        gen = self._generator(prompt, n)
        out: list[int] = []
        while len(out) < n and not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out

    def first_token(self, prompt: np.ndarray) -> object:
        gen = self._generator(prompt, 1)
        gen.generate_next_token()
        return gen

    def decoder_at(self, prompt: np.ndarray, steps: int) -> Step:
        gen = self._generator(prompt, steps + 2, run_to_end=True)
        gen.generate_next_token()  # picks the first token from the prompt's logits
        return gen.generate_next_token


def open_cases(models: GenaiModels) -> dict[str, GenaiCase]:
    """Case name -> case: ``base`` and, where a LoRA model was built, ``lora-adapter`` (its
    adapter active)."""
    cases = {"base": GenaiCase(models.base)}
    if models.lora is not None:
        cases["lora-adapter"] = GenaiCase(models.lora, models.adapter_file)
    return cases
