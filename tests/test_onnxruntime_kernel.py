"""edgeadapt's ONNX Runtime kernel, ``edgeadapt.BlockedMatMul`` (kernels/blocked_matmul.cpp):
the op against float64 numpy on the blocked32 layout, the graph rewrite against the MatMul
pattern it replaces, a live session whose buffers are edited in place, and the fallbacks where
the kernel cannot be built. Torch-free."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeadapt.errors import ConfigError
from edgeadapt.format.layout import BLOCKED, TRANSPOSED, to_backend, to_torch
from edgeadapt.graphs.blocked import (
    KERNEL_DOMAIN,
    KERNEL_OP,
    block_live_matmuls,
    kernel_blocked_matmuls,
)
from edgeadapt.graphs.values import LiveWeight as GraphLive
from edgeadapt.runtime import native
from edgeadapt.runtime.backends.onnxruntime import kernel as ok
from edgeadapt.runtime.backends.onnxruntime.kernel import use_kernel
from edgeadapt.runtime.backends.onnxruntime.session import cpu_session, session_options

ort = pytest.importorskip("onnxruntime")
REASON = ok.unavailable()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"kernel unavailable: {REASON}")


def op_session(op: str, inputs: list, threads: int = 1, library: Path | None = None,
               outputs: tuple[str, ...] = ("y",), **attrs):
    """A session of one ``*outputs = edgeadapt.<op>(*inputs)`` node (``inputs``: their value
    infos; ``attrs``: its attributes), the op from ``library`` (default: the loaded one). The
    quantized kernel's tests use it too."""
    graph = helper.make_graph(
        [helper.make_node(op, [i.name for i in inputs], list(outputs), domain=KERNEL_DOMAIN,
                          **attrs)],
        "g", inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)
                      for y in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(KERNEL_DOMAIN, 1)])
    model.ir_version = 9
    so = session_options(threads)
    if library is None:
        ok.register(so)
    else:
        so.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _op_session(k: int, n: int, rank: int, threads: int = 1, w_dims: list | None = None,
                library: Path | None = None):
    """A session of one ``y = BlockedMatMul(x, w)`` node, x of the given rank (the op from
    ``library``, default the loaded one)."""
    dims = [f"d{i}" for i in range(rank - 1)] + [k]
    return op_session(KERNEL_OP, [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, dims),
        helper.make_tensor_value_info("w", TensorProto.FLOAT, w_dims or [n // 32, k, 32])],
        threads, library)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lead", [(1,), (5,), (12,), (13,), (2, 48), (97,), (3, 70), (0,)])
def test_op_matches_numpy(lead, threads):
    """Row counts across the 12-row tile and the 96-row chunk (1, 5, 12, 13, 96, 97, 210),
    a 3-D x, no rows; K not a multiple of the 4-step unroll."""
    rng = np.random.default_rng(len(lead) * 100 + lead[-1])
    k, n = 45, 96
    w = rng.standard_normal((n, k)).astype(np.float32)  # torch layout (out, in)
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    sess = _op_session(k, n, len(lead) + 1, threads)
    y = sess.run(None, {"x": x, "w": np.ascontiguousarray(to_backend(w, BLOCKED))})[0]
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    assert y.shape == (*lead, n)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_portable_path_matches_numpy(tmp_path, monkeypatch):
    """The plain C++ loops a CPU without AVX-512 compiles (built here with -mno-avx512f, in a
    library of its own): the same shapes as above against float64 numpy."""
    monkeypatch.setenv("EDGEADAPT_CACHE", str(tmp_path))
    portable = ok.library_path(("-mno-avx512f",))
    assert portable != ok.library_path()
    rng = np.random.default_rng(7)
    k, n = 45, 64
    w = rng.standard_normal((n, k)).astype(np.float32)
    for lead in ((1,), (13,), (2, 60)):
        x = rng.standard_normal((*lead, k)).astype(np.float32)
        sess = _op_session(k, n, len(lead) + 1, library=portable)
        y = sess.run(None, {"x": x, "w": np.ascontiguousarray(to_backend(w, BLOCKED))})[0]
        np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64),
                                   rtol=1e-5, atol=1e-5)


