"""Section 5: switching and latency, read from the committed bench JSONs (issue 7)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from experiments import results_switch_size as rss
from experiments.results_switch_size import backend_name, row_backend

from .data import NOT_MEASURED, NOT_RUN, bench_report, notes_link, num

#: the newest SmolLM2 q/v report per backend (docs/bench.md): column -> (report, backend as
#: ``--backends`` spells it)
BENCH_MAIN = {"ONNX Runtime CPU, run 11": ("smollm2-qv-onnxruntime-run11", "onnxruntime"),
              "ExecuTorch (XNNPACK + own kernel), run 11": ("smollm2-qv-executorch-run11",
                                                            "executorch")}
SHAPES = ((1, 1), (1, 64), (8, 64))
def floor_ratio(report: dict, backend: str) -> float | None:
    """The paired switch / floor ratio of ``backend``; the map is keyed ``backend:device`` in
    today's reports and by the old backend name in earlier ones."""
    for key, value in report["floor"]["measured_over_floor"].items():
        name, _, device = key.partition(":")
        if backend_name(name, device or "cpu") == backend:
            return value
    return None


def fwd_ratio(report: dict, backend: str, variant: str, shape: tuple[int, int]) -> float | None:
    """ratio_vs_base of one forward case."""
    return next((r["ratio_vs_base"] for r in report["forward"]
                 if (row_backend(r), r["variant"], r["batch"], r["seq"]) ==
                 (backend, variant, *shape)), None)


def switch_ms(report: dict, backend: str, method: str, mode: str) -> float | None:
    """p50 of one switch case (ms)."""
    return next((r["p50_ms"] for r in report["switch"]
                 if (row_backend(r), r["method"], r["mode"]) == (backend, method, mode)), None)


def switch_ratio(report: dict, backend: str, method: str, mode: str) -> float | None:
    """A switch case over SHiRA's live switch: the per-round paired ``ratio_vs_shira`` where the
    report has it (run 10 on), else the ratio of the two p50s (older reports)."""
    row = next((r for r in report["switch"]
                if (row_backend(r), r["method"], r["mode"]) == (backend, method, mode)), None)
    if row is None:
        return None
    if row.get("ratio_vs_shira") is not None:
        return row["ratio_vs_shira"]
    shira = switch_ms(report, backend, "shira", "live")
    return row["p50_ms"] / shira if shira else None


def bench_targets(report: dict, backend: str) -> list[tuple[str, float | None, bool | None]]:
    """(issue-6 target, measured value, met) for one report and backend."""
    live = [fwd_ratio(report, backend, "shira-live", s) for s in SHAPES]
    lora = switch_ratio(report, backend, "lora-fuse", "live")
    reload_ = switch_ratio(report, backend, "reload", "repack")
    floor = floor_ratio(report, backend)
    worst = max((x for x in live if x is not None), default=None)
    out = [("shira-live / base forward <= 1.02 (worst shape)", worst,
            None if worst is None else worst <= 1.02)]
    for label, r, ok in (("LoRA fuse / SHiRA switch >= 10", lora, lambda r: r >= 10),
                         ("reload / SHiRA switch >= 200", reload_, lambda r: r >= 200)):
        out.append((label, r, None if r is None else ok(r)))
    out.append(("SHiRA switch / floor <= 1.5", floor, None if floor is None else floor <= 1.5))
    return out


def bench_cell(report: dict | None, backend: str, what: str) -> str:
    """One cell of the section-5 headline table."""
    if report is None:
        return NOT_RUN
    shira = switch_ms(report, backend, "shira", "live")
    if what in ("shira-live", "sira-unfused"):
        shapes = SHAPES if what == "shira-live" else SHAPES[:2]
        vals = [fwd_ratio(report, backend, what, s) for s in shapes]
        return " · ".join("-" if v is None else f"{num(v, 3)}" for v in vals)
    if what == "shira":
        return "-" if shira is None else f"{num(shira, 2)} ms"
    if what in ("lora-fuse", "reload"):
        mode = "live" if what == "lora-fuse" else "repack"
        v, r = switch_ms(report, backend, what, mode), switch_ratio(report, backend, what, mode)
        return "-" if v is None or r is None else f"{num(v, 1)} ms ({r:.0f}x)"
    if what == "floor":
        v = floor_ratio(report, backend)
        return "-" if v is None else f"{num(v, 2)}"
    mem = next((r for r in report["memory"] if r["runtime"] == "live after switches"), None)
    if mem is None:
        return "-"
    mb = {k: v / 1e6 for k, v in mem.items() if k.endswith("_bytes_shira") or
          k.endswith("_bytes_lora")}
    return (f"SHiRA {num(mb['restore_bytes_shira'], 1)} MB "
            f"(+{num(mb['plan_cache_bytes_shira'], 1)} MB "
            f"switch-plan cache), LoRA {num(mb['restore_bytes_lora'], 1)} MB")


