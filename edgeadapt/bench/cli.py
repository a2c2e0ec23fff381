"""``edgeadapt bench BUNDLE``: forward and switch cost per backend, side by side with the
alternatives (docs/bench.md)."""

from __future__ import annotations

import shlex
import sys

import click

from edgeadapt.bench.backends import DEVICES, parse_targets
from edgeadapt.bench.cli_values import positive_ints
from edgeadapt.bench.generation.cli import generate_options, options_of
from edgeadapt.errors import ConfigError
from edgeadapt.runtime.policy import POLICY_FILE


@click.command("bench")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--backends", default="onnxruntime,onnxruntime:cuda,executorch",
              show_default=True,
              help="Comma-separated NAME[:DEVICE]: onnxruntime, executorch, each on cpu or "
                   "cuda (default: --device), e.g. onnxruntime,onnxruntime:cuda. Those that "
                   "cannot start here are skipped.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(DEVICES),
              help="The device of the --backends written without one.")
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
@click.option("--density", default=0.01, show_default=True, type=click.FloatRange(0, 1,
              min_open=True), help="Share of each live weight a synthetic SHiRA adapter "
                                   "changes (adapters the bundle lacks are synthesised).")
@click.option("--no-peers", is_flag=True,
              help="Skip the peers (PEFT; with --generate also onnxruntime-genai, transformers).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None)
@click.option("--write-policy", "policy_path", is_flag=False, flag_value=str(POLICY_FILE),
              default=None, type=click.Path(dir_okay=False),
              help="Write the measured live-vs-repack thresholds of mode='auto' (2x the "
                   "break-even per backend, live form and batch) into this policy file; "
                   "without a value, the one shipped with edgeadapt.runtime.")
@generate_options
def bench(bundle: str, backends: str, device: str, batches: str, seqs: str,
          shapes: str | None, repeats: int, switch_repeats: int, reload_repeats: int,
          warmup: int, threads: int, sessions: int, density: float, no_peers: bool,
          json_path: str | None, plot_path: str | None, policy_path: str | None,
          generate: bool, **generation: object) -> None:
    """Benchmark BUNDLE: forward latency (base vs SHiRA live/repack, LoRA fused/unfused, SoRA,
    SiRA, ONNX Runtime's LoRA adapters) and full switch cost (SHiRA, LoRA fuse, reload, PEFT),
    every ratio from interleaved runs; with --generate, generation instead (docs/bench.md,
    "Generation"). Refuses to time any variant whose output does not match PyTorch."""
    backend_list = [b.strip() for b in backends.split(",") if b.strip()]
    try:
        parse_targets(backend_list, device)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--backends") from None
    import torch
    from tqdm import tqdm

    from edgeadapt.bench.options import BenchOptions
    from edgeadapt.bench.report import plot, table, write_json
    from edgeadapt.bench.run import run_bench

    torch.set_num_threads(threads)
    pairs = None
    if shapes:
        try:
            pairs = [tuple(int(x) for x in s.lower().split("x")) for s in shapes.split(",")]
        except ValueError:
            raise click.BadParameter(f"--shapes {shapes!r}: use BxS,BxS") from None
        if any(len(p) != 2 or min(p) < 1 for p in pairs):
            raise click.BadParameter(f"--shapes {shapes!r}: use BxS,BxS with positive ints")
    opts = BenchOptions(backends=backend_list, device=device, batches=positive_ints(batches),
                        seqs=positive_ints(seqs), shapes=pairs, repeats=repeats,
                        switch_repeats=switch_repeats, reload_repeats=reload_repeats,
                        warmup=warmup, threads=threads, sessions=sessions, density=density,
                        peers=not no_peers)
    if generate and policy_path:
        raise click.BadParameter("--write-policy reads forward rows: not with --generate",
                                 param_hint="--write-policy")
    with tqdm(desc="bench", unit="call", file=sys.stderr) as bar:
        if generate:
            from edgeadapt.bench.generation.run import run_generate

            report = run_generate(bundle, opts, options_of(**generation), progress=bar.update)
        else:
            report = run_bench(bundle, opts, progress=bar.update)
    report["command"] = "edgeadapt bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    click.echo(table(report))
    if json_path:
        write_json(json_path, report)
        click.echo(f"wrote {json_path}")
    if plot_path:
        plot(plot_path, report)
        click.echo(f"wrote {plot_path}")
    if policy_path:
        from edgeadapt.bench.policy import write_policy

        click.echo(f"wrote {write_policy(policy_path, report)}")
