"""ONNX graph surgery for the in-place runtime (numpy + onnx only, no torch).

- :func:`locate_live_weights` finds, *by value*, the initializer each MatMul/Gemm reads for a
  given PyTorch weight and checks that the kernel reads it directly (not through a Transpose or
  any other op ONNX Runtime could constant-fold into a private copy).
- :func:`make_live_inputs` moves those initializers from ``graph.initializer`` to ``graph.input``
  under deterministic names.
- :mod:`edgeadapt.graphs.blocked` re-lays a live input read only by MatMul as
  ``blocked32`` and rewrites each reader to match (why: :mod:`edgeadapt.format.layout`).
- :func:`add_default_initializers` gives branch inputs a default value (an initializer with the
  input's name), the pattern ONNX Runtime's LoRA adapter API expects.
- :func:`save_with_external_data` writes the graph with its weights as external data, reusing
  byte-identical tensors already stored in another data file of the same bundle.

Layouts (torch weight ``W`` of shape ``(out, in)``, C order; the arithmetic lives in
:mod:`edgeadapt.format.layout`):

- ``"as-is"``: the backend tensor ``X`` is ``(out, in)`` and ``X.flat[i] == W.flat[i]``.
- ``"transposed"``: ``X`` is ``(in, out)``, ``X = W.T``; ONNX flat index ``j`` holds
  ``W[j % out, j // out]``, and torch flat index ``i`` (row ``i // in``, column ``i % in``) lives
  at ONNX flat index ``(i % in) * out + i // in``.
- ``"blocked32"``: ``X`` is ``(out / 32, in, 32)``, ``X[b, c, j] = W[32 b + j, c]``
  (:mod:`edgeadapt.graphs.blocked`).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeadapt.errors import ConfigError, ExportError
from edgeadapt.format.layout import AS_IS, TRANSPOSED, backend_index, to_backend
from edgeadapt.format.layout import BLOCKED as BLOCKED  # callers read og.BLOCKED next to og.AS_IS
from edgeadapt.graphs.values import LiveWeight, all_value_names, consumers, live_input_name

#: The highest ONNX IR version onnxruntime 1.31/1.32 reads (onnx 1.23 writes 14 by default).
MAX_IR_VERSION = 10
#: Tensors of at least this many bytes go to the external data file.
EXTERNAL_THRESHOLD = 1024
_ALIGN = 64


def digest(arr: np.ndarray) -> str:
    """sha256 of a tensor's C-order bytes, with dtype and shape mixed in."""
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def to_backend_layout(weight: np.ndarray, layout: str) -> np.ndarray:
    """The (contiguous) tensor the backend holds for a torch weight ``(out, in)``."""
    try:
        return to_backend(weight, layout)
    except ConfigError as exc:
        raise ExportError(str(exc)) from None


def torch_flat_to_backend_flat(index: np.ndarray, shape: tuple[int, int], layout: str
                               ) -> np.ndarray:
    """Map flat row-major indices into torch ``W (out, in)`` to flat indices of the backend
    tensor (:func:`edgeadapt.format.layout.backend_index`)."""
    try:
        return backend_index(index, shape, layout)
    except ConfigError as exc:
        raise ExportError(str(exc)) from None


def _expected_layout(node: onnx.NodeProto, pos: int) -> str | None:
    """Layout a weight must have to be read directly as the B operand of MatMul / Gemm."""
    if node.op_type == "MatMul" and pos == 1:
        return TRANSPOSED
    if node.op_type == "Gemm" and pos == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return AS_IS if trans_b else TRANSPOSED
    return None


def locate_live_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]
                        ) -> dict[str, LiveWeight]:
    """For each torch weight (name -> ``(out, in)`` fp32 array) find the one initializer that
    holds it, by value: its bytes must equal ``W`` (layout ``"as-is"``) or ``W.T``
    (``"transposed"``). Then check that every reader is a MatMul/Gemm taking it as its weight
    operand in that layout, so the kernel reads this very tensor (a Transpose or any other reader
    would let ONNX Runtime fold a private copy, which in-place edits never reach).

    Raises ExportError when a weight is not found, matches several initializers (or both W and
    W.T, e.g. a symmetric matrix), shares its initializer with another weight, or is read
    through anything but MatMul/Gemm.
    """
    graph = model.graph
    uses = consumers(graph)
    outputs = {o.name for o in graph.output}
    by_hash: dict[str, list[str]] = defaultdict(list)
    inits = {}
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and len(init.dims) == 2 and init.name in uses:
            inits[init.name] = init
            by_hash[digest(numpy_helper.to_array(init))].append(init.name)

    found: dict[str, LiveWeight] = {}
    owner: dict[str, str] = {}
    for wname, w in weights.items():
        w = np.asarray(w, dtype=np.float32)
        hits = [(n, AS_IS) for n in by_hash.get(digest(w), [])]
        hits += [(n, TRANSPOSED) for n in by_hash.get(digest(w.T), [])]
        if not hits:
            raise ExportError(
                f"live weight {wname!r} {tuple(w.shape)}: no initializer holds W or W.T; the "
                "exporter folded it into another constant (scaled, fused or concatenated copy), "
                "so in-place edits could not reach the kernel")
        if len(hits) > 1:
            raise ExportError(
                f"live weight {wname!r}: located ambiguously by value ({hits}); cannot tell "
                "which tensor the kernel reads (duplicate or symmetric weights)")
        init_name, layout = hits[0]
        if init_name in owner:
            raise ExportError(f"live weights {owner[init_name]!r} and {wname!r} share the "
                              f"initializer {init_name!r} (tied weights cannot be live)")
        owner[init_name] = wname
        if init_name in outputs:
            raise ExportError(f"live weight {wname!r} ({init_name!r}) is a graph output")
        for node, pos in uses[init_name]:
            expected = _expected_layout(node, pos) if pos >= 0 else None
            if expected is None:
                raise ExportError(
                    f"live weight {wname!r} ({init_name!r}) is read by {node.op_type} "
                    f"{node.name!r} (input {pos}), not directly by MatMul/Gemm; ONNX Runtime "
                    "may fold it into a copy that in-place edits never reach")
            if expected != layout:
                raise ExportError(
                    f"live weight {wname!r} ({init_name!r}) matched as {layout} but "
                    f"{node.op_type} {node.name!r} reads it as {expected}")
        found[wname] = LiveWeight(init_name, layout, tuple(int(d) for d in inits[init_name].dims))
    return found


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                _rename_value(sub, old, new)
    for vi in graph.value_info:
        if vi.name == old:
            vi.name = new


