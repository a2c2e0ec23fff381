"""The peers of the generation rows, built and checked before anything is timed:
onnxruntime-genai (:mod:`.genai_build` / :mod:`.genai_peer`; skipped with the reason where it
is not installed, the model has no Hugging Face directory or genai's builder fails) and
transformers + PEFT eager (:class:`.torch_decode.TorchCase`)."""

from __future__ import annotations

import os

from edgeadapt.bench.backends import PYTORCH, Target
from edgeadapt.bench.generation import genai_build, genai_peer
from edgeadapt.bench.generation.parity import TokenParity
from edgeadapt.bench.generation.timing import Key
from edgeadapt.bench.generation.torch_decode import TorchCase
from edgeadapt.bench.options import BenchContext
from edgeadapt.errors import ExportError, MissingPackageError

#: the onnxruntime-genai peer's rows
GENAI = Target("onnxruntime-genai", "cpu")


def genai_cases(ctx: BenchContext, genai_dir, tokens: TokenParity, lora: str
                ) -> tuple[dict[Key, object], list[dict], dict]:
    """genai's ``base`` and ``lora-adapter`` (the run's LoRA ``lora`` as its multi-LoRA
    adapter), each checked by ``tokens`` (and the adapter on its logits); its models under
    ``genai_dir`` (None: the run's scratch). Returns (cases, skips, the report's peer info)."""
    where = {**GENAI.fields(), "what": "peer"}
    reason = genai_build.genai_missing()
    source = None if reason else genai_build.hf_dir(ctx.manifest, ctx.bundle)
    if reason is None and source is None:
        reason = (f"no Hugging Face directory for model {ctx.manifest.model!r}: genai's "
                  "builder needs one (export the bundle from a model directory)")
    if reason is not None:
        return {}, [{**where, "reason": reason}], {}
    try:
        models = genai_build.prepare_genai(source, genai_dir or ctx.scratch / "genai",
                                           ctx.adapters.adapters[lora], ctx.opts.threads)
        built = genai_peer.open_cases(models)
    except (ExportError, MissingPackageError) as exc:
        return {}, [{**where, "reason": f"{type(exc).__name__}: {exc}"}], {}
    for case, peer in built.items():
        adapter = None if case == "base" else lora
        tokens.check(GENAI.fields(), case, peer, adapter)
        if adapter is not None:
            tokens.check_logits(GENAI.fields(), case, peer.logits(tokens.prompt), adapter)
    info = {"version": genai_peer.version(), "models": str(models.base.parent),
            "precision": "fp32", "lora_params": models.lora_params, "lora_adapter": lora}
    return {(GENAI, case): peer for case, peer in built.items()}, [], info


def torch_cases(ctx: BenchContext, lm, tokens: TokenParity, lora: str
                ) -> tuple[dict[Key, object], dict]:
    """transformers eager: ``base`` (the parity reference itself) and ``peft-lora`` (PEFT
    holding the run's LoRA ``lora`` unfused, checked by ``tokens``). Returns (cases, the
    report's peer info). ``omp_wait_policy``: the ``OMP_WAIT_POLICY`` the process started
    with (PASSIVE, else torch's OpenMP workers spin after each step and take the cores from the
    case timed next; it is read when torch loads, so it must be set before the command)."""
    import peft
    import torch
    import transformers

    from edgeadapt.bench.peers import peft_lora_model

    pm, _ = peft_lora_model(lm.model, [ctx.adapters.adapters[lora]])
    peft_case = TorchCase(pm)
    tokens.check(PYTORCH.fields(), "peft-lora", peft_case, lora)
    info = {"torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "peft": peft.__version__, "lora_adapter": lora,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    return {(PYTORCH, "base"): TorchCase(lm.model), (PYTORCH, "peft-lora"): peft_case}, info
