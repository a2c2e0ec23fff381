"""``edgeadapt generate BUNDLE --prompt TEXT``: the runtime's command-line face (torch-free)."""

from __future__ import annotations

import click

from edgeadapt.timer import stopwatch

#: the backends whose decoder ``--backend`` may name, in the order the default tries them
DECODER_BACKENDS = ("onnxruntime", "executorch")
BACKEND_HELP = ("onnxruntime | executorch [default: the first of them whose decoder the bundle "
                "has]")
DEVICE_HELP = "cpu | cuda (ONNX Runtime's CUDA provider, onnxruntime-gpu)"


def decoder_backend(bundle: str, backend: str | None) -> str:
    """``backend``, or where it is None the first of :data:`DECODER_BACKENDS` whose section of
    the bundle has a ``"decoder"`` entry (``onnxruntime`` if none has: loading then says
    what is missing)."""
    if backend is not None:
        return backend
    from edgeadapt.format.manifest import read_manifest

    sections = read_manifest(bundle).to_dict()
    return next((b for b in DECODER_BACKENDS
                 if isinstance(sections.get(b), dict) and sections[b].get("decoder")),
                DECODER_BACKENDS[0])



@click.command("generate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True, help="the text to continue (or reply to)")
@click.option("--adapter", "adapters", multiple=True,
              help="adapter to switch to first (repeat to fuse several); default: the base")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy")
@click.option("--top-k", type=click.IntRange(min=1), default=None)
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None)
@click.option("--seed", type=click.IntRange(min=0), default=None)
@click.option("--stop", multiple=True, help="a string that ends the reply (repeatable)")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="intra-op threads (default: the backend's)")
@click.option("--backend", default=None, help=BACKEND_HELP)
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)
def generate_cmd(bundle: str, prompt: str, adapters: tuple[str, ...], max_new_tokens: int,
                 temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
                 stop: tuple[str, ...], threads: int | None, backend: str | None,
                 device: str) -> None:
    """Generate a reply to --prompt with the bundle's decoder (exported with --generate),
    streamed to the terminal; the token count and speed go to stderr."""
    from edgeadapt.runtime import load

    rt = load(bundle, backend=decoder_backend(bundle, backend), device=device, mode="live",
              threads=threads)
    if adapters:
        rt.switch(list(adapters))
    chat = rt.conversation()
    pieces = chat.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, stop=list(stop))
    elapsed, first = stopwatch(), None
    for piece in pieces:
        first = elapsed() if first is None else first
        click.echo(piece.text, nl=False)
    end = elapsed()
    click.echo()
    out = chat.last
    first = end if first is None else first
    decode = (len(out.ids) - 1) / (end - first) if len(out.ids) > 1 and end > first else 0.0
    click.echo(f"[{len(out.ids)} tokens, {out.finish_reason}; prompt {out.prompt_tokens} tokens, "
               f"first token after {1e3 * first:.0f} ms, then {decode:.1f} tokens/s; "
               f"adapters: {', '.join(rt.active) or 'none (base)'}]", err=True)
