"""PyTorch peers of the switch: Hugging Face PEFT merge/unmerge for SHiRA and for LoRA, on the
same target weights of the same model (peft is an optional dependency: ``pip install
edgeadapt[bench]``).

A peer's full switch is what a PEFT user does to change adapter: ``unmerge_adapter()`` (subtract
the active delta) then ``merge_adapter([next])`` (add the next one). PEFT restores by subtraction,
so its weights drift in low precision; ours restore exactly from saved values.

The peers hold exactly the positions and values (SHiRA) or A and B (LoRA) of our adapters.
Before a peer's timings are reported, its merged weights are compared with ``W0 + delta``
computed independently (:func:`edgeadapt.adapters.reference.reference_weights`), and ``W0``
after the unmerge: ``rel_error <= PEFT_WEIGHT_TOL`` (:func:`time_peers`).
"""

from __future__ import annotations

import copy
import gc
import itertools

import numpy as np
import torch
from torch import nn

from edgeadapt.adapters.reference import reference_weights
from edgeadapt.bench.backends import PYTORCH
from edgeadapt.bench.options import BenchContext
from edgeadapt.bench.timing import Stats
from edgeadapt.errors import MissingPackageError, ParityError
from edgeadapt.format.types import Adapter, LoraDelta
from edgeadapt.models import LoadedModel
from edgeadapt.numeric import rel_error
from edgeadapt.timer import time_interleaved

PEFT_WEIGHT_TOL = 1e-4  # PEFT merges / unmerges by addition / subtraction: float32 drift
PEFT_MISSING = "the PEFT peers need peft: pip install 'edgeadapt[bench]' (or pass --no-peers)"


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise MissingPackageError(PEFT_MISSING) from exc
    return peft


def require_peft() -> None:
    """MissingPackageError naming the extra to install unless peft can be imported (checked
    before a run starts, not after its backends were timed)."""
    _peft()


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


def time_peers(ctx: BenchContext, lm: LoadedModel, parity_rows: list[dict]) -> list[dict]:
    """The switch rows of the PEFT peers (SHiRA and LoRA merge/unmerge) on ``lm``, cycling
    between the run's first two fused adapters of each method; the weight checks go to
    ``parity_rows``. ParityError where merged weights are off (see the module docstring)."""
    opts, aset = ctx.opts, ctx.adapters
    rows: list[dict] = []
    for method, build, method_of in (("peft-shira-merge", peft_shira_model, "shira"),
                                     ("peft-lora-merge", peft_lora_model, "lora")):
        ad_names = aset.of(method_of)[:2]
        ads = [aset.adapters[n] for n in ad_names]
        pm, _ = build(lm.model, ads)
        switch = peft_switcher(pm, ["a0", "a1"])
        samples = time_interleaved({method: switch}, repeats=opts.switch_repeats,
                                   warmup=opts.warmup, progress=ctx.progress)
        names = sorted(ads[0].targets)
        for label, ad, ad_name in (("a0", ads[0], ad_names[0]), ("a1", ads[1], ad_names[1]),
                                   (None, None, None)):
            switch.to(label)
            want = reference_weights(lm, ad, names)
            got = merged_weights(pm, names)
            err = max(rel_error(got[n], want[n]) for n in names)
            what = f"pytorch {method} " + (f"merge of {ad_name}" if ad is not None
                                           else "unmerge")
            if not err <= PEFT_WEIGHT_TOL:
                raise ParityError(f"{what}: merged weights differ from W0 + delta computed "
                                  f"independently (max rel error {err:.3g} > "
                                  f"{PEFT_WEIGHT_TOL:g}); refusing to report its timings")
            parity_rows.append({**PYTORCH.fields(), "variant": method, "instance": 0,
                                "batch": None, "seq": None, "max_rel_error": err,
                                "check": "merge" if ad is not None else "unmerge",
                                "method": method, "mode": "merge", "adapter": ad_name,
                                "compared": "weights"})
        rows.append({**PYTORCH.fields(), "method": method, "mode": "merge",
                     **Stats.of(samples[method]).as_dict()})
        del pm, switch
        gc.collect()
    return rows
