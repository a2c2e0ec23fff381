"""``edgeadapt export base|adapter``: the command-line face of :mod:`edgeadapt.export`."""

from __future__ import annotations

import logging

import click

#: the ExecuTorch live forms the CLIs offer: edgeadapt.export.executorch_live_form.LIVE_FORMS,
#: spelled out so that ``--help`` imports no torch (a test keeps the two equal)
PTE_LIVE_FORMS = ("linear", "weight-left", "own-kernel")


class _EchoHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=record.levelno >= logging.WARNING)


def _log_to_console() -> None:
    logger = logging.getLogger("edgeadapt.export")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
    logger.setLevel(logging.INFO)


@click.group()
def export() -> None:
    """Build a deployment bundle: the base model's graphs, then adapter files."""


@export.command("base")
@click.option("--model", required=True, help="smollm2 | minilm | tiny-* | a Hugging Face dir")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="bundle directory to write")
@click.option("--backends", default="onnxruntime,executorch", show_default=True,
              help="comma-separated backends to export for: onnxruntime, executorch")
@click.option("--targets", default="qv", show_default=True,
              help="adaptable weights: qv | attn | all | regex over nn.Linear module names")
@click.option("--num-labels", type=click.IntRange(min=2), default=2, show_default=True,
              help="classifier head size (MiniLM)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-check", is_flag=True, help="skip the backend-vs-PyTorch parity check")
@click.option("--executorch-live-form", "pte_live_form", default=None,
              type=click.Choice(PTE_LIVE_FORMS),
              help="how ExecuTorch's live linears are written (default: own-kernel, or "
                   "weight-left without a C++ compiler; docs/export_executorch.md)")
def export_base_cmd(model: str, out: str, backends: str, targets: str, num_labels: int,
                    seed: int, no_check: bool, pte_live_form: str | None) -> None:
    """Export the base model with only the --targets weights editable in place."""
    from edgeadapt.export.bundle import export_base

    _log_to_console()
    path = export_base(model, out, backends, targets, num_labels=num_labels, seed=seed,
                       check=not no_check, pte_live_form=pte_live_form)
    click.echo(f"bundle written to {path}")


@export.command("adapter")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--name", required=True, help="adapter name inside the bundle")
@click.option("--dtype", "value_dtype", default="float16", show_default=True,
              type=click.Choice(["float16", "bfloat16", "float32"]))
@click.option("--unfused", is_flag=True,
              help="LoRA/SoRA: also export a graph variant with LoRA branches")
@click.option("--no-check", is_flag=True, help="skip parity checks of new graph variants")
def export_adapter_cmd(run: str, bundle: str, name: str, value_dtype: str, unfused: bool,
                       no_check: bool) -> None:
    """Add the adapter of training run RUN to a bundle as adapters/<name>.eadp."""
    from edgeadapt.export.adapter import export_adapter

    _log_to_console()
    path = export_adapter(run, bundle, name, value_dtype, unfused=unfused, check=not no_check)
    click.echo(f"adapter written to {path} ({path.stat().st_size:,} bytes)")