@needs_kernel
def test_op_refuses_mismatched_shapes():
    sess = _op_session(16, 32, 2, w_dims=["a", "b", "c"])  # the graph lets any w through
    for w in (np.ones((1, 8, 32), np.float32), np.ones((1, 16, 16), np.float32)):
        with pytest.raises(Exception, match="same K"):  # ORT's InvalidArgument
            sess.run(None, {"x": np.ones((2, 16), np.float32), "w": w})


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lead", [(1,), (13,), (2, 48)])
def test_op_with_several_weights_matches_numpy(lead, threads):
    """One x, three weights of different widths: y_i = x w_i each, in the weights' order (one
    parallel section over all their blocks), against float64 numpy."""
    rng = np.random.default_rng(lead[-1] + threads)
    k, widths = 45, [96, 32, 64]
    ws = [rng.standard_normal((n, k)).astype(np.float32) for n in widths]
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    dims = [f"d{i}" for i in range(len(lead))] + [k]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)] + [
        helper.make_tensor_value_info(f"w{i}", TensorProto.FLOAT, [n // 32, k, 32])
        for i, n in enumerate(widths)]
    graph = helper.make_graph(
        [helper.make_node(KERNEL_OP, [i.name for i in inputs], ["y0", "y1", "y2"],
                          domain=KERNEL_DOMAIN)], "g", inputs,
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(KERNEL_DOMAIN, 1)])
    model.ir_version = 9
    so = session_options(threads)
    ok.register(so)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ys = sess.run(None, {"x": x, **{f"w{i}": np.ascontiguousarray(to_backend(w, BLOCKED))
                                    for i, w in enumerate(ws)}})
    for y, w in zip(ys, ws, strict=True):
        assert y.shape == (*lead, w.shape[0])
        np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64),
                                   rtol=1e-5, atol=1e-5)


