"""Bundles that can move: a base exported from a local Hugging Face directory is recorded
relative to the bundle, with its config.json sha256, so that exporting a graph variant (SiRA,
unfused LoRA), which reloads the base, works after the bundle and its model moved together;
a model moved alone is found again with ``--model DIR``, checked against the bundle.

References: hashlib over bundle.json and config.json; the adapters are random numpy deltas
tied to the bundle's recorded weight hashes.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeadapt.errors import BundleError, ConfigError, ExportError, FingerprintMismatchError
from edgeadapt.export import export_adapter
from edgeadapt.export.bundle import export_base, model_record
from edgeadapt.export.cli import export
from edgeadapt.format import read_manifest, write_adapter
from edgeadapt.format.manifest import model_location
from edgeadapt.format.types import Adapter, LoraDelta, SiraBranch
from edgeadapt.runtime import load

torch.set_num_threads(1)
SIRA = "sira-e3-r2-k2-c1.25"


def save_llama(path, seed=0, **config):
    """A one-block Llama (hidden 32) saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "tie_word_embeddings": True, **config}
    LlamaForCausalLM(LlamaConfig(**kw)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The base, one with other weights (same config.json) and one with another config."""
    root = tmp_path_factory.mktemp("models")
    base = save_llama(root / "base")
    other_weights = save_llama(root / "other-weights", seed=1)
    other_config = save_llama(root / "other-config", rms_norm_eps=1e-5)
    assert (base / "config.json").read_bytes() == (other_weights / "config.json").read_bytes()
    return {"base": base, "weights": other_weights, "config": other_config}


@pytest.fixture
def placed(models, tmp_path):
    """``tmp/a/model`` (a copy of the base) and ``tmp/a/bundle`` exported from it (ONNX
    Runtime), plus a SiRA and a LoRA .eadp outside the bundle."""
    model = shutil.copytree(models["base"], tmp_path / "a" / "model")
    bundle = export_base(str(model), tmp_path / "a" / "bundle", backends=("onnxruntime",),
                         targets="qv", check=False)
    files = write_adapters(read_manifest(bundle), tmp_path / "adapters")
    return model, bundle, files


def write_adapters(manifest, out):
    rng = np.random.default_rng(0)
    names = sorted(manifest.weights)
    shapes = {n: tuple(manifest.weights[n].shape) for n in names}
    sha = {n: manifest.weights[n].sha256 for n in names}

    def f32(*shape):
        return (0.3 * rng.standard_normal(shape)).astype(np.float32)

    sira = {n: SiraBranch(f32(3, shapes[n][1]), f32(3, 2, shapes[n][1]),
                          f32(3, shapes[n][0], 2), 2, 1.25) for n in names}
    lora = {n: LoraDelta(f32(2, shapes[n][1]), f32(shapes[n][0], 2)) for n in names}
    out.mkdir()
    return {"sira": write_adapter(out / "sira.eadp", Adapter("sira", sira, shapes, sha),
                                  "float32"),
            "lora": write_adapter(out / "lora.eadp", Adapter("lora", lora, shapes, sha),
                                  "float32")}


def state(bundle) -> dict[str, str]:
    """sha256 of every file in the bundle (an empty adapters/ folder may appear)."""
    return {str(p.relative_to(bundle)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(bundle.rglob("*")) if p.is_file()}


def runs(bundle, *names):
    """Each adapter switches and changes the output of the moved bundle."""
    rt = load(bundle, backend="onnxruntime")
    ids = np.array([[3, 17, 42, 5, 99]], np.int64)
    x = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    x = {i["name"]: x[i["name"]] for i in read_manifest(bundle).inputs}
    base = rt.run(**x)
    for name in names:
        rt.switch(name)
        got = rt.run(**x)
        assert np.isfinite(got).all() and not np.allclose(got, base), name
    rt.switch(None)


def test_records_relative_path_and_config_hash(placed):
    model, bundle, _ = placed
    m = read_manifest(bundle)
    assert m.model == "../model"
    assert m.model_config_sha256 == hashlib.sha256(
        (model / "config.json").read_bytes()).hexdigest()
    assert model_location(m, bundle) == str(model.resolve())
    raw = json.loads((bundle / "bundle.json").read_text())
    assert raw["model"] == "../model" and raw["model_config_sha256"] == m.model_config_sha256
    raw["model_config_sha256"] = "not-a-hash"
    (bundle / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="model_config_sha256"):
        read_manifest(bundle)


def test_model_record(models, tmp_path):
    """Registry names and names of no directory stay as they are; a directory inside the
    bundle gets './' (never read as a registry name)."""
    assert model_record("tiny-smollm2", tmp_path) == ("tiny-smollm2", None)
    assert model_record("one-block-llama", tmp_path) == ("one-block-llama", None)
    inside = shutil.copytree(models["base"], tmp_path / "bundle" / "smollm2")
    rec, sha = model_record(str(inside), tmp_path / "bundle")
    assert rec == "./smollm2" and len(sha) == 64
    rec, _ = model_record(str(models["base"]), tmp_path / "bundle")
    assert rec.startswith("../") and (tmp_path / "bundle" / rec).resolve() == \
        models["base"].resolve()


def test_bundle_and_model_move_together(placed, tmp_path):
    model, bundle, files = placed
    new = tmp_path / "elsewhere" / "deeper"
    new.mkdir(parents=True)
    shutil.move(bundle, new / "bundle")
    shutil.move(model, new / "model")
    bundle = new / "bundle"
    export_adapter(files["sira"], bundle, "sira", check=False)
    export_adapter(files["lora"], bundle, "lora", unfused=True, check=False)
    m = read_manifest(bundle)
    assert m.adapters["sira"].variant == SIRA and m.adapters["lora"].variant == "lora-r2"
    assert sorted(m.variants) == ["lora-r2", SIRA] and m.model == "../model"
    runs(bundle, "sira", "lora")


def test_model_moved_alone_needs_model_option(placed, tmp_path):
    model, bundle, files = placed
    moved = shutil.move(model, tmp_path / "moved-model")
    before = state(bundle)
    with pytest.raises(BundleError, match=r"'\.\./model'.*--model DIR") as err:
        export_adapter(files["sira"], bundle, "sira", check=False)
    assert "edgeadapt export adapter" in str(err.value)
    assert state(bundle) == before
    # a fused adapter needs no reload: still fine without --model
    export_adapter(files["lora"], bundle, "fused", check=False)
    res = CliRunner().invoke(export, ["adapter", str(files["sira"]), "--bundle", str(bundle),
                                      "--name", "sira", "--no-check", "--model", str(moved)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = read_manifest(bundle)
    assert m.adapters["sira"].variant == SIRA
    assert m.model == "../../moved-model"  # where the checked base was found, from now on
    export_adapter(files["lora"], bundle, "lora", unfused=True, check=False)  # no --model
    runs(bundle, "sira", "lora", "fused")


@pytest.mark.parametrize("other", ["weights", "config"])
def test_model_option_refuses_another_model(placed, models, tmp_path, other):
    model, bundle, files = placed
    shutil.move(model, tmp_path / "moved-model")
    before = state(bundle)
    what = "config.json" if other == "config" else "weights are not the bundle's base"
    with pytest.raises(FingerprintMismatchError, match=what):
        export_adapter(files["sira"], bundle, "sira", check=False, model=models[other])
    assert state(bundle) == before
    res = CliRunner().invoke(export, ["adapter", str(files["lora"]), "--bundle", str(bundle),
                                      "--name", "lora", "--unfused", "--no-check", "--model",
                                      str(models[other])])
    assert isinstance(res.exception, FingerprintMismatchError), res.output
    assert state(bundle) == before
    with pytest.raises(ConfigError, match="no config.json"):
        export_adapter(files["sira"], bundle, "sira", check=False, model=tmp_path)
    assert state(bundle) == before


def test_recorded_directory_holding_another_model(placed, models):
    """The directory at the recorded path was replaced: its config or its weights differ."""
    model, bundle, files = placed
    shutil.rmtree(model)
    shutil.copytree(models["config"], model)
    before = state(bundle)
    with pytest.raises(FingerprintMismatchError, match="config.json.*--model DIR"):
        export_adapter(files["sira"], bundle, "sira", check=False)
    shutil.rmtree(model)
    shutil.copytree(models["weights"], model)
    with pytest.raises(ExportError, match="different weights"):
        export_adapter(files["sira"], bundle, "sira", check=False)
    assert state(bundle) == before


def test_old_bundle_with_absolute_path(placed, tmp_path):
    """Bundles written before: "model" an absolute directory, no model_config_sha256."""
    model, bundle, files = placed
    raw = json.loads((bundle / "bundle.json").read_text())
    del raw["model_config_sha256"]
    raw["model"] = str(model.resolve())
    (bundle / "bundle.json").write_text(json.dumps(raw))
    m = read_manifest(bundle)
    assert m.model_config_sha256 is None and model_location(m, bundle) == str(model.resolve())
    export_adapter(files["sira"], bundle, "sira", check=False)
    assert read_manifest(bundle).model == str(model.resolve())  # left as it was
    bundle = shutil.move(bundle, tmp_path / "moved-bundle")  # absolute: the bundle can move
    new = shutil.move(model, tmp_path / "moved-model")
    before = state(bundle)
    with pytest.raises(BundleError, match="--model DIR"):
        export_adapter(files["lora"], bundle, "lora", unfused=True, check=False)
    assert state(bundle) == before
    export_adapter(files["lora"], bundle, "lora", unfused=True, check=False, model=new)
    m = read_manifest(bundle)  # found again: recorded relative, with its config's hash
    assert m.model == "../moved-model" and m.model_config_sha256 is not None
    runs(bundle, "sira", "lora")
