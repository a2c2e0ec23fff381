"""bundle.json: round trip, fingerprint recomputed from the weights, and every refusal."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from edgeadapt.errors import BundleError
from edgeadapt.format import (
    AdapterEntry,
    Manifest,
    WeightEntry,
    read_manifest,
    variant_key,
    weight_sha256,
    write_manifest,
)


def make_manifest() -> Manifest:
    rng = np.random.default_rng(0)
    w = {f"layer.{i}.q.weight": rng.standard_normal((4, 3)).astype(np.float32) for i in range(2)}
    weights = {n: WeightEntry(a.shape, "float32", weight_sha256(a),
                              onnxruntime={"name": f"val_{i}", "layout": "transposed"},
                              executorch={"buffer": f"b_{i}"})
               for i, (n, a) in enumerate(w.items())}
    return Manifest(model="tiny-minilm", kind="classifier", targets_spec="qv", weights=weights,
                    inputs=[{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}],
                    onnxruntime={"file": "model.onnx"},
                    adapters={"s": AdapterEntry("adapters/s.eadp", "shira")},
                    variants={"sira-e4-r2-k2-c1": {
                        "branch": {"kind": "sira"}, "dir": "variants/sira-e4-r2-k2-c1",
                        "onnxruntime": {"file": "variants/sira-e4-r2-k2-c1/model.onnx"},
                        "weights": {"layer.0.q.weight": {"onnxruntime": {"name": "v0"}}}}})


def test_round_trip_and_fingerprint(tmp_path):
    m = make_manifest()
    path = write_manifest(tmp_path, m)
    assert path == tmp_path / "bundle.json"
    data = json.loads(path.read_text())
    lines = "\n".join(f"{n}={w['sha256']}" for n, w in sorted(data["weights"].items()))
    assert data["fingerprint"] == hashlib.sha256(lines.encode()).hexdigest()
    assert data["format"] == "edgeadapt-bundle" and data["version"] == 2
    back = read_manifest(tmp_path)
    assert back.to_dict() == m.to_dict()
    assert back.weights["layer.0.q.weight"].shape == (4, 3)
    assert read_manifest(path).fingerprint == data["fingerprint"]


def test_version_1_bundles_load_with_the_backend_names(tmp_path):
    """A version-1 bundle.json (ONNX Runtime's sections keyed "onnx": top level, per weight,
    per variant and per variant weight) reads as version 2 with every one keyed
    "onnxruntime"; nothing else changes, and writing it back writes version 2."""
    m = make_manifest()
    want = m.to_dict()
    v1 = json.loads(json.dumps(want).replace('"onnxruntime"', '"onnx"'))
    v1["version"] = 1
    assert "onnxruntime" not in json.dumps(v1)  # the old form, independently of the reader
    (tmp_path / "bundle.json").write_text(json.dumps(v1))
    back = read_manifest(tmp_path)
    assert back.to_dict() == want
    assert back.onnxruntime == {"file": "model.onnx"}
    assert back.weights["layer.1.q.weight"].onnxruntime == {"name": "val_1",
                                                            "layout": "transposed"}
    variant = back.variants["sira-e4-r2-k2-c1"]
    assert variant["weights"]["layer.0.q.weight"] == {"onnxruntime": {"name": "v0"}}
    write_manifest(tmp_path, back)
    assert json.loads((tmp_path / "bundle.json").read_text())["version"] == 2


def _edit(tmp_path, fn):
    path = write_manifest(tmp_path, make_manifest())
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(format="x"), "format"),
    (lambda d: d.update(version=3), "newer edgeadapt"),
    (lambda d: d.update(version="1"), "positive integer"),
    (lambda d: d.update(kind="seq2seq"), "kind"),
    (lambda d: d.pop("model"), "'model'"),
    (lambda d: d["weights"]["layer.0.q.weight"].update(sha256="ab" * 32), "fingerprint"),
    (lambda d: d["weights"]["layer.0.q.weight"].update(shape=[4]), "shape"),
    (lambda d: d["weights"]["layer.0.q.weight"].update(sha256="XYZ"), "sha256"),
    (lambda d: d["adapters"]["s"].update(file="../etc/passwd"), "relative path"),
    (lambda d: d["adapters"]["s"].update(file="/abs.eadp"), "relative path"),
    (lambda d: d["adapters"]["s"].update(method="dora"), "unknown method"),
    (lambda d: d["adapters"]["s"].update(variant="nope"), "variant 'nope'"),
    (lambda d: d.update(weights=[]), "weights"),
    (lambda d: d.update(seed="x"), "'seed' must be an integer"),
    (lambda d: d.update(num_labels=2.5), "'num_labels' must be an integer"),
    (lambda d: d.update(executorch={"file": "m.pte", "max_batch": 0}), "'max_batch'"),
    (lambda d: d.update(executorch={"file": "m.pte", "max_seq": "64"}), "'max_seq'"),
])
def test_refusals(tmp_path, edit, message):
    path = _edit(tmp_path, edit)
    with pytest.raises(BundleError, match=message):
        read_manifest(path)


def test_unreadable(tmp_path):
    with pytest.raises(BundleError, match="export base"):
        read_manifest(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_write_refuses_invalid_and_keeps_old(tmp_path):
    write_manifest(tmp_path, make_manifest())
    before = (tmp_path / "bundle.json").read_bytes()
    bad = make_manifest()
    bad.adapters["x"] = AdapterEntry("../x.eadp", "shira")
    with pytest.raises(BundleError):
        write_manifest(tmp_path, bad)
    assert (tmp_path / "bundle.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.json"]


def test_variant_key():
    assert variant_key(("sira", 4, 8, 2, 1.25)) == "sira-e4-r8-k2-c1.25"
    assert variant_key(("lora", 16)) == "lora-r16"
    with pytest.raises(BundleError):
        variant_key(("dora", 1))