def _blocked_model(k: int, outs: list[int], consts: tuple[int, ...] = ()
                   ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x (B, T, k) -> MatMul with live W_i.T for each out_i (blocked by block_live_matmuls)
    and with a constant initializer C_i (k, out) for each of ``consts`` (after the live ones),
    each summed over its last axis and concatenated, so every reader feeds the output; the
    weights in torch layout (``c<i>``: C_i.T)."""
    rng = np.random.default_rng(3)
    nodes, inputs, live, weights, inits = [], [], {}, {}, []
    for i, out in enumerate(outs):
        name = f"w{i}.T"
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [k, out]))
        nodes.append(helper.make_node("MatMul", ["x", name], [f"y{i}"], name=f"mm{i}"))
        live[f"w{i}"] = GraphLive(name, TRANSPOSED, (k, out))
        weights[f"w{i}"] = rng.standard_normal((out, k)).astype(np.float32)
    for i, out in enumerate(consts, start=len(outs)):
        weights[f"c{i}"] = rng.standard_normal((out, k)).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(weights[f"c{i}"].T),
                                                  f"c{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"c{i}"], [f"y{i}"], name=f"mm{i}"))
    n = len(outs) + len(consts)
    nodes += [helper.make_node("ReduceSum", [f"y{i}", "axis"], [f"r{i}"], keepdims=1)
              for i in range(n)]
    nodes.append(helper.make_node("Concat", [f"r{i}" for i in range(n)], ["y"], axis=-1))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", k]),
                     *inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array([-1], np.int64), "axis"), *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    block_live_matmuls(model, live)
    return model, weights


@needs_kernel
def test_rewrite_replaces_each_blocked_reader_and_matches_matmul(tmp_path):
    """kernel_blocked_matmuls turns the blocked32 patterns of one x into one BlockedMatMul node
    (no Transpose or helper left) that a constant MatMul of that x joins, its weight re-laid in
    blocked32 from the external data file and supplied at load (one whose width is not a
    multiple of 32 stays a MatMul); the session reads the live buffers in place: after an
    in-place edit its output follows, equal to the MatMul pattern's and to float64 numpy."""
    model, weights = _blocked_model(40, [64, 32], consts=(64, 40))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=64)
    names = [f"w{i}.B32" for i in range(2)]
    rewritten = onnx.load(str(path), load_external_data=False)
    rewrite = kernel_blocked_matmuls(rewritten, names, tmp_path)
    assert rewrite.replaced == 2 and list(rewrite.constants) == ["c2/edgeadapt.B32"]
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count(KERNEL_OP) == 1 and "Transpose" not in ops and ops.count("MatMul") == 1
    node, = (n for n in rewritten.graph.node if n.op_type == KERNEL_OP)
    assert list(node.input) == ["x", "w0.B32", "w1.B32", "c2/edgeadapt.B32"]
    assert list(node.output) == ["y0", "y1", "y2"]
    inits = {i.name: i for i in rewritten.graph.initializer}
    assert "c2" not in inits and "c3" in inits  # the absorbed one is read as its copy only
    copy = inits["c2/edgeadapt.B32"]  # a placeholder: the session is given the copy at load
    assert copy.data_location == TensorProto.EXTERNAL and list(copy.dims) == [2, 40, 32]
    np.testing.assert_array_equal(rewrite.constants["c2/edgeadapt.B32"],
                                  to_backend(weights["c2"], BLOCKED))
    assert not any(i.startswith("edgeadapt_") for i in inits)
    untouched = onnx.load(str(path), load_external_data=False)
    kernel_blocked_matmuls(untouched, names)  # no folder: external constants are left alone
    assert [n.op_type for n in untouched.graph.node].count("MatMul") == 2

    kern, used = cpu_session(path, session_options(1), names, kernel=True)
    plain, unused = cpu_session(path, session_options(1), names, kernel=False)
    assert used and not unused
    bufs = {f"{w}.B32": np.ascontiguousarray(to_backend(weights[w], BLOCKED))
            for w in ("w0", "w1")}
    x = np.random.default_rng(0).standard_normal((2, 7, 40)).astype(np.float32)

    def want() -> np.ndarray:
        mats = [to_torch(bufs[f"w{i}.B32"], weights[f"w{i}"].shape, BLOCKED) for i in range(2)]
        mats += [weights["c2"], weights["c3"]]
        return np.concatenate([(x.astype(np.float64) @ m.T.astype(np.float64))
                               .sum(-1, keepdims=True) for m in mats], -1)

    binding = kern.io_binding()
    for name, buf in bufs.items():  # bound once, as the live store does
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buf))
    for step in range(2):
        binding.bind_cpu_input("x", x)
        binding.bind_output("y", "cpu")
        kern.run_with_iobinding(binding)
        got = binding.get_outputs()[0].numpy()
        np.testing.assert_allclose(got, want(), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(got, plain.run(None, {"x": x, **bufs})[0], rtol=1e-4,
                                   atol=1e-3)
        bufs["w1.B32"][0, 3, :] += 1.0  # an in-place edit: the next run must see it
        if step == 0:
            assert not np.allclose(want(), got, rtol=1e-4, atol=1e-3)


@needs_kernel
def test_every_float_constant_matmul_reads_through_the_kernel(tmp_path, monkeypatch):
    """With every_constant (the decoder's sessions), constant MatMuls of values no live weight
    reads become BlockedMatMul nodes too (without it they stay MatMuls): two of
    one x are one node (a layer's gate and up), and an LM head read in chunks (Slice of the
    Transpose of a tied embedding, as graphs/head.py writes it) one node per chunk where a
    node would read more than CHUNK_BYTES (here 16 KB: gate and up 8 KB each, the chunks 16
    and 8 KB), its Slice and Transpose dropped while the embedding's Gather keeps it; the
    session given the supplied copies equals ONNX Runtime on the original graph and float64
    numpy, and the live weight is still read in place."""
    rng = np.random.default_rng(5)
    k, hidden, vocab = 40, 64, 96
    emb = rng.standard_normal((vocab, hidden)).astype(np.float32)
    gate, up = (rng.standard_normal((hidden, 32)).astype(np.float32) for _ in range(2))
    live_w = rng.standard_normal((hidden, k)).astype(np.float32)  # torch layout (out, in)
    init = onnx.numpy_helper.from_array
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]),
             helper.make_node("MatMul", ["x", "w.T"], ["h"], name="live"),
             helper.make_node("Add", ["h", "e"], ["h2"]),
             helper.make_node("MatMul", ["h2", "gate"], ["g"], name="gate"),
             helper.make_node("MatMul", ["h2", "up"], ["u"], name="up"),
             helper.make_node("Mul", ["g", "u"], ["gu"]),
             helper.make_node("Transpose", ["emb"], ["head"], perm=[1, 0]),
             *[helper.make_node("Slice", ["head", f"lo{i}", f"hi{i}", "ax"], [f"w{i}"],
                                name=f"slice{i}") for i in range(2)],
             *[helper.make_node("MatMul", ["h2", f"w{i}"], [f"l{i}"], name=f"chunk{i}")
               for i in range(2)],
             helper.make_node("Concat", ["l0", "l1"], ["logits"], axis=-1)]
    consts = [init(emb, "emb"), init(gate, "gate"), init(up, "up"),
              init(np.array([1], np.int64), "ax")]
    consts += [init(np.array([v], np.int64), f"{n}{i}")
               for i, (lo, hi) in enumerate([(0, 64), (64, 2**63 - 1)])
               for n, v in (("lo", lo), ("hi", hi))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k]),
                     helper.make_tensor_value_info("ids", TensorProto.INT64, ["T"]),
                     helper.make_tensor_value_info("w.T", TensorProto.FLOAT, [k, hidden])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("gu", "logits")],
        consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    block_live_matmuls(model, {"w": GraphLive("w.T", TRANSPOSED, (k, hidden))})
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=64)

    rewritten = onnx.load(str(path), load_external_data=False)
    monkeypatch.setattr("edgeadapt.graphs.blocked.CHUNK_BYTES", 16 << 10)
    rewrite = kernel_blocked_matmuls(rewritten, ["w.B32"], tmp_path, every_constant=True)
    assert rewrite.replaced == 1
    kernel_nodes = [list(n.input) for n in rewritten.graph.node if n.op_type == KERNEL_OP]
    assert kernel_nodes == [["x", "w.B32"], ["h2", "gate/edgeadapt.B32", "up/edgeadapt.B32"],
                            ["h2", "w0/edgeadapt.B32"], ["h2", "w1/edgeadapt.B32"]]
    ops = [n.op_type for n in rewritten.graph.node]
    assert {"MatMul", "Slice", "Transpose"}.isdisjoint(ops) and "Gather" in ops
    left = {i.name for i in rewritten.graph.initializer}
    assert "emb" in left and not left & {"lo0", "hi0", "lo1", "hi1", "ax"}  # the Slices' bounds
    np.testing.assert_array_equal(rewrite.constants["w1/edgeadapt.B32"],
                                  to_backend(emb[64:], BLOCKED))

    live = {"w.B32": np.ascontiguousarray(to_backend(live_w, BLOCKED))}
    kern, used = cpu_session(path, session_options(2), ["w.B32"], kernel=True,
                             every_constant=True)
    plain, _ = cpu_session(path, session_options(2), ["w.B32"], kernel=False)
    assert used
    only_live = onnx.load(str(path), load_external_data=False)  # without every_constant
    assert kernel_blocked_matmuls(only_live, ["w.B32"], tmp_path).constants == {}
    assert [n.op_type for n in only_live.graph.node].count("MatMul") == 4
    x = rng.standard_normal((5, k)).astype(np.float32)
    ids = rng.integers(0, vocab, 5)
    binding = kern.io_binding()
    binding.bind_ortvalue_input("w.B32", ort.OrtValue.ortvalue_from_numpy(live["w.B32"]))
    for _ in range(2):
        h2 = x.astype(np.float64) @ live_w.T.astype(np.float64) + emb[ids]
        want = [(h2 @ gate) * (h2 @ up), h2 @ emb.T.astype(np.float64)]
        binding.bind_cpu_input("x", x)
        binding.bind_cpu_input("ids", ids)
        for name in ("gu", "logits"):
            binding.bind_output(name, "cpu")
        kern.run_with_iobinding(binding)
        got = [v.numpy() for v in binding.get_outputs()]
        stock = plain.run(["gu", "logits"], {"x": x, "ids": ids, **live})
        for g, w, s_ in zip(got, want, stock, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(g, s_, rtol=1e-4, atol=1e-3)
        live["w.B32"][1, 3, :] += 1.0  # an in-place edit of the live weight: seen next run
        live_w[32:64, 3] += 1.0


def test_use_kernel_policy():
    assert not use_kernel(None, [TRANSPOSED, "as-is"])  # nothing blocked: nothing to read
    assert not use_kernel(False, [BLOCKED])
    assert use_kernel(None, [BLOCKED]) == (REASON is None)


@pytest.fixture
def no_headers(tmp_path, monkeypatch):
    """A fresh process's view (nothing loaded, nothing cached) on a machine without headers."""
    monkeypatch.setattr(ok._LIBRARY, "loaded", None)
    monkeypatch.setenv("EDGEADAPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ok, "include_dirs", lambda: [tmp_path / "none"])


def test_without_headers_the_kernel_is_off_and_says_why(no_headers):
    problem = ok.unavailable()
    assert problem is not None and "onnxruntime_cxx_api.h" in problem
    assert not use_kernel(None, [BLOCKED])
    with pytest.raises(ConfigError, match="headers"):
        use_kernel(True, [BLOCKED])


@needs_kernel
def test_headers_newer_than_the_runtime_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ok._LIBRARY, "loaded", None)
    monkeypatch.setenv("EDGEADAPT_CACHE", str(tmp_path))
    monkeypatch.setattr(ok, "runtime_api_version", lambda: ok.api_version(ok.include_dir()) - 1)
    with pytest.raises(ConfigError, match="newer than the installed onnxruntime"):
        ok.library_path()


@needs_kernel
def test_builds_from_scratch_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEADAPT_CACHE", str(tmp_path))
    built = ok.library_path()
    assert built.is_file() and built.is_relative_to(tmp_path) and ok.library_path() == built
    monkeypatch.setattr(native.shutil, "which", lambda name: None)  # cached: no compiler needed
    monkeypatch.setenv("CXX", "")
    assert ok.library_path() == built


def test_ort_headers_finds_the_debian_archive_in_apt_sources():
    """scripts/ort_headers.py asks the machine's own Debian mirror: deb822 and one-line source
    formats, the security archive and other vendors' archives skipped."""
    spec = importlib.util.spec_from_file_location(
        "ort_headers", Path(__file__).parents[1] / "scripts" / "ort_headers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    deb822 = ["Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n\n"
              "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: x\n",
              "Types: deb\nURIs: https://vendor.example/apt\nSuites: stable\n"]
    assert mod.archive_uris(deb822) == ["http://mirror.example/debian"]
    legacy = ("# deb http://old.example/debian bookworm main\n"
              "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n"
              "deb http://one.example/debian-security bookworm-security main\n")
    assert mod.archive_uris([], legacy) == ["http://one.example/debian"]
    assert mod.archive_uris([deb822[1]], "") == []
