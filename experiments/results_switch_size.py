"""Switch time vs model size (issue 7): one point per `edgeadapt bench` JSON.

    .venv/bin/python -m experiments.results_switch_size docs/bench/*-ort.json \
        --plot docs/switch_size.png

For each report (one bundle: model + live targets) and backend, the x value is the number of live
parameters (``live_params``: the weights an adapter may touch) and the y values are the p50 of a
full switch (undo the previous adapter, apply the next) per method: SHiRA in place (live), LoRA
fuse with exact restore, re-creating the session/program (reload), and the SHiRA memory-traffic
floor of the same switch. Prints a markdown table with the ratios measured in the same run
(LoRA / SHiRA, reload / SHiRA, SHiRA / floor) and writes a log-log PNG.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import click

from edgeadapt.format.container import atomic_write_bytes

METHODS = (("shira", "live", "SHiRA switch (live)"), ("lora-fuse", "live", "LoRA fuse + restore"),
           ("reload", "repack", "reload (re-create)"))


#: backend names of reports written before one name per backend -> today's ``--backends``
#: spelling (the CPU implied, another device as ``NAME:DEVICE``)
OLD_BACKENDS = {"onnxruntime-cpu": "onnxruntime", "onnxruntime-cuda": "onnxruntime:cuda"}


def backend_name(backend: str, device: str = "cpu") -> str:
    """A report's backend (and row device) in today's ``--backends`` spelling: ``onnxruntime``,
    ``onnxruntime:cuda``, ``executorch``; old names (``onnxruntime-cpu``) are renamed."""
    name = OLD_BACKENDS.get(backend, backend)
    return name if device == "cpu" or ":" in name else f"{name}:{device}"


def row_backend(row: dict) -> str:
    """:func:`backend_name` of one forward / switch row (rows before the rename carry no
    ``device``)."""
    return backend_name(row["backend"], row.get("device", "cpu"))


def points(report: dict, stale: bool = False) -> list[dict]:
    """One row per backend of ``report``: live params and the switch p50s (ms) per method.
    ``stale``: measured under different conditions (drawn hollow, marked in the table)."""
    rows = []
    backends = sorted({row_backend(r) for r in report["switch"] if r["backend"] != "pytorch"})
    for backend in backends:
        row = {"model": report["model"], "targets": report.get("targets_spec", "?"),
               "backend": backend, "live_params": int(report["live_params"]), "stale": stale}
        for method, mode, _ in METHODS:
            row[method] = next((r["p50_ms"] for r in report["switch"]
                                if (row_backend(r), r["method"], r["mode"]) ==
                                (backend, method, mode)), None)
        row["floor"] = report["floor"]["shira_switch_ms"]
        rows.append(row)
    return rows


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.1f}x"


def table(rows: list[dict]) -> str:
    lines = ["| model | targets | backend | live params | SHiRA ms | LoRA fuse ms | reload ms | "
             "floor ms | LoRA / SHiRA | reload / SHiRA | SHiRA / floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = [f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("shira", "lora-fuse",
                                                                   "reload", "floor")]
        mark = " (*)" if r["stale"] else ""
        lines.append(f"| {r['model']}{mark} | {r['targets']} | {r['backend']} | "
                     f"{r['live_params'] / 1e6:.2f}M | {' | '.join(f)} | "
                     f"{_ratio(r['lora-fuse'], r['shira'])} | {_ratio(r['reload'], r['shira'])} "
                     f"| {_ratio(r['shira'], r['floor'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [(m, label) for m, _, label in METHODS] + [("floor", "SHiRA memory-traffic floor")]
    for backend, marker in (("onnxruntime", "o"), ("executorch", "s"),
                            ("onnxruntime:cuda", "^")):
        rs = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["live_params"])
        if not rs:
            continue
        for (key, label), color in zip(series, ("C0", "C1", "C2", "0.5"), strict=True):
            pts = [(r["live_params"], r[key]) for r in rs if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=color,
                        linestyle="--" if key == "floor" else "-",
                        label=f"{label}, {backend}")
            for r in rs:
                if r[key] is not None:
                    ax.plot(r["live_params"], r[key], marker=marker, color=color,
                            markerfacecolor="none" if r["stale"] else color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("live parameters (weights an adapter may touch); o ONNX Runtime, □ ExecuTorch")
    ax.set_ylabel("full switch p50 (ms)")
    ax.set_title("Switch time vs model size (1% SHiRA, LoRA r16); hollow: loaded machine")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(Path(path), [buf.getvalue()])


@click.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--plot", "plot_path", default=None, help="Write the log-log PNG here.")
@click.option("--stale", multiple=True, type=click.Path(exists=True),
              help="A report measured under other conditions (hollow markers, (*) in the table).")
def main(reports: tuple[str, ...], plot_path: str | None, stale: tuple[str, ...]) -> None:
    rows = [r for p in (*reports, *stale)
            for r in points(json.loads(Path(p).read_text()), stale=p in stale)]
    rows.sort(key=lambda r: (r["backend"], r["live_params"]))
    click.echo(table(rows))
    if plot_path:
        plot(rows, plot_path)
        click.echo(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
