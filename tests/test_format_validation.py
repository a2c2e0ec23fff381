"""The reader refuses every malformed .eadp file with AdapterFormatError (or a subclass).

``reseal`` re-computes the checksum from the spec (docs/format.md §1) independently of the
writer, so each structural check is reached on its own and not masked by the checksum.
Random mutations and truncations (fuzz) must all end in the typed error, never another
exception or a silent load.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeadapt.errors import (
    AdapterFormatError,
    FingerprintMismatchError,
    TargetMismatchError,
    WriteError,
)
from edgeadapt.format import (
    Adapter,
    LoraDelta,
    Manifest,
    ShiraDelta,
    SiraBranch,
    WeightEntry,
    read_adapter,
    write_adapter,
)

SHA = "ab" * 32
SHA2 = "cd" * 32


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def reseal(header: dict, data: bytes, checksum: bool = True) -> bytes:
    """Serialise ``header`` + ``data`` with a checksum computed from the spec."""
    header = json.loads(json.dumps(header))
    header["__metadata__"]["checksum"] = "0" * 64
    text = json.dumps(header, separators=(",", ":")).encode()
    blob = struct.pack("<Q", len(text)) + text + data
    if not checksum:
        return blob
    digest = hashlib.sha256(blob).hexdigest()
    text = text.replace(b'"checksum":"' + b"0" * 64 + b'"', b'"checksum":"' + digest.encode()
                        + b'"')
    return struct.pack("<Q", len(text)) + text + data


def shira_file(tmp_path, idx=(0, 7, 300, 2000), shape=(64, 64), dtype="float16"):
    idx = np.asarray(idx)
    a = Adapter("shira", {"w": ShiraDelta(idx, np.linspace(-1, 1, idx.size).astype(np.float32))},
                {"w": shape}, {"w": SHA})
    return write_adapter(tmp_path / "a.eadp", a, dtype)


def rewrite(path, edit) -> None:
    """Apply ``edit(header, metadata, targets) -> data | None`` and reseal the file."""
    header, data = split(path.read_bytes())
    md = header["__metadata__"]
    before = md["targets"]
    targets = json.loads(before)
    new_data = edit(header, md, targets)
    if md["targets"] == before:
        md["targets"] = json.dumps(targets)
    path.write_bytes(reseal(header, data if new_data is None else new_data))


def test_reseal_reproduces_the_writer(tmp_path):
    path = shira_file(tmp_path)
    raw = path.read_bytes()
    header, data = split(raw)
    path.write_bytes(reseal(header, data))
    assert read_adapter(path).targets["w"].indices.tolist() == [0, 7, 300, 2000]


CASES = {
    "format name": (lambda h, md, t: md.update(format="other"), "format is 'other'"),
    "newer version": (lambda h, md, t: md.update(version="2"), "newer edgeadapt"),
    "version text": (lambda h, md, t: md.update(version="one"), "not an integer"),
    "method": (lambda h, md, t: md.update(method="dora"), "unknown method"),
    "value dtype": (lambda h, md, t: md.update(value_dtype="int8"), "unknown value_dtype"),
    "scale nan": (lambda h, md, t: md.update(scale="nan"), "not finite"),
    "scale underscore": (lambda h, md, t: md.update(scale="1_0"), "not a number"),
    "scale spaces": (lambda h, md, t: md.update(scale=" 1.0 "), "not a number"),
    "scale hex": (lambda h, md, t: md.update(scale="0x10"), "not a number"),
    "targets json": (lambda h, md, t: md.update(targets="[{"), None),
    "fingerprint": (lambda h, md, t: md.update(fingerprint="0" * 64), "fingerprint"),
    "nnz": (lambda h, md, t: t[0].update(nnz=5), "gaps shape"),
    "shape too small": (lambda h, md, t: t[0].update(shape=[2, 2]), "exceeds|out of range"),
    "shape negative": (lambda h, md, t: t[0].update(shape=[-64, 64]), "shape"),
    "sha256 bad": (lambda h, md, t: t[0].update(sha256="xyz"), "sha256"),
    "duplicate target": (lambda h, md, t: t.append(dict(t[0])), "listed twice"),
    "slash name": (lambda h, md, t: t[0].update(name="a/b"), "bad weight name"),
    "missing tensor": (lambda h, md, t: t[0].update(name="v"), "missing"),
    "unknown dtype": (lambda h, md, t: h["w/values"].update(dtype="F8"), "unknown dtype"),
    "wrong value dtype": (lambda h, md, t: h["w/values"].update(dtype="I16"), "expected F16"),
    "bad gap dtype": (lambda h, md, t: h["w/gaps"].update(dtype="I8"), "gap/escape dtypes"),
    "offsets overlap": (lambda h, md, t: h["w/values"].update(
        data_offsets=[0, h["w/values"]["data_offsets"][1] - h["w/values"]["data_offsets"][0]]),
        "overlaps"),
    "shape vs bytes": (lambda h, md, t: h["w/values"].update(shape=[5]), "needs"),
    "extra key": (lambda h, md, t: h["w/values"].update(extra=1), "exactly"),
    "no metadata": (lambda h, md, t: md.pop("format") and None, "lacks 'format'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_check_fires(tmp_path, case):
    edit, message = CASES[case]
    path = shira_file(tmp_path)
    rewrite(path, edit)
    with pytest.raises(AdapterFormatError, match=message) as info:
        read_adapter(path)
    assert str(path) in str(info.value)


def _shira_data(gaps: bytes, escapes: bytes, values: np.ndarray):
    def edit(h, md, t):
        parts = [("w/escapes", "U16", escapes, len(escapes) // 2), ("w/gaps", "U8", gaps,
                 len(gaps)), ("w/values", "F16", values.astype("<f2").tobytes(), values.size)]
        off, data = 0, b""
        for name, dt, b, n in parts:
            h[name] = {"dtype": dt, "shape": [n], "data_offsets": [off, off + len(b)]}
            off += len(b)
            data += b
        t[0]["nnz"] = len(gaps)
        return data
    return edit


@pytest.mark.parametrize(("gaps", "escapes", "values", "message"), [
    (b"\x00\x00", b"", [1, 2], None),                       # valid: positions 0, 1
    (b"\x00\xff", b"", [1, 2], "escape codes"),             # escape code without escape
    (b"\x00\x05", b"\x00\x01", [1, 2], "escape codes"),     # escape without code
    (b"\x00\xff", b"\x10\x00", [1, 2], "below the escape"),  # non-canonical escape (16)
    (b"\x00\xff", b"\x00\x10", [1, 2], "exceeds"),          # gap 4096 in a 4096-element weight
    (b"\xff\x00", b"\xff\x0f", [1, 2], "out of range"),     # positions 4095, 4096
    (b"\x00\x00", b"", [1, np.inf], "non-finite"),
    (b"\x00\x00", b"", [np.nan, 1], "non-finite"),
])
def test_position_and_value_checks(tmp_path, gaps, escapes, values, message):
    path = shira_file(tmp_path)
    rewrite(path, _shira_data(gaps, escapes, np.array(values, dtype=np.float16)))
    if message is None:
        assert read_adapter(path).targets["w"].indices.tolist() == [0, 1]
        return
    with pytest.raises(AdapterFormatError, match=message):
        read_adapter(path)


def test_truncated_and_trailing(tmp_path):
    path = shira_file(tmp_path)
    raw = path.read_bytes()
    header, data = split(raw)
    for blob, message in [(raw[:5], "truncated"), (raw[:20], "truncated"),
                          (reseal(header, data[:-2]), "truncated"),
                          (reseal(header, data + b"\0\0"), "trailing"),
                          (struct.pack("<Q", 2**40) + raw[8:], "header length"),
                          (b"\x03\0\0\0\0\0\0\0[1]", "not a JSON object"),
                          (reseal(header, data, checksum=False), "checksum")]:
        path.write_bytes(blob)
        with pytest.raises(AdapterFormatError, match=message):
            read_adapter(path)
    with pytest.raises(AdapterFormatError, match="cannot read"):
        read_adapter(tmp_path / "missing.eadp")


def test_duplicate_json_keys_and_nan_literals(tmp_path):
    path = shira_file(tmp_path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8:8 + n].rstrip()
    for bad in (text[:-1] + b',"w/values":{}}', text.replace(b'"shape":[4]', b'"shape":[NaN]', 1)):
        path.write_bytes(struct.pack("<Q", len(bad)) + bad + raw[8 + n:])
        with pytest.raises(AdapterFormatError, match="not valid JSON"):
            read_adapter(path)


def test_sira_checks(tmp_path):
    e, r, o, n = 3, 2, 4, 5
    br = SiraBranch(np.ones((e, n), np.float32), np.ones((e, r, n), np.float32),
                    np.ones((e, o, r), np.float32), top_k=2, capacity_factor=1.0)
    path = write_adapter(tmp_path / "s.eadp", Adapter("sira", {"w": br}, {"w": (o, n)},
                                                      {"w": SHA}))
    for key, value, message in [("top_k", 4, "top_k"), ("top_k", 0, "top_k"),
                                ("capacity_factor", 0, "capacity_factor"),
                                ("capacity_factor", "x", "capacity_factor"),
                                ("experts", 2, "router has shape")]:
        raw = path.read_bytes()
        rewrite(path, lambda h, md, t, k=key, v=value: t[0].update({k: v}))
        with pytest.raises(AdapterFormatError, match=message):
            read_adapter(path)
        path.write_bytes(raw)
    with pytest.raises(AdapterFormatError, match="top_k"):
        write_adapter(tmp_path / "t.eadp", Adapter("sira", {"w": SiraBranch(
            br.router, br.A, br.B, top_k=5, capacity_factor=1.0)}, {"w": (o, n)}, {"w": SHA}))


def test_manifest_checks(tmp_path):
    path = shira_file(tmp_path)

    def manifest(weights):
        return Manifest(model="m", kind="classifier", targets_spec="qv", weights=weights)

    ok = manifest({"w": WeightEntry((64, 64), "float32", SHA), "v": WeightEntry((2, 2), "f", SHA2)})
    assert read_adapter(path, ok).targets["w"].indices.size == 4
    with pytest.raises(FingerprintMismatchError, match="different base model"):
        read_adapter(path, manifest({"w": WeightEntry((64, 64), "float32", SHA2)}))
    with pytest.raises(TargetMismatchError, match="--targets"):
        read_adapter(path, manifest({"v": WeightEntry((64, 64), "float32", SHA)}))
    with pytest.raises(AdapterFormatError, match="shape"):
        read_adapter(path, manifest({"w": WeightEntry((64, 65), "float32", SHA)}))


def _valid_files(tmp_path):
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(40 * 50, 30, replace=False))
    shira = Adapter("shira", {"a.w": ShiraDelta(idx, rng.standard_normal(30).astype(np.float32)),
                              "b.w": ShiraDelta(np.array([0, 1999]), np.ones(2, np.float32))},
                    {"a.w": (40, 50), "b.w": (40, 50)}, {"a.w": SHA, "b.w": SHA2})
    lora = Adapter("lora", {"a.w": LoraDelta(np.ones((2, 6), np.float32),
                                             np.ones((4, 2), np.float32))}, {"a.w": (4, 6)},
                   {"a.w": SHA})
    return [write_adapter(tmp_path / "s.eadp", shira, "bfloat16").read_bytes(),
            write_adapter(tmp_path / "l.eadp", lora).read_bytes()]


# EDGEADAPT_FUZZ_EXAMPLES=5000 for a long fuzz run.
FUZZ = settings(max_examples=int(os.environ.get("EDGEADAPT_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(which=st.integers(0, 1), edits=st.lists(st.tuples(st.integers(0, 10**6),
                                                         st.integers(0, 255)), min_size=1,
                                               max_size=4))
def test_fuzz_mutated_bytes(tmp_path, which, edits):
    raw = bytearray(_valid_files(tmp_path)[which])
    for pos, byte in edits:
        raw[pos % len(raw)] = byte
    path = tmp_path / "f.eadp"
    path.write_bytes(bytes(raw))
    if bytes(raw) == _valid_files(tmp_path)[which]:
        return  # every edit rewrote the byte it found: the file is the valid one
    with pytest.raises(AdapterFormatError):
        read_adapter(path)


@FUZZ
@given(which=st.integers(0, 1), cut=st.integers(0, 10**6))
def test_fuzz_truncated(tmp_path, which, cut):
    raw = _valid_files(tmp_path)[which]
    path = tmp_path / "f.eadp"
    path.write_bytes(raw[: cut % len(raw)])
    with pytest.raises(AdapterFormatError):
        read_adapter(path)


JSON_JUNK = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(
    allow_nan=False) | st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.text(max_size=4), c, max_size=3), max_leaves=5)


@FUZZ
@given(which=st.integers(0, 1), path_choice=st.integers(0, 10**6), junk=JSON_JUNK,
       data_edit=st.tuples(st.integers(0, 10**6), st.integers(0, 255)))
def test_fuzz_resealed_header_and_data(tmp_path, which, path_choice, junk, data_edit):
    """Structure-aware fuzz past the checksum: replace one header value by random JSON, flip a
    data byte, reseal. Either the typed error, or a load whose invariants hold."""
    header, data = split(_valid_files(tmp_path)[which])
    md = header["__metadata__"]
    md["targets"] = json.loads(md["targets"])
    slots = []  # (container, key) pairs of every value in the header

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in list(items):
            slots.append((node, k))
            if isinstance(v, (dict, list)):
                walk(v)
    walk(header)
    node, key = slots[path_choice % len(slots)]
    node[key] = junk
    if isinstance(md, dict) and isinstance(md.get("targets"), (list, dict)):
        md["targets"] = json.dumps(md["targets"])
    data = bytearray(data)
    if data:
        data[data_edit[0] % len(data)] = data_edit[1]
    path = tmp_path / "f.eadp"
    try:
        blob = reseal(header, bytes(data))
    except (TypeError, KeyError, AttributeError, ValueError):
        return  # the junk removed the metadata object itself; the byte fuzz covers that
    path.write_bytes(blob)
    try:
        a = read_adapter(path)
    except AdapterFormatError:
        return
    for name, d in a.targets.items():
        out_f, in_f = a.shapes[name]
        if isinstance(d, ShiraDelta):
            assert d.indices.dtype == np.int64 and d.values.shape == d.indices.shape
            assert np.all(np.diff(d.indices) > 0) and (d.indices.size == 0 or (
                d.indices[0] >= 0 and d.indices[-1] < out_f * in_f))
            assert np.all(np.isfinite(d.values))
        else:
            assert d.A.shape[-1] == in_f and np.all(np.isfinite(d.A)) and np.all(
                np.isfinite(d.B))


def test_an_unwritable_path_is_a_write_error(tmp_path, monkeypatch):
    """OSError from the file system comes back typed (and still an OSError), naming the path;
    the file it would have replaced is untouched and no temp file is left."""
    import edgeadapt.format.container as container

    (tmp_path / "f").write_text("a file")
    with pytest.raises(WriteError, match="f/sub"):
        shira_file(tmp_path / "f" / "sub")
    path = shira_file(tmp_path)
    before = path.read_bytes()

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(container.os, "replace", full)
    with pytest.raises(WriteError, match="No space left") as info:
        shira_file(tmp_path)
    monkeypatch.undo()
    assert isinstance(info.value, OSError)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
