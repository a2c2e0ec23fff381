"""Write an edgeadapt :class:`~edgeadapt.format.types.Adapter` (LoRA, pruned SoRA as LoRA,
SHiRA) as a Hugging Face PEFT adapter directory (spec: docs/format.md §7; the reader is
:mod:`edgeadapt.format.peft`). Torch-free: numpy and safetensors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.errors import AdapterFormatError, ConfigError
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.format.peft import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE
from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta


def write_peft(out: str | Path, adapter: Adapter, base_model: str | None) -> Path:
    """Write ``adapter`` (LoRA, pruned SoRA as LoRA, or SHiRA) as a PEFT adapter directory
    that ``PeftModel.from_pretrained(base, out)`` loads; returns ``out``.

    An adapter read from PEFT (``meta["peft"]``) is written back with its own config, module
    names and unfolded ``lora_B`` (``B / scaling``: exact where the scaling is a power of two).
    Others get one of their own: LoRA with each module's rank as ``r`` and ``lora_alpha`` (so
    PEFT's scaling is 1 and ``lora_B`` carries edgeadapt's folded alpha / r), SHiRA with
    ``r = max ceil(K / (out + in))`` and each mask padded with zero values to the ``r (out +
    in)`` entries PEFT's SHiRA layer holds. A classifier head becomes ``modules_to_save``
    with a zero bias. SiRA has no PEFT equivalent (ConfigError).
    """
    out = Path(out)
    if adapter.method not in ("lora", "sora", "shira"):
        raise ConfigError(f"a {adapter.method} adapter has no PEFT equivalent (SiRA: routed "
                          "LoRA experts, run unfused); convert LoRA, SoRA or SHiRA adapters")
    origin = adapter.meta.get("peft") if isinstance(adapter.meta.get("peft"), dict) else None
    if origin is not None and origin.get("peft_type") != (
            "SHIRA" if adapter.method == "shira" else "LORA"):
        origin = None
    modules = (origin or {}).get("modules") or {}
    targets = {n: _scaled(d, adapter.scale) for n, d in adapter.targets.items()
               if not (isinstance(d, LoraDelta) and d.rank == 0)}  # SoRA: every rank pruned
    if not targets:
        raise AdapterFormatError("the adapter changes no weight: nothing to write")
    key_of = {n: KEY_PREFIX + modules.get(n, n.removesuffix(".weight")) for n in targets}
    if adapter.method == "shira":
        tensors, config = _shira_peft(targets, adapter.shapes, key_of, origin)
    else:
        tensors, config = _lora_peft(targets, key_of, origin)
    heads = sorted(adapter.head)
    for name in heads:
        key = KEY_PREFIX + modules.get(name, name).removesuffix(".weight")
        h = np.ascontiguousarray(adapter.head[name], dtype=np.float32)
        tensors[f"{key}.weight"] = h
        tensors[f"{key}.bias"] = np.zeros(h.shape[0], dtype=np.float32)
    if heads:
        config["modules_to_save"] = sorted({n.removesuffix(".weight") for n in heads})
    if origin is None or "base_model_name_or_path" not in config:
        config["base_model_name_or_path"] = base_model
    _write_dir(out, tensors, config)
    return out


def _scaled(delta: LoraDelta | ShiraDelta, scale: float) -> LoraDelta | ShiraDelta:
    """The delta at the adapter's default strength (PEFT has none: it is folded in)."""
    if scale == 1.0:
        return delta
    if isinstance(delta, LoraDelta):
        return LoraDelta(A=delta.A, B=(delta.B * np.float32(scale)).astype(np.float32))
    return ShiraDelta(indices=delta.indices,
                      values=(delta.values * np.float32(scale)).astype(np.float32))


def _lora_peft(targets: dict, key_of: dict[str, str], origin: dict | None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    tensors: dict[str, np.ndarray] = {}
    if origin is not None:
        scaling = origin.get("scaling") or {}
        for n, d in targets.items():
            s = float(scaling.get(n, 1.0))
            tensors[f"{key_of[n]}.lora_A.weight"] = np.ascontiguousarray(d.A, np.float32)
            tensors[f"{key_of[n]}.lora_B.weight"] = (d.B.astype(np.float64) / s
                                                     ).astype(np.float32)
        return tensors, dict(origin.get("config") or {})
    ranks = {n: d.rank for n, d in targets.items()}
    r = max(ranks.values())
    pattern = {re.escape(key_of[n].removeprefix(KEY_PREFIX)): k for n, k in ranks.items()
               if k != r}
    for n, d in targets.items():
        tensors[f"{key_of[n]}.lora_A.weight"] = np.ascontiguousarray(d.A, np.float32)
        tensors[f"{key_of[n]}.lora_B.weight"] = np.ascontiguousarray(d.B, np.float32)
    config = {"peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": r,
              "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False,
              "fan_in_fan_out": False, "bias": "none", "lora_dropout": 0.0,
              "init_lora_weights": True, "inference_mode": True,
              "target_modules": sorted(k.removeprefix(KEY_PREFIX) for k in key_of.values())}
    return tensors, config


def _shira_peft(targets: dict, shapes: dict, key_of: dict[str, str], origin: dict | None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if origin is not None:
        config = dict(origin.get("config") or {})
        r = config.get("r")
    else:
        r = max(-(-d.indices.size // (shapes[n][0] + shapes[n][1]))
                for n, d in targets.items())
        config = {"peft_type": "SHIRA", "task_type": None, "r": r, "mask_type": "random",
                  "random_seed": 0, "fan_in_fan_out": False, "init_weights": True,
                  "inference_mode": True,
                  "target_modules": sorted(k.removeprefix(KEY_PREFIX) for k in key_of.values())}
    tensors: dict[str, np.ndarray] = {}
    for n, d in targets.items():
        out_f, in_f = shapes[n]
        want = int(r) * (out_f + in_f) if isinstance(r, int) else d.indices.size
        if want > out_f * in_f or want < d.indices.size:
            raise AdapterFormatError(
                f"SHiRA target {n}: PEFT's SHiRA holds r (out + in) = {want} entries of a "
                f"{[out_f, in_f]} weight, this adapter {d.indices.size}: not representable")
        flat, values = _pad(np.asarray(d.indices, np.int64),
                            np.asarray(d.values, np.float32), want, out_f * in_f)
        tensors[f"{key_of[n]}.shira_weight"] = values
        tensors[f"{key_of[n]}.shira_indices"] = np.stack([flat // in_f, flat % in_f]
                                                         ).astype(np.int32)
    return tensors, config


def _pad(flat: np.ndarray, values: np.ndarray, k: int, numel: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """``flat`` (sorted) plus the ``k - len(flat)`` smallest positions not in it, with value 0,
    all sorted: the same delta with PEFT's count of entries."""
    extra = k - flat.size
    if extra == 0:
        return flat, values
    free = np.setdiff1d(np.arange(min(numel, flat.size + extra), dtype=np.int64), flat,
                        assume_unique=True)[:extra]
    merged = np.concatenate([flat, free])
    order = np.argsort(merged, kind="stable")
    return merged[order], np.concatenate([values, np.zeros(extra, np.float32)])[order]


def _write_dir(out: Path, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())},
                metadata={"format": "pt"})
    atomic_write_bytes(out / WEIGHTS_FILE, [data])
    text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(out / CONFIG_FILE, [text.encode()])
