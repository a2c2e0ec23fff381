"""The quantized-base benchmark: forward latency of fp32, int8 and int4 bundles of one model
(base and a fused SHiRA), beside ONNX Runtime's stock quantized model of the same weights, the
switch on codes against its memory-traffic floor, and the sizes (docs/quantized.md).

    python -m edgeadapt.bench.quantized --model smollm2 --work bundles/quant-smollm2 \\
        --threads 2 --json docs/bench/smollm2-quantized-run1.json

Per precision ``p`` (bundles exported into ``--work/<p>`` when missing, ``--targets qv``):

- ``p base`` / ``p shira-fused``: edgeadapt's live runtime, without and with a synthetic SHiRA
  adapter fused (1% of every live weight, values 0.01 N(0, 1), re-quantized onto the codes).
- ``p hybrid`` (int8, int4): the fp32 bundle with only the rest quantized, its live weights
  left fp32 (:func:`ensure_hybrid`): is a quantized rest alone enough?
- ``p stock`` (int8, int4): what a user of ONNX Runtime runs for that precision: the fp32
  bundle's graph with every weight constant, quantized whole by the backend's own tool
  (:func:`edgeadapt.export.onnx_quant.quantize_rest`: ``MatMulNBits`` blocks of 32, accuracy
  level 4) and packed by ONNX Runtime. Same threads,
  spinning off.

Checked before anything is timed (ParityError otherwise): every quantized runtime's codes are
exactly the grid's (the base against ``codes_sha256``; the fused one against the codes computed
here from the fp32 weights and the adapter, :func:`expected_codes`), and edgeadapt's kernel in
the real graph equals stock ONNX Runtime running the same graph's own dequantization, both with
float activations in the rest (:func:`kernel_parity`, ``RTOL``). The distance of each output to
the stock model is recorded, not gated: with int8 activations, a float difference that moves
one activation across a rounding boundary changes it by a whole step, and such steps compound
(:func:`edgeadapt.export.onnx_quant.float_activations`).

All forward cases of a shape are interleaved round by round (:func:`edgeadapt.timer.
time_interleaved`); each ratio is the median of per-round ratios of one run. The switch: a
full switch between two synthetic SHiRA adapters (a cached pair: one scatter of codes), timed
with a 128 MiB copy before each (:class:`~edgeadapt.bench.floor.CopyProbe`), against the floor
of :mod:`edgeadapt.bench.floor` for 1-byte codes (4-byte values in fp32), and the same switch
written by numpy's fancy assignment instead of the native scatter (``numpy_scatter``,
:mod:`edgeadapt.runtime.scatter`) in the same rounds.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import click
import numpy as np

from edgeadapt.bench.floor import CopyProbe, floor_ratios, switch_traffic
from edgeadapt.bench.synth import synth_shira
from edgeadapt.bench.timing import Ratio, Stats
from edgeadapt.errors import ConfigError, ParityError
from edgeadapt.export.onnx import RTOL
from edgeadapt.format import read_manifest
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.format.layout import TRANSPOSED, to_backend
from edgeadapt.format.quant import PRECISIONS
from edgeadapt.numeric import rel_error
from edgeadapt.timer import time_interleaved

SHAPES = ((1, 1), (1, 64), (8, 64))


def ensure_bundle(model: str, work: Path, precision: str) -> Path:
    """``work/<precision>``, exported (ONNX Runtime, q/v live) if it has no bundle.json."""
    out = work / precision
    if not (out / "bundle.json").is_file():
        from edgeadapt.export.bundle import export_base

        export_base(model, out, backends="onnxruntime", targets="qv", precision=precision)
    return out


def ensure_hybrid(work: Path, lm, precision: str) -> Path:
    """``work/<precision>-hybrid``: the fp32 bundle with its rest quantized and its live weights
    left fp32 (what the issue asked to measure first: is a quantized rest enough?)."""
    import shutil

    import onnx

    from edgeadapt.export import onnx_graph as og
    from edgeadapt.export.onnx_quant import constant_matmuls, quantize_rest
    from edgeadapt.models.targets import quantized_weight_names

    out = work / f"{precision}-hybrid"
    if (out / "bundle.json").is_file():
        return out
    tmp = work / f"{precision}-hybrid.building"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "fp32", tmp)
    manifest = read_manifest(tmp)
    path = tmp / manifest.onnxruntime["file"]
    proto = onnx.load(str(path))
    rest = {w: lm.model.get_submodule(w.removesuffix(".weight")).weight.detach().float()
            .numpy() for w in quantized_weight_names(lm.model, lm.kind)
            if w not in manifest.weights}
    proto = quantize_rest(proto, constant_matmuls(proto, rest), precision)
    if og.save_with_external_data(proto, tmp, path.name) != manifest.onnxruntime["data"]:
        raise ConfigError(f"{tmp}: the quantized graph's data files differ from the bundle's")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def constant_graph(fp32_bundle: Path, lm):
    """The fp32 bundle's graph with its live weights constants again (``(in, out)``
    initializers read by plain MatMuls, as torch's exporter writes a Linear), the value infos
    the rewrites left stale dropped: the model a user of the backend would quantize."""
    import onnx
    from onnx import numpy_helper

    from edgeadapt.graphs.blocked import unblock_live_matmuls

    manifest = read_manifest(fp32_bundle)
    proto = onnx.load(str(fp32_bundle / manifest.onnxruntime["file"]))
    names = {w: e.onnxruntime["name"] for w, e in manifest.weights.items()}
    renamed = unblock_live_matmuls(proto, list(names.values()))
    inputs = {i.name: i for i in proto.graph.input}
    for w, name in names.items():
        name = renamed.get(name, name)
        proto.graph.input.remove(inputs[name])
        value = lm.model.get_parameter(w).detach().float().numpy()
        proto.graph.initializer.append(numpy_helper.from_array(to_backend(value, TRANSPOSED),
                                                               name))
    del proto.graph.value_info[:]
    return proto


def stock_session(fp32_bundle: Path, lm, precision: str, threads: int):
    """ONNX Runtime's own quantized model of the same weights (module docstring): the fp32
    bundle's graph, live weights made constants again (:func:`constant_graph`), quantized whole
    by the backend's tool."""
    from edgeadapt.export.onnx_quant import constant_matmuls, quantize_rest
    from edgeadapt.models.targets import quantized_weight_names
    from edgeadapt.runtime.backends.onnxruntime.session import open_session, session_options

    model = lm.model
    proto = constant_graph(fp32_bundle, lm)
    weights = {w: model.get_submodule(w.removesuffix(".weight")).weight.detach().float().numpy()
               for w in quantized_weight_names(model, lm.kind)}
    proto = quantize_rest(proto, constant_matmuls(proto, weights), precision)
    return open_session(proto.SerializeToString(), session_options(threads), fp32_bundle)


