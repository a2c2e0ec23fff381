"""The verbs over the four methods: attach, trainable_parameters, extract, apply_adapter_torch,
adapter_state / load_adapter_state, config_from_dict. Each method folder supplies the math."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeadapt.adapters.base import AdaptedLinear, AdapterConfig, adapted_layers, replace_module
from edgeadapt.adapters.lora.config import LoraConfig
from edgeadapt.adapters.lora.model import attach_lora, fuse_lora, insert_lora, lora_delta
from edgeadapt.adapters.shira.config import ShiraConfig
from edgeadapt.adapters.shira.model import (
    attach_shira,
    checked_indices,
    fuse_shira,
    shira_delta,
)
from edgeadapt.adapters.sira.config import SiraConfig
from edgeadapt.adapters.sira.model import attach_sira, insert_sira, sira_branch
from edgeadapt.adapters.sora.config import SoraConfig
from edgeadapt.adapters.sora.model import attach_sora, sora_delta
from edgeadapt.errors import (
    AdapterFormatError,
    ConfigError,
    TargetMismatchError,
    UnknownNameError,
)
from edgeadapt.format.fingerprint import weight_sha256 as sha256_of
from edgeadapt.format.quant_adapter import META_KEY as QUANT_META
from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta, SiraBranch
from edgeadapt.models import resolve_targets

CONFIGS: dict[str, type[AdapterConfig]] = {
    c.method: c for c in (LoraConfig, ShiraConfig, SoraConfig, SiraConfig)
}
_DELTA = {"lora": lora_delta, "shira": shira_delta, "sora": sora_delta, "sira": sira_branch}


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from ``config.to_dict()`` (e.g. a run's ``adapter.json``)."""
    d = dict(d)
    method = d.pop("method", None)
    if method not in CONFIGS:
        raise UnknownNameError(f"unknown adapter method {method!r}; choose one of "
                               f"{', '.join(CONFIGS)}")
    cls = CONFIGS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(d) - known)
    if extra:
        raise ConfigError(f"{method}: unknown config field(s) {', '.join(extra)}")
    return cls(**d)


def attach(model: nn.Module, config: AdapterConfig,
           calib: Callable[[], torch.Tensor] | None = None) -> list[str]:
    """Freeze every base parameter of ``model`` and swap the target nn.Linear layers for
    adapter layers of ``config``'s method, in place.

    calib: ``() -> scalar loss``; needed by SHiRA's ``grad`` and ``snip`` masks (the gradient of
    this loss with respect to each target weight scores the positions).
    Returns the adapted base weight names (``<module>.weight``), in model order.
    """
    return _attach(model, config, calib)