BENCH_ROWS = [("SHiRA fused (live) / base forward, 1x1 · 1x64 · 8x64", "shira-live"),
              ("full SHiRA switch (undo the old adapter, apply the new, exact), p50", "shira"),
              ("LoRA r16 fuse with exact restore (x SHiRA switch)", "lora-fuse"),
              ("re-creating the session / program (x SHiRA switch)", "reload"),
              ("SHiRA switch / memory-traffic floor", "floor"),
              ("SiRA unfused / base forward, 1x1 · 1x64", "sira-unfused"),
              ("memory kept for exact restore", "memory")]


def section_5() -> str:
    """Section 5: the headline bench rows, their commands and switch time vs size."""
    reports = {col: (bench_report(name), backend) for col, (name, backend) in BENCH_MAIN.items()}
    lines = ["| | " + " | ".join(reports) + " |", "|---|" + "---|" * len(reports)]
    for label, what in BENCH_ROWS:
        lines.append(f"| {label} | " + " | ".join(bench_cell(r, b, what)
                                                   for r, b in reports.values()) + " |")
    first = next((r for r, _ in reports.values() if r), None)
    scope = ("" if first is None else f" SmolLM2-135M with q/v live ({first['live_weights']} "
             f"weights, {num(first['live_params'] / 1e6, 1)}M parameters),")
    return f"""## 5. Switching and latency on real models (issue 7 section 3)

The headline rows of `edgeadapt bench` for the newest run on each backend (method, every row,
and what earlier runs changed: `docs/bench.md`), one thread,{scope} three sessions / programs
per variant, synthetic 1% SHiRA and rank-16 LoRA adapters. Not re-run by
`experiments/results.py`: read from the committed JSONs, whose commands are listed below. The
"(Nx)" of LoRA fuse and reload is the per-round paired ratio to the SHiRA switch of the same
rounds (`ratio_vs_shira`).

{chr(10).join(lines)}

{bench_commands()}

{switch_size_section()}

{notes_link("5")}"""


#: report -> (its bundle, the command that makes the bundle); the bench command is in the JSON
PREPARE = {
    "smollm2-qv-onnxruntime-run11": (
        "bundles/smollm2-qv-onnxruntime", "python -m edgeadapt.bench.prepare smollm2 "
        "bundles/smollm2-qv-onnxruntime --targets qv --backends onnxruntime --no-check"),
    "smollm2-qv-executorch-run11": (
        "bundles/smollm2-qv-executorch", "python -m edgeadapt.bench.prepare smollm2 "
        "bundles/smollm2-qv-executorch --targets qv --backends executorch --lora-rank 0 "
        "--sira '' --no-check --executorch-live-form own-kernel"),
    "minilm-qv": (
        "bundles/minilm-qv", "python -m edgeadapt.bench.prepare minilm bundles/minilm-qv "
        "--targets qv --backends onnxruntime,executorch --lora-rank 0 --sira '' --no-check"),
    "smollm2-all-ort-run2": (
        "bundles/smollm2-all", "python -c \"from edgeadapt.export.bundle import export_base; "
        "export_base('smollm2', 'bundles/smollm2-all', backends=['onnxruntime'], targets='all', "
        "check=False)\""),
}
BENCH_FILES = ["smollm2-qv-onnxruntime-run11", "smollm2-qv-executorch-run11", "minilm-qv",
               "smollm2-all-ort-run2"]


