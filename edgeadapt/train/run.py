"""A training run on disk (``runs/<x>/``), written atomically, no pickle: the torch side.

The directory format (file names, adapter.json fields and checks, readers, fingerprint checks)
is :mod:`edgeadapt.format.run_dir` (spec: docs/format.md, "Training-run directory"); this module
adds what needs the model: writing a run, rebuilding it, and reading another SHiRA run's mask
positions for ``--exclude-run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from edgeadapt import __version__
from edgeadapt.adapters import config_from_dict, load_adapter_state
from edgeadapt.adapters.shira.model import checked_indices
from edgeadapt.errors import (
    AdapterFormatError,
    ConfigError,
    UnknownNameError,
    WriteError,
)
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.format.run_dir import (
    ADAPTER_FILE,
    HEAD_FILE,
    INFO_FILE,
    METRICS_FILE,
    SHIRA_INDICES,
    check_weight_hashes,
    read_info,
    read_json,
    read_tensors,
    shira_indices,
    write_json,
)
from edgeadapt.models import LoadedModel, head_weight_names, load_model
from edgeadapt.models.quantized import quantize_reference_


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


def model_weight_hashes(model: torch.nn.Module, names: list[str] | dict[str, Any]
                        ) -> dict[str, str]:
    """sha256 (fp32, (out, in)) of each named weight that ``model`` has; names it lacks are
    left out (:func:`~edgeadapt.format.run_dir.check_weight_hashes` reports them)."""
    params = dict(model.named_parameters())
    return {n: weight_sha256(params[n].detach().float().cpu().numpy())
            for n in names if n in params}


def base_weight_hashes(lm: LoadedModel, names: list[str]) -> dict[str, str]:
    """sha256 of each named base weight (fp32, (out, in)): the adapter's fingerprint."""
    return model_weight_hashes(lm.model, names)


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


def read_run_info(path: str | Path) -> tuple[dict[str, Any], Any]:
    """A run's adapter.json, its schema checked (:func:`~edgeadapt.format.run_dir.read_info`),
    and its adapter config (None for ``none``); an invalid config is an AdapterFormatError
    naming the file and the field."""
    info = read_info(path)
    if info["method"] == "none":
        return info, None
    try:
        config = config_from_dict({**info.get("config", {}), "method": info["method"]})
    except (ConfigError, TypeError, ValueError) as exc:
        raise AdapterFormatError(f"{Path(path) / INFO_FILE}: field 'config' is invalid: "
                                 f"{exc}") from exc
    return info, config


def _torch_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in read_tensors(path).items()}


def load_run(path: str | Path) -> tuple[LoadedModel, dict[str, Any]]:
    """Rebuild a run: its base model with the adapter attached and loaded, and the head.

    Returns ``(lm, info)`` with ``info`` = adapter.json plus ``"metrics"`` (metrics.json, if
    present). A run trained with ``--quant`` comes back on its quantized reference base
    (``quantize_reference_``, the adapted weights live), so ``extract`` gives its grid deltas.
    Raises AdapterFormatError on missing, corrupt or hand-edited files (naming the file and
    field) and FingerprintMismatchError when the base weights differ from (or lack)
    the ones the adapter was trained on.
    """
    path = Path(path)
    info, config = read_run_info(path)
    try:
        lm = load_model(info["model"], num_labels=info.get("num_labels") or 2,
                        seed=info.get("seed", 0))
    except UnknownNameError as exc:
        raise AdapterFormatError(f"{path / INFO_FILE}: field 'model': {exc}") from exc
    hashes = info["weight_sha256"]
    check_weight_hashes(path / INFO_FILE, hashes, model_weight_hashes(lm.model, hashes),
                        info["model"])
    if config is not None:
        state = _torch_tensors(path / ADAPTER_FILE)
        try:
            names = load_adapter_state(lm.model, config, state)
        except (ConfigError, AdapterFormatError) as exc:
            raise AdapterFormatError(f"{path / ADAPTER_FILE}: {exc}") from exc
        if set(names) != set(hashes):
            raise AdapterFormatError(
                f"{path / INFO_FILE}: field 'weight_sha256' must fingerprint exactly the adapted "
                f"weights; missing {sorted(set(names) - set(hashes))[:3]}, "
                f"extra {sorted(set(hashes) - set(names))[:3]}")
    if info.get("quant") is not None:  # trained on the quantized reference base
        try:
            quantize_reference_(lm, info["quant"], live=list(hashes))
        except ConfigError as exc:
            raise AdapterFormatError(f"{path / INFO_FILE}: field 'quant': {exc}") from exc
    if info.get("head"):
        head = head_parameters(lm)
        state = _torch_tensors(path / info["head"])
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
        info["metrics"] = read_json(path / METRICS_FILE)
    return lm, info


def excluded_positions(run_dir: str | Path, model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Module name -> sorted flat positions (int64) of the SHiRA adapter saved in ``run_dir``:
    what ``ShiraConfig(exclude=...)`` takes so that a new mask on ``model`` avoids them
    (non-overlapping masks; ``edgeadapt train --exclude-run``).

    The run is read through the same checks as :func:`load_run` (adapter.json schema, a valid
    safetensors file, in-range integer indices: AdapterFormatError). It must be a SHiRA run
    (ConfigError) trained on this base: its fingerprinted weights must exist in ``model`` with
    the same sha256 (FingerprintMismatchError).
    """
    run = Path(run_dir)
    if not (run / INFO_FILE).is_file() or not (run / ADAPTER_FILE).is_file():
        raise ConfigError(f"shira: exclude_run {str(run_dir)!r} is not a training run directory "
                          f"(needs {INFO_FILE} and {ADAPTER_FILE})")
    info = read_info(run)
    if info["method"] != "shira":
        raise ConfigError(f"shira: exclude_run {str(run_dir)!r} is a {info['method']!r} run, "
                          "not a SHiRA run")
    hashes = info["weight_sha256"]
    check_weight_hashes(f"shira: exclude_run {str(run_dir)!r}", hashes,
                        model_weight_hashes(model, hashes), info["model"])
    found = {}
    for name, idx in shira_indices(run, info).items():
        key = f"{name}{SHIRA_INDICES}"
        try:
            found[name] = checked_indices(key, torch.from_numpy(idx),
                                          model.get_submodule(name)).numpy()
        except AdapterFormatError as exc:
            raise AdapterFormatError(f"{run / ADAPTER_FILE}: {exc}") from exc
    return found
