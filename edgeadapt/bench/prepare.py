"""Prepare a benchmark bundle: export a base model and the branch variant graphs the unfused
cases need, without any training run (the benchmark synthesises the adapters itself).

    python -m edgeadapt.bench.prepare smollm2 bundles/smollm2-qv --targets qv \
        --backends onnxruntime,executorch [--generate]

Variants: a LoRA branch graph (its rank dimension is dynamic: it serves LoRA, pruned SoRA and
ONNX Runtime's adapter API) and a SiRA graph with ``(experts, rank, top_k, capacity_factor)``.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgeadapt.export.cli import PTE_LIVE_FORMS


@click.command()
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--targets", default="qv", show_default=True)
@click.option("--backends", default="onnxruntime,executorch", show_default=True)
@click.option("--lora-rank", default=16, show_default=True, help="0 for no LoRA variant.")
@click.option("--sira", default="4,4,2,1.25", show_default=True,
              help="experts,rank,top_k,capacity_factor of the SiRA variant ('' for none)")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Let the exporters verify the graphs against PyTorch.")
@click.option("--variants-only", is_flag=True,
              help="OUT is an existing bundle: add only the variants it lacks.")
@click.option("--pte-shapes", default=None,
              help="BxS,... the SiRA ExecuTorch program is lowered for (default: 1x1, "
                   "1 x max_seq, max_batch x max_seq)")
@click.option("--executorch-live-form", "pte_live_form", default=None,
              type=click.Choice(PTE_LIVE_FORMS),
              help="How the ExecuTorch base program's live linears are written (default: the "
                   "exporter's; edgeadapt.export.executorch_live_form)")
@click.option("--generate", is_flag=True,
              help="causal LMs: also the KV-cache decoders (the base's and each variant's), for "
                   "`edgeadapt bench --generate`")
@click.option("--max-context", type=int, default=None,
              help="with --generate: the decoders' context (default: the exporter's)")
def main(model: str, out: str, targets: str, backends: str, lora_rank: int, sira: str,
         check: bool, variants_only: bool, pte_shapes: str | None,
         pte_live_form: str | None, generate: bool, max_context: int | None) -> None:
    """Export MODEL to OUT with the branch variants `edgeadapt bench` times."""
    import torch

    from edgeadapt.export.adapter import ensure_variant
    from edgeadapt.export.bundle import export_base
    from edgeadapt.format.manifest import read_manifest, write_manifest

    torch.set_num_threads(2)
    bundle = Path(out)
    if not variants_only:
        export_base(model, bundle, backends=backends.split(","), targets=targets, check=check,
                    pte_live_form=pte_live_form, generate=generate, max_context=max_context)
    shapes = ([tuple(int(v) for v in s.split("x")) for s in pte_shapes.split(",")]
              if pte_shapes else None)
    branches: list[tuple] = [("lora", lora_rank)] if lora_rank > 0 else []
    if sira:
        e, r, k, cf = sira.split(",")
        branches.append(("sira", int(e), int(r), int(k), float(cf)))
    for branch in branches:  # the manifest is written after each: a lowering takes minutes
        manifest = read_manifest(bundle)
        key = ensure_variant(bundle, manifest, branch, check, pte_shapes=shapes)
        write_manifest(bundle, manifest)
        click.echo(f"variant {key}")
    click.echo(f"wrote {bundle / 'bundle.json'}")


if __name__ == "__main__":
    from edgeadapt import quiet

    quiet.install()  # as the edgeadapt CLI does
    main()
