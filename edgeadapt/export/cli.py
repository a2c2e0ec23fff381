"""``edgeadapt export base|adapter`` and ``edgeadapt convert``: the command-line face of
:mod:`edgeadapt.export`."""

from __future__ import annotations

import logging

import click

from edgeadapt.format.quant import PRECISIONS

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
@click.option("--generate", is_flag=True,
              help="causal LMs: also export the KV-cache decoder and the tokenizer, for "
                   "`edgeadapt generate` (docs/generate.md)")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="with --generate: positions (prompt + reply) a conversation may hold "
                   "[default: 2048, or the model's positions if fewer]")
@click.option("--weights", "precision", default="fp32", show_default=True,
              type=click.Choice(PRECISIONS),
              help="int8 | int4 (blocks of 32, ONNX Runtime's MatMulNBits grid): the blocks' "
                   "weights quantized, the live ones as codes edited in place; int4-affine: "
                   "int4 plus a float offset per block (Q4_1's grid; ONNX Runtime only); "
                   "int4-affine-live8: the same with the --targets weights on int8 "
                   "(docs/quantized.md)")
def export_base_cmd(model: str, out: str, backends: str, targets: str, num_labels: int,
                    seed: int, no_check: bool, pte_live_form: str | None, generate: bool,
                    max_context: int | None, precision: str) -> None:
    """Export the base model with only the --targets weights editable in place."""
    from edgeadapt.export.bundle import export_base

    _log_to_console()
    path = export_base(model, out, backends, targets, num_labels=num_labels, seed=seed,
                       check=not no_check, pte_live_form=pte_live_form, generate=generate,
                       max_context=max_context, precision=precision)
    click.echo(f"bundle written to {path}")


@export.command("adapter")
@click.argument("source", metavar="PATH", type=click.Path(exists=True))
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--name", required=True, help="adapter name inside the bundle")
@click.option("--dtype", "--value-dtype", "value_dtype", default=None,
              type=click.Choice(["float16", "bfloat16", "float32"]),
              help="stored value dtype [default: float16; an .eadp keeps its own]")
@click.option("--unfused/--fused", default=None,
              help="LoRA/SoRA: also export a graph variant with LoRA branches (--unfused) or "
                   "not [default: unfused on a quantized ONNX Runtime base only]")
@click.option("--no-check", is_flag=True, help="skip parity checks of new graph variants")
@click.option("--force-base", is_flag=True,
              help="PEFT adapters: accept a base_model_name_or_path other than the bundle's "
                   "model (shapes and ranges are still checked)")
@click.option("--model", "model", default=None, metavar="DIR",
              type=click.Path(exists=True, file_okay=False),
              help="where the bundle's base model directory is now, if it moved: reloaded to "
                   "export a graph variant (SiRA, --unfused); its config.json and weights must "
                   "hash as bundle.json records")
def export_adapter_cmd(source: str, bundle: str, name: str, value_dtype: str | None,
                       unfused: bool | None, no_check: bool, force_base: bool,
                       model: str | None) -> None:
    """Add an adapter to a bundle as adapters/<name>.eadp. PATH: an edgeadapt training run, a
    Hugging Face PEFT adapter directory (LoRA or SHiRA, adapter_model.safetensors) or an
    .eadp file."""
    from edgeadapt.export.adapter import export_adapter

    _log_to_console()
    path = export_adapter(source, bundle, name, value_dtype, unfused=unfused,
                          check=not no_check, force_base=force_base, model=model)
    click.echo(f"adapter written to {path} ({path.stat().st_size:,} bytes)")


@click.command("convert")
@click.argument("source", metavar="PATH", type=click.Path(exists=True))
@click.option("--to", "to", required=True, type=click.Choice(["peft"]),
              help="the format to write: peft (a Hugging Face PEFT adapter directory)")
@click.argument("out", type=click.Path())
def convert(source: str, to: str, out: str) -> None:
    """Write the adapter of PATH (an edgeadapt training run or .eadp file; LoRA, SoRA or
    SHiRA) to OUT as a PEFT adapter: PeftModel.from_pretrained(base, OUT) loads it."""
    from edgeadapt.export.convert import convert_adapter

    path = convert_adapter(source, out, to)
    click.echo(f"{to} adapter written to {path}")
