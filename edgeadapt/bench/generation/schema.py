"""The ``generate`` section of a bench report (``edgeadapt bench --generate``): its validation
and its targets. docs/bench.md ("Generation") describes every field.

Required::

    "generate": {
      "first_token": [{"backend", "device", "case", "prompt_tokens", "p50_ms", "p90_ms",
                       "p99_ms", "n", "prefill_tok_s"}],
      "decode":      [{"backend", "device", "case", "context", "p50_ms", "p90_ms", "p99_ms",
                       "n", "tok_s"}],
      "switch":      [{"backend", "device", "method", "p50_ms", "p99_ms", "n",
                       "answer_p50_ms", "ratio_vs_answer"}],
      "load":        [{"backend", "device", "method", "p50_ms", "p99_ms", "n"}],
      "ratios":      [{"what", "num_backend", "num_case", "den_backend", "den_device",
                       "den_case", "paired_median"}]}

``backend`` is an edgeadapt backend, ``onnxruntime-genai`` or ``pytorch`` (transformers);
``case`` one of :data:`CASES`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from edgeadapt.bench.schema import BACKENDS, check_backend, check_row, target_row
from edgeadapt.errors import ConfigError

GENERATE_BACKENDS = (*BACKENDS, "onnxruntime-genai")
#: edgeadapt's cases, then the peers'
CASES = ("base", "shira-fused", "lora-fused", "lora-unfused", "sira-unfused", "lora-adapter",
         "peft-lora")
PEERS = ("onnxruntime-genai", "pytorch")
SWITCH_METHODS = ("between-requests", "under-load")

_TIMED = {"backend": str, "device": str, "case": str, "p50_ms": float, "p90_ms": float,
          "p99_ms": float, "n": int}
_ROWS = {
    "first_token": {**_TIMED, "prompt_tokens": int, "prefill_tok_s": float},
    "decode": {**_TIMED, "context": int, "tok_s": float},
    "switch": {"backend": str, "device": str, "method": str, "p50_ms": float, "p99_ms": float,
               "n": int, "answer_p50_ms": float, "ratio_vs_answer": float},
    "load": {"backend": str, "device": str, "method": str, "p50_ms": float, "p99_ms": float,
             "n": int},
    "ratios": {"what": str, "num_backend": str, "num_case": str, "den_backend": str,
               "den_device": str, "den_case": str, "paired_median": float},
}

#: the issue's thresholds
DECODE_RATIO_MAX = 1.02      # shira-fused / base decode, each context
SWITCH_SHARE_MAX = 0.01      # switch between requests / a reply_tokens-token answer
LOAD_P99_MAX_MS = 5.0        # switch p99 while two threads decode


def validate_generate(section: Any) -> None:
    """ConfigError unless ``section`` is a valid ``generate`` section (module docstring):
    every list present, every row with its keys and types, known backends, cases and
    methods, percentiles in order."""
    if not isinstance(section, dict):
        raise ConfigError("report: 'generate' must be an object")
    for key, spec in _ROWS.items():
        rows = section.get(key)
        if not isinstance(rows, list):
            raise ConfigError(f"generate: {key!r} must be a list")
        for i, row in enumerate(rows):
            where = f"generate.{key}[{i}]"
            check_row(row, spec, where)
            if key == "ratios":
                continue
            check_backend(row, where, GENERATE_BACKENDS)
            if "case" in spec and row["case"] not in CASES:
                raise ConfigError(f"{where}: unknown case {row['case']!r}")
            if "method" in spec and row["method"] not in SWITCH_METHODS:
                raise ConfigError(f"{where}: unknown method {row['method']!r}")
            if not row["p50_ms"] <= row.get("p90_ms", row["p50_ms"]) <= row["p99_ms"]:
                raise ConfigError(f"{where}: percentiles must satisfy p50 <= p90 <= p99")


def _decode(section: Mapping, backend: str, device: str, case: str, context: int
            ) -> dict | None:
    return next((r for r in section["decode"] if (r["backend"], r["device"], r["case"],
                                                   r["context"]) == (backend, device, case,
                                                                     context)), None)


def _ratio(section: Mapping, backend: str, device: str, num: tuple[str, str], den_case: str,
           context: int) -> float:
    row = next((r for r in section["ratios"] if r["what"] == "context"
                and r.get("context") == context and (r["num_backend"], r["num_case"]) == num
                and (r["den_backend"], r["den_device"], r["den_case"]) == (backend, device,
                                                                             den_case)), None)
    return float(row["paired_median"]) if row else math.nan


def generate_targets(section: Mapping) -> list[dict]:
    """The generation targets per edgeadapt backend (one row each, as
    :func:`edgeadapt.bench.schema.check_targets`'s):

    - shira-fused / base decode <= 1.02 at every context (``ratio_vs_base``);
    - genai base / base decode >= 1 at every context: edgeadapt's base decodes at least as many
      tokens per second as onnxruntime-genai's (paired ratio of step times);
    - genai LoRA / shira-fused decode >= genai LoRA / genai base: edgeadapt's adapter-active
      decode ahead of genai's LoRA decode by at least genai's own LoRA penalty;
    - switch between requests / answer <= 0.01 (``ratio_vs_answer``);
    - switch p99 while two threads decode < 5 ms.
    """
    rows: list[dict] = []
    ours = sorted({(r["backend"], r["device"]) for r in section["decode"]
                   if r["backend"] not in PEERS})
    contexts = sorted({r["context"] for r in section["decode"]})
    for backend, device in ours:
        for ctx in contexts:
            fused = _decode(section, backend, device, "shira-fused", ctx)
            rows.append(target_row(f"shira-fused/base decode @{ctx}", backend, device,
                                   float(fused.get("ratio_vs_base", math.nan)) if fused
                                   else math.nan, "<=", DECODE_RATIO_MAX))
            rows.append(target_row(f"genai base/base decode @{ctx}", backend, device,
                                   _ratio(section, backend, device,
                                          ("onnxruntime-genai", "base"), "base", ctx),
                                   ">=", 1.0))
            penalty = _decode(section, "onnxruntime-genai", "cpu", "lora-adapter", ctx)
            penalty = float(penalty.get("ratio_vs_base", math.nan)) if penalty else math.nan
            rows.append(target_row(f"genai lora/shira-fused decode @{ctx}", backend, device,
                                   _ratio(section, backend, device,
                                          ("onnxruntime-genai", "lora-adapter"),
                                          "shira-fused", ctx),
                                   ">=", penalty if not math.isnan(penalty) else math.inf))
        switch = next((r for r in section["switch"]
                       if (r["backend"], r["device"]) == (backend, device)), None)
        rows.append(target_row("switch/answer between requests", backend, device,
                               float(switch["ratio_vs_answer"]) if switch else math.nan, "<=",
                               SWITCH_SHARE_MAX))
        load = next((r for r in section["load"]
                     if (r["backend"], r["device"]) == (backend, device)), None)
        rows.append(target_row("switch p99 under load (ms)", backend, device,
                               float(load["p99_ms"]) if load else math.nan, "<",
                               LOAD_P99_MAX_MS))
    return rows
