"""``edgeadapt bench BUNDLE``: forward and switch cost per backend, side by side with the
alternatives (docs/bench.md)."""

from __future__ import annotations

import shlex
import sys

import click


def _ints(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{value!r}: expected positive integers")
    return out


@click.command("bench")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--backends", default="onnxruntime-cpu,onnxruntime-cuda,executorch",
              show_default=True, help="Comma-separated; those that cannot start are skipped.")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Batch sizes.")
@click.option("--seq", "seqs", default="64", show_default=True, help="Sequence lengths.")
@click.option("--shapes", default=None,
              help="Explicit BxS pairs, e.g. 1x1,1x64,8x64 (overrides --batch/--seq).")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1),
              help="Timed rounds per forward case.")
@click.option("--switch-repeats", default=50, show_default=True, type=click.IntRange(min=1),
              help="Timed switches.")
@click.option("--reload-repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed reloads and repack switches (each rebuilds a session).")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="Intra-op threads per backend.")
@click.option("--sessions", default=1, show_default=True, type=click.IntRange(min=1),
              help="Independent sessions/programs per forward variant, all interleaved; "
                   "ratios average over them (one session's memory layout can move it ~4%).")
@click.option("--no-peers", is_flag=True, help="Skip the PyTorch PEFT peers.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None)
def bench(bundle: str, backends: str, batches: str, seqs: str, shapes: str | None,
          repeats: int, switch_repeats: int, reload_repeats: int, warmup: int, threads: int,
          sessions: int,
          no_peers: bool, json_path: str | None, plot_path: str | None) -> None:
    """Benchmark BUNDLE: forward latency (base vs SHiRA live/repack, LoRA fused/unfused, SoRA,
    SiRA, ONNX Runtime's LoRA adapters) and full switch cost (SHiRA, LoRA fuse, reload, PEFT),
    every ratio from interleaved runs. Refuses to time any variant whose output does not match
    PyTorch."""
    backend_list = [b.strip() for b in backends.split(",") if b.strip()]
    if not backend_list:
        raise click.BadParameter("name at least one backend", param_hint="--backends")
    import torch
    from tqdm import tqdm

    from edgeadapt.bench.report import plot, table, write_json
    from edgeadapt.bench.run import BenchOptions, run_bench

    torch.set_num_threads(threads)
    pairs = None
    if shapes:
        try:
            pairs = [tuple(int(x) for x in s.lower().split("x")) for s in shapes.split(",")]
        except ValueError:
            raise click.BadParameter(f"--shapes {shapes!r}: use BxS,BxS") from None
        if any(len(p) != 2 or min(p) < 1 for p in pairs):
            raise click.BadParameter(f"--shapes {shapes!r}: use BxS,BxS with positive ints")
    opts = BenchOptions(backends=backend_list, batches=_ints(batches),
                        seqs=_ints(seqs), shapes=pairs, repeats=repeats,
                        switch_repeats=switch_repeats, reload_repeats=reload_repeats,
                        warmup=warmup, threads=threads, sessions=sessions,
                        peers=not no_peers)
    with tqdm(desc="bench", unit="call", file=sys.stderr) as bar:
        report = run_bench(bundle, opts, progress=bar.update)
    report["command"] = "edgeadapt bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    click.echo(table(report))
    if json_path:
        write_json(json_path, report)
        click.echo(f"wrote {json_path}")
    if plot_path:
        plot(plot_path, report)
        click.echo(f"wrote {plot_path}")
