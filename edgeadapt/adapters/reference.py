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

On a quantized reference (:func:`edgeadapt.models.quantized.quantize_reference_`) SHiRA adapters
edit the codes as a switch on codes does: the scaled values of every adapter are added first,
``d = sum_i s_i v_i``, then rounded once, ``q' = clip(rint((q s + d) / s))`` with the base's
scales (``Grid.requantize``); :func:`carrying` saves and restores the codes too. LoRA / SoRA
run there unfused, as the runtime runs them: ``y = x Wq^T + b + s x A^T B^T`` (layers
inserted, like SiRA's).
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
from edgeadapt.errors import ConfigError
from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta, SiraBranch
from edgeadapt.models import LoadedModel, forward
from edgeadapt.models.quantized import weight_quants

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
    pairs = _listed(adapters, scales)
    if len(pairs) > 1 and weight_quants(model):
        pairs = [(summed_shira(pairs), 1.0)]  # deltas add before the codes round
    with torch.no_grad():
        for adapter, scale in reversed(pairs):
            apply_adapter_torch(model, adapter, scale)


def summed_shira(pairs: list[tuple[Adapter, float]]) -> Adapter:
    """One SHiRA adapter holding ``sum_i s_i v_i`` per target over the union of positions
    (summed in the order given), and the head of the first adapter that has one; ConfigError
    for an adapter that is not SHiRA (on a quantized base only SHiRA fuses)."""
    first = pairs[0][0]
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for adapter, scale in pairs:
        for name, delta in adapter.targets.items():
            if not isinstance(delta, ShiraDelta):
                raise ConfigError(f"only SHiRA adapters fuse on a quantized base; {name!r} "
                                  f"carries a {adapter.method} delta")
            parts.setdefault(name, []).append(
                (np.asarray(delta.indices, np.int64),
                 np.float32(scale) * np.asarray(delta.values, np.float32)))
    targets = {}
    for name, got in parts.items():
        idx, inverse = np.unique(np.concatenate([i for i, _ in got]), return_inverse=True)
        values = np.zeros(idx.size, np.float32)
        np.add.at(values, inverse, np.concatenate([v for _, v in got]))  # in adapter order
        targets[name] = ShiraDelta(indices=idx, values=values)
    head = next((a.head for a, _ in pairs if a.head), {})
    shapes = {n: s for a, _ in pairs for n, s in a.shapes.items()}
    hashes = {n: h for a, _ in pairs for n, h in a.weight_sha256.items()}
    return Adapter(method="shira", targets=targets, shapes=shapes, weight_sha256=hashes,
                   meta=dict(first.meta), head=head)


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
    inserts layers (SiRA; LoRA / SoRA on a quantized reference) gets a :func:`reference_model`
    copy instead.
    """
    pairs = _listed(adapters, scales)
    quants = weight_quants(lm.model)
    if any(isinstance(d, SiraBranch) or (isinstance(d, LoraDelta) and n in quants)
           for a, _ in pairs for n, d in a.targets.items()):
        yield reference_model(lm, [a for a, _ in pairs], [s for _, s in pairs])
        return
    params = dict(lm.model.named_parameters())
    touched = {n for a, _ in pairs for n in (*a.targets, *a.head)}
    saved = {n: params[n].detach().clone() for n in sorted(touched) if n in params}
    quants = {n: q for n, q in quants.items() if n in touched}
    codes = {n: q.codes.clone() for n, q in quants.items()}
    try:
        apply_adapters(lm.model, [a for a, _ in pairs], [s for _, s in pairs])
        yield lm
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)
        for n, q in quants.items():
            q.set_codes_(codes[n])


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