def _attach(model: nn.Module, config: AdapterConfig, calib=None, masks=None) -> list[str]:
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"attach: expected an adapter config, got {type(config).__name__}")
    if any(True for _ in adapted_layers(model)):
        raise ConfigError("attach: this model already has an adapter attached; load a fresh "
                          "model to attach another")
    names = resolve_targets(model, config.targets)
    if isinstance(config, ShiraConfig):
        attach_shira(model, names, config, calib, masks)  # masks chosen before freezing
    for p in model.parameters():
        p.requires_grad_(False)
    if isinstance(config, LoraConfig):
        attach_lora(model, names, config)
    elif isinstance(config, SoraConfig):
        attach_sora(model, names, config)
    elif isinstance(config, SiraConfig):
        attach_sira(model, names, config)
    for _, layer in adapted_layers(model):
        for p in layer.adapter_tensors().values():
            if isinstance(p, nn.Parameter):
                p.requires_grad_(True)
    return [f"{n}.weight" for n in names]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters the main optimizer should see (SoRA gates excluded: see
    :func:`edgeadapt.adapters.sora.gate_parameters`)."""
    return [p for _, layer in adapted_layers(model) for p in layer.trainable()]


def _layers_of_one_method(model: nn.Module) -> tuple[str, list[tuple[str, AdaptedLinear]]]:
    layers = list(adapted_layers(model))
    if not layers:
        raise ConfigError("no adapter is attached to this model (call attach first)")
    methods = {layer.method for _, layer in layers}
    if len(methods) != 1:
        raise ConfigError(f"model mixes adapter methods {sorted(methods)}")
    return methods.pop(), layers


def extract(model: nn.Module, weight_sha256: dict[str, str] | None = None) -> Adapter:
    """The attached adapter as a numpy :class:`~edgeadapt.format.types.Adapter`.

    weight_sha256: base weight name -> sha256 of the *base* weight (as fingerprinted at export);
    if omitted it is computed from the model's (unmodified) base weights.
    SoRA comes out pruned, as LoRA deltas with method "sora" (live ranks in ``meta``). SHiRA on
    a quantized base (``quantize_reference_``) comes out as grid deltas, ``meta["quant"]`` its
    precision.
    """
    method, layers = _layers_of_one_method(model)
    targets, shapes, hashes = {}, {}, {}
    for name, layer in layers:
        wname = f"{name}.weight"
        targets[wname] = _DELTA[method](layer)
        shapes[wname] = (layer.out_features, layer.in_features)
        if weight_sha256 is not None:
            if wname not in weight_sha256:
                raise TargetMismatchError(f"extract: no sha256 given for target {wname!r}")
            hashes[wname] = weight_sha256[wname]
        else:
            hashes[wname] = sha256_of(layer.weight.detach().float().cpu().numpy())
    meta: dict[str, Any] = {}
    quants = {layer.quant.precision for _, layer in layers if layer.quant is not None}
    if method == "shira" and quants:  # its values are grid deltas of that base
        if len(quants) > 1:
            raise ConfigError(f"extract: the adapted weights mix precisions {sorted(quants)}")
        meta[QUANT_META] = quants.pop()
    if method == "sora":
        meta["live_ranks"] = {n: targets[f"{n}.weight"].rank for n, _ in layers}
        meta["r_max"] = layers[0][1].r
    return Adapter(method=method, targets=targets, shapes=shapes, weight_sha256=hashes, meta=meta)


def apply_adapter_torch(model: nn.Module, adapter: Adapter, scale: float = 1.0) -> None:
    """The PyTorch reference of applying ``adapter`` at strength ``scale`` to a base model, in
    place: SHiRA ``W.flat[idx] += scale * v``; LoRA / SoRA ``W += scale * B @ A``; SiRA inserts
    SiRA layers (numpy weights, B multiplied by scale) in place of the target nn.Linear layers.
    On a quantized target (``edgeadapt.models.quantized.quantize_reference_``) SHiRA requantizes the
    codes (``q' = clip(rint((q s + scale v) / s))``, the base's scales) and LoRA / SoRA insert
    :class:`~edgeadapt.adapters.lora.layer.LoraLinear` layers (unfused: ``y = x Wq^T + b +
    scale x A^T B^T``, as the runtime runs them on a quantized base).

    ``adapter.scale`` is not applied: pass it as ``scale`` if wanted. A task head
    (``adapter.head``) replaces the model's head weight and is never scaled.
    """
    for wname, value in adapter.head.items():
        try:
            weight = model.get_parameter(wname)
        except AttributeError:
            raise TargetMismatchError(f"adapter head {wname!r} is not in the model") from None
        if tuple(weight.shape) != tuple(value.shape):
            raise TargetMismatchError(f"adapter head {wname!r}: model has {tuple(weight.shape)}, "
                                      f"adapter has {tuple(value.shape)}")
        with torch.no_grad():
            weight.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))
    for wname, delta in adapter.targets.items():
        mname = wname.removesuffix(".weight")
        try:
            module = model.get_submodule(mname)
        except AttributeError:
            raise TargetMismatchError(f"adapter target {wname!r} is not in the model") from None
        weight = getattr(module, "weight", None)
        expected = tuple(adapter.shapes.get(wname, ()))
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected:
            raise TargetMismatchError(
                f"adapter target {wname!r}: model has "
                f"{None if weight is None else tuple(weight.shape)}, adapter expects {expected}")
        quant = getattr(module, "quant", None)
        if quant is not None and isinstance(delta, ShiraDelta):  # a switch on codes
            quant.requantize_(delta.indices, scale * np.asarray(delta.values, np.float32))
        elif isinstance(delta, SiraBranch) or (quant is not None and isinstance(delta, LoraDelta)):
            if not isinstance(module, nn.Linear):  # a layer inserted: unfused
                raise TargetMismatchError(f"{adapter.method} target {mname!r} is a "
                                          f"{type(module).__name__}, not an nn.Linear")
            insert = insert_sira if isinstance(delta, SiraBranch) else insert_lora
            replace_module(model, mname, insert(module, delta, scale))
        elif isinstance(delta, ShiraDelta):
            fuse_shira(weight, delta, scale)
        elif isinstance(delta, LoraDelta):
            fuse_lora(weight, delta, scale)
        else:
            raise AdapterFormatError(f"adapter target {wname!r}: unknown delta type "
                                     f"{type(delta).__name__}")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (``<module>.<tensor>``: parameters, SoRA gates, SHiRA indices),
    detached copies on CPU, ready for safetensors."""
    _layers_of_one_method(model)
    return {f"{name}.{k}": v.detach().cpu().clone()
            for name, layer in adapted_layers(model) for k, v in layer.adapter_tensors().items()}


def load_adapter_state(model: nn.Module, config: AdapterConfig,
                       state: dict[str, torch.Tensor]) -> list[str]:
    """Attach ``config`` to ``model`` and load ``state`` (from :func:`adapter_state`) into it.

    SHiRA masks come from the stored indices (no calibration needed). Raises
    AdapterFormatError on missing, unexpected or mis-shaped tensors. Returns the adapted names.
    """
    masks = None
    if isinstance(config, ShiraConfig):
        masks = {}
        for name in resolve_targets(model, config.targets):
            key = f"{name}.shira_indices"
            if key not in state:
                raise AdapterFormatError(f"adapter state lacks {key!r}")
            masks[name] = checked_indices(key, state[key], model.get_submodule(name))
    names = _attach(model, config, masks=masks)
    expected: dict[str, torch.Tensor] = {
        f"{name}.{k}": v for name, layer in adapted_layers(model)
        for k, v in layer.adapter_tensors().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise AdapterFormatError(f"adapter state does not match the config: missing "
                                 f"{missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, dst in expected.items():
            src = state[key]
            if tuple(src.shape) != tuple(dst.shape):
                raise AdapterFormatError(f"adapter state {key!r}: shape {tuple(src.shape)}, "
                                         f"expected {tuple(dst.shape)}")
            dst.copy_(src.to(dst.dtype))
    return names
