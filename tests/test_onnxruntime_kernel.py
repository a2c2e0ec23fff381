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
    blocked32 from the external data file (one whose width is not a multiple of 32 stays a
    MatMul); the session reads the live buffers in place: after an in-place edit its output
    follows, equal to the MatMul pattern's and to float64 numpy."""
    model, weights = _blocked_model(40, [64, 32], consts=(64, 40))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=64)
    names = [f"w{i}.B32" for i in range(2)]
    rewritten = onnx.load(str(path), load_external_data=False)
    assert kernel_blocked_matmuls(rewritten, names, tmp_path) == 2
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count(KERNEL_OP) == 1 and "Transpose" not in ops and ops.count("MatMul") == 1
    node, = (n for n in rewritten.graph.node if n.op_type == KERNEL_OP)
    assert list(node.input) == ["x", "w0.B32", "w1.B32", "c2/edgeadapt.B32"]
    assert list(node.output) == ["y0", "y1", "y2"]
    inits = {i.name: i for i in rewritten.graph.initializer}
    assert "c2" not in inits and "c3" in inits  # the absorbed one is read as its copy only
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits["c2/edgeadapt.B32"]),
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