def bench_commands() -> str:
    """How each committed bench JSON was made: bundle, then its stored `command`."""
    reports = {name: bench_report(name) for name in BENCH_FILES}
    renamed = any(r and re.search(r"--backends \S*onnxruntime-c", r.get("command", ""))
                  for r in reports.values())
    lines = ["How each bench JSON was made (bundle, then the `command` stored in the JSON)"
             + (", in today's backend names: these runs predate them, so their JSONs say "
                "`onnxruntime-cpu` and their bundles were exported with `--formats onnx,pte`"
                if renamed else "") + ":", ""]
    for name in BENCH_FILES:
        report = reports[name]
        if report is None:
            lines.append(f"- `docs/bench/{name}.json`: {NOT_RUN}")
            continue
        bundle, prep = PREPARE[name]
        lines.append(f"- `docs/bench/{name}.json`: `{prep}`, then "
                     f"`{bench_command(report['command'], bundle)}`")
    return "\n".join(lines)


def bench_command(command: str, bundle: str) -> str:
    """A stored bench command with its bundle path (a scratch directory of the machine that ran
    it) replaced by the ``bundles/`` path its PREPARE command writes, and its ``--backends`` in
    today's names (``onnxruntime-cpu`` -> ``onnxruntime``)."""
    command = re.sub(r"^(edgeadapt bench) \S+", rf"\1 {bundle}", command)
    return re.sub(r"(--backends )(\S+)", lambda m: m[1] + ",".join(
        rss.OLD_BACKENDS.get(b, b) for b in m[2].split(",")), command)


SIZE_REPORTS = ["minilm-qv", "smollm2-qv-onnxruntime-run11", "smollm2-qv-executorch-run11",
                "smollm2-all-ort-run2"]
SIZE_STALE: list[str] = []


def switch_size_rows() -> list[dict]:
    """results_switch_size.points of every available report, sorted as that script sorts."""
    rows = [r for names, stale in ((SIZE_REPORTS, False), (SIZE_STALE, True)) for n in names
            if (rep := bench_report(n)) is not None for r in rss.points(rep, stale=stale)]
    return sorted(rows, key=lambda r: (r["backend"], r["live_params"]))


def switch_size_section() -> str:
    """The switch-time-vs-model-size table, plot and reading."""
    rows = switch_size_rows()
    args = " ".join([f"docs/bench/{n}.json" for n in SIZE_REPORTS]
                    + [f"--stale docs/bench/{n}.json" for n in SIZE_STALE])
    return f"""**Switch time vs model size** (`.venv/bin/python -m \
experiments.results_switch_size {args} --plot docs/switch_size.png`; backend `onnxruntime`
is ONNX Runtime on the CPU; (*) = measured under other conditions, see `docs/bench.md`):

{rss.table(rows) if rows else NOT_RUN}

![switch time vs model size](switch_size.png)

{switch_size_text(rows)}"""


def switch_size_text(rows: Sequence[dict]) -> str:
    """'What came out' of the switch-size table (fresh rows only)."""
    fresh = [r for r in rows if not r["stale"] and r["shira"] and r["lora-fuse"] and r["reload"]]
    if not fresh:
        return f"**What came out:** {NOT_MEASURED}."
    lo = [r["lora-fuse"] / r["shira"] for r in fresh]
    rl = [r["reload"] / r["shira"] for r in fresh]
    fl = [r["shira"] / r["floor"] for r in fresh]
    by_model = "; ".join(f"{r['model']} ({num(r['live_params'] / 1e6, 1)}M live, {r['backend']}) "
                         f"{num(r['shira'], 2)} ms" for r in fresh)
    under = [f"{r['model']} on {r['backend']} ({r['reload'] / r['shira']:.0f}x)" for r in fresh
             if r["reload"] / r["shira"] < 200]
    tail = (f" Below issue 6's 200x reload ratio: {', '.join(under)}." if under else
            " Every reload is >= 200x the SHiRA switch (issue 6).")
    return (f"**What came out.** SHiRA's full switch: {by_model}; "
            f"{num(min(fl), 1)}-{num(max(fl), 1)}x its "
            f"memory-traffic floor. LoRA's fuse-with-restore is {min(lo):.0f}-{max(lo):.0f}x "
            f"slower on the same weights and re-creating the session or program "
            f"{min(rl):.0f}-{max(rl):.0f}x.{tail}")
