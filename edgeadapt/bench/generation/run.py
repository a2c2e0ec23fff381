"""One generation benchmark over a bundle exported with ``--generate`` (the parts: the package
docstring, :mod:`edgeadapt.bench.generation`). Every case is checked before anything is timed;
a mismatch anywhere raises ParityError."""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeadapt.bench.adapters import collect
from edgeadapt.bench.backends import PYTORCH, Target, parse_targets, unavailable
from edgeadapt.bench.generation.cases import BackendCases, backend_cases, no_decoder
from edgeadapt.bench.generation.load import time_under_load
from edgeadapt.bench.generation.options import GenerateOptions
from edgeadapt.bench.generation.parity import TokenParity
from edgeadapt.bench.generation.peers import GENAI, genai_cases, torch_cases
from edgeadapt.bench.generation.requests import check_requests, check_restore, time_requests
from edgeadapt.bench.generation.timing import Key, cross_ratios, time_decode, time_first_tokens
from edgeadapt.bench.head import report_head
from edgeadapt.bench.options import BenchContext, BenchOptions
from edgeadapt.bench.parity import ParityLog
from edgeadapt.bench.reference import Subject
from edgeadapt.errors import ConfigError, MissingPackageError
from edgeadapt.format.manifest import read_manifest
from edgeadapt.runtime.generate import GenerationSpec
from edgeadapt.runtime.inputs import check_inputs

__all__ = ["run_generate"]


def _prompt(subject: Subject, tokens: int) -> np.ndarray:
    """A prompt of ``tokens`` random token ids (1-D int64), as the subject draws them."""
    return np.asarray(subject.inputs(1, tokens)["input_ids"][0], dtype=np.int64)


def _ours(ctx: BenchContext, targets: list[Target], check_in: dict[str, np.ndarray],
          tokens: TokenParity, skipped: list[dict]) -> dict[Target, BackendCases]:
    """Every target's checked cases; a target that cannot generate here goes to
    ``skipped`` (no package, no bundle section, no decoder, or one not on this device)."""
    ours = {}
    for target in targets:
        reason = unavailable(target, ctx.manifest) or no_decoder(target)
        if reason is None:
            try:
                ours[target] = backend_cases(ctx, target, check_in, tokens.prompt[:2])
            except (MissingPackageError, ConfigError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            skipped.append({**target.fields(), "what": "generate", "reason": reason})
            gc.collect()
            continue
        skipped.extend(ours[target].skipped)
        for case, (runtime_case, adapter) in ours[target].cases.items():
            tokens.check(target.fields(), case, runtime_case, adapter)
    return ours


def _switches(ours: dict[Target, BackendCases], names: list[str], prompt: np.ndarray,
              gen: GenerateOptions, warmup: int, parity: ParityLog
              ) -> tuple[list[dict], list[dict], list[dict]]:
    """The switch between requests and under load on each target's SHiRA runtime, each
    series checked after it ran; returns (switch rows, load rows, parity rows)."""
    switch, load, rows = [], [], []
    for target, built in ours.items():
        rt = built.runtime("shira-fused")
        switch.append(time_requests(rt, target, names, prompt, reply_tokens=gen.reply_tokens,
                                    requests=gen.requests, warmup=warmup))
        rows += check_requests(parity, rt, target, names, built.shira_base_out)
        load.append(time_under_load(rt, target, names, prompt, reply_tokens=gen.reply_tokens,
                                    switches=gen.load_switches,
                                    interval_ms=gen.load_interval_ms, warmup=warmup))
        rows.append(check_restore(rt, target, "under-load"))
    return switch, load, rows


def run_generate(bundle_dir: str | Path, opts: BenchOptions, gen: GenerateOptions,
                 subject: Subject | None = None,
                 progress: Callable[[int], object] | None = None) -> dict:
    """Measure generation on ``bundle_dir``; returns the report (its ``generate`` section:
    :mod:`edgeadapt.bench.generation.schema`). BundleError for a bundle that cannot generate;
    ConfigError for sizes the bundle's context cannot hold, or a subject without a PyTorch
    model; backends without a decoder and peers that cannot run here are ``skipped``."""
    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)
    spec = GenerationSpec.of(manifest)
    gen.check(spec.max_context, opts.warmup)
    targets = parse_targets(opts.backends, opts.device)
    if subject is None:
        from edgeadapt.bench.reference import TorchSubject

        subject = TorchSubject(manifest, bundle)
    lm = getattr(subject, "lm", None)
    if lm is None:
        raise ConfigError("the generation bench checks every case against the PyTorch model: "
                          "the subject has none")
    if opts.peers:
        from edgeadapt.bench.peers import require_peft

        require_peft()
    prompts = {n: _prompt(subject, n) for n in gen.prompt_tokens}
    contexts = {n: _prompt(subject, n) for n in gen.contexts}
    skipped: list[dict] = []
    peers: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgeadapt-bench-generate-") as scratch:
        aset = collect(bundle, manifest, Path(scratch), density=opts.density, lora_rank=None)
        ctx = BenchContext(bundle, manifest, opts, aset, Path(scratch), progress)
        shira, lora = aset.of("shira")[:2], aset.of("lora")[0]
        check_in = check_inputs(manifest.inputs, subject.inputs(1, 8))
        parity = ParityLog(subject, aset, check_in)
        tokens = TokenParity(lm, aset, prompts[gen.prompt_tokens[0]], gen.parity_tokens,
                             spec.eos_token_ids)
        ours = _ours(ctx, targets, check_in, tokens, skipped)
        cases: dict[Key, object] = {(t, c): rc for t, b in ours.items()
                                    for c, (rc, _) in b.cases.items()}
        if opts.peers:
            more, skips, peers["onnxruntime-genai"] = genai_cases(ctx, gen.genai_dir, tokens,
                                                                  lora)
            cases.update(more)
            skipped.extend(skips)
            more, peers["pytorch"] = torch_cases(ctx, lm, tokens, lora)
            cases.update(more)
        else:
            skipped += [{**t.fields(), "what": "peer", "reason": "--no-peers"}
                        for t in (GENAI, PYTORCH)]
        peer_keys = [k for k in cases if k[0] not in ours]
        first, first_raw = time_first_tokens(cases, prompts, repeats=gen.ttft_repeats,
                                             warmup=opts.warmup, progress=progress)
        decode, decode_raw = time_decode(cases, contexts, steps=gen.decode_steps,
                                         warmup=opts.warmup, progress=progress)
        ratios = [r for field, raws in (("prompt_tokens", first_raw), ("context", decode_raw))
                  for size, raw in raws.items()
                  for r in cross_ratios(raw, list(ours), peer_keys, field, size)]
        del cases
        switch, load, checked = _switches(ours, shira, tokens.prompt, gen, opts.warmup, parity)
        head = report_head(manifest, opts.threads, {t.key: b.threads for t, b in ours.items()},
                           {t.key: b.live_form for t, b in ours.items()})
        del ours
        gc.collect()
    section = {"prompt_tokens": gen.prompt_tokens, "contexts": gen.contexts,
               "decode_steps": gen.decode_steps, "ttft_repeats": gen.ttft_repeats,
               "warmup": opts.warmup, "parity_tokens": gen.parity_tokens,
               "shira_adapter": shira[0], "lora_adapter": lora,
               "first_token": first, "decode": decode, "ratios": ratios, "switch": switch,
               "load": load, "parity": tokens.rows + checked + parity.rows, "peers": peers}
    return {**head, "skipped": skipped, "adapters": aset.describe(), "generate": section}