def check_codes(rt, lm, adapter) -> None:
    """ParityError unless ``rt``'s codes are those of ``adapter`` fused (at scale 1) on the
    grid: the base's codes of the fp32 weights, each touched entry re-quantized."""
    for w, lw in rt.store.live_weights().items():
        if lw.codes is None:
            continue
        g = lw.codes.grid
        q, s = g.quantize(lm.model.get_parameter(w).detach().float().numpy())
        t = adapter.targets.get(w)
        if t is not None:
            flat = q.reshape(-1)
            flat[t.indices] = g.requantize(flat[t.indices], g.scale_at(s, q.shape, t.indices),
                                           t.values)[0]
        if not np.array_equal(lw.torch_weight(), q):
            raise ParityError(f"{w}: the runtime's codes are not the grid's codes of the "
                              "adapter fused on the base; refusing to time it")


def kernel_parity(bundle: Path, rt, threads: int, vocab: int) -> float:
    """``rel_error`` between edgeadapt's kernel on ``rt``'s live codes and stock ONNX Runtime
    running the same graph's own dequantization of them, both on the bundle's graph with float
    activations in the rest (so that only the kernel differs), on 2 x 40 random tokens."""
    import onnxruntime as ort

    from edgeadapt.export.onnx_quant import float_activations
    from edgeadapt.runtime.backends.onnxruntime.store import OrtLiveStore

    section = rt.manifest.onnxruntime
    live = rt.store.live_weights()
    ids = np.random.default_rng(5).integers(5, vocab, (2, 40)).astype(np.int64)
    with float_activations(bundle / section["file"]) as copy:
        store = OrtLiveStore(copy, live, rt.manifest.inputs, rt.store.graph_names, threads,
                             kernel=True)
        if not store.kernel:
            raise ParityError(f"{bundle}: edgeadapt's kernel did not load")
        got = store.run({"input_ids": ids})
        feeds = {"input_ids": ids}
        for w, lw in live.items():
            feeds[rt.store.graph_names[w]] = lw.array
            if lw.codes is not None:
                feeds[lw.codes.name] = lw.codes.array
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        plain = ort.InferenceSession(str(copy), so, providers=["CPUExecutionProvider"])
        want = plain.run(None, feeds)[0]
    return rel_error(got, want)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()
               and "adapters" not in f.parts)


