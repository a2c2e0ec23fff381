"""The ``auto`` mode policy: live or repack, from the workload and how the bundle reads its live
weights (torch-free).

Live mode edits the weights where the kernels read them (a switch in milliseconds, every forward
reading unpacked weights); repack rebuilds so every weight is packed (a rebuild per switch,
0.5-1.7 s on SmolLM2). :func:`choose_mode` repacks when ``runs_per_switch`` reaches the
threshold for (backend, live form) and the batch's class. The thresholds live in
``runtime/policy.json`` (each row with its source), which the bench rewrites
(:func:`write_thresholds`; ``edgeadapt bench --write-policy``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from edgeadapt.errors import ConfigError
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime.backends import Backend, get_backend

#: the thresholds shipped with the package (package data)
POLICY_FILE = Path(__file__).with_name("policy.json")

Thresholds = dict[tuple[str, str], dict[int, float]]


def read_thresholds(path: str | Path = POLICY_FILE) -> Thresholds:
    """{(backend, live form): {batch class: runs per switch}} from a policy file (null: never,
    read as ``math.inf``); ConfigError naming the file where it does not parse."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())["rows"]
        table = {(str(r["backend"]), str(r["live_form"])):
                 {int(b): math.inf if v is None else float(v)
                  for b, v in r["runs_per_switch"].items()}
                 for r in rows}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a readable auto-policy file ({exc!r})") from exc
    return table


#: {(backend, live form): {batch class: runs per switch from which ``auto`` repacks}}, from
#: :data:`POLICY_FILE` (rows and their sources: runtime/policy.json)
REPACK_RUNS_PER_SWITCH: Thresholds = read_thresholds()


def write_thresholds(path: str | Path, table: Mapping[tuple[str, str], Mapping[int, float]],
                     source: str) -> Path:
    """Write ``table`` ({(backend, live form): {batch class: runs per switch}}; ``math.inf``:
    never) into the policy file ``path``, each row with ``source`` (which run measured it).
    Rows of other (backend, live form) pairs are kept: those of ``path`` if it exists, else
    the shipped ones. Atomic (a reader sees the old file or the new one). Writing
    :data:`POLICY_FILE` also updates :data:`REPACK_RUNS_PER_SWITCH` in this process.
    ConfigError for a class below 1 or a threshold that is not a positive number."""
    path = Path(path)
    doc = json.loads((path if path.is_file() else POLICY_FILE).read_text())
    rows = {(r["backend"], r["live_form"]): r for r in doc["rows"]}
    for (backend, form), row in table.items():
        if not row or any(int(b) < 1 or not float(v) > 0 for b, v in row.items()):
            raise ConfigError(f"write_thresholds: ({backend!r}, {form!r}) needs batch classes "
                              f">= 1 with positive runs per switch; got {dict(row)}")
        rows[(backend, form)] = {
            "backend": backend, "live_form": form,
            "runs_per_switch": {str(int(b)): None if math.isinf(v) else float(v)
                                for b, v in sorted(row.items())},
            "source": source}
    doc["rows"] = list(rows.values())
    atomic_write_bytes(path, [(json.dumps(doc, indent=2) + "\n").encode()])
    if path.resolve() == POLICY_FILE.resolve():
        REPACK_RUNS_PER_SWITCH.clear()
        REPACK_RUNS_PER_SWITCH.update(read_thresholds(path))
    return path


def live_form(manifest: Manifest, backend: str) -> str:
    """How the bundle's base graph reads its live weights on ``backend`` without edgeadapt's
    kernel, the key of :data:`REPACK_RUNS_PER_SWITCH` (the backend's
    :meth:`~edgeadapt.runtime.backends.Backend.live_form`)."""
    return get_backend(backend).live_form(manifest, kernel=False)


def choose_mode(runs_per_switch: float | None, batch: int | None,
                backend: str = "onnxruntime", form: str | None = None) -> tuple[str, str]:
    """The ``auto`` policy: (mode, reason).

    Repack when ``runs_per_switch`` reaches the threshold of (``backend``, ``form``) for the
    batch's class (:data:`REPACK_RUNS_PER_SWITCH`): a rebuild per switch against what the live
    weights cost each forward in that form (ONNX Runtime own-kernel: 0.98x at one token,
    1.003-1.006x at 8x64; blocked32: 0.98x / 1.006x; transposed: 1.07x / 1.00x; ExecuTorch
    own-kernel: 0.98-0.99x / 1.00-1.01x; weight-left: 1.06-1.08x / <= 1.0x; linear: 1.11x /
    1.005x). ``form`` None: the backend's ``default_live_form``. Without a workload: live.
    """
    if runs_per_switch is None or batch is None:
        return "live", "auto: no workload given (runs_per_switch, batch); live is never stale " \
                       "and switches in milliseconds"
    if form is None:
        form = get_backend(backend).default_live_form
    row = REPACK_RUNS_PER_SWITCH.get((backend, form))
    if row is None:
        raise ConfigError(f"no auto policy for backend {backend!r} with live form {form!r}: "
                          f"known {sorted(REPACK_RUNS_PER_SWITCH)}; pass mode='live' or 'repack'")
    threshold = row[max((c for c in row if c <= batch), default=min(row))]
    where = f"{backend} ({form} live weights)"
    if runs_per_switch >= threshold:
        return "repack", (f"auto: {runs_per_switch:g} runs per switch at batch {batch} >= "
                          f"{threshold:g} on {where} (2x the measured break-even): packed "
                          "weights repay the rebuild")
    return "live", (f"auto: {runs_per_switch:g} runs per switch at batch {batch} < "
                    f"{threshold:g} on {where}: a rebuild per switch would cost more than "
                    "the live weights")


def auto_mode(backend: Backend, manifest: Manifest, device: str, form: str,
              runs_per_switch: float | None, batch: int | None) -> tuple[str, str]:
    """``load(mode="auto")``: (mode, reason). Live off the CPU (device kernels read raw
    weights: nothing to repack); else :func:`choose_mode` for the bundle's live ``form``, and
    repack where live mode cannot run here (the backend's ``live_blocker``, e.g. an ExecuTorch
    own-kernel program where the kernel cannot be built)."""
    if device != "cpu":
        return "live", f"auto: {device.upper()} kernels read raw weights"
    mode, reason = choose_mode(runs_per_switch, batch, backend.name, form)
    if mode == "live":
        blocker = backend.live_blocker(manifest)
        if blocker is not None:
            return "repack", f"auto: {blocker}"
    return mode, reason
