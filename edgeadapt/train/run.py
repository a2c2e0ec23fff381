"""A training run on disk (``runs/<x>/``), written atomically, no pickle.

- ``adapter.safetensors``: the raw adapter tensors from ``edgeadapt.adapters.adapter_state``
  (empty for ``--method none``).
- ``head.safetensors``: a classifier's trained head (``classifier.*``), when there is one.
- ``adapter.json``: ``{"method", "config", "model", "task", "targets", "weight_sha256",
  "edgeadapt_version", "num_labels", "labels", "max_len", "seed", "head"}``.
- ``metrics.json``: what training measured (see ``edgeadapt.train.trainer.train``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edgeadapt import __version__
from edgeadapt.errors import (
    AdapterFormatError,
    ConfigError,
    FingerprintMismatchError,
    UnknownNameError,
    WriteError,
)
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.models import LoadedModel, head_weight_names, load_model

ADAPTER_FILE, HEAD_FILE, INFO_FILE, METRICS_FILE = (
    "adapter.safetensors", "head.safetensors", "adapter.json", "metrics.json")


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, [(json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()])


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, [st_save({k: v.detach().cpu().contiguous()
                                       for k, v in tensors.items()})])


def head_parameters(lm: LoadedModel) -> dict[str, torch.nn.Parameter]:
    """A classifier's task head: its matrices (``edgeadapt.models.head_weight_names``, e.g.
    ``classifier.weight``). The head bias is not trained: it keeps its zero init, so the
    deployed head is one matrix the runtime swaps in place (Adapter.head). Causal LMs have
    none (the generative classifier reuses the LM head)."""
    params = dict(lm.model.named_parameters())
    return {n: params[n] for n in head_weight_names(lm.model, lm.kind)}


def base_weight_hashes(lm: LoadedModel, names: list[str]) -> dict[str, str]:
    """sha256 of each named base weight (fp32, (out, in)): the adapter's fingerprint."""
    params = dict(lm.model.named_parameters())
    return {n: weight_sha256(params[n].detach().float().cpu().numpy()) for n in names}