def run(model: str, work: Path, threads: int, repeats: int, switch_repeats: int,
        shapes=SHAPES, precisions=PRECISIONS) -> dict:
    from edgeadapt.format.adapter_file import write_adapter
    from edgeadapt.models import load_model
    from edgeadapt.runtime import load

    lm = load_model(model, seed=0)
    bundles = {p: ensure_bundle(model, work, p) for p in precisions}
    manifest = read_manifest(bundles[precisions[0]])
    shapes_w = {w: tuple(e.shape) for w, e in manifest.weights.items()}
    sha = {w: e.sha256 for w, e in manifest.weights.items()}
    adapters = [synth_shira(shapes_w, sha, density=0.01, seed=s) for s in (0, 1)]
    adapter_file = work / "shira-synthetic.eadp"
    write_adapter(adapter_file, adapters[0], value_dtype="float32")
    hybrids = {p: load(ensure_hybrid(work, lm, p), mode="live", threads=threads)
               for p in precisions if p != "fp32"}
    runtimes = {p: load(bundles[p], mode="live", threads=threads) for p in precisions}
    fused = {p: load(bundles[p], mode="live", threads=threads) for p in precisions}
    kernel_errors: dict[str, float] = {}
    preps = {p: [rt.engine.prepare(a, f"s{i}") for i, a in enumerate(adapters)]
             for p, rt in fused.items()}
    for p, rt in fused.items():
        rt.engine.switch([(preps[p][0], 1.0)])
        if p != "fp32":
            runtimes[p].engine.verify_base()
            check_codes(rt, lm, adapters[0])
            report_kernel = kernel_parity(bundles[p], rt, threads, lm.vocab_size)
            if not report_kernel <= RTOL:
                raise ParityError(f"{p}: edgeadapt's kernel in the real graph differs from ONNX "
                                  f"Runtime's own dequantization by {report_kernel:.3g} > {RTOL}")
            kernel_errors[p] = report_kernel
    stock = {p: stock_session(bundles["fp32"], lm, p, threads)
             for p in precisions if p != "fp32"}
    rng = np.random.default_rng(0)
    report: dict = {"model": model, "threads": threads, "host": platform.node(),
                    "cpu_count": os.cpu_count(), "forward": [], "ratios": [],
                    "parity": {"kernel_vs_own_dequantization": kernel_errors,
                               "codes": "exact"}, "switch": {}, "sizes": {}}
    for b, s in shapes:
        ids = rng.integers(5, lm.vocab_size, (b, s)).astype(np.int64)
        cases = {}
        for p in precisions:
            cases[f"{p} base"] = lambda rt=runtimes[p], x=ids: rt.run(input_ids=x)
            cases[f"{p} shira-fused"] = lambda rt=fused[p], x=ids: rt.run(input_ids=x)
            if p in hybrids:
                cases[f"{p} hybrid"] = lambda rt=hybrids[p], x=ids: rt.run(input_ids=x)
            if p in stock:
                cases[f"{p} stock"] = lambda s_=stock[p], x=ids: s_.run(None, {"input_ids": x})
                want = cases[f"{p} stock"]()[0]
                for case in (f"{p} base", f"{p} hybrid"):
                    out = cases[case]()
                    report["parity"][f"{case} vs stock {b}x{s}"] = {
                        "max_rel_error": rel_error(out, want),
                        "argmax_agree": float((out.argmax(-1) == want.argmax(-1)).mean())}
        samples = time_interleaved(cases, repeats=repeats, warmup=3)
        for name, ms in samples.items():
            report["forward"].append({"shape": f"{b}x{s}", "case": name,
                                      **Stats.of(ms).as_dict()})
        pairs = [(f"{p} shira-fused", f"{p} base") for p in precisions]
        pairs += [(f"{p} base", f"{p} stock") for p in stock]
        pairs += [(f"{p} hybrid", f"{p} base") for p in hybrids]
        pairs += [(f"fp32 {c}", f"{p} {c}") for p in precisions if p != "fp32"
                  for c in ("base", "shira-fused")]
        for num, den in pairs:
            report["ratios"].append({"shape": f"{b}x{s}", **Ratio.of(samples, num, den)
                                     .as_dict()})
    probe = CopyProbe()
    for p, rt in fused.items():
        pair = [[(preps[p][1], 1.0)], [(preps[p][0], 1.0)]]
        state = {"k": 0}

        def switch(rt=rt, pair=pair, state=state) -> None:
            rt.engine.switch(pair[state["k"] % 2])
            state["k"] += 1

        def numpy_switch(rt=rt, switch=switch) -> None:  # the same with numpy's scatter
            native, rt.engine.native_scatter = rt.engine.native_scatter, False
            try:
                switch()
            finally:
                rt.engine.native_scatter = native

        cases = {"copy": probe, "switch": switch}
        if rt.engine.native_scatter:
            cases["switch-numpy"] = numpy_switch
        samples = time_interleaved(cases, repeats=switch_repeats, warmup=4)
        live = rt.store.live_weights()
        codes = any(lw.codes is not None for lw in live.values())
        traffic = switch_traffic(
            {w: t.indices for w, t in adapters[0].targets.items()},
            {w: t.indices for w, t in adapters[1].targets.items()}, shapes_w,
            layouts={w: lw.layout for w, lw in live.items()},
            itemsize=1 if codes else 4, value_bytes=1 if codes else 4)
        rt.engine.switch([(preps[p][0], 1.0)])
        report["switch"][p] = {**Stats.of(samples["switch"]).as_dict(),
                               **floor_ratios(samples["switch"],
                                              probe.bandwidth(samples["copy"]), traffic),
                               "restore_bytes": rt.restore_memory_bytes(),
                               "saturated": sum(rt.engine.saturated.values()),
                               "native_scatter": rt.engine.native_scatter}
        if "switch-numpy" in samples:  # what the native scatter saves, in the same rounds
            report["switch"][p]["numpy_scatter"] = {
                **Stats.of(samples["switch-numpy"]).as_dict(),
                "native_over_numpy": Ratio.of(samples, "switch", "switch-numpy").as_dict()}
    report["lora_fused"] = lora_fused(runtimes, shapes_w, sha, switch_repeats)
    report["sizes"] = {p: {"bundle_bytes": _dir_bytes(bundles[p]),
                           "live_bytes": sum(lw.array.nbytes for lw in
                                             runtimes[p].store.live_weights().values())}
                       for p in precisions}
    report["sizes"]["adapter_file_bytes"] = adapter_file.stat().st_size
    return report


