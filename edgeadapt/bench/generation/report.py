"""Presenting a report's ``generate`` section: its lines of the terminal table (:func:`lines`)
and its plot's two panels (:func:`draw`); :mod:`edgeadapt.bench.report` calls both."""

from __future__ import annotations

import math

from edgeadapt.bench.report import FEW_SAMPLES, fmt_num, p99_cell, where

_HEAD = (f"{'backend':<26}{'case':<14}{'{size}':>8}{'n':>6}{'p50 ms':>10}{'p90 ms':>10}"
         f"{'p99 ms':>11}{'tok/s':>9}{'x base':>8}")


def _timed(rows: list[dict], size: str, rate: str) -> list[str]:
    out = [_HEAD.replace("{size}", size)]
    for r in rows:
        out.append(f"{where(r):<26}{r['case']:<14}{r[size]:>8}{r['n']:>6}"
                   f"{fmt_num(r['p50_ms'], 2):>10}{fmt_num(r['p90_ms'], 2):>10}{p99_cell(r):>11}"
                   f"{fmt_num(r[rate], 1):>9}{fmt_num(r.get('ratio_vs_base')):>8}")
    return out


def lines(section: dict) -> list[str]:
    """First-token and decode rows, the peers against edgeadapt, the switch between requests
    and under load."""
    out = ["", "time to first token (tok/s: prompt tokens / p50)"]
    out += _timed(section["first_token"], "prompt_tokens", "prefill_tok_s")
    out += ["", f"decode steps at a context (interleaved, {section.get('decode_steps')} "
                "per case)"]
    out += _timed(section["decode"], "context", "tok_s")
    timed = section["first_token"] + section["decode"]
    if any(r["n"] < FEW_SAMPLES for r in timed):
        out.append(f"* p99 from n < {FEW_SAMPLES} samples: at or next to the largest sample")
    if section["ratios"]:
        out += ["", "peers / edgeadapt (median of per-round ratios; > 1: edgeadapt faster)"]
    for r in section["ratios"]:
        out.append(f"  {r['what']} {r[r['what']]:>5}: {r['num_backend']} {r['num_case']} / "
                   f"{r['den_backend']}:{r['den_device']} {r['den_case']} = "
                   f"{fmt_num(r['paired_median'])} (p10 {fmt_num(r.get('paired_p10'))}, "
                   f"p90 {fmt_num(r.get('paired_p90'))})")
    for r in section["switch"]:
        out += ["", f"switch between requests {where(r)} ({' <-> '.join(r['adapters'])}): "
                    f"p50 {fmt_num(r['p50_ms'], 3)} ms, p90 {fmt_num(r['p90_ms'], 3)}, "
                    f"p99 {p99_cell(r).strip()} ms (n {r['n']}); a {r['answer_tokens']}-token "
                    f"answer p50 {fmt_num(r['answer_p50_ms'], 1)} ms; switch / answer "
                    f"{r['ratio_vs_answer']:.2e} (p90 {r['ratio_vs_answer_p90']:.2e})"]
    for r in section["load"]:
        out += [f"switch under load {where(r)} ({r['decoding_threads']} threads decoding, "
                f"a switch every {r['interval_ms']:g} ms): p50 {fmt_num(r['p50_ms'], 3)} ms, "
                f"p90 {fmt_num(r['p90_ms'], 3)}, p99 {p99_cell(r).strip()} ms (n {r['n']}; "
                f"waiting for the runs p50 {fmt_num(r['wait_p50_ms'], 3)}, p99 "
                f"{fmt_num(r['wait_p99_ms'], 3)}; holding them off p50 "
                f"{fmt_num(r['held_p50_ms'], 3)}, p99 {fmt_num(r['held_p99_ms'], 3)}); decode "
                f"meanwhile p50 {fmt_num(r['decode_p50_ms'], 2)}, p90 "
                f"{fmt_num(r['decode_p90_ms'], 2)} ms/token (n {r['decode_n']}), "
                f"{r['reprefills']} re-prefills"]
    policy = section.get("peers", {}).get("pytorch", {}).get("omp_wait_policy", "PASSIVE")
    if (policy or "").upper() != "PASSIVE":
        out.append("note: OMP_WAIT_POLICY was not PASSIVE: torch's OpenMP threads spin after "
                   "each step of the pytorch peer and slow the case timed after it (start the "
                   "command with OMP_WAIT_POLICY=PASSIVE)")
    checks = section.get("parity", [])
    if checks:
        out.append(f"parity: {len(checks)} checks passed (greedy tokens vs transformers, "
                   "switch and restore, bit-exact weights)")
    return out


def draw(fig, axes, report: dict) -> None:
    """Left: decode ms per token per case and context (every backend and peer); right: the
    switch's wall time between requests and under load (p50 and p99, log scale) with the
    5 ms target and 1% of an answer as lines."""
    section = report["generate"]
    ax1, ax2 = axes
    keys = list(dict.fromkeys(f"{where(r)}\n{r['case']}" for r in section["decode"]))
    contexts = sorted({r["context"] for r in section["decode"]})
    width = 0.8 / max(len(contexts), 1)
    for i, ctx in enumerate(contexts):
        vals = {f"{where(r)}\n{r['case']}": r["p50_ms"] for r in section["decode"]
                if r["context"] == ctx}
        ax1.bar([j + i * width for j in range(len(keys))], [vals.get(k, math.nan) for k in keys],
                width, label=f"context {ctx}")
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, rotation=45,
                   ha="right", fontsize=7)
    ax1.set_yscale("log")
    ax1.set_ylabel("decode ms per token (p50, log)")
    ax1.set_title("Decode step per case (interleaved)")
    ax1.legend(fontsize=7)
    rows = section["switch"] + section["load"]
    labels = [f"{where(r)}\n{r['method']}" for r in rows]
    ys = range(len(rows))
    ax2.barh([y - 0.2 for y in ys], [r["p50_ms"] for r in rows], 0.4, label="p50")
    ax2.barh([y + 0.2 for y in ys], [r["p99_ms"] for r in rows], 0.4, label="p99")
    ax2.axvline(5.0, color="red", ls="--", label="target under load: p99 < 5 ms")
    for r in section["switch"]:
        ax2.axvline(0.01 * r["answer_p50_ms"], color="green", ls=":",
                    label=f"1% of a {r['answer_tokens']}-token answer")
    ax2.set_yticks(list(ys), labels, fontsize=7)
    ax2.set_xscale("log")
    ax2.set_xlabel("switch wall time (ms, log)")
    ax2.set_title("Switch between requests and while two threads decode")
    ax2.legend(fontsize=7)
    fig.suptitle(f"edgeadapt bench --generate: {report['model']} "
                 f"({report.get('targets_spec', '')}) on {report['device']}, "
                 f"{report.get('threads')} threads", fontsize=9)
