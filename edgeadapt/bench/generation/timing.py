"""Time to first token and decode steps of every case, all interleaved in the same rounds
(:func:`edgeadapt.timer.time_interleaved`), so every ratio comes from one run.

- first token: per prompt length, each call a fresh request (prefill + the first token);
  ``prefill_tok_s`` = prompt tokens / p50.
- decode: per context length, every case first reads a prompt of that length (untimed); each
  call is then one decode step of it. ``tok_s`` = 1000 / p50 (ms).

Cases are keyed ``(backend:device, case)``. A row's ``ratio_vs_base`` (p10, p90) is the median
over rounds of its time over its own backend's ``base`` in the same round; :func:`cross_ratios`
compares each peer with each edgeadapt backend's counterpart the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from edgeadapt.bench.backends import Target
from edgeadapt.bench.generation.decoding import DecodeCase
from edgeadapt.bench.timing import Ratio, Stats
from edgeadapt.timer import time_interleaved

Key = tuple[Target, str]  # (backend on a device, case)

#: a peer's case -> edgeadapt's case it is compared with
COUNTERPART = {"base": "base", "lora-adapter": "shira-fused", "peft-lora": "shira-fused"}


def _name(key: Key) -> str:
    return f"{key[0].key} {key[1]}"


def _rows(samples: dict[str, list[float]], keys: list[Key], field: str, size: int
          ) -> list[dict]:
    rows = []
    for key in keys:
        row = {**key[0].fields(), "case": key[1], field: size,
               **Stats.of(samples[_name(key)]).as_dict()}
        base = _name((key[0], "base"))
        if base in samples and key[1] != "base":
            r = Ratio.of(samples, _name(key), base)
            row.update(ratio_vs_base=r.paired_median, ratio_vs_base_p10=r.paired_p10,
                       ratio_vs_base_p90=r.paired_p90)
        rows.append(row)
    return rows


def cross_ratios(samples: dict[str, list[float]], ours: list[Target], peers: list[Key],
                 field: str, size: int) -> list[dict]:
    """Each peer case over its counterpart (:data:`COUNTERPART`) on each of ``ours``, paired
    per round: > 1 where edgeadapt is faster."""
    out = []
    for target in ours:
        for peer in peers:
            den = (target, COUNTERPART[peer[1]])
            if _name(den) not in samples:
                continue
            r = Ratio.of(samples, _name(peer), _name(den))
            out.append({"what": field, field: size, "num_backend": peer[0].backend,
                        "num_case": peer[1], "den_backend": target.backend,
                        "den_device": target.device, "den_case": den[1],
                        "paired_median": r.paired_median, "paired_p10": r.paired_p10,
                        "paired_p90": r.paired_p90})
    return out


def time_first_tokens(cases: Mapping[Key, DecodeCase], prompts: Mapping[int, np.ndarray], *,
                      repeats: int, warmup: int,
                      progress: Callable[[int], object] | None = None
                      ) -> tuple[list[dict], dict[int, dict[str, list[float]]]]:
    """The first-token rows of every case and prompt length, and the samples (ms) per
    prompt length."""
    rows, raw = [], {}
    for size, prompt in prompts.items():
        samples = time_interleaved(
            {_name(k): (lambda c=c, p=prompt: c.first_token(p)) for k, c in cases.items()},
            repeats=repeats, warmup=warmup, progress=progress)
        for row in _rows(samples, list(cases), "prompt_tokens", size):
            row["prefill_tok_s"] = size / (row["p50_ms"] / 1000.0)
            rows.append(row)
        raw[size] = samples
    return rows, raw


def time_decode(cases: Mapping[Key, DecodeCase], prompts: Mapping[int, np.ndarray], *,
                steps: int, warmup: int, progress: Callable[[int], object] | None = None
                ) -> tuple[list[dict], dict[int, dict[str, list[float]]]]:
    """The decode rows of every case and context (a prompt of ``context`` tokens read first),
    and the samples (ms) per context."""
    rows, raw = [], {}
    for size, prompt in prompts.items():
        series = {_name(k): c.decoder_at(prompt, warmup + steps) for k, c in cases.items()}
        samples = time_interleaved(series, repeats=steps, warmup=warmup, progress=progress)
        del series
        for row in _rows(samples, list(cases), "context", size):
            row["tok_s"] = 1000.0 / row["p50_ms"]
            rows.append(row)
        raw[size] = samples
    return rows, raw
