"""Unfused adapter branches for ONNX export, their parameters lifted to graph inputs.

A branch variant is the base model with each branch target's ``nn.Linear`` replaced by the
adapters package's own layer (:class:`~edgeadapt.adapters.lora.layer.LoraLinear` with
``alpha = r`` so its scaling is 1, or :class:`~edgeadapt.adapters.sira.layer.SiraLinear`) —
no second implementation of the math. :class:`BranchInputs` calls the model through
``torch.func.functional_call`` with the layers' adapter parameters replaced by forward
arguments, so ``torch.export`` sees them as user inputs.

Branch specs and the inputs they add per target module ``m`` (input name = the torch parameter
name of the layer, relative to ``lm.model``):

- ``("lora", r)``: ``m.lora_A`` (r, in), ``m.lora_B`` (out, r); ``y = W0 x + b + B (A x)``.
  The rank dimension is dynamic (``lora_rank``): any rank works, including 0.
- ``("sira", E, r, top_k, capacity_factor)``: ``m.sira_router`` (E, in), ``m.sira_A``
  (E, r, in), ``m.sira_B`` (E, out, r); ``top_k`` and ``capacity_factor`` are baked in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from edgeadapt.adapters.base import replace_module
from edgeadapt.adapters.lora.layer import LoraLinear
from edgeadapt.adapters.sira.layer import SiraLinear
from edgeadapt.errors import ConfigError

#: Per method: branch-input key (as in ``branch_inputs``) -> layer parameter name.
BRANCH_PARAMS = {
    "lora": {"A": "lora_A", "B": "lora_B"},
    "sira": {"router": "sira_router", "A": "sira_A", "B": "sira_B"},
}
LORA_RANK_DIM = "lora_rank"


def parse_branch(branch: tuple | None) -> dict | None:
    """Validate a branch spec; returns its JSON-able description (None for the base graph)."""
    if branch is None:
        return None
    if not isinstance(branch, (tuple, list)) or not branch:
        raise ConfigError(f"branch must be None, ('lora', r) or ('sira', E, r, top_k, "
                          f"capacity_factor), got {branch!r}")
    kind = branch[0]
    if kind == "lora" and len(branch) == 2 and _pos_int(branch[1]):
        return {"method": "lora", "rank": int(branch[1]), "rank_dim": LORA_RANK_DIM}
    if kind == "sira" and len(branch) == 5:
        _, E, r, k, cf = branch
        if _pos_int(E) and _pos_int(r) and _pos_int(k) and k <= E and (
                isinstance(cf, (int, float)) and math.isfinite(cf) and cf > 0):
            return {"method": "sira", "num_experts": int(E), "rank": int(r), "top_k": int(k),
                    "capacity_factor": float(cf)}
    raise ConfigError(f"invalid branch {branch!r}: use ('lora', r>=1) or ('sira', E, r, top_k "
                      "<= E, capacity_factor > 0)")


def _pos_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def variant_name(info: dict | None) -> str | None:
    """``lora-r16``, ``sira-e4-r4-k2-c1.25``; None for the base graph."""
    if info is None:
        return None
    if info["method"] == "lora":
        return f"lora-r{info['rank']}"
    return (f"sira-e{info['num_experts']}-r{info['rank']}-k{info['top_k']}"
            f"-c{info['capacity_factor']:g}")


def _make_layer(linear: nn.Linear, info: dict) -> nn.Module:
    if info["method"] == "lora":
        return LoraLinear(linear, info["rank"], alpha=float(info["rank"])).eval()
    return SiraLinear(linear, info["num_experts"], info["rank"], alpha=float(info["rank"]),
                      top_k=info["top_k"], capacity_factor=info["capacity_factor"]).eval()


@contextmanager
def branch_layers(model: nn.Module, modules: list[str], info: dict
                  ) -> Iterator[dict[str, dict[str, str]]]:
    """Temporarily swap each named nn.Linear for the branch layer; restores the original
    modules on exit. Yields ``{module: {key: parameter name relative to model}}``."""
    originals = {}
    try:
        for name in modules:
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise ConfigError(f"branch target {name!r} is a {type(linear).__name__}, "
                                  "not an nn.Linear")
            originals[name] = linear
            replace_module(model, name, _make_layer(linear, info))
        yield {m: {k: f"{m}.{p}" for k, p in BRANCH_PARAMS[info["method"]].items()}
               for m in modules}
    finally:
        for name, linear in originals.items():
            replace_module(model, name, linear)


@contextmanager
def branched(model: nn.Module, modules: list[str], info: dict | None
             ) -> Iterator[tuple[list[str], dict[str, dict[str, str]]]]:
    """:func:`branch_layers` for a branch spec ``info`` (None: the model as it is). Yields
    (the branch parameter names relative to ``model``, in graph-input order; ``{weight name:
    {key: parameter name}}``, bundle.json's ``branch_inputs``)."""
    if info is None:
        yield [], {}
        return
    with branch_layers(model, modules, info) as layer_params:
        yield ([p for m in layer_params.values() for p in m.values()],
               {f"{m}.weight": dict(p) for m, p in layer_params.items()})


class BranchInputs(nn.Module):
    """``forward(*model_inputs, *branch_tensors) -> inner's outputs``: ``inner`` (a module
    whose HF model is at attribute ``model``: a LogitsModule, or the KV-cache decoder
    :class:`edgeadapt.export.onnx_decoder.KVCacheDecoder`) run with the parameters
    ``param_names`` (relative to the HF model) replaced by ``branch_tensors``, in that order."""

    def __init__(self, inner: nn.Module, n_model_inputs: int, param_names: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.n_model_inputs = n_model_inputs
        self.param_names = list(param_names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        model_args, tensors = args[:self.n_model_inputs], args[self.n_model_inputs:]
        params = {f"model.{n}": t for n, t in zip(self.param_names, tensors, strict=True)}
        return torch.func.functional_call(self.inner, params, model_args, strict=False)


def example_branch_tensors(model: nn.Module, param_names: list[str], seed: int = 0,
                           scale: float = 0.05) -> list[torch.Tensor]:
    """Random tensors shaped like the named branch parameters (for export and parity checks;
    non-zero so the branch visibly contributes)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(model.get_parameter(n).shape), generator=gen) * scale
            for n in param_names]


def branch_dynamic_dims(info: dict, param_names: list[str]) -> list[dict | None]:
    """torch.export dynamic_shapes for the branch tensors: the LoRA rank is dynamic."""
    if info["method"] != "lora":
        return [None] * len(param_names)
    rank = torch.export.Dim(LORA_RANK_DIM, min=1, max=4096)
    return [{0: rank} if n.endswith("lora_A") else {1: rank} for n in param_names]


def default_branch_values(model: nn.Module, param_names: list[str], info: dict
                          ) -> dict[str, tuple[int, ...]]:
    """Shapes of the default (all-zero) value of each branch input: LoRA rank 0 (an empty
    tensor, as in ONNX Runtime's LoRA examples), SiRA the full shape."""
    shapes = {}
    for n in param_names:
        shape = tuple(model.get_parameter(n).shape)
        if info["method"] == "lora":
            shape = (0, shape[1]) if n.endswith("lora_A") else (shape[0], 0)
        shapes[n] = shape
    return shapes
