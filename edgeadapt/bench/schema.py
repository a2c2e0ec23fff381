"""The JSON report of ``edgeadapt bench``: its schema, validation, and the target checks.

Required keys (other tools read them; everything else is an extension)::

    {"model": str, "device": str,
     "forward": [{"backend", "device", "variant", "batch", "seq", "p50_ms", "p90_ms", "p99_ms"}],
     "switch":  [{"backend", "device", "method", "mode", "p50_ms"}],
     "floor":   {"shira_switch_ms"}}

``backend`` is ``onnxruntime``, ``executorch`` or ``pytorch`` (the PEFT peers), ``device``
``cpu`` or ``cuda``; maps keyed by backend (``threads_by_backend``, ``live_form_by_backend``,
``floor.per_backend``, ``floor.measured_over_floor``) use ``backend:device``
(:mod:`edgeadapt.bench.backends`). The top-level ``device`` is the machine's CPU.

Extensions written by the benchmark: ``forward[].ratio_vs_base`` (median of per-round ratios
against ``base`` of the same backend and shape, interleaved), ``switch[].p90_ms``/``p99_ms``,
``switch[].ratio_vs_shira`` (median of per-round ratios against the live SHiRA switch timed in
the same rounds; absent from reports written before it existed), ``floor.*`` (bandwidth,
traffic), ``break_even``, ``memory``, ``parity``, ``skipped``, ``command``, ``targets_spec``.
The full description lives in docs/bench.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from edgeadapt.errors import ConfigError

VARIANTS = ("base", "shira-live", "shira-repack", "lora-fused", "lora-unfused", "sora-unfused",
            "sira-unfused", "ort-lora-adapter")
METHODS = ("shira", "lora-fuse", "reload", "peft-shira-merge", "peft-lora-merge", "ort-adapter")
BACKENDS = ("onnxruntime", "executorch", "pytorch")
DEVICES = ("cpu", "cuda")
MODES = ("live", "repack", "unfused", "merge")

_FORWARD = {"backend": str, "device": str, "variant": str, "batch": int, "seq": int,
            "p50_ms": float, "p90_ms": float, "p99_ms": float}
_SWITCH = {"backend": str, "device": str, "method": str, "mode": str, "p50_ms": float}


def check_row(row: Any, spec: Mapping[str, type], where: str) -> None:
    """ConfigError unless ``row`` is an object holding every key of ``spec`` with a value of
    its type (float: finite and >= 0; int: >= 1)."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected an object, got {type(row).__name__}")
    for key, typ in spec.items():
        if key not in row:
            raise ConfigError(f"{where}: missing key {key!r}")
        value = row[key]
        if typ is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and value >= 0.0
        elif typ is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        else:
            ok = isinstance(value, typ)
        if not ok:
            raise ConfigError(f"{where}: {key}={value!r} is not a valid {typ.__name__}")


def check_backend(row: Mapping, where: str, backends: tuple[str, ...] = BACKENDS) -> None:
    """ConfigError unless the row's ``backend`` is one of ``backends`` and its ``device`` one
    of :data:`DEVICES`."""
    if row["backend"] not in backends:
        raise ConfigError(f"{where}: unknown backend {row['backend']!r} (one of "
                          f"{', '.join(backends)}, the device apart)")
    if row["device"] not in DEVICES:
        raise ConfigError(f"{where}: unknown device {row['device']!r}")


def validate_report(report: Any) -> None:
    """Raise ConfigError unless ``report`` satisfies the JSON contract above (names of backends,
    variants, methods and modes included). A report of ``edgeadapt bench --generate`` has a
    ``generate`` section (:func:`edgeadapt.bench.generation.schema.validate_generate`) and
    needs no forward part."""
    if not isinstance(report, dict):
        raise ConfigError("a bench report is a JSON object")
    for key in ("model", "device"):
        if not isinstance(report.get(key), str):
            raise ConfigError(f"report: {key!r} must be a string")
    if "generate" in report:
        from edgeadapt.bench.generation.schema import validate_generate  # imports this module

        validate_generate(report["generate"])
        if "forward" not in report:
            return
    _validate_forward(report)


def _validate_forward(report: Mapping) -> None:
    for key in ("forward", "switch"):
        if not isinstance(report.get(key), list):
            raise ConfigError(f"report: {key!r} must be a list")
    for i, row in enumerate(report["forward"]):
        check_row(row, _FORWARD, f"forward[{i}]")
        check_backend(row, f"forward[{i}]")
        if row["variant"] not in VARIANTS:
            raise ConfigError(f"forward[{i}]: unknown variant {row['variant']!r}")
        if not row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]:
            raise ConfigError(f"forward[{i}]: percentiles must satisfy p50 <= p90 <= p99")
    for i, row in enumerate(report["switch"]):
        check_row(row, _SWITCH, f"switch[{i}]")
        check_backend(row, f"switch[{i}]")
        if row["method"] not in METHODS:
            raise ConfigError(f"switch[{i}]: unknown method {row['method']!r}")
        if row["mode"] not in MODES:
            raise ConfigError(f"switch[{i}]: unknown mode {row['mode']!r}")
    floor = report.get("floor")
    if not isinstance(floor, dict):
        raise ConfigError("report: 'floor' must be an object")
    check_row(floor, {"shira_switch_ms": float}, "floor")


