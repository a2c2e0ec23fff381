"""PEFT in, PEFT out: adapters made by Hugging Face PEFT itself on the tiny models, exported into
bundles and switched on the runtime; edgeadapt runs converted to PEFT adapters and loaded back
by ``PeftModel.from_pretrained``.

References, all independent of the code under test: PEFT's own merged model
(``merge_and_unload``) and its layers' ``get_delta_weight``; the edgeadapt run's own PyTorch
model (``edgeadapt.train.load_run``); the tensors PEFT saved; sha256 of the bundle's files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402
from runtime_reference import export_tiny, parity  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from edgeadapt.adapters import LoraConfig as EaLora  # noqa: E402
from edgeadapt.adapters import ShiraConfig as EaShira  # noqa: E402
from edgeadapt.adapters import SiraConfig as EaSira  # noqa: E402
from edgeadapt.adapters import SoraConfig as EaSora  # noqa: E402
from edgeadapt.adapters import adapter_state, attach  # noqa: E402
from edgeadapt.cli import main  # noqa: E402
from edgeadapt.errors import (  # noqa: E402
    AdapterFormatError,
    ConfigError,
    FingerprintMismatchError,
    TargetMismatchError,
)
from edgeadapt.export import export_adapter  # noqa: E402
from edgeadapt.export.convert import convert_adapter  # noqa: E402
from edgeadapt.format import read_adapter, read_manifest  # noqa: E402
from edgeadapt.format.peft import (  # noqa: E402
    BASE_ALIASES,
    REFUSED_LORA_OPTIONS,
    CooDelta,
    read_peft,
)
from edgeadapt.format.peft_match import _prefix_change  # noqa: E402
from edgeadapt.models import REAL_MODELS, example_inputs, load_model  # noqa: E402
from edgeadapt.runtime import load  # noqa: E402
from edgeadapt.train import load_run  # noqa: E402
from edgeadapt.train.run import base_weight_hashes, save_run  # noqa: E402

torch.set_num_threads(1)
SMOL, MINI = "tiny-smollm2", "tiny-minilm"
TARGETS = {SMOL: ["q_proj", "v_proj"], MINI: ["query", "value"]}
#: fp32 values: the runtime after a switch equals PEFT's merged model this closely (max-norm)
EXACT = 1e-5


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """One ONNX Runtime bundle per tiny model, q/v live (seed 0, as load_model gives)."""
    out = {}
    for model in (SMOL, MINI):
        path = tmp_path_factory.mktemp(model)
        export_tiny(model, path, num_labels=2)
        out[model] = path
    return out


def _out(model, kind, inputs):
    if kind == "classifier":
        res = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    else:
        res = model(input_ids=inputs["input_ids"], use_cache=False)
    return res.logits if hasattr(res, "logits") else res


def logits(model, kind, inputs) -> np.ndarray:
    with torch.no_grad():
        return _out(model, kind, inputs).float().numpy()


def inputs_of(model_name):
    lm = load_model(model_name, seed=0)
    t = example_inputs(lm, batch=2, seq=7, seed=3)
    return lm.kind, t, {k: v.numpy() for k, v in t.items()}


def peft_config(method, model_name, **kw):
    if method == "lora":
        return peft.LoraConfig(**{"r": 4, "lora_alpha": 8,
                                  "target_modules": TARGETS[model_name], **kw})
    return peft.ShiraConfig(**{"r": 2, "target_modules": TARGETS[model_name], **kw})


def make_peft(model_name, config, out, steps=3, seed=0, module=None, hook=None):
    """A PEFT adapter on ``load_model(model_name, seed=0)`` (or on its submodule ``module``)
    after ``steps`` Adam steps on a toy loss, saved with save_pretrained; returns the
    PeftModel."""
    lm = load_model(model_name, seed=0)
    base = lm.model if module is None else lm.model.get_submodule(module)
    pm = peft.get_peft_model(base, config)
    x = example_inputs(lm, batch=2, seq=8, seed=seed)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        y = _out(pm, lm.kind, x) if module is None else pm(
            input_ids=x["input_ids"]).last_hidden_state
        y.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    if hook is not None:
        hook(pm)
    pm.save_pretrained(out)
    return pm


def merged(pm):
    """PEFT's own merged model (a copy): W + delta for every adapted weight."""
    return copy.deepcopy(pm).merge_and_unload()


