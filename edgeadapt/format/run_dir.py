"""The training-run directory (``runs/<x>/``): its file names, readers and checks.

Spec: docs/format.md, "Training-run directory". Torch-free (safetensors.numpy): the trainer
writes a run with ``edgeadapt.train.save_run`` and rebuilds it with ``edgeadapt.train.load_run``;
both, and the SHiRA ``--exclude-run`` reader, go through the checks here. Every problem with a
file is an AdapterFormatError naming the file (and the field); a base model that is not the
one the adapter was trained on is a FingerprintMismatchError.

- ``adapter.safetensors``: the raw adapter tensors, ``<module>.<tensor>`` (empty for ``none``).
- ``head.safetensors``: a classifier's trained head (``classifier.*``), when there is one.
- ``adapter.json``: what the run is (:func:`read_info` lists and checks the fields).
- ``metrics.json``: what training measured (see ``edgeadapt.train.trainer.train``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load

from edgeadapt.errors import AdapterFormatError, FingerprintMismatchError
from edgeadapt.format.container import atomic_write_bytes, read_json_object
from edgeadapt.format.types import METHODS

ADAPTER_FILE, HEAD_FILE, INFO_FILE, METRICS_FILE = (
    "adapter.safetensors", "head.safetensors", "adapter.json", "metrics.json")
#: adapter.json ``method``: an adapter method, or ``none`` (frozen base, head only).
RUN_METHODS = (*METHODS, "none")
#: suffix of a SHiRA layer's flat mask positions in adapter.safetensors.
SHIRA_INDICES = ".shira_indices"


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    atomic_write_bytes(path, [(json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()])


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (:func:`~edgeadapt.format.container.read_json_object`)."""
    return read_json_object(path, "not a training run directory")


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (name -> writable numpy array)."""
    try:
        return st_load(path.read_bytes())
    except FileNotFoundError:
        raise AdapterFormatError(f"{path} is missing: not a complete training run") from None
    except Exception as exc:  # safetensors raises its own error types on corrupt headers
        raise AdapterFormatError(f"{path} is not a valid safetensors file: {exc}") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_info(run: str | Path) -> dict[str, Any]:
    """A run's adapter.json, its schema checked.

    Raises AdapterFormatError naming the file and the field when a field has the wrong type or
    value: method (one of RUN_METHODS), model (a non-empty string), weight_sha256 (object:
    weight name -> hex string), seed (integer), num_labels (integer >= 1 or null), head (null
    or a file name in the run), task (string or null), config (an object; its ``method``, if
    given, the run's). Whether ``config`` is a valid config of its method is checked where the
    configs live (``edgeadapt.train.run.read_run_info``).
    """
    file = Path(run) / INFO_FILE
    info = read_json(file)

    def bad(field: str, want: str) -> AdapterFormatError:
        got = repr(info[field]) if field in info else "nothing (the field is missing)"
        return AdapterFormatError(f"{file}: field {field!r} must be {want}, got {got}")

    if info.get("method") not in RUN_METHODS:
        raise bad("method", f"one of {', '.join(RUN_METHODS)}")
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
    if info["method"] != "none" and cfg.get("method", info["method"]) != info["method"]:
        raise AdapterFormatError(f"{file}: field 'config' is a {cfg.get('method')!r} config "
                                 f"but the run's method is {info['method']!r}")
    return info


def check_weight_hashes(source: str | Path, expected: dict[str, str], actual: dict[str, str],
                        model_name: str) -> None:
    """Raise FingerprintMismatchError naming ``source`` unless every weight in ``expected``
    (a run's ``weight_sha256``) is in ``actual`` with the same sha256.

    actual: weight name -> ``edgeadapt.format.weight_sha256`` (fp32, (out, in)) of the base
    model's weights, for those names of ``expected`` the model has; a name it lacks is a weight
    the model does not have. model_name: the run's ``model`` field, for the message.
    """
    unknown = sorted(n for n in expected if n not in actual)
    if unknown:
        raise FingerprintMismatchError(
            f"{source}: base weight(s) {', '.join(unknown[:3])}"
            f"{f' (+{len(unknown) - 3} more)' if len(unknown) > 3 else ''} are not in this "
            f"base model (the run names model {model_name!r}): the adapter was trained on "
            "another base model")
    for name, want in expected.items():
        if actual[name] != want:
            raise FingerprintMismatchError(
                f"{source}: base weight {name} differs from the one the adapter was trained on "
                f"(model {model_name!r}); use the same base model")


def shira_indices(run: str | Path, info: dict[str, Any]) -> dict[str, np.ndarray]:
    """Module name -> the stored flat mask positions (``<module>.shira_indices``, as stored:
    their dtype and values are checked against the weight by the caller) of the SHiRA run in
    ``run`` whose adapter.json is ``info`` (from :func:`read_info`).

    Raises AdapterFormatError unless adapter.safetensors is valid and holds indices for exactly
    the modules whose weights adapter.json fingerprints.
    """
    file = Path(run) / ADAPTER_FILE
    state = read_tensors(file)
    stored = {k[:-len(SHIRA_INDICES)] for k in state if k.endswith(SHIRA_INDICES)}
    modules = {w.removesuffix(".weight") for w in info["weight_sha256"]}
    if stored != modules:
        raise AdapterFormatError(
            f"{file}: its SHiRA modules do not match the weights fingerprinted "
            f"in {INFO_FILE}: missing {sorted(modules - stored)[:3]}, "
            f"extra {sorted(stored - modules)[:3]}")
    return {name: state[f"{name}{SHIRA_INDICES}"] for name in sorted(modules)}
