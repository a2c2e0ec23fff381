"""PyTorch peers of the switch: Hugging Face PEFT merge/unmerge for SHiRA and for LoRA, on the
same target weights of the same model (peft is an optional dependency: ``pip install
edgeadapt[bench]``).

A peer's full switch is what a PEFT user does to change adapter: ``unmerge_adapter()`` (subtract
the active delta) then ``merge_adapter([next])`` (add the next one). PEFT restores by subtraction,
so its weights drift in low precision; ours restore exactly from saved values.

The peers hold exactly the positions and values (SHiRA) or A and B (LoRA) of our adapters.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import torch
from torch import nn

from edgeadapt.errors import MissingPackageError
from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise MissingPackageError(
            "the PEFT peers need peft: pip install 'edgeadapt[bench]'") from exc
    return peft


def _module_names(adapter: Adapter) -> list[str]:
    return sorted(name.removesuffix(".weight") for name in adapter.targets)


def peft_shira_model(model: nn.Module, adapters: list[Adapter], seed: int = 0
                     ) -> tuple[nn.Module, int]:
    """A copy of ``model`` wrapped by PEFT with one SHiRA adapter per entry of ``adapters``
    (named ``a0``, ``a1``, ...), holding exactly the adapters' positions and values.

    PEFT sizes a SHiRA layer as ``r * (in + out)`` values; the layers are built with ``r=1``
    and then given the adapter's own (2, K) int32 indices and (K,) values, which is all PEFT's
    merge (``get_delta_weight``: a sparse COO tensor) reads. Returns (peft model, positions per
    adapter).
    """
    peft = _peft()
    work = copy.deepcopy(model)
    targets = _module_names(adapters[0])
    pm = None
    for j in range(len(adapters)):
        cfg = peft.ShiraConfig(r=1, target_modules=targets, random_seed=seed + j)
        if pm is None:
            pm = peft.get_peft_model(work, cfg, adapter_name=f"a{j}")
        else:
            pm.add_adapter(f"a{j}", cfg)
    layers = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for j, ad in enumerate(adapters):
            for mod in targets:
                delta = ad.targets[f"{mod}.weight"]
                layer = layers[mod]
                idx = torch.from_numpy(np.asarray(delta.indices, dtype=np.int64))
                rows, cols = idx // layer.in_features, idx % layer.in_features
                layer.shira_indices[f"a{j}"] = torch.stack([rows, cols]).to(torch.int)
                layer.shira_weight[f"a{j}"] = nn.Parameter(
                    torch.from_numpy(np.asarray(delta.values, np.float32).copy()),
                    requires_grad=False)
    positions = sum(int(d.indices.size) for d in adapters[0].targets.values())
    return pm, positions


def peft_lora_model(model: nn.Module, adapters: list[Adapter], seed: int = 0
                    ) -> tuple[nn.Module, int]:
    """A copy of ``model`` with PEFT LoRA adapters ``a0``, ``a1``, ... of the adapters' rank on
    their targets, A and B set to the adapters' values. Returns (peft model, rank)."""
    peft = _peft()
    work = copy.deepcopy(model)
    first = next(iter(adapters[0].targets.values()))
    assert isinstance(first, LoraDelta)
    rank = first.rank
    pm = None
    for j, ad in enumerate(adapters):
        cfg = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=_module_names(ad),
                              lora_dropout=0.0, init_lora_weights=False)
        if pm is None:
            pm = peft.get_peft_model(work, cfg, adapter_name=f"a{j}")
        else:
            pm.add_adapter(f"a{j}", cfg)
    modules = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for j, ad in enumerate(adapters):
            for name, delta in ad.targets.items():
                layer = modules[name.removesuffix(".weight")]
                layer.lora_A[f"a{j}"].weight.copy_(torch.from_numpy(delta.A))
                layer.lora_B[f"a{j}"].weight.copy_(torch.from_numpy(delta.B))
    return pm, rank


class PeftSwitch:
    """One full PEFT switch per call, cycling through ``names``: unmerge the merged adapter,
    merge the next (the first call only merges). :meth:`to` sets a given state untimed."""

    def __init__(self, pm: nn.Module, names: list[str]) -> None:
        self.pm = pm
        self._cycle = itertools.cycle(names)
        self.merged: str | None = None

    @torch.no_grad()
    def to(self, name: str | None) -> None:
        """Unmerge whatever is merged, then merge ``name`` (None: leave the base)."""
        if self.merged is not None:
            self.pm.base_model.unmerge_adapter()
            self.merged = None
        if name is not None:
            self.pm.base_model.merge_adapter([name])
            self.merged = name

    def __call__(self) -> None:
        self.to(next(self._cycle))


def peft_switcher(pm: nn.Module, names: list[str]) -> PeftSwitch:
    """A callable doing one full PEFT switch per call, cycling through ``names``: unmerge the
    merged adapter, merge the next. The first call merges ``names[0]``."""
    return PeftSwitch(pm, names)


def merged_weights(pm: nn.Module, names: list[str]) -> dict[str, np.ndarray]:
    """The weights PEFT's forward reads now (merged adapter included) for the torch weight
    ``names`` of the wrapped model (a wrapped layer keeps them as ``base_layer.weight``)."""
    params = dict(pm.base_model.model.named_parameters())
    return {n: params[n.removesuffix(".weight") + ".base_layer.weight"].detach().numpy().copy()
            for n in names}


def reference_weights(model: nn.Module, adapter: Adapter | None, names: list[str]
                      ) -> dict[str, np.ndarray]:
    """W0 + delta of ``adapter`` at its own scale for ``names``, computed independently of PEFT
    (``edgeadapt.adapters.apply_adapter_torch`` on ``model``, which is restored exactly from a
    saved copy afterwards); W0 for None."""
    from edgeadapt.adapters import apply_adapter_torch

    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names}
    try:
        with torch.no_grad():
            if adapter is not None:
                apply_adapter_torch(model, adapter, scale=adapter.scale)
            return {n: params[n].detach().numpy().copy() for n in names}
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


def shira_only(adapter: Adapter) -> bool:
    """True when every target of ``adapter`` is a SHiRA delta."""
    return all(isinstance(d, ShiraDelta) for d in adapter.targets.values())