def state(bundle) -> dict[str, str]:
    """sha256 of bundle.json and of every file under adapters/."""
    files = [bundle / "bundle.json", *sorted((bundle / "adapters").glob("*"))]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


# -- PEFT in -----------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", [SMOL, MINI])
@pytest.mark.parametrize("method", ["lora", "shira"])
def test_peft_adapter_switches_to_peft_merged_model(bundles, tmp_path, model_name, method):
    bundle = bundles[model_name]
    pm = make_peft(model_name, peft_config(method, model_name), tmp_path / "a")
    name = f"peft-{method}"
    export_adapter(tmp_path / "a", bundle, name, "float32")
    assert read_manifest(bundle).adapters[name].method == method
    kind, t_in, np_in = inputs_of(model_name)
    ref = merged(pm)
    rt = load(bundle, backend="onnxruntime", mode="live")
    rt.switch(name)
    assert parity(rt.run(**np_in), logits(ref, kind, t_in)) <= EXACT
    want = dict(ref.named_parameters())
    base = load_model(model_name, seed=0).model
    for n, arr in rt.live_weights(sorted(read_adapter(bundle / f"adapters/{name}.eadp")
                                         .targets)).items():
        assert not np.array_equal(arr, base.get_parameter(n).numpy()), n  # it was adapted
        assert parity(arr, want[n].detach().numpy()) <= 1e-6, n


def test_two_peft_adapters_fuse_and_the_base_comes_back_bit_exact(bundles, tmp_path):
    bundle = bundles[SMOL]
    pa = make_peft(SMOL, peft_config("lora", SMOL), tmp_path / "a", seed=1)
    make_peft(SMOL, peft_config("shira", SMOL), tmp_path / "b", seed=2)
    export_adapter(tmp_path / "a", bundle, "fa", "float32")
    export_adapter(tmp_path / "b", bundle, "fb", "float32")
    kind, t_in, np_in = inputs_of(SMOL)
    # W + delta_a + delta_b, by PEFT alone: merge a, then load b onto the merged model
    both = peft.PeftModel.from_pretrained(merged(pa), tmp_path / "b").merge_and_unload()
    rt = load(bundle, backend="onnxruntime", mode="live")
    base_w, base_out = rt.live_weights(), rt.run(**np_in)
    rt.switch(["fa", "fb"])
    assert parity(rt.run(**np_in), logits(both, kind, t_in)) <= EXACT
    rt.switch("fb")
    rt.switch(None)
    after = rt.live_weights()
    assert all(np.array_equal(after[n], base_w[n]) for n in base_w)
    assert np.array_equal(rt.run(**np_in), base_out)
    with pytest.raises(ValueError):  # the view is read-only: a copy, not the engine's arrays
        after[next(iter(after))][0, 0] = 1.0