def _forward(report: Mapping, backend: str, device: str, variant: str, batch: int, seq: int
             ) -> dict | None:
    for row in report["forward"]:
        if (row["backend"], row["device"], row["variant"], row["batch"], row["seq"]) == (
                backend, device, variant, batch, seq):
            return row
    return None


def _switch(report: Mapping, backend: str, device: str, method: str, mode: str | None = None
            ) -> dict | None:
    for row in report["switch"]:
        if (row["backend"], row["device"], row["method"]) == (backend, device, method) and (
                mode is None or row["mode"] == mode):
            return row
    return None


def forward_ratio(report: Mapping, backend: str, device: str, variant: str, batch: int,
                  seq: int) -> float:
    """variant / base forward time of one backend, device and shape: the row's
    ``ratio_vs_base`` (median of per-round ratios) when present, else the ratio of the two
    p50s."""
    row = _forward(report, backend, device, variant, batch, seq)
    base = _forward(report, backend, device, "base", batch, seq)
    if row is None or base is None:
        return float("nan")
    if "ratio_vs_base" in row:
        return float(row["ratio_vs_base"])
    return row["p50_ms"] / base["p50_ms"]


def switch_ratio(report: Mapping, backend: str, device: str, method: str) -> float:
    """method switch / live SHiRA switch of one backend and device: the row's
    ``ratio_vs_shira`` (median of per-round ratios against the SHiRA switch timed in the same
    rounds) when present, else (reports written before it existed) the ratio of the two
    p50s."""
    row = _switch(report, backend, device, method)
    shira = _switch(report, backend, device, "shira", "live")
    if row is None:
        return float("nan")
    if "ratio_vs_shira" in row:
        return float(row["ratio_vs_shira"])
    return row["p50_ms"] / shira["p50_ms"] if shira else float("nan")


def target_row(name: str, backend: str, device: str, value: float, op: str, threshold: float
               ) -> dict:
    """One target's row: ``value op threshold`` (op ``<=``, ``<`` or ``>=``) as ``pass`` /
    ``miss``, ``not measured`` for NaN."""
    if math.isnan(value):
        status = "not measured"
    else:
        ok = {"<=": value <= threshold, "<": value < threshold, ">=": value >= threshold}[op]
        status = "pass" if ok else "miss"
    return {"target": name, "backend": backend, "device": device, "value": value, "op": op,
            "threshold": threshold, "status": status}


def check_targets(report: Mapping) -> list[dict]:
    """The benchmark's targets, evaluated from a report; one row per (target, backend,
    device).

    - shira-live / base <= 1.02 at (batch, seq) = (1, 1), (1, 64), (8, 64);
    - lora-fuse switch / shira switch >= 10 (:func:`switch_ratio`); shira switch / floor
      <= 1.5 (the paired per-round ratio ``floor.measured_over_floor["backend:device"]`` where
      the report has it, else p50 / ``floor.shira_switch_ms``);
      reload / shira switch >= 200 (:func:`switch_ratio`; switches in live mode);
    - sira-unfused / base <= 1.3 at batch 1 on onnxruntime, cpu (every seq measured).
    - a ``generate`` section's targets (:func:`edgeadapt.bench.generation.schema.
      generate_targets`).
    Rows whose inputs are absent from the report come out ``not measured``.
    """
    rows: list[dict] = []
    if "generate" in report:
        from edgeadapt.bench.generation.schema import generate_targets  # imports this module

        rows.extend(generate_targets(report["generate"]))
    if "forward" not in report:
        return rows
    pairs = sorted({(r["backend"], r["device"]) for r in report["forward"]} |
                   {(r["backend"], r["device"]) for r in report["switch"]})
    for backend, device in pairs:
        if backend == "pytorch":
            continue
        for batch, seq in ((1, 1), (1, 64), (8, 64)):
            rows.append(target_row(f"shira-live/base {batch}x{seq}", backend, device,
                                   forward_ratio(report, backend, device, "shira-live", batch, seq),
                                   "<=", 1.02))
        shira = _switch(report, backend, device, "shira", "live")
        s = shira["p50_ms"] if shira else float("nan")
        rows.append(target_row("lora-fuse/shira switch", backend, device,
                               switch_ratio(report, backend, device, "lora-fuse"), ">=", 10.0))
        paired = report["floor"].get("measured_over_floor", {}).get(f"{backend}:{device}")
        floor = report["floor"]["shira_switch_ms"]
        rows.append(target_row("shira switch/floor", backend, device,
                               float(paired) if paired is not None
                               else (s / floor if floor > 0 else float("nan")), "<=", 1.5))
        rows.append(target_row("reload/shira switch", backend, device,
                               switch_ratio(report, backend, device, "reload"), ">=", 200.0))
        if (backend, device) == ("onnxruntime", "cpu"):
            seqs = sorted({r["seq"] for r in report["forward"]
                           if (r["backend"], r["device"], r["batch"]) == (backend, device, 1)})
            for seq in seqs:
                rows.append(target_row(f"sira-unfused/base 1x{seq}", backend, device,
                                       forward_ratio(report, backend, device, "sira-unfused", 1,
                                                     seq), "<=", 1.3))
    return rows