def save_run(out: Path, lm: LoadedModel, info: dict[str, Any],
             adapter: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
    """Write the run's four files into ``out`` (``info`` gets the version and head fields).

    An OSError (not a directory, read-only, disk full, ...) is a WriteError naming ``out``.
    """
    out = Path(out)
    head = head_parameters(lm)
    info = {**info, "edgeadapt_version": __version__, "head": HEAD_FILE if head else None}
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_tensors(out / ADAPTER_FILE, adapter)
        if head:
            write_tensors(out / HEAD_FILE, head)
        write_json(out / INFO_FILE, info)
        write_json(out / METRICS_FILE, metrics)
    except OSError as exc:
        raise WriteError(f"cannot write the run to {out}: {exc.strerror or exc}"
                          f"{f' ({exc.filename})' if exc.filename else ''}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else (missing, unreadable, not UTF-8, not JSON,
    not an object) is an AdapterFormatError naming the file."""
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise AdapterFormatError(f"{path} is missing: not a training run directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise AdapterFormatError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    if not isinstance(obj, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return st_load(path.read_bytes())
    except FileNotFoundError:
        raise AdapterFormatError(f"{path} is missing: not a complete training run") from None
    except Exception as exc:  # safetensors raises its own error types on corrupt headers
        raise AdapterFormatError(f"{path} is not a valid safetensors file: {exc}") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_run_info(path: str | Path) -> tuple[dict[str, Any], Any]:
    """A run's adapter.json, its schema checked, and its adapter config (None for ``none``).

    Raises AdapterFormatError naming the file and the field when a field has the wrong type or
    value: method (a method name), model (a non-empty string), config (an object that is a
    valid config of that method), weight_sha256 (object: weight name -> hex string), seed
    (integer), num_labels (integer >= 1 or null), head (null or a file name in the run).
    """
    from edgeadapt.adapters import CONFIGS, config_from_dict

    file = Path(path) / INFO_FILE
    info = _read_json(file)

    def bad(field: str, want: str) -> AdapterFormatError:
        got = repr(info[field]) if field in info else "nothing (the field is missing)"
        return AdapterFormatError(f"{file}: field {field!r} must be {want}, got {got}")

    methods = (*CONFIGS, "none")
    if info.get("method") not in methods:
        raise bad("method", f"one of {', '.join(methods)}")
    if not isinstance(info.get("model"), str) or not info["model"]:
        raise bad("model", "a model name or directory (a non-empty string)")
    hashes = info.get("weight_sha256")
    if not isinstance(hashes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()):
        raise bad("weight_sha256", "an object of base weight name -> sha256 hex string")
    if not _is_int(info.get("seed", 0)):
        raise bad("seed", "an integer")
    num_labels = info.get("num_labels")
    if num_labels is not None and not (_is_int(num_labels) and num_labels >= 1):
        raise bad("num_labels", "an integer >= 1 or null")
    head = info.get("head")
    if head is not None and not (isinstance(head, str) and head not in ("", ".", "..")
                                 and Path(head).name == head):
        raise bad("head", "null or the name of a file in the run directory")
    if info.get("task") is not None and not isinstance(info["task"], str):
        raise bad("task", "a task name (string) or null")
    cfg = info.get("config", {})
    if not isinstance(cfg, dict):
        raise bad("config", f"an object with the {info['method']} config fields")
    config = None
    if info["method"] != "none":
        if cfg.get("method", info["method"]) != info["method"]:
            raise AdapterFormatError(f"{file}: field 'config' is a {cfg.get('method')!r} config "
                                     f"but the run's method is {info['method']!r}")
        try:
            config = config_from_dict({**cfg, "method": info["method"]})
        except (ConfigError, TypeError, ValueError) as exc:
            raise AdapterFormatError(f"{file}: field 'config' is invalid: {exc}") from exc
    return info, config


def check_weight_hashes(source: str | Path, hashes: dict[str, str], model: torch.nn.Module,
                        model_name: str) -> None:
    """Raise FingerprintMismatchError naming ``source`` unless every weight in ``hashes``
    exists in ``model`` and has that sha256 (fp32, (out, in))."""
    params = dict(model.named_parameters())
    unknown = sorted(n for n in hashes if n not in params)
    if unknown:
        raise FingerprintMismatchError(
            f"{source}: base weight(s) {', '.join(unknown[:3])}"
            f"{f' (+{len(unknown) - 3} more)' if len(unknown) > 3 else ''} are not in this "
            f"base model (the run names model {model_name!r}): the adapter was trained on "
            "another base model")
    for name, expected in hashes.items():
        if weight_sha256(params[name].detach().float().cpu().numpy()) != expected:
            raise FingerprintMismatchError(
                f"{source}: base weight {name} differs from the one the adapter was trained on "
                f"(model {model_name!r}); use the same base model")


def load_run(path: str | Path) -> tuple[LoadedModel, dict[str, Any]]:
    """Rebuild a run: its base model with the adapter attached and loaded, and the head.

    Returns ``(lm, info)`` with ``info`` = adapter.json plus ``"metrics"`` (metrics.json, if
    present). Raises AdapterFormatError on missing, corrupt or hand-edited files (naming the
    file and field) and FingerprintMismatchError when the base weights differ from (or lack)
    the ones the adapter was trained on.
    """
    from edgeadapt.adapters import load_adapter_state

    path = Path(path)
    info, config = read_run_info(path)
    try:
        lm = load_model(info["model"], num_labels=info.get("num_labels") or 2,
                        seed=info.get("seed", 0))
    except UnknownNameError as exc:
        raise AdapterFormatError(f"{path / INFO_FILE}: field 'model': {exc}") from exc
    check_weight_hashes(path / INFO_FILE, info["weight_sha256"], lm.model, info["model"])
    if config is not None:
        state = read_tensors(path / ADAPTER_FILE)
        try:
            names = load_adapter_state(lm.model, config, state)
        except (ConfigError, AdapterFormatError) as exc:
            raise AdapterFormatError(f"{path / ADAPTER_FILE}: {exc}") from exc
        if set(names) != set(info["weight_sha256"]):
            raise AdapterFormatError(
                f"{path / INFO_FILE}: field 'weight_sha256' must fingerprint exactly the adapted "
                f"weights; missing {sorted(set(names) - set(info['weight_sha256']))[:3]}, "
                f"extra {sorted(set(info['weight_sha256']) - set(names))[:3]}")
    if info.get("head"):
        head = head_parameters(lm)
        state = read_tensors(path / info["head"])
        if set(state) != set(head):
            raise AdapterFormatError(f"{path / info['head']}: tensors {sorted(state)} do not "
                                     f"match the model's head {sorted(head)}")
        with torch.no_grad():
            for name, tensor in state.items():
                if tensor.shape != head[name].shape:
                    raise AdapterFormatError(f"{path / info['head']}: {name} has shape "
                                             f"{tuple(tensor.shape)}, the model's "
                                             f"{tuple(head[name].shape)}")
                head[name].copy_(tensor)
    lm.model.eval()
    if (path / METRICS_FILE).exists():
        info["metrics"] = _read_json(path / METRICS_FILE)
    return lm, info