@pytest.mark.slow
def test_peft_adapters_on_executorch(tmp_path):
    """The same on the ExecuTorch backend (a one-block Llama: lowering costs tens of seconds)."""
    pytest.importorskip("executorch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeadapt.export.bundle import export_base
    from edgeadapt.models import LoadedModel

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, use_cache=False)).eval().requires_grad_(False)
    lm = LoadedModel(model=model, tokenizer=None, name="one-block-llama", kind="causal-lm")
    export_base(lm, tmp_path / "bundle", backends=("executorch",), targets="qv", check=False)
    t_in = example_inputs(lm, batch=2, seq=7, seed=3)
    np_in = {k: v.numpy() for k, v in t_in.items()}
    pms = {}
    for method, kw in (("lora", {"init_lora_weights": False}), ("shira", {"init_weights": False})):
        pms[method] = peft.get_peft_model(copy.deepcopy(model), peft_config(method, SMOL, **kw))
        pms[method].save_pretrained(tmp_path / method)
        export_adapter(tmp_path / method, tmp_path / "bundle", method, "float32")
    both = peft.PeftModel.from_pretrained(merged(pms["lora"]), tmp_path / "shira"
                                          ).merge_and_unload()
    rt = load(tmp_path / "bundle", backend="executorch", mode="live")
    base_out = rt.run(**np_in)
    for names, ref in (("lora", merged(pms["lora"])), ("shira", merged(pms["shira"])),
                       (["lora", "shira"], both)):
        rt.switch(names)
        assert parity(rt.run(**np_in), logits(ref, "causal-lm", t_in)) <= EXACT, names
    rt.switch(None)
    assert np.array_equal(rt.run(**np_in), base_out)


GPT2 = {"vocab_size": 64, "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 16}


@pytest.mark.parametrize("case", ["lora", "rslora", "patterns", "fan_in_fan_out", "shira"])
def test_read_peft_equals_peft_delta_weight(tmp_path, case):
    """Every delta read equals what PEFT's own layer adds to the weight (get_delta_weight)."""
    if case == "fan_in_fan_out":  # GPT-2's Conv1D stores (in, out)
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        base, targets = GPT2LMHeadModel(GPT2Config(**GPT2)), ["c_attn"]
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                 fan_in_fan_out=True, init_lora_weights=False)
    else:
        base = load_model(SMOL, seed=0).model
        kw = {"rslora": {"use_rslora": True, "lora_alpha": 12},
              "patterns": {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}
              }.get(case, {})
        config = peft_config("shira" if case == "shira" else "lora", SMOL, **kw,
                             **({"init_weights": False} if case == "shira"
                                else {"init_lora_weights": False}))
    pm = peft.get_peft_model(base, config)
    pm.save_pretrained(tmp_path)
    got = read_peft(tmp_path)
    layers = {n: m for n, m in pm.base_model.model.named_modules()
              if hasattr(m, "get_delta_weight")}
    assert sorted(got.targets) == sorted(layers)
    for name, delta in got.targets.items():
        want = layers[name].get_delta_weight("default").detach()
        want = (want.to_dense() if want.is_sparse else want).numpy()
        if isinstance(delta, CooDelta):
            dense = np.zeros(want.shape, np.float32)
            dense[delta.rows, delta.cols] = delta.values
        else:
            dense = delta.B @ delta.A
        assert dense.shape == want.shape and parity(dense, want) <= 1e-6, name


