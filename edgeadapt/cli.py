"""The ``edgeadapt`` command line: one click group, each command living beside its subsystem
(``quickstart``, which runs them all, lives here).

Commands import their heavy dependencies (torch, backends) inside the function body, so
``edgeadapt --help`` is fast. Every :class:`~edgeadapt.errors.EdgeAdaptError` becomes a one-line
``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys

import click

from edgeadapt import quiet
from edgeadapt.errors import EdgeAdaptError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # noqa: D102 - click hook
        try:
            return super().invoke(ctx)
        except EdgeAdaptError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="edgeadapt")
def main() -> None:
    """Sparse adapters from training to the device: train, export, switch, benchmark."""
    quiet.install()


@click.command()
@click.option("--out", default="runs/quickstart", show_default=True,
              type=click.Path(file_okay=False), help="where the runs and the bundle are written")
@click.option("--max-train", type=int, default=400, show_default=True,
              help="training examples per adapter")
@click.option("--max-test", type=int, default=200, show_default=True,
              help="test examples per task")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--model", default="minilm", show_default=True)
@click.option("--backends", default="onnxruntime,executorch", show_default=True,
              help="backends to export and run: onnxruntime, executorch")
@click.option("--repeats", type=int, default=10, show_default=True,
              help="timed forwards and switches per table cell (median)")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def quickstart(out: str, max_train: int, max_test: int, epochs: float, model: str,
               backends: str, repeats: int, threads: int, progress: bool) -> None:
    """The whole pipeline on MiniLM: train SHiRA per task (sentiment, politics) and LoRA, SoRA,
    SiRA baselines, export one bundle, switch adapters in place on ONNX Runtime and ExecuTorch
    (checked against PyTorch), fuse the two SHiRA adapters, and print one summary table."""
    from edgeadapt.export.bundle import parse_backends
    from edgeadapt.pipeline import QuickstartConfig, run_quickstart
    from edgeadapt.train.cli import set_threads

    set_threads(threads)
    run_quickstart(QuickstartConfig(out=out, model=model, max_train=max_train,
                                    max_test=max_test, epochs=epochs,
                                    backends=tuple(parse_backends(backends)),
                                    repeats=repeats,
                                    threads=threads, progress=progress),
                   echo=click.echo)


@click.command("generate-demo")
@click.option("--out", default="runs/generate-demo", show_default=True,
              type=click.Path(file_okay=False), help="where the runs and the bundle are written")
@click.option("--model", default="smollm2", show_default=True)
@click.option("--steps", type=int, default=12, show_default=True,
              help="optimizer steps per adapter")
@click.option("--reviews", type=int, default=24, show_default=True,
              help="held-out reviews scored per adapter state")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def generate_demo(out: str, model: str, steps: int, reviews: int, threads: int,
                  progress: bool) -> None:
    """Generation end to end on SmolLM2: train two SHiRA adapters (Hamlet text, a sentiment
    answer), export with the KV-cache decoder, and generate under the base, each adapter and
    both fused, switching in place between requests (checked against transformers)."""
    from edgeadapt.pipeline_generate import GenerateDemoConfig, run_generate_demo
    from edgeadapt.train.cli import set_threads

    set_threads(threads)
    run_generate_demo(GenerateDemoConfig(out=out, model=model, steps=steps, reviews=reviews,
                                         threads=threads, progress=progress), echo=click.echo)


def _register() -> None:
    from edgeadapt.bench.cli import bench
    from edgeadapt.export.cli import convert, export
    from edgeadapt.runtime.chat import chat_cmd
    from edgeadapt.runtime.cli import generate_cmd
    from edgeadapt.train.cli import train

    for command in (train, export, convert, generate_cmd, chat_cmd, bench, quickstart,
                    generate_demo):
        main.add_command(command)


_register()


if __name__ == "__main__":
    main()
