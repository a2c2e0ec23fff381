"""The PyTorch model carrying adapters: what every parity check compares a backend with.

Each adapter is applied by :func:`edgeadapt.adapters.apply_adapter_torch` at a scale ``s_i``
(default: the adapter's own ``scale``), so the target weights become
``W = W0 + sum_i s_i dW_i`` (SHiRA ``W.flat[idx] += s v``; LoRA / SoRA ``W += s B @ A``; SiRA
inserts its layers with ``B`` scaled). A task head replaces the model's head; with several
adapters the *first* one's head wins, as in the runtime's fused switch, so the adapters are
applied last to first.

- :func:`reference_model`: a copy of the model carrying the adapters (the original untouched);
- :func:`carrying`: the model itself carrying them for a ``with`` block, then exactly as it was
  (no copy of the whole model where the adapters only edit weights);
- :func:`reference_logits` / :func:`reference_weights`: its logits on numpy inputs, or the
  weights it holds;
- :func:`reference_greedy`: transformers' greedy ``generate`` on it (causal LMs).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from edgeadapt.adapters.api import apply_adapter_torch
from edgeadapt.format.types import Adapter, SiraBranch
from edgeadapt.models import LoadedModel, forward

Adapters = Adapter | Sequence[Adapter] | None


def _listed(adapters: Adapters, scales: float | Sequence[float] | None
            ) -> list[tuple[Adapter, float]]:
    ads = [] if adapters is None else [adapters] if isinstance(adapters, Adapter) \
        else list(adapters)
    if scales is None:
        factors = [float(a.scale) for a in ads]
    elif isinstance(scales, (int, float)):
        factors = [float(scales)] * len(ads)
    else:
        factors = [float(s) for s in scales]
    return list(zip(ads, factors, strict=True))


def apply_adapters(model: nn.Module, adapters: Adapters,
                   scales: float | Sequence[float] | None = None) -> None:
    """Apply ``adapters`` to ``model`` in place, last to first (the first one's head wins).

    scales: one per adapter, one for all, or None for each adapter's own ``scale``.
    """
    with torch.no_grad():
        for adapter, scale in reversed(_listed(adapters, scales)):
            apply_adapter_torch(model, adapter, scale)


def reference_model(lm: LoadedModel, adapters: Adapters,
                    scales: float | Sequence[float] | None = None) -> LoadedModel:
    """A copy of ``lm`` (its model deep-copied, the tokenizer shared) carrying ``adapters``."""
    ref = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    apply_adapters(ref.model, adapters, scales)
    return ref


@contextmanager
def carrying(lm: LoadedModel, adapters: Adapters,
             scales: float | Sequence[float] | None = None) -> Iterator[LoadedModel]:
    """``lm`` carrying ``adapters`` inside the ``with`` block, exactly as it was after it.

    Adapters that only edit weights (SHiRA, LoRA, SoRA, heads) are applied to ``lm`` in place,
    every tensor they touch saved before and copied back after (bit for bit); an adapter that
    inserts layers (SiRA) gets a :func:`reference_model` copy instead.
    """
    pairs = _listed(adapters, scales)
    if any(isinstance(d, SiraBranch) for a, _ in pairs for d in a.targets.values()):
        yield reference_model(lm, [a for a, _ in pairs], [s for _, s in pairs])
        return
    params = dict(lm.model.named_parameters())
    touched = {n for a, _ in pairs for n in (*a.targets, *a.head)}
    saved = {n: params[n].detach().clone() for n in sorted(touched) if n in params}
    try:
        apply_adapters(lm.model, [a for a, _ in pairs], [s for _, s in pairs])
        yield lm
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


def reference_greedy(lm: LoadedModel, adapters: Adapters, ids: Sequence[int], n: int,
                     eos_token_ids: Sequence[int]) -> list[int]:
    """The ``n`` tokens transformers' greedy ``generate`` (KV cache on) appends to ``ids`` on
    ``lm`` carrying ``adapters`` (fewer where it ends on one of ``eos_token_ids``, which it
    keeps); ``lm`` is left as it was."""
    eos = [int(t) for t in eos_token_ids]
    x = torch.tensor([list(ids)])
    with carrying(lm, adapters) as ref, torch.no_grad():
        out = ref.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                 do_sample=False, use_cache=True, eos_token_id=eos or None,
                                 pad_token_id=eos[0] if eos else 0)
    return out[0, len(ids):].tolist()


def reference_logits(lm: LoadedModel, adapters: Adapters, inputs: Mapping[str, np.ndarray],
                     scales: float | Sequence[float] | None = None) -> np.ndarray:
    """Logits of ``lm`` carrying ``adapters`` on numpy ``inputs`` (``edgeadapt.models.forward``:
    (batch, labels) for a classifier, (batch, seq, vocab) for a causal LM); ``lm`` is left as
    it was."""
    feeds = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with carrying(lm, adapters, scales) as ref, torch.no_grad():
        return forward(ref, feeds).numpy()


def reference_weights(lm: LoadedModel, adapters: Adapters, names: Sequence[str],
                      scales: float | Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """The torch weights ``names`` of ``lm`` carrying ``adapters`` (``W0 + sum_i s_i dW_i``;
    ``W0`` for no adapter), copied out; ``lm`` is left as it was."""
    with carrying(lm, adapters, scales) as ref:
        params = dict(ref.model.named_parameters())
        return {n: params[n].detach().numpy().copy() for n in names}
