"""The quantized-base benchmark: forward latency of fp32, int8 and int4 bundles of one model
(base and a fused SHiRA) on ONNX Runtime and ExecuTorch, beside each backend's stock quantized
model of the same weights, the switch on codes against its memory-traffic floor, and the sizes
(docs/quantized.md).

    python -m edgeadapt.bench.quantized --model smollm2 --work bundles/quant-smollm2 \\
        --backends onnxruntime,executorch --threads 2 --json docs/bench/smollm2-quantized-run2.json

``--backends``: ``onnxruntime`` and/or ``executorch`` (default: both where executorch and
torchao import). Per precision ``p`` (bundles exported into ``--work/<p>`` and
``--work/executorch-<p>`` when missing, ``--targets qv``; ExecuTorch's case names, switch and
size rows are prefixed ``executorch ``, ONNX Runtime's keep the names of the first reports):

- ``p base`` / ``p shira-fused``: edgeadapt's live runtime, without and with a synthetic SHiRA
  adapter fused (1% of every live weight, values 0.01 N(0, 1), re-quantized onto the codes).
- ``p hybrid`` (ONNX Runtime, int8, int4; not int4-affine): the fp32 bundle with only the
  rest quantized, its live weights left fp32 (:func:`ensure_hybrid`): is a quantized rest
  alone enough?
- ``p stock`` (every quantized ``p``): what a user of the backend runs for that precision.
  ONNX Runtime: the fp32 bundle's graph with every weight constant, quantized whole by the
  backend's own tool (:func:`edgeadapt.export.onnx_quant.quantize_rest`: ``MatMulNBits`` blocks
  of 32, accuracy level 4, each weight on its grid's bits (int4-affine-live8's q/v on int8);
  for an affine grid its asymmetric form,
  a uint8 zero point per block, the tool's nearest to an offset: ``MatMulNBits`` with float
  zero points is exact but runs a dequantizing fallback, 21x slower in
  experiments/zero_point_probe.py) and packed by ONNX Runtime. ExecuTorch: the fp32
  model with every Linear of the blocks (q/v included) quantized by torchao as the bundle's
  rest is and lowered whole to XNNPACK (:func:`edgeadapt.export.executorch_quant.stock_program`,
  ``work/executorch-<p>-stock.pte``). Same threads (ONNX Runtime: spinning off).

Checked before anything is timed (ParityError otherwise): every quantized runtime's codes are
exactly the grid's (the base against ``codes_sha256``; the fused one against the codes computed
here from the fp32 weights and the adapter, :func:`expected_live`); on ONNX Runtime,
edgeadapt's kernel in the real graph equals stock ONNX Runtime running the same graph's own
dequantization, both with float activations in the rest (:func:`kernel_parity`, ``RTOL``); on
ExecuTorch, base and fused outputs at every timed shape equal the PyTorch model the export is
held to, holding the same live values (:func:`edgeadapt.bench.quantized_executorch.
executorch_parity`). The distance of each output to the stock model is recorded, not gated:
with int8 activations, a float difference that moves one activation across a rounding
boundary changes it by a whole step, and such steps compound
(:func:`edgeadapt.export.onnx_quant.float_activations`).

All forward cases of a shape, both backends', are interleaved round by round
(:func:`edgeadapt.timer.time_interleaved`); each ratio is the median of per-round ratios of one
run (:func:`ratio_pairs`). The switch (:func:`switch_row`, per backend and precision): a full
switch between two synthetic SHiRA adapters (a cached pair: one scatter of codes), timed with a
128 MiB copy before each (:class:`~edgeadapt.bench.floor.CopyProbe`), against the floor of
:mod:`edgeadapt.bench.floor` for 1-byte codes (4-byte values in fp32) in the live buffers'
layouts and addresses, and the same switch written by numpy's fancy assignment instead of the
native scatter (``numpy_scatter``, :mod:`edgeadapt.runtime.scatter`) in the same rounds.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from edgeadapt.bench.floor import CACHE_LINE, CopyProbe, floor_ratios, switch_traffic
from edgeadapt.bench.synth import synth_shira
from edgeadapt.bench.timing import Ratio, Stats
from edgeadapt.errors import ConfigError, ParityError
from edgeadapt.export.onnx import RTOL
from edgeadapt.format import read_manifest
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.format.layout import TRANSPOSED, to_backend
from edgeadapt.format.quant import PRECISIONS, codes_weight, grid
from edgeadapt.format.types import Adapter
from edgeadapt.models import LoadedModel
from edgeadapt.numeric import rel_error
from edgeadapt.timer import time_interleaved

if TYPE_CHECKING:
    from edgeadapt.runtime.api import Runtime

SHAPES = ((1, 1), (1, 64), (8, 64))
BACKENDS = ("onnxruntime", "executorch")
#: what each backend's case names start with (ONNX Runtime's are those of the first reports)
PREFIX = {"onnxruntime": "", "executorch": "executorch "}

Forward = Callable[[np.ndarray], np.ndarray]  # input_ids (batch, seq) -> logits


def default_backends() -> tuple[str, ...]:
    """Both backends where ExecuTorch and torchao import, else ONNX Runtime alone."""
    from importlib.util import find_spec

    return BACKENDS if all(find_spec(m) for m in ("executorch", "torchao")) else BACKENDS[:1]


def bundle_dir(work: Path, precision: str, backend: str = "onnxruntime") -> Path:
    """``work/<precision>`` (ONNX Runtime, as the first runs had it) or
    ``work/<backend>-<precision>``."""
    return work / (precision if backend == "onnxruntime" else f"{backend}-{precision}")


def ensure_bundle(model: str | LoadedModel, work: Path, precision: str,
                  backend: str = "onnxruntime") -> Path:
    """:func:`bundle_dir`, exported (``backend`` only, q/v live) if it has no bundle.json;
    ``model``: a registry name or a loaded model, as :func:`~edgeadapt.export.bundle.export_base`
    takes it.
    ExecuTorch: the live program alone (no repack program), its forward dynamic up to the
    exporter's 8 x 64 (:data:`SHAPES`'s largest), not checked at export: the parity before
    timing (:func:`executorch_parity`) holds it to the same reference."""
    out = bundle_dir(work, precision, backend)
    if not (out / "bundle.json").is_file():
        from edgeadapt.export.bundle import export_base

        export_base(model, out, backends=backend, targets="qv", precision=precision,
                    pte_repack=False, check=backend != "executorch")
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


def stock_session(fp32_bundle: Path, lm, precision: str, threads: int,
                  live: Sequence[str] = ()):
    """ONNX Runtime's own quantized model of the same weights (module docstring): the fp32
    bundle's graph, live weights made constants again (:func:`constant_graph`), quantized whole
    by the backend's tool, each weight at its grid's bits (``live``: the bundle's live
    weights, for a grid that puts them on another one: int4-affine-live8's q/v on int8)."""
    from edgeadapt.export.onnx_quant import quantize_by_grid
    from edgeadapt.models.targets import quantized_weight_grids
    from edgeadapt.runtime.backends.onnxruntime.session import open_session, session_options

    model = lm.model
    grids = quantized_weight_grids(model, lm.kind, precision, live=live)
    weights = {w: model.get_submodule(w.removesuffix(".weight")).weight.detach().float().numpy()
               for w in grids}
    proto = quantize_by_grid(constant_graph(fp32_bundle, lm), weights, grids, stock=True)
    return open_session(proto.SerializeToString(), session_options(threads), fp32_bundle)


def expected_live(lm, rt, adapter: Adapter | None = None) -> dict[str, np.ndarray]:
    """Per live weight of ``rt``, what it must hold with ``adapter`` fused at scale 1 (None:
    the base), computed from ``lm``'s fp32 weights, not by the engine: on a grid the base's
    codes with each touched entry re-quantized; fp32 the weight plus the values."""
    out = {}
    for w, lw in rt.store.live_weights().items():
        value = lm.model.get_parameter(w).detach().float().numpy().copy()
        t = adapter.targets.get(w) if adapter is not None else None
        if lw.codes is not None:
            g = lw.codes.grid
            value, s = g.quantize(codes_weight(value, g))
            if t is not None:
                flat = value.reshape(-1)
                flat[t.indices] = g.requantize(flat[t.indices], g.scale_at(s, value.shape,
                                                                         t.indices),
                                               t.values)[0]
        elif t is not None:
            value.reshape(-1)[t.indices] += t.values
        out[w] = value
    return out


def check_codes(rt, lm, adapter: Adapter) -> None:
    """ParityError unless ``rt``'s codes are those of ``adapter`` fused (at scale 1) on the
    grid (:func:`expected_live`)."""
    want = expected_live(lm, rt, adapter)
    for w, lw in rt.store.live_weights().items():
        if lw.codes is not None and not np.array_equal(lw.torch_weight(), want[w]):
            raise ParityError(f"{w}: the runtime's codes are not the grid's codes of the "
                              "adapter fused on the base; refusing to time it")


def kernel_parity(bundle: Path, rt, threads: int, vocab: int) -> float:
    """``rel_error`` between edgeadapt's kernel on ``rt``'s live codes and stock ONNX Runtime
    running the same graph's own dequantization of them, both on the bundle's graph with float
    activations in the rest (so that only the kernel differs; edgeadapt's nodes take the
    graph's level, float too: ``graphs.quantized.stock_accuracy_level``), on 2 x 40 random
    tokens."""
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
            feeds[rt.store.graph_names[w]] = lw.read()  # the graph's own form: a code per byte
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


@dataclass
class Side:
    """One backend's runtimes in the bench, per precision: its bundle, the base runtime, the
    runtime with the first synthetic adapter fused (both adapters prepared on it: ``preps``),
    the peers timed beside them (peer case -> precision -> :data:`Forward`) and extra sizes."""

    backend: str
    bundles: dict[str, Path]
    base: dict[str, Runtime]
    fused: dict[str, Runtime]
    preps: dict[str, list]
    peers: dict[str, dict[str, Forward]] = field(default_factory=dict)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return PREFIX[self.backend]

    def cases(self, ids: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
        """The forward cases on ``ids``, named ``<prefix><precision> <case>``."""
        out = {}
        for p in self.base:
            out[f"{self.prefix}{p} base"] = partial(_run, self.base[p], ids)
            out[f"{self.prefix}{p} shira-fused"] = partial(_run, self.fused[p], ids)
            for peer, forwards in self.peers.items():
                if p in forwards:
                    out[f"{self.prefix}{p} {peer}"] = partial(forwards[p], ids)
        return out

    def stock_distances(self, cases: dict, where: str) -> dict[str, dict]:
        """Each case of a precision with a stock peer against it (recorded, not gated)."""
        out = {}
        for p in self.peers.get("stock", {}):
            want = cases[f"{self.prefix}{p} stock"]()
            for case in ["base"] + [c for c in self.peers if c != "stock" and p in self.peers[c]]:
                got = cases[f"{self.prefix}{p} {case}"]()
                out[f"{self.prefix}{p} {case} vs stock {where}"] = {
                    "max_rel_error": rel_error(got, want),
                    "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).mean())}
        return out


def _run(rt: Runtime, ids: np.ndarray) -> np.ndarray:
    return rt.run(input_ids=ids)


def open_side(backend: str, bundles: dict[str, Path], lm: LoadedModel,
              adapters: list[Adapter], threads: int) -> Side:
    """Base and fused runtimes of ``bundles`` on ``backend``, the codes checked first: the
    base's against ``codes_sha256``, the fused one's exact (:func:`check_codes`)."""
    def opened() -> dict[str, Runtime]:
        return {p: _load(b, threads, backend) for p, b in bundles.items()}

    base, fused = opened(), opened()
    preps = {p: [rt.engine.prepare(a, f"s{i}") for i, a in enumerate(adapters)]
             for p, rt in fused.items()}
    for p, rt in fused.items():
        rt.engine.switch([(preps[p][0], 1.0)])
        if p != "fp32":
            base[p].engine.verify_base()
            check_codes(rt, lm, adapters[0])
    return Side(backend, bundles, base, fused, preps)


def onnxruntime_side(model: str | LoadedModel, lm: LoadedModel, work: Path, threads: int,
                     precisions: Sequence[str], adapters: list[Adapter], parity: dict) -> Side:
    """ONNX Runtime's runtimes; edgeadapt's kernel held to ONNX Runtime's own dequantization
    (:func:`kernel_parity`, into ``parity``); the hybrid and stock peers."""
    bundles = {p: ensure_bundle(model, work, p) for p in precisions}
    side = open_side("onnxruntime", bundles, lm, adapters, threads)
    kernel = parity.setdefault("kernel_vs_own_dequantization", {})
    quantized = [p for p in precisions if p != "fp32"]
    for p in quantized:
        err = kernel_parity(bundles[p], side.fused[p], threads, lm.vocab_size)
        if not err <= RTOL:
            raise ParityError(f"{p}: edgeadapt's kernel in the real graph differs from ONNX "
                              f"Runtime's own dequantization by {err:.3g} > {RTOL}")
        kernel[p] = err
    side.peers["hybrid"] = {p: partial(_run, _load(ensure_hybrid(work, lm, p), threads))
                            for p in quantized if not grid(p).affine}
    side.peers["stock"] = {p: partial(_run_session, stock_session(
        bundles["fp32"], lm, p, threads, sorted(side.base[p].store.live_weights())))
        for p in quantized}
    return side


def _load(bundle: Path, threads: int, backend: str = "onnxruntime") -> Runtime:
    from edgeadapt.runtime import load

    return load(bundle, backend=backend, mode="live", threads=threads)


def _run_session(session, ids: np.ndarray) -> np.ndarray:
    return session.run(None, {"input_ids": ids})[0]


def ratio_pairs(sides: Sequence[Side]) -> list[tuple[str, str]]:
    """The forward ratios (numerator, denominator case) of each shape: per backend fused /
    base, base / stock, hybrid / base, fp32 / each quantized precision (base and fused),
    int4-affine base / int4 base, int4-affine-live8 base / int4-affine base; then
    ExecuTorch's base / ONNX Runtime's per precision both ran."""
    pairs = []
    for side in sides:
        x, ps = side.prefix, list(side.base)
        pairs += [(f"{x}{p} shira-fused", f"{x}{p} base") for p in ps]
        pairs += [(f"{x}{p} base", f"{x}{p} stock") for p in side.peers.get("stock", {})]
        pairs += [(f"{x}{p} hybrid", f"{x}{p} base") for p in side.peers.get("hybrid", {})]
        if "fp32" in ps:
            pairs += [(f"{x}fp32 {c}", f"{x}{p} {c}") for p in ps if p != "fp32"
                      for c in ("base", "shira-fused")]
        if {"int4", "int4-affine"} <= set(ps):  # what the offsets cost
            pairs.append((f"{x}int4-affine base", f"{x}int4 base"))
        if {"int4-affine", "int4-affine-live8"} <= set(ps):  # what int8 live weights cost
            pairs.append((f"{x}int4-affine-live8 base", f"{x}int4-affine base"))
    by = {side.backend: side for side in sides}
    if set(by) == set(BACKENDS):
        pairs += [(f"{PREFIX['executorch']}{p} base", f"{PREFIX['onnxruntime']}{p} base")
                  for p in by["executorch"].base if p in by["onnxruntime"].base]
    return pairs


def forward_section(report: dict, sides: Sequence[Side], shapes: Sequence[tuple[int, int]],
                    repeats: int, vocab: int) -> None:
    """Per shape every backend's cases interleaved round by round (``report["forward"]``), the
    paired ratios (``report["ratios"]``) and the distances to the stock peers (parity)."""
    rng = np.random.default_rng(0)
    for b, s in shapes:
        ids = rng.integers(5, vocab, (b, s)).astype(np.int64)
        cases = {}
        for side in sides:
            cases |= side.cases(ids)
        for side in sides:
            report["parity"] |= side.stock_distances(cases, f"{b}x{s}")
        samples = time_interleaved(cases, repeats=repeats, warmup=3)
        for name, ms in samples.items():
            report["forward"].append({"shape": f"{b}x{s}", "case": name,
                                      **Stats.of(ms).as_dict()})
        for num, den in ratio_pairs(sides):
            report["ratios"].append({"shape": f"{b}x{s}", **Ratio.of(samples, num, den)
                                     .as_dict()})


def switch_row(rt: Runtime, preps: list, adapters: list[Adapter], shapes: dict,
               probe: CopyProbe, repeats: int) -> dict:
    """The full switch between the two prepared synthetic adapters (``preps``, a cached pair:
    one scatter), a ``probe`` copy before each, against the floor of its traffic in the live
    buffers' layouts and addresses (1-byte codes, else 4-byte values), and the same switch
    with numpy's scatter in the same rounds; ``rt`` is left on the first adapter."""
    pair = [[(preps[1], 1.0)], [(preps[0], 1.0)]]
    state = {"k": 0}

    def switch() -> None:
        rt.engine.switch(pair[state["k"] % 2])
        state["k"] += 1

    def numpy_switch() -> None:  # the same with numpy's scatter
        native, rt.engine.native_scatter = rt.engine.native_scatter, False
        try:
            switch()
        finally:
            rt.engine.native_scatter = native

    cases = {"copy": probe, "switch": switch}
    if rt.engine.native_scatter:
        cases["switch-numpy"] = numpy_switch
    samples = time_interleaved(cases, repeats=repeats, warmup=4)
    live = rt.store.live_weights()
    codes = any(lw.codes is not None for lw in live.values())
    traffic = switch_traffic(
        {w: t.indices for w, t in adapters[0].targets.items()},
        {w: t.indices for w, t in adapters[1].targets.items()}, shapes,
        layouts={w: lw.layout for w, lw in live.items()},
        offsets={w: int(lw.array.ctypes.data) % CACHE_LINE for w, lw in live.items()},
        itemsize=1 if codes else 4, value_bytes=1 if codes else 4,
        packed=frozenset(w for w, lw in live.items() if lw.packed))
    rt.engine.switch(pair[1])
    row = {**Stats.of(samples["switch"]).as_dict(),
           **floor_ratios(samples["switch"], probe.bandwidth(samples["copy"]), traffic),
           "restore_bytes": rt.restore_memory_bytes(),
           "saturated": sum(rt.engine.saturated.values()),
           "native_scatter": rt.engine.native_scatter}
    if "switch-numpy" in samples:  # what the native scatter saves, in the same rounds
        row["numpy_scatter"] = {
            **Stats.of(samples["switch-numpy"]).as_dict(),
            "native_over_numpy": Ratio.of(samples, "switch", "switch-numpy").as_dict()}
    return row


def side_sizes(side: Side) -> dict[str, dict[str, int]]:
    """Per precision the bundle's bytes (adapters aside), its live weights' and extra sizes."""
    return {f"{side.prefix}{p}": {
        "bundle_bytes": _dir_bytes(bundle),
        "live_bytes": sum(lw.array.nbytes for lw in side.base[p].store.live_weights().values()),
        **side.sizes.get(p, {})} for p, bundle in side.bundles.items()}


def run(model: str | LoadedModel, work: Path, threads: int, repeats: int, switch_repeats: int,
        shapes: Sequence[tuple[int, int]] = SHAPES, precisions: Sequence[str] = PRECISIONS,
        backends: Sequence[str] | None = None,
        executorch_precisions: Sequence[str] | None = None) -> dict:
    """The report (module docstring) of ``backends`` (None: :func:`default_backends`), each at
    ``precisions`` (ExecuTorch: ``executorch_precisions`` where given); ``model``: a registry
    name or a loaded model (the tests' small ones)."""
    from edgeadapt.format.adapter_file import write_adapter
    from edgeadapt.models import load_model

    backends = tuple(default_backends() if backends is None else backends)
    unknown = set(backends) - set(BACKENDS)
    if not backends or unknown:
        raise ConfigError(f"backends {list(backends)}: choose among {', '.join(BACKENDS)}")
    et_precisions = tuple(  # affine grids run on ONNX Runtime only
        [p for p in precisions if p == "fp32" or not grid(p).affine]
        if executorch_precisions is None else executorch_precisions)
    lm = model if isinstance(model, LoadedModel) else load_model(model, seed=0)
    first = ensure_bundle(model, work, (et_precisions if backends[0] == "executorch"
                                        else precisions)[0], backends[0])
    manifest = read_manifest(first)
    shapes_w = {w: tuple(e.shape) for w, e in manifest.weights.items()}
    sha = {w: e.sha256 for w, e in manifest.weights.items()}
    adapters = [synth_shira(shapes_w, sha, density=0.01, seed=s) for s in (0, 1)]
    adapter_file = work / "shira-synthetic.eadp"
    write_adapter(adapter_file, adapters[0], value_dtype="float32")
    report: dict = {"model": lm.name, "threads": threads, "host": platform.node(),
                    "cpu_count": os.cpu_count(), "backends": list(backends), "forward": [],
                    "ratios": [], "parity": {"codes": "exact"}, "switch": {}, "sizes": {}}
    sides = []
    if "onnxruntime" in backends:
        sides.append(onnxruntime_side(model, lm, work, threads, precisions, adapters,
                                      report["parity"]))
    if "executorch" in backends:
        from edgeadapt.bench.quantized_executorch import executorch_side

        sides.append(executorch_side(model, lm, work, threads, et_precisions, adapters,
                                     shapes, report["parity"]))
    forward_section(report, sides, shapes, repeats, lm.vocab_size)
    probe = CopyProbe()
    for side in sides:
        for p, rt in side.fused.items():
            report["switch"][f"{side.prefix}{p}"] = switch_row(
                rt, side.preps[p], adapters, shapes_w, probe, switch_repeats)
    if sides[0].backend == "onnxruntime":
        report["lora_fused"] = lora_fused(sides[0].base, shapes_w, sha, switch_repeats)
    for side in sides:
        report["sizes"] |= side_sizes(side)
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
                cases[ours, f"{p} {case}"].rt, probe,
                tol=1e-3 if p == "fp32" else QUANT_DECODER_TOL)
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
    if "int4" in generate_bundles and "int4-affine" in generate_bundles:  # the offsets' cost
        pairs += [("int4-affine base", "int4 base", ours, ours)]
    if "int4-affine" in generate_bundles and "int4-affine-live8" in generate_bundles:
        pairs += [("int4-affine-live8 base", "int4-affine base", ours, ours)]
    for p in ("int4-affine", "int4-affine-live8"):
        if (GENAI, "int4 base") in cases and p in generate_bundles:
            pairs += [("int4 base", f"{p} base", GENAI, ours),
                      ("int4 lora-adapter", f"{p} shira-fused", GENAI, ours)]
    section["ratios"] = [
        {"context": n, **Ratio.of(raw[n], names[nt, num], names[dt, den]).as_dict()}
        for n in contexts for num, den, nt, dt in pairs]
    return section


#: how far below the forward's top logit (relative to the row's largest magnitude) a quantized
#: decoder's greedy token may be: its rest runs with int8 activations, so the decoder and the
#: full forward, two graphs that differ in float summation order, differ by whole activation
#: steps (SmolLM2 int4 and int4-affine, base and SHiRA fused: 3.4e-2 to 3.8e-2 relative over
#: the logits). Their float-activation forms are held to ``QUANT_RTOL`` at export.
QUANT_DECODER_TOL = 5e-2


def _decoder_parity(rt, prompt: np.ndarray, n: int = 8, tol: float = 1e-3) -> int:
    """ParityError unless each of ``n`` greedy tokens of ``rt``'s decoder is the argmax (within
    ``tol`` of the top logit's magnitude) of ``rt``'s full forward over its whole context;
    ``n``."""
    ids = list(rt.generate(prompt, max_new_tokens=n).ids)
    logits = rt.run(input_ids=np.array([list(prompt) + ids]))[0]
    for k, token in enumerate(ids):
        row = logits[len(prompt) + k - 1]
        if row[token] < row.max() - tol * np.abs(row).max():
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
    """The report's ratios as a markdown table, then the switch per backend and precision."""
    lines = ["| forward shape / decode context | ratio | paired median (p10-p90) |",
             "|---|---|---|"]
    rows = [(r["shape"], r) for r in report.get("ratios", [])]
    rows += [(f"decode @{r['context']}", r) for r in report.get("decode", {}).get("ratios", [])]
    for where, r in rows:
        lines.append(f"| {where} | {r['num']} / {r['den']} | {r['paired_median']:.3f} "
                     f"({r['paired_p10']:.3f}-{r['paired_p90']:.3f}) |")
    if report.get("switch"):
        lines += ["", "| switch | p50 ms | floor ms | measured / floor |", "|---|---|---|---|"]
        lines += [f"| {name} | {r['p50_ms']:.3f} | {r['floor_ms']:.3f} | "
                  f"{r['measured_over_floor']:.2f} |" for name, r in report["switch"].items()]
    return "\n".join(lines)


@click.command()
@click.option("--model", default="smollm2", show_default=True)
@click.option("--work", required=True, type=click.Path(file_okay=False),
              help="folder of the bundles (<precision> for ONNX Runtime, "
                   "executorch-<precision>; exported when missing)")
@click.option("--backends", default=None, metavar="NAME[,NAME]",
              help="onnxruntime and/or executorch [default: both where executorch and torchao "
                   "import, else onnxruntime]")
@click.option("--precisions", default=",".join(PRECISIONS), show_default=True,
              metavar="P[,P]", help="the precisions of the forward rows (fp32 first)")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=30, show_default=True, type=click.IntRange(min=0),
              help="timed rounds per forward shape (0: no forward, switch or size rows, "
                   "only --generate's decode rows)")
@click.option("--switch-repeats", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--generate", "generate_bundles", multiple=True, metavar="PRECISION=BUNDLE",
              help="decode rows for a bundle exported with --generate, e.g. "
                   "int4=bundles/smollm2-generate-int4 (repeatable)")
@click.option("--genai-dir", type=click.Path(file_okay=False), default=None,
              help="where onnxruntime-genai's int4 peer is built (and reused)")
@click.option("--decode-steps", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(model: str, work: str, backends: str | None, precisions: str, threads: int,
         repeats: int, switch_repeats: int, generate_bundles: tuple[str, ...],
         genai_dir: str | None, decode_steps: int, json_path: str | None) -> None:
    """Forward, switch and sizes of quantized bundles on ONNX Runtime and ExecuTorch against
    each backend's stock quantized model (and, with --generate, decode against
    onnxruntime-genai int4)."""
    names = None if backends is None else [b.strip() for b in backends.split(",") if b.strip()]
    chosen = tuple(p.strip() for p in precisions.split(",") if p.strip())
    for p in chosen:
        if p not in PRECISIONS:
            raise click.BadParameter(f"{p!r}: choose from {', '.join(PRECISIONS)}",
                                     param_hint="--precisions")
    report = run(model, Path(work), threads, repeats, switch_repeats, backends=names,
                 precisions=chosen) if repeats else {}
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
