"""``edgeadapt export base --generate``: what a bundle needs to generate text.

- the backends' KV-cache decoders, reading the same live weights as the base graph, each a
  ``"decoder"`` entry in its backend's bundle.json section: ONNX Runtime's a graph written
  beside the base graph (:mod:`edgeadapt.export.onnx_decoder`), ExecuTorch's a method of the
  live program itself (:mod:`edgeadapt.export.executorch_decoder`, lowered with it by
  :func:`edgeadapt.export.executorch.export_pte` and checked here);
- the model's tokenizer (``tokenizer.json``, read at run time by the ``tokenizers`` library:
  no torch, no transformers) and chat template (``chat_template.jinja``) where it has them;
- a top-level ``"generate"`` section (docs/generate.md)::

      {"max_context": 2048, "vocab_size": 49152, "eos_token_ids": [2], "bos_token_id": 1,
       "tokenizer": "tokenizer.json" | null, "chat_template": "chat_template.jinja" | null}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeadapt.errors import ConfigError, ExportError
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.models import LoadedModel
from edgeadapt.numeric import rel_error

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
#: the context a decoder gets without --max-context, unless the model's positions are fewer
DEFAULT_MAX_CONTEXT = 2048


def generation_context(lm: LoadedModel, backends: list[str], max_context: int | None) -> int:
    """The decoders' context (``max_context``, default the smaller of 2048 and the model's
    positions), checked before anything is exported: ConfigError for a model that is not a
    causal LM, or a context beyond the model's positions or below what the ``backends``'
    decoders need (ExecuTorch's: :data:`edgeadapt.export.executorch_decoder.MIN_CONTEXT`)."""
    if lm.kind != "causal-lm":
        raise ConfigError(f"--generate: {lm.name} is a {lm.kind}; only causal LMs generate")
    limit = int(getattr(lm.model.config, "max_position_embeddings", 0) or 0)
    if max_context is None:
        return min(DEFAULT_MAX_CONTEXT, limit) if limit else DEFAULT_MAX_CONTEXT
    least = 2
    if "executorch" in backends:
        from edgeadapt.export import executorch_decoder

        least = executorch_decoder.MIN_CONTEXT
    if isinstance(max_context, bool) or not isinstance(max_context, int) \
            or max_context < least or (limit and max_context > limit):
        raise ConfigError(f"--max-context {max_context!r}: a whole number from {least} to the "
                          f"model's {limit or 'unknown'} positions")
    return max_context


def export_generation(lm: LoadedModel, out: Path, live: list[str], results: dict[str, dict], *,
                      max_context: int, check: bool = True, precision: str = "fp32"
                      ) -> tuple[dict[str, dict], dict]:
    """Export the decoders of ``lm`` for the backends in ``results`` (the exporters' answers
    per backend; their base graphs are in ``out``) and its tokenizer files: ONNX Runtime's
    decoder graph is written here, ExecuTorch's ``decode`` method was lowered into its program
    by its exporter (``decoder_context``) and is checked here.

    max_context: from :func:`generation_context`. check: each decoder's logits against the
    model's full forward (ExportError on mismatch). precision: the base graph's
    (:func:`edgeadapt.export.onnx.export_onnx`), the decoder's too. Returns ({backend: its
    "decoder" entry}, the bundle's "generate" section).
    """
    decoders = {}
    if "onnxruntime" in results:
        from edgeadapt.export.onnx_decoder import export_onnx_decoder

        decoders["onnxruntime"] = export_onnx_decoder(
            lm, out, live, max_context=max_context, expected=results["onnxruntime"]["weights"],
            check=check, precision=precision)["section"]
    if "executorch" in results:
        decoders["executorch"] = dict(results["executorch"]["decoder"])
        if check:
            from edgeadapt.export.executorch_decoder import check_decoder

            decoders["executorch"]["parity"] = check_decoder(
                lm, out, results["executorch"], decoders["executorch"])
    if not decoders:
        raise ExportError(f"--generate: no exporter with a decoder ran (ran: {sorted(results)})")
    section = {"max_context": max_context, "vocab_size": lm.vocab_size,
               "eos_token_ids": _token_ids(lm, "eos_token_id"),
               "bos_token_id": next(iter(_token_ids(lm, "bos_token_id")), None),
               **write_tokenizer(lm.tokenizer, out)}
    return decoders, section


def step_error(got: np.ndarray, want: np.ndarray, start: int, n: int, keep: int,
               what: str) -> float:
    """The relative error of one decoder step's logits ``got`` ((k, vocab): a step of ``n``
    tokens after ``start`` cached ones, asked for the last ``keep`` positions' logits, 0 for
    all) against ``want`` (positions, vocab), the sequence's reference at every position;
    ExportError naming ``what`` where the step returned another number of positions."""
    lo = start if keep == 0 else start + n - min(keep, n)
    if got.shape[0] != start + n - lo:
        raise ExportError(f"{what}: keep {keep} gave {got.shape[0]} positions of a {n}-token "
                          "step")
    return rel_error(got, want[lo:start + n])


def parity_report(errors: list[float], chunks: tuple[int, ...], rtol: float, what: str) -> dict:
    """A decoder check's bundle.json ``parity`` entry from its per-step relative errors
    (each step's logits vs the PyTorch model's): ``{"max_rel_error", "chunks", "rtol"}``;
    ExportError naming ``what`` and every step's error where the worst exceeds ``rtol``."""
    worst = max(errors)
    if not worst <= rtol:
        raise ExportError(f"{what}: the KV-cache decoder's logits differ from the PyTorch "
                          f"model's (max relative error {worst:.3g} > {rtol:g}; per step "
                          f"{[f'{e:.2g}' for e in errors]})")
    return {"max_rel_error": worst, "chunks": list(chunks), "rtol": rtol}


def _token_ids(lm: LoadedModel, key: str) -> list[int]:
    """The model's ``eos_token_id`` / ``bos_token_id`` as a list: its generation config's
    (what transformers' ``generate`` stops on), else its config's."""
    gen = getattr(lm.model, "generation_config", None)
    value = getattr(gen, key, None) if gen is not None else None
    if value is None:
        value = getattr(lm.model.config, key, None)
    values = [] if value is None else [value] if isinstance(value, int) else list(value)
    return [int(v) for v in values]


def write_tokenizer(tokenizer: object, out: Path) -> dict:
    """Write the tokenizer's ``tokenizer.json`` (a fast tokenizer's backend) and chat template;
    returns the section entries naming them (None where the model has none: tiny test models,
    slow tokenizers)."""
    entries: dict = {"tokenizer": None, "chat_template": None}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        atomic_write_bytes(out / TOKENIZER_FILE, [backend.to_str().encode()])
        entries["tokenizer"] = TOKENIZER_FILE
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        atomic_write_bytes(out / CHAT_TEMPLATE_FILE, [template.encode()])
        entries["chat_template"] = CHAT_TEMPLATE_FILE
    return entries