def test_half_precision_peft_tensors_read_exactly(tmp_path):
    """Adapters trained in bf16 / fp16 are saved so: read widened exactly (torch's widening the
    reference), with the scaling folded into B in float64."""
    from safetensors.torch import load_file as torch_load
    from safetensors.torch import save_file as torch_save

    pm = peft.get_peft_model(load_model(SMOL, seed=0).model,
                             peft_config("lora", SMOL, init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    fp32 = torch_load(file)
    for dtype in (torch.bfloat16, torch.float16):
        torch_save({k: v.to(dtype) for k, v in fp32.items()}, file)
        got = read_peft(tmp_path)
        for module, d in got.targets.items():
            key = f"base_model.model.{module}"
            A = fp32[f"{key}.lora_A.weight"].to(dtype).float().numpy()
            B = fp32[f"{key}.lora_B.weight"].to(dtype).double().numpy() * 2.0  # 8 / 4
            assert np.array_equal(d.A, A) and np.array_equal(d.B, B.astype(np.float32)), dtype


def test_peft_on_the_inner_model_maps_by_prefix(bundles, tmp_path):
    """PEFT on LlamaModel names ``layers.0...``, the bundle (LlamaForCausalLM) ``model.layers.0
    ...``; on BertModel ``encoder...``, the bundle ``bert.encoder...``."""
    for model_name, inner in ((SMOL, "model"), (MINI, "bert")):
        pm = make_peft(model_name, peft_config("lora", model_name), tmp_path / model_name,
                       module=inner)
        path = export_adapter(tmp_path / model_name, bundles[model_name], "inner", "float32")
        adapter = read_adapter(path)
        want = {f"{inner}.{n}": p.detach().numpy() for n, p in merged(pm).named_parameters()}
        base = load_model(model_name, seed=0).model
        assert all(n.startswith(f"{inner}.") for n in adapter.targets)
        for n, d in adapter.targets.items():
            assert parity(base.get_parameter(n).numpy() + d.B @ d.A, want[n]) <= 1e-6


def test_prefix_change_both_ways():
    live = {"model.layers.0.q", "model.layers.1.q"}
    assert _prefix_change(["layers.0.q", "layers.1.q"], live) == ("", "model.")
    assert _prefix_change(["model.model.layers.0.q"], live) == ("model.", "")
    assert _prefix_change(["model.layers.0.q"], live) == ("", "")
    assert _prefix_change(["encoder.x"], live) == ("", "")


def test_classifier_head_as_modules_to_save(bundles, tmp_path):
    def zero_bias(pm):
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].bias.zero_()

    config = peft_config("shira", MINI, modules_to_save=["classifier"])
    pm = make_peft(MINI, config, tmp_path / "trained")  # its head bias moved in training
    before = state(bundles[MINI])
    with pytest.raises(AdapterFormatError, match="trained bias"):
        export_adapter(tmp_path / "trained", bundles[MINI], "head", "float32")
    assert state(bundles[MINI]) == before
    pm = make_peft(MINI, config, tmp_path / "zero", hook=zero_bias)
    path = export_adapter(tmp_path / "zero", bundles[MINI], "head", "float32")
    assert list(read_adapter(path).head) == ["classifier.weight"]
    kind, t_in, np_in = inputs_of(MINI)
    rt = load(bundles[MINI], backend="onnxruntime", mode="live")
    rt.switch("head")
    assert parity(rt.run(**np_in), logits(merged(pm), kind, t_in)) <= EXACT


def test_eadp_file_source(bundles, tmp_path):
    bundle = bundles[SMOL]
    make_peft(SMOL, peft_config("shira", SMOL), tmp_path / "a")
    first = export_adapter(tmp_path / "a", bundle, "src", "float32")
    second = export_adapter(first, bundle, "copy")  # an .eadp keeps its own value dtype
    assert read_manifest(bundle).adapters["copy"].info["value_dtype"] == "float32"
    a, b = read_adapter(first), read_adapter(second)
    assert all(np.array_equal(a.targets[n].values, b.targets[n].values) for n in a.targets)
    before = state(bundles[MINI])
    with pytest.raises(TargetMismatchError):  # an .eadp of another model's bundle
        export_adapter(first, bundles[MINI], "copy")
    assert state(bundles[MINI]) == before


def test_fp16_rounding_warning(bundles, tmp_path, caplog):
    bundle = bundles[SMOL]
    pm = make_peft(SMOL, peft_config("shira", SMOL), tmp_path / "a")
    kind, t_in, np_in = inputs_of(SMOL)
    want = logits(merged(pm), kind, t_in)
    with caplog.at_level(logging.WARNING, logger="edgeadapt.export"):
        export_adapter(tmp_path / "a", bundle, "half")  # default float16
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    export_adapter(tmp_path / "a", bundle, "full", "float32")
    rt = load(bundle, backend="onnxruntime", mode="live")
    err = {}
    for name in ("half", "full"):
        rt.switch(name)
        err[name] = parity(rt.run(**np_in), want)
    assert err["full"] <= EXACT and err["full"] < err["half"] <= 1e-3, err

    def tiny_values(pm):  # below fp16's normal range (6.1e-5): rounding loses digits
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.mul_(1e-4)

    make_peft(SMOL, peft_config("shira", SMOL), tmp_path / "b", hook=tiny_values)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgeadapt.export"):
        export_adapter(tmp_path / "b", bundle, "tiny")
    assert any("--dtype float32" in r.getMessage() for r in caplog.records)


# -- bad input ---------------------------------------------------------------------------------

def _nan(path):
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan
    save_file(tensors, file)


def _edit_config(**fields):
    def edit(path):
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update(fields)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    return edit


def _bin_only(path):
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(b"never unpickled")


def _small_llama(path, method):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    kw = {"init_weights": False} if method == "shira" else {"init_lora_weights": False}
    peft.get_peft_model(small, peft_config(method, SMOL, **kw)).save_pretrained(path)


BAD = {
    "another architecture": (MINI, "lora", None, TargetMismatchError, "none of the 4 module"),
    "lora, another size": (None, "lora", None, AdapterFormatError, "another model size"),
    "shira, another size": (None, "shira", None, AdapterFormatError, "another model size"),
    "no safetensors": (SMOL, "lora", lambda p: (p / "adapter_model.safetensors").unlink(),
                       AdapterFormatError, "adapter_model.safetensors is missing"),
    "pickle only": (SMOL, "lora", _bin_only, AdapterFormatError, r"adapter_model.bin.*no "
                                                                  r"pickle.*safe_serialization"),
    "IA3": (SMOL, "ia3", None, AdapterFormatError, "PEFT type 'IA3' is not supported"),
    "NaN": (SMOL, "lora", _nan, AdapterFormatError, "non-finite"),
    "DoRA": (SMOL, "lora", _edit_config(use_dora=True), AdapterFormatError, "DoRA"),
    "PiSSA": (SMOL, "lora", _edit_config(init_lora_weights="pissa"), AdapterFormatError,
              "path_initial_model_for_weight_conversion"),
    "another base": (SMOL, "lora", _edit_config(base_model_name_or_path="HuggingFaceTB/"
                                                "SmolLM2-360M"),
                     FingerprintMismatchError, "--force-base"),
    "not live": (SMOL, "lora-k", None, TargetMismatchError,
                 r"k_proj.*--targets '\(\^\|\\\.\)\(k_proj\|q_proj\)\$'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_peft_adapters_leave_the_bundle_unchanged(bundles, tmp_path, case):
    made_on, method, spoil, error, match = BAD[case]
    path = tmp_path / "a"
    if made_on is None:
        _small_llama(path, method)
    elif method == "ia3":
        pm = peft.get_peft_model(load_model(SMOL).model, peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
        pm.save_pretrained(path)
    else:
        kw = {"target_modules": ["q_proj", "k_proj"]} if method == "lora-k" else {}
        make_peft(made_on, peft_config("lora", made_on, **kw), path, steps=1)
    if spoil is not None:
        spoil(path)
    bundle = bundles[SMOL]
    before = state(bundle)
    with pytest.raises(error, match=match):
        export_adapter(path, bundle, "bad", "float32")
    assert state(bundle) == before and "bad" not in read_manifest(bundle).adapters
    res = CliRunner().invoke(main, ["export", "adapter", str(path), "--bundle", str(bundle),
                                    "--name", "bad"])
    assert res.exit_code == 2 and "error: " in res.output, res.output
    assert state(bundle) == before


def test_force_base_accepts_another_name(bundles, tmp_path):
    make_peft(SMOL, peft_config("lora", SMOL), tmp_path / "a", steps=1)
    _edit_config(base_model_name_or_path="my-finetune-of-smollm2")(tmp_path / "a")
    with pytest.raises(FingerprintMismatchError):
        export_adapter(tmp_path / "a", bundles[SMOL], "forced", "float32")
    export_adapter(tmp_path / "a", bundles[SMOL], "forced", "float32", force_base=True)
    with pytest.raises(ConfigError, match="not a PEFT adapter"):
        export_adapter(bundles[SMOL] / "adapters" / "forced.eadp", bundles[SMOL], "x",
                       force_base=True)


def test_refused_lora_options_cover_peft_lora_variants():
    """Every LoRA variant PEFT marks (``is_lora_variant``) is refused, except VeLoRA, whose
    forward pass is plain LoRA."""
    import dataclasses

    variants = {f.name for f in dataclasses.fields(peft.LoraConfig)
                if f.metadata.get("is_lora_variant")}
    assert variants - {"velora_config"} <= set(REFUSED_LORA_OPTIONS)
    assert set(REFUSED_LORA_OPTIONS) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}


def test_base_aliases_name_registry_models():
    assert set(BASE_ALIASES) <= set(REAL_MODELS)


# -- PEFT out ----------------------------------------------------------------------------------

def make_run(path, model_name, config):
    """A training run as the trainer writes it, random non-zero adapter values (SoRA: the
    k-th layer's first k % r_max gates zero, pruned at export: ranks differ), a random
    classifier head."""
    lm = load_model(model_name, seed=0)
    names = attach(lm.model, config)
    gen = torch.Generator().manual_seed(7)
    gates = 0
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if p.requires_grad or n == "classifier.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            if n.endswith("sora_gate"):
                p[:gates % p.numel()] = 0.0
                gates += 1
    fresh = load_model(model_name, seed=0)
    info = {"method": config.method, "config": config.to_dict(), "model": model_name,
            "task": "t", "targets": names, "weight_sha256": base_weight_hashes(fresh, names),
            "seed": 0, "num_labels": 2 if lm.kind == "classifier" else None}
    save_run(path, lm, info, adapter_state(lm.model), {})


@pytest.mark.parametrize(("model_name", "config"), [
    (SMOL, EaLora(r=2, alpha=16.0)),
    (SMOL, EaSora(r_max=4, alpha=8.0)),
    (SMOL, EaShira(density=0.05)),
    (MINI, EaShira(density=0.05)),
    (MINI, EaLora(r=2, alpha=4.0)),
], ids=["smol-lora", "smol-sora", "smol-shira", "mini-shira", "mini-lora"])
def test_run_converts_to_a_peft_adapter_with_the_same_outputs(tmp_path, model_name, config):
    make_run(tmp_path / "run", model_name, config)
    res = CliRunner().invoke(main, ["convert", str(tmp_path / "run"), "--to", "peft",
                                    str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    run_lm, _ = load_run(tmp_path / "run")
    kind, t_in, _ = inputs_of(model_name)
    pm = peft.PeftModel.from_pretrained(load_model(model_name, seed=0).model, tmp_path / "peft")
    want = logits(run_lm.model, kind, t_in)
    assert parity(logits(pm, kind, t_in), want) <= EXACT
    assert parity(want, logits(load_model(model_name, seed=0).model, kind, t_in)) > 1e-3


@pytest.mark.parametrize("method", ["lora", "shira"])
def test_peft_to_edgeadapt_to_peft_gives_the_same_tensors(bundles, tmp_path, method):
    make_peft(SMOL, peft_config(method, SMOL), tmp_path / "a")  # lora: alpha / r = 2
    path = export_adapter(tmp_path / "a", bundles[SMOL], f"rt-{method}", "float32")
    convert_adapter(path, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(
        tmp_path / "b" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    cfg = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in "ab"]
    assert cfg[0] == cfg[1]


def test_sira_has_no_peft_form(tmp_path):
    make_run(tmp_path / "run", SMOL, EaSira(num_experts=2, r=2, top_k=1))
    with pytest.raises(ConfigError, match="SiRA"):
        convert_adapter(tmp_path / "run", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