def decode_section(lm, generate_bundles: dict[str, Path], genai_dir: Path | None,
                   threads: int, contexts=(128, 1024), steps: int = 40, warmup: int = 3
                   ) -> dict:
    """Decode ms/token of edgeadapt's decoders per precision (``generate_bundles``: precision
    -> a bundle exported with ``--generate``), base and the synthetic SHiRA fused, beside
    onnxruntime-genai's int4 model and its multi-LoRA adapter holding an equal-parameter LoRA
    (built under ``genai_dir``; skipped where genai is not installed). Parity first: each of
    edgeadapt's decoders gives greedy tokens that are the argmax of its own full forward
    (:func:`_decoder_parity`), genai's adapter must change its logits; edgeadapt's int4 logits
    against genai's are recorded."""
    from edgeadapt.bench.backends import Target
    from edgeadapt.bench.generation import genai_build, genai_peer
    from edgeadapt.bench.generation.decoding import RuntimeCase, ignore_end_of_turn
    from edgeadapt.bench.generation.peers import GENAI
    from edgeadapt.bench.generation.timing import time_decode
    from edgeadapt.bench.synth import equal_rank, synth_lora
    from edgeadapt.runtime import load

    ours = Target("onnxruntime", "cpu")
    rng = np.random.default_rng(1)
    prompts = {n: rng.integers(5, lm.vocab_size, n).astype(np.int64) for n in contexts}
    probe = rng.integers(5, lm.vocab_size, 64).astype(np.int64)
    cases, section = {}, {"parity": {}, "skipped": []}
    logits = {}
    for p, bundle in generate_bundles.items():
        manifest = read_manifest(bundle)
        shapes = {w: tuple(e.shape) for w, e in manifest.weights.items()}
        sha = {w: e.sha256 for w, e in manifest.weights.items()}
        shira = synth_shira(shapes, sha, density=0.01, seed=0)
        for case in ("base", "shira-fused"):
            rt = load(bundle, mode="live", threads=threads)
            ignore_end_of_turn(rt)
            if case == "shira-fused":
                rt.engine.switch([(rt.engine.prepare(shira, "s0"), 1.0)])
            cases[ours, f"{p} {case}"] = RuntimeCase(rt)
        logits[p] = cases[ours, f"{p} base"].rt.run(input_ids=probe[None])[0, -1]
        for case in ("base", "shira-fused"):
            section["parity"][f"{p} {case} decoder = forward argmax"] = _decoder_parity(
                cases[ours, f"{p} {case}"].rt, probe)
    if "int4" in generate_bundles and genai_dir is not None:
        bundle = generate_bundles["int4"]
        manifest = read_manifest(bundle)
        reason = genai_build.genai_missing()
        source = None if reason else genai_build.hf_dir(manifest, bundle)
        if source is None:
            section["skipped"].append({"peer": "onnxruntime-genai", "reason": reason or
                                       "no Hugging Face directory"})
        else:
            shapes = {w: tuple(e.shape) for w, e in manifest.weights.items()}
            sha = {w: e.sha256 for w, e in manifest.weights.items()}
            positions = sum(round(0.01 * a * b) for a, b in shapes.values())
            lora = synth_lora(shapes, sha, rank=equal_rank(shapes, positions), seed=0)
            models = genai_build.prepare_genai(source, genai_dir, lora, threads, "int4")
            for case, peer in genai_peer.open_cases(models).items():
                cases[GENAI, f"int4 {case}"] = peer
            g_base = cases[GENAI, "int4 base"].logits(probe)
            g_lora = cases[GENAI, "int4 lora-adapter"].logits(probe)
            section["parity"] |= {
                "ours_int4_vs_genai_int4": rel_error(logits["int4"], g_base),
                "genai_lora_vs_genai_base": rel_error(g_lora, g_base),
                "greedy_agree": _agree(cases[ours, "int4 base"].greedy(probe, 8),
                                       cases[GENAI, "int4 base"].greedy(probe, 8)),
                "lora_params": models.lora_params, "lora_rank": lora.targets[
                    next(iter(lora.targets))].rank}
            if not section["parity"]["genai_lora_vs_genai_base"] > 1e-4:
                raise ParityError("onnxruntime-genai's LoRA adapter does not change its logits")
    rows, raw = time_decode(cases, prompts, steps=steps, warmup=warmup)
    section["rows"] = [{k: v for k, v in r.items() if not k.startswith("ratio_vs")}
                       for r in rows]
    names = {k: f"{k[0].key} {k[1]}" for k in cases}
    pairs = [(f"{p} shira-fused", f"{p} base", ours, ours) for p in generate_bundles]
    if (GENAI, "int4 base") in cases:
        pairs += [("int4 base", "int4 base", GENAI, ours),
                  ("int4 lora-adapter", "int4 shira-fused", GENAI, ours)]
    if "fp32" in generate_bundles and "int4" in generate_bundles:
        pairs += [("fp32 shira-fused", "int4 shira-fused", ours, ours),
                  ("fp32 base", "int4 base", ours, ours)]
    section["ratios"] = [
        {"context": n, **Ratio.of(raw[n], names[nt, num], names[dt, den]).as_dict()}
        for n in contexts for num, den, nt, dt in pairs]
    return section


