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
from collections.abc import Callable

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


def peft_switcher(pm: nn.Module, names: list[str]) -> Callable[[], None]:
    """A callable doing one full PEFT switch per call, cycling through ``names``: unmerge the
    merged adapter, merge the next. The first call merges ``names[0]``."""
    cycle = itertools.cycle(names)
    state = {"merged": False}

    @torch.no_grad()
    def switch() -> None:
        if state["merged"]:
            pm.base_model.unmerge_adapter()
        pm.base_model.merge_adapter([next(cycle)])
        state["merged"] = True

    return switch


def shira_only(adapter: Adapter) -> bool:
    """True when every target of ``adapter`` is a SHiRA delta."""
    return all(isinstance(d, ShiraDelta) for d in adapter.targets.values())
