"""Presenting a bench report: the terminal table, the JSON file, the PNG plot."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from edgeadapt.bench.schema import check_targets, validate_report
from edgeadapt.format.container import atomic_write_bytes


def fmt_num(x: float | None, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals (none from 1000 on); ``-`` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:.0f}"


FEW_SAMPLES = 100  # below this many samples, p99 is (close to) the largest sample


def p99_cell(row: dict) -> str:
    """p99 with a ``*`` where fewer than FEW_SAMPLES samples back it (legend under the table)."""
    n = row.get("n")
    return fmt_num(row["p99_ms"]) + ("*" if n is not None and n < FEW_SAMPLES else " ")


def where(row: dict) -> str:
    """``backend:device`` of a row (:attr:`edgeadapt.bench.backends.Target.key`)."""
    return f"{row['backend']}:{row['device']}"


def table(report: dict) -> str:
    """Forward rows (n, p50 / p90 / p99, ratio to base), switch rows, floor, the generation
    rows where the report has them (:func:`edgeadapt.bench.generation.report.lines`), targets,
    skipped. A p99 from fewer than 100 samples is marked ``*``."""
    forms = ", ".join(f"{b} {f}" for b, f in report.get("live_form_by_backend", {}).items())
    lines = [f"model {report['model']} on {report['device']}"
             + (f", {report['sessions']} sessions per variant" if report.get("sessions", 1) > 1
                else "") + (f"; live weights read as: {forms}" if forms else "")]
    if "forward" in report:
        lines += _forward_lines(report)
    if "generate" in report:
        from edgeadapt.bench.generation.report import lines as generate_lines

        lines += generate_lines(report["generate"])
    lines += ["", "targets:"]
    for t in check_targets(report):
        lines.append(f"  {t['status']:<13}{where(t):<18}{t['target']:<38}"
                     f"{fmt_num(t['value'])} {t['op']} {t['threshold']:g}")
    for s in report.get("skipped", []):
        lines.append(f"skipped: {where(s)} {s['what']}: {s['reason']}")
    return "\n".join(lines)


def _forward_lines(report: dict) -> list[str]:
    lines = ["", f"{'backend':<18}{'variant':<18}{'BxS':>7}{'n':>6}{'p50 ms':>10}{'p90 ms':>10}"
             f"{'p99 ms':>11}{'x base':>8}"]
    for r in report["forward"]:
        lines.append(f"{where(r):<18}{r['variant']:<18}{r['batch']:>3}x{r['seq']:<3}"
                     f"{r.get('n', '?'):>6}{fmt_num(r['p50_ms']):>10}{fmt_num(r['p90_ms']):>10}"
                     f"{p99_cell(r):>11}{fmt_num(r.get('ratio_vs_base')):>8}")
    lines += ["", f"{'backend':<18}{'switch':<18}{'mode':<9}{'n':>6}{'p50 ms':>10}"
              f"{'p90 ms':>10}{'p99 ms':>11}{'x shira':>9}"]
    for r in report["switch"]:
        lines.append(f"{where(r):<18}{r['method']:<18}{r['mode']:<9}{r.get('n', '?'):>6}"
                     f"{fmt_num(r['p50_ms'], 4):>10}{fmt_num(r.get('p90_ms'), 4):>10}"
                     f"{p99_cell(r) if 'p99_ms' in r else '-':>11}"
                     f"{fmt_num(r.get('ratio_vs_shira')):>9}")
    if any(r.get("n", FEW_SAMPLES) < FEW_SAMPLES for r in report["forward"] + report["switch"]):
        lines.append(f"* p99 from n < {FEW_SAMPLES} samples: at or next to the largest sample")
    fl = report["floor"]
    lines += ["", f"SHiRA switch floor {fmt_num(fl['shira_switch_ms'], 4)} ms "
              f"({fl.get('total_bytes', '?')} bytes at "
              f"{fmt_num(fl.get('bandwidth_GBps'), 1)} GB/s)"]
    for be, r in fl.get("per_backend", {}).items():
        lines.append(f"  {be}: switch / floor {fmt_num(r['measured_over_floor'], 2)} (paired, "
                     f"{fmt_num(r['bandwidth_GBps'], 1)} GB/s median copy); "
                     f"{fmt_num(r['measured_over_floor_peak'], 2)} against the peak copy "
                     f"({fmt_num(r['bandwidth_GBps_peak'], 1)} GB/s)")
    for r in report.get("break_even", []):
        v = r["runs_per_switch"]
        lines.append(f"live vs repack break-even {where(r)} {r['batch']}x{r['seq']}: "
                      + ("repack never wins" if r.get("repack_never_wins") else
                         f"{fmt_num(v, 0)} runs per switch"))
    return lines


def write_json(path: str | os.PathLike, report: dict) -> Path:
    """Validate and write the report atomically (indent 1, no NaN)."""
    validate_report(report)
    out = Path(path)
    text = json.dumps(report, indent=1, allow_nan=False, default=float) + "\n"
    atomic_write_bytes(out, [text.encode()])
    return out


def plot(path: str | os.PathLike, report: dict) -> Path:
    """Two panels: forward time relative to base per variant and shape (one group per backend),
    and switch time per method (log scale) with the floor as a line; for a generation report
    (no forward rows), :func:`edgeadapt.bench.generation.report.draw`'s. Written
    atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    if "forward" not in report:
        from edgeadapt.bench.generation.report import draw

        draw(fig, (ax1, ax2), report)
        return _save(fig, plt, path)
    shapes = sorted({(where(r), r["batch"], r["seq"]) for r in report["forward"]})
    variants = [v for v in dict.fromkeys(r["variant"] for r in report["forward"])
                if v != "base"]
    width = 0.8 / max(len(shapes), 1)
    for i, (backend, b, s) in enumerate(shapes):
        vals = []
        for v in variants:
            row = next((r for r in report["forward"] if (where(r), r["variant"], r["batch"],
                        r["seq"]) == (backend, v, b, s)), None)
            vals.append(row.get("ratio_vs_base", math.nan) if row else math.nan)
        ax1.bar([j + i * width for j in range(len(variants))], vals, width,
                label=f"{backend} {b}x{s}")
    ax1.axhline(1.0, color="black", lw=0.8)
    ax1.axhline(1.02, color="green", lw=0.8, ls="--", label="target 1.02 (shira-live)")
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(variants))], variants, rotation=30,
                   ha="right")
    ax1.set_ylabel("forward time / base (median of paired ratios)")
    ax1.set_title("Forward latency relative to the packed base")
    ax1.legend(fontsize=7)
    rows = report["switch"]
    labels = [f"{where(r)}\n{r['method']} ({r['mode']})" for r in rows]
    ax2.barh(range(len(rows)), [r["p50_ms"] for r in rows], color="tab:orange")
    ax2.axvline(report["floor"]["shira_switch_ms"], color="red", ls="--",
                label="SHiRA switch memory-traffic floor")
    ax2.set_yticks(range(len(rows)), labels, fontsize=7)
    ax2.set_xscale("log")
    ax2.set_xlabel("full switch p50 (ms, log)")
    ax2.set_title("Switch cost (undo previous + apply next)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"edgeadapt bench: {report['model']} ({report.get('targets_spec', '')}) on "
                 f"{report['device']}", fontsize=9)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    out = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, [buf.getvalue()])
    return out