def _decoder_parity(rt, prompt: np.ndarray, n: int = 8) -> int:
    """ParityError unless each of ``n`` greedy tokens of ``rt``'s decoder is the argmax (within
    1e-3 of the top logit's magnitude) of ``rt``'s full forward over its whole context; ``n``."""
    ids = list(rt.generate(prompt, max_new_tokens=n).ids)
    logits = rt.run(input_ids=np.array([list(prompt) + ids]))[0]
    for k, token in enumerate(ids):
        row = logits[len(prompt) + k - 1]
        if row[token] < row.max() - 1e-3 * np.abs(row).max():
            raise ParityError(f"decoder token {k} ({token}) is not the forward's argmax "
                              f"({int(row.argmax())}); refusing to time it")
    return n


def _agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy replies share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def lora_fused(runtimes: dict, shapes, sha, repeats: int) -> dict:
    """A LoRA fused on each precision's base (an equal-parameter LoRA of the SHiRA adapter's
    size, rank from :func:`~edgeadapt.bench.synth.equal_rank`): the switch base <-> LoRA (a
    dense write; on codes, every entry of the touched matrices re-quantized) and how much of
    ``B A`` the weights really change by, ``||W' - W0 - B A|| / ||B A||`` over the live weights
    (fp32: rounding only; on a grid, what rounds away)."""
    from edgeadapt.bench.synth import equal_rank, synth_lora

    positions = sum(round(0.01 * a * b) for a, b in shapes.values())
    lora = synth_lora(shapes, sha, rank=equal_rank(shapes, positions), seed=0)
    out = {}
    for p, rt in runtimes.items():
        prep = rt.engine.prepare(lora, "lora")
        base = rt.live_weights()
        rt.engine.switch([(prep, 1.0)])
        moved = rt.live_weights()
        lost = sum(float(np.linalg.norm(moved[w] - base[w] - t.B @ t.A) ** 2)
                   for w, t in lora.targets.items())
        total = sum(float(np.linalg.norm(t.B @ t.A) ** 2) for t in lora.targets.values())
        state = {"k": 0}

        def switch(rt=rt, prep=prep, state=state) -> None:
            rt.engine.switch([] if state["k"] % 2 == 0 else [(prep, 1.0)])
            state["k"] += 1

        ms = time_interleaved({"switch": switch}, repeats=max(2, repeats // 5), warmup=2)
        rt.engine.switch([])
        out[p] = {**Stats.of(ms["switch"]).as_dict(), "rank": lora.targets[
            next(iter(lora.targets))].rank, "delta_lost": (lost / total) ** 0.5}
    return out


def table(report: dict) -> str:
    """The report's ratios as a markdown table."""
    lines = ["| forward shape / decode context | ratio | paired median (p10-p90) |",
             "|---|---|---|"]
    rows = [(r["shape"], r) for r in report.get("ratios", [])]
    rows += [(f"decode @{r['context']}", r) for r in report.get("decode", {}).get("ratios", [])]
    for where, r in rows:
        lines.append(f"| {where} | {r['num']} / {r['den']} | {r['paired_median']:.3f} "
                     f"({r['paired_p10']:.3f}-{r['paired_p90']:.3f}) |")
    return "\n".join(lines)


@click.command()
@click.option("--model", default="smollm2", show_default=True)
@click.option("--work", required=True, type=click.Path(file_okay=False),
              help="folder of the fp32/int8/int4 bundles (exported when missing)")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=30, show_default=True, type=click.IntRange(min=0),
              help="timed rounds per forward shape (0: no forward rows)")
@click.option("--switch-repeats", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--generate", "generate_bundles", multiple=True, metavar="PRECISION=BUNDLE",
              help="decode rows for a bundle exported with --generate, e.g. "
                   "int4=bundles/smollm2-generate-int4 (repeatable)")
@click.option("--genai-dir", type=click.Path(file_okay=False), default=None,
              help="where onnxruntime-genai's int4 peer is built (and reused)")
@click.option("--decode-steps", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(model: str, work: str, threads: int, repeats: int, switch_repeats: int,
         generate_bundles: tuple[str, ...], genai_dir: str | None, decode_steps: int,
         json_path: str | None) -> None:
    """Forward, switch and sizes of quantized bundles against the stock quantized model (and,
    with --generate, decode against onnxruntime-genai int4)."""
    report = run(model, Path(work), threads, repeats, switch_repeats) if repeats else {}
    if generate_bundles:
        from edgeadapt.models import load_model

        pairs = dict(item.split("=", 1) for item in generate_bundles)
        report["decode"] = decode_section(load_model(model, seed=0),
                                          {p: Path(b) for p, b in pairs.items()},
                                          Path(genai_dir) if genai_dir else None, threads,
                                          steps=decode_steps)
    if json_path:
        atomic_write_bytes(Path(json_path), [json.dumps(report, indent=1).encode() + b"\n"])
    click.echo(table(report))
    click.echo(json.dumps({k: report[k] for k in ("switch", "sizes") if k in report},
                          indent=1))


if __name__ == "__main__":
    main()
