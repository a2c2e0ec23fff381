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
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edgeadapt import __version__
from edgeadapt.errors import AdapterFormatError, ConfigError, FingerprintMismatchError
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


def check_out_dir(out: str | Path) -> Path:
    """Refuse, before any work, an output path that cannot become a writable run directory.

    Nothing is created: the nearest existing path at or above ``out`` must be a directory that
    can be written to (``f/sub`` with ``f`` a file, or a read-only parent, is a ConfigError
    naming it). :func:`save_run` creates the missing directories.
    """
    out = Path(out)
    probe = out
    while not probe.exists() and not probe.is_symlink() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        what = "is not a directory" if probe.exists() else "does not exist (a broken link?)"
        raise ConfigError(f"--out {out}: {probe} {what}; choose another run directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {probe} is not writable; choose another run directory")
    return out


def save_run(out: Path, lm: LoadedModel, info: dict[str, Any],
             adapter: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
    """Write the run's four files into ``out`` (``info`` gets the version and head fields).

    An OSError (not a directory, read-only, disk full, ...) is a ConfigError naming ``out``.
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
        raise ConfigError(f"cannot write the run to {out}: {exc.strerror or exc}"
                          f"{f' ({exc.filename})' if exc.filename else ''}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterFormatError(f"{path} is missing: not a training run directory") from None
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{path} is not valid JSON: {exc}") from exc


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return st_load(path.read_bytes())
    except FileNotFoundError:
        raise AdapterFormatError(f"{path} is missing: not a complete training run") from None
    except Exception as exc:  # safetensors raises its own error types on corrupt headers
        raise AdapterFormatError(f"{path} is not a valid safetensors file: {exc}") from exc


def load_run(path: str | Path) -> tuple[LoadedModel, dict[str, Any]]:
    """Rebuild a run: its base model with the adapter attached and loaded, and the head.

    Returns ``(lm, info)`` with ``info`` = adapter.json plus ``"metrics"`` (metrics.json, if
    present). Raises AdapterFormatError on missing or corrupt files and FingerprintMismatchError
    when the base weights differ from the ones the adapter was trained on.
    """
    from edgeadapt.adapters import config_from_dict, load_adapter_state

    path = Path(path)
    info = _read_json(path / INFO_FILE)
    lm = load_model(info["model"], num_labels=info.get("num_labels") or 2,
                    seed=info.get("seed", 0))
    found = base_weight_hashes(lm, list(info.get("weight_sha256", {})))
    for name, expected in info.get("weight_sha256", {}).items():
        if found[name] != expected:
            raise FingerprintMismatchError(
                f"{path}: base weight {name} differs from the one the adapter was trained on "
                f"(model {info['model']!r}); use the same base model")
    if info["method"] != "none":
        load_adapter_state(lm.model, config_from_dict(info["config"]),
                           _read_tensors(path / ADAPTER_FILE))
    if info.get("head"):
        head = head_parameters(lm)
        state = _read_tensors(path / info["head"])
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