def make_live_inputs(model: onnx.ModelProto, located: dict[str, LiveWeight]
                     ) -> dict[str, LiveWeight]:
    """Move each located initializer out of ``graph.initializer`` into ``graph.input``, renamed
    :func:`live_input_name`; returns the same mapping with the new input names."""
    graph = model.graph
    taken = all_value_names(graph)
    by_name = {init.name: init for init in graph.initializer}
    result: dict[str, LiveWeight] = {}
    for wname, lw in located.items():
        new = live_input_name(wname, lw.layout)
        if new != lw.name and new in taken:
            raise ExportError(f"cannot name the live input of {wname!r} {new!r}: the graph "
                              "already has a value of that name")
        init = by_name[lw.name]
        graph.initializer.remove(init)
        _rename_value(graph, lw.name, new)
        graph.input.append(helper.make_tensor_value_info(new, TensorProto.FLOAT, list(lw.shape)))
        taken.add(new)
        result[wname] = LiveWeight(new, lw.layout, lw.shape)
    return result


def add_default_initializers(model: onnx.ModelProto, defaults: dict[str, np.ndarray]) -> None:
    """Give graph inputs a default value: an initializer of the same name. ONNX Runtime treats
    such an initializer as overridable (never constant-folded); a feed or an active LoRA adapter
    (``RunOptions.add_active_adapter``) replaces it, and without one the default is used."""
    inputs = {i.name for i in model.graph.input}
    for name, value in defaults.items():
        if name not in inputs:
            raise ExportError(f"default for {name!r}, which is not a graph input")
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))


def cap_ir_version(model: onnx.ModelProto) -> None:
    """Lower the IR version to one onnxruntime 1.31 reads (opset imports are left as exported)."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION


def input_specs(model: onnx.ModelProto, names: list[str]) -> list[dict]:
    """``[{"name", "dtype", "shape"}]`` of the named graph inputs; symbolic dims as strings."""
    by_name = {i.name: i for i in model.graph.input}
    specs = []
    for name in names:
        tt = by_name[name].type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        specs.append({"name": name, "dtype": dtype, "shape": shape})
    return specs


def _data_index(model_path: Path) -> dict[str, tuple[str, int, int]]:
    """digest -> (location, offset, length) of the external tensors of an existing model file,
    hashed from the bytes actually on disk."""
    index: dict[str, tuple[str, int, int]] = {}
    if not model_path.is_file():
        return index
    model = onnx.load(str(model_path), load_external_data=False)
    for init in model.graph.initializer:
        if init.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        loc, off, length = info["location"], int(info.get("offset", 0)), int(info["length"])
        data_path = model_path.parent / loc
        if not data_path.is_file():
            continue
        with open(data_path, "rb") as f:
            f.seek(off)
            raw = f.read(length)
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        arr = np.frombuffer(raw, dtype=dtype).reshape(tuple(init.dims))
        index[digest(arr)] = (loc, off, length)
    return index


def save_with_external_data(model: onnx.ModelProto, out_dir: Path, file_name: str,
                            reuse_from: str | None = None) -> list[str]:
    """Write ``out_dir/file_name`` with every tensor of >= EXTERNAL_THRESHOLD bytes in external
    data. Tensors byte-identical to one stored by the model file ``reuse_from`` (same folder)
    point into that model's data file; the rest go to ``file_name + ".data"`` (written only if
    needed). Both files are written atomically (temp + os.replace), data first.

    Returns the data files the written model references (relative names).
    """
    out_dir = Path(out_dir)
    index = _data_index(out_dir / reuse_from) if reuse_from else {}
    own = file_name + ".data"
    tmp_data = out_dir / f".{own}.tmp{os.getpid()}"
    used: set[str] = set()
    offset = 0
    with open(tmp_data, "wb") as f:
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.nbytes < EXTERNAL_THRESHOLD:
                continue
            hit = index.get(digest(arr))
            if hit is not None:
                loc, off, length = hit
            else:
                pad = (-offset) % _ALIGN
                f.write(b"\0" * pad)
                offset += pad
                raw = np.ascontiguousarray(arr).tobytes()
                f.write(raw)
                loc, off, length = own, offset, len(raw)
                offset += len(raw)
            used.add(loc)
            init.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data",
                          "uint64_data", "string_data"):
                init.ClearField(field)
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (("location", loc), ("offset", str(off)), ("length", str(length))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
    if own in used:
        os.replace(tmp_data, out_dir / own)
    else:
        tmp_data.unlink()
    tmp_model = out_dir / f".{file_name}.tmp{os.getpid()}"
    with open(tmp_model, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp_model, out_dir / file_name)
    return sorted(used)
