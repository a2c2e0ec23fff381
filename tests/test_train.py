"""Trainer: scoring, one optimiser step, metrics, run files and their round trip, SoRA stages.

References are computed independently: HF tokenizer + model forward per example, hand-written
AdamW first step, hand-computed perplexity.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from edgeadapt.errors import (
    AdapterFormatError,
    ConfigError,
    FingerprintMismatchError,
    WriteError,
)
from edgeadapt.models import load_model
from edgeadapt.tasks import load_task
from edgeadapt.train import TrainConfig, load_run, train
from edgeadapt.train.data import byte_encoder, encode_task, label_tokens
from edgeadapt.train.objective import evaluate
from edgeadapt.train.trainer import sora_xi

torch.set_num_threads(2)


def tiny(method: str = "shira", **kw) -> TrainConfig:
    base = dict(model="tiny-minilm", task="rt-sentiment", method=method, max_train=24,
                max_test=16, max_len=24, batch_size=8, steps=2)
    base.update(kw)
    return TrainConfig(**base)


def test_label_tokens_skip_the_shared_prefix():
    prefix, tokens = label_tokens(byte_encoder, (" negative", " positive"))
    assert prefix == [ord(" ")] and tokens == [ord("n"), ord("p")]
    with pytest.raises(ConfigError):
        label_tokens(byte_encoder, (" same", " same"))


def test_generative_classifier_scores_match_per_example_forward():
    lm = load_model("tiny-smollm2", seed=0)
    task = load_task("rt+politics", max_train=4, max_test=6)
    enc = encode_task(lm, task, max_len=40)
    metrics = evaluate(lm, enc, batch_size=4, groups=task.groups, progress=False)
    right = 0
    for ex in task.test:  # reference: one unpadded sequence at a time, prompt built by hand
        head, tail = task.prompts[ex.group].split("{text}")
        words = [task.label_words[i] for i in task.groups[ex.group]]
        ids = list(head.encode()) + list(ex.text.encode())[:40 - len(head) - len(tail) - 1]
        ids += list(tail.encode()) + [ord(" ")]
        with torch.no_grad():
            last = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        scores = [last[ord(w[1])] for w in words]
        pred = task.groups[ex.group][int(torch.stack(scores).argmax())]
        right += pred == ex.label
    assert metrics["accuracy"] == pytest.approx(right / len(task.test))
    assert set(metrics) >= {"accuracy/rt", "accuracy/politics"}


def test_perplexity_is_exp_of_mean_token_nll():
    lm = load_model("tiny-smollm2", seed=0)
    task = load_task("hamlet", max_test=3)
    metrics = evaluate(lm, encode_task(lm, task, max_len=32), progress=False)
    ids = torch.tensor(list(task.test[0].text.encode())[:96]).view(3, 32)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert metrics["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_first_step_is_adamw_on_the_batch_gradient(tmp_path):
    """One step of SHiRA (random mask) + head matrix equals a hand-written AdamW step on the
    gradient of the mean cross-entropy of the first shuffled batch, built with the HF tokenizer."""
    from edgeadapt.adapters import ShiraConfig, attach, trainable_parameters

    cfg = tiny("shira", adapter={"mask": "random", "density": 0.05}, steps=1, lr=1e-2,
               head_lr=3e-3, seed=3)
    out = tmp_path / "run"
    train(cfg, out=out, progress=False)

    lm = load_model("tiny-minilm", num_labels=2, seed=3)
    if lm.tokenizer is None:
        pytest.skip("needs the MiniLM tokenizer")
    task = load_task("rt-sentiment", seed=3, max_train=24, max_test=16)
    attach(lm.model, ShiraConfig(mask="random", density=0.05, seed=0))
    order = torch.randperm(24, generator=torch.Generator().manual_seed(3)).tolist()[:8]
    batch = lm.tokenizer([task.train[i].text for i in order], truncation=True, max_length=24,
                         padding=True, return_tensors="pt")
    labels = torch.tensor([task.train[i].label for i in order])
    head = [lm.model.classifier.weight]  # the bias stays at its zero init (bias-free heads)
    for p in head:
        p.requires_grad_(True)
    values = trainable_parameters(lm.model)
    logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    F.cross_entropy(logits, labels).backward()

    def adamw_first_step(p, lr):  # m_hat = g, v_hat = g^2
        return p.detach() - lr * p.grad / (p.grad.abs() + 1e-8)

    saved = load_file(out / "adapter.safetensors")
    names = [n for n in saved if n.endswith("shira_values")]
    assert len(names) == len(values) == 4
    for name, p in zip(names, values, strict=True):
        torch.testing.assert_close(saved[name], adamw_first_step(p, 1e-2), atol=1e-6, rtol=0)
    saved_head = load_file(out / "head.safetensors")
    assert set(saved_head) == {"classifier.weight"}
    torch.testing.assert_close(saved_head["classifier.weight"], adamw_first_step(head[0], 3e-3))


@pytest.mark.parametrize("method,adapter", [
    ("shira", {"mask": "snip", "density": 0.05}), ("lora", {"r": 2}), ("sira", {"r": 2}),
    ("none", {}),
])
def test_run_round_trip_reproduces_the_metrics(tmp_path, method, adapter):
    result = train(tiny(method, adapter=adapter, steps=3), out=tmp_path, progress=False)
    info = json.loads((tmp_path / "adapter.json").read_text())
    assert info["method"] == method and info["model"] == "tiny-minilm"
    assert set(info["weight_sha256"]) == set(info["targets"]) == set(result.targets)
    lm, loaded = load_run(tmp_path)
    task = load_task("rt-sentiment", max_train=24, max_test=16)
    again = evaluate(lm, encode_task(lm, task, 24), progress=False)
    assert again["accuracy"] == loaded["metrics"]["test"]["accuracy"]
    assert again["loss"] == pytest.approx(loaded["metrics"]["test"]["loss"], abs=1e-6)
    with torch.no_grad():
        x = {"input_ids": torch.randint(5, 100, (2, 9)),
             "attention_mask": torch.ones(2, 9, dtype=torch.int64)}
        torch.testing.assert_close(lm.model(**x).logits, result.lm.model(**x).logits)


def test_exclude_run_trains_a_mask_disjoint_from_that_run(tmp_path):
    """--exclude-run (adapter option exclude_run): the trainer reads the run's positions into
    the config once the model is loaded; adapter.json records the run, not the positions."""
    first = tmp_path / "first"
    shira = {"mask": "wm", "density": 0.1}
    train(tiny(adapter=shira, steps=1), out=first, progress=False)
    train(tiny(adapter={**shira, "exclude_run": str(first)}, steps=1), out=tmp_path / "second",
          progress=False)
    a, b = (load_file(tmp_path / n / "adapter.safetensors") for n in ("first", "second"))
    keys = [k for k in a if k.endswith("shira_indices")]
    assert keys and set(keys) == {k for k in b if k.endswith("shira_indices")}
    for key in keys:
        assert a[key].numel() == b[key].numel()
        assert not set(a[key].tolist()) & set(b[key].tolist())
    config = json.loads((tmp_path / "second" / "adapter.json").read_text())["config"]
    assert config["exclude_run"] == str(first) and config["exclude"] is None
    load_run(tmp_path / "second")


def test_load_run_rejects_other_weights_and_corrupt_files(tmp_path):
    train(tiny("lora", adapter={"r": 2}), out=tmp_path, progress=False)
    info = json.loads((tmp_path / "adapter.json").read_text())
    name = next(iter(info["weight_sha256"]))
    info["weight_sha256"][name] = "0" * 64
    (tmp_path / "adapter.json").write_text(json.dumps(info))
    with pytest.raises(FingerprintMismatchError, match=name):
        load_run(tmp_path)
    info["weight_sha256"].pop(name)
    (tmp_path / "adapter.json").write_text(json.dumps(info))
    (tmp_path / "adapter.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(AdapterFormatError):
        load_run(tmp_path)
    with pytest.raises(AdapterFormatError, match="missing"):
        load_run(tmp_path / "nowhere")


def _drop(key):
    return lambda info: {k: v for k, v in info.items() if k != key}


def _set(key, value):
    return lambda info: {**info, key: value}


def _drop_one_hash(info):
    hashes = dict(info["weight_sha256"])
    hashes.pop(next(iter(hashes)))
    return {**info, "weight_sha256": hashes}


@pytest.mark.parametrize("edit,error,needle", [
    (b"\xff\xfe\x00\x81 random bytes", AdapterFormatError, "not valid JSON"),
    (b"[1, 2]", AdapterFormatError, "JSON object"),
    (_drop("model"), AdapterFormatError, "'model'"),
    (_drop("method"), AdapterFormatError, "'method'"),
    (_set("method", "dora"), AdapterFormatError, "'method'"),
    (_set("model", 5), AdapterFormatError, "'model'"),
    (_set("model", "gpt5"), AdapterFormatError, "'model'"),
    (_set("config", "oops"), AdapterFormatError, "'config'"),
    (_set("config", {"method": "lora", "r": 0}), AdapterFormatError, "'config'"),
    (_set("config", {"method": "sira", "r": 2}), AdapterFormatError, "'config'"),
    (_set("seed", "x"), AdapterFormatError, "'seed'"),
    (_set("seed", True), AdapterFormatError, "'seed'"),
    (_set("weight_sha256", "x"), AdapterFormatError, "'weight_sha256'"),
    (_set("weight_sha256", {"encoder.x.weight": 5}), AdapterFormatError, "'weight_sha256'"),
    (_drop_one_hash, AdapterFormatError, "'weight_sha256'"),
    (_set("num_labels", "2"), AdapterFormatError, "'num_labels'"),
    (_set("head", 5), AdapterFormatError, "'head'"),
    (_set("head", "../adapter.json"), AdapterFormatError, "'head'"),
    # another registry model: the weight names do not exist there
    (_set("model", "tiny-smollm2"), FingerprintMismatchError, "not in this base model"),
])
def test_load_run_validates_adapter_json(tmp_path, lora_run, edit, error, needle):
    """A hand-edited adapter.json is a typed error naming the file and the field (before: a
    UnicodeDecodeError, TypeError, KeyError or ValueError traceback)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    if callable(edit):
        info = edit(json.loads((run / "adapter.json").read_text()))
        (run / "adapter.json").write_text(json.dumps(info))
    else:
        (run / "adapter.json").write_bytes(edit)
    with pytest.raises(error) as caught:
        load_run(run)
    assert str(run / "adapter.json") in str(caught.value)
    assert needle in str(caught.value)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    train(tiny("lora", adapter={"r": 2}, steps=1), out=out, progress=False)
    load_run(out)  # the untouched run loads
    return out


def test_a_run_that_cannot_be_written_is_a_write_error(tmp_path):
    """An OSError while saving (here: adapter.safetensors is a directory) is a WriteError
    naming the run directory, not a traceback."""
    out = tmp_path / "run"
    (out / "adapter.safetensors").mkdir(parents=True)
    with pytest.raises(WriteError, match="cannot write the run"):
        train(tiny("lora", adapter={"r": 2}, steps=1), out=out, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match="not a directory"):  # refused before training
        train(tiny("lora", adapter={"r": 2}), out=tmp_path / "file" / "sub", progress=False)


def test_sora_xi_schedules():
    assert [sora_xi("linear", s, 5, 0.0, 4.0) for s in range(5)] == [0, 1, 2, 3, 4]
    assert sora_xi("log", 2, 5, 1.0, 2.0) == pytest.approx(1 + math.log1p(4.5) / math.log(10))
    assert sora_xi("exp", 2, 5, 1.0, 2.0) == pytest.approx(1 + (10 ** 0.5 - 1) / 9)
    assert sora_xi("exp", 0, 3, 0.5, 2.0) == 0.5 and sora_xi("log", 2, 3, 0.5, 2.0) == 2.0


def test_sora_scheduler_records_stages_and_kills_ranks(tmp_path):
    cfg = tiny("sora", adapter={"r_max": 4, "xi": 0.02}, steps=8, sora_schedule="linear",
               sora_stages=4, sora_xi_max=0.2)
    metrics = train(cfg, out=tmp_path, progress=False).metrics
    stages = metrics["stages"]
    assert [s["step"] for s in stages] == [2, 4, 6, 8]
    assert [s["xi"] for s in stages] == pytest.approx([0.02, 0.08, 0.14, 0.2])
    totals = [s["live_rank_total"] for s in stages]
    assert totals == sorted(totals, reverse=True)
    assert all("accuracy" in s for s in stages)
    # q and v of tiny-minilm's layers at r_max 4: the first stage (two steps at xi 0.02) leaves
    # every randn gate alive; the rising threshold (sum 0.88 over 8 steps) kills some, not all
    lm = load_model("tiny-minilm")
    layers = 2 * lm.model.config.num_hidden_layers
    assert totals[0] == 4 * layers
    assert 0 < totals[-1] < totals[0]
    sora = metrics["sora"]
    assert len(sora["live_ranks"]) == layers
    sizes = {n: lm.model.get_submodule(n).in_features + lm.model.get_submodule(n).out_features
             for n in sora["live_ranks"]}
    assert sora["params_after"] == sum(sora["live_ranks"][n] * sizes[n] for n in sizes)
    assert sora["params_before"] == sum(4 * (sizes[n] + 1) for n in sizes)
    assert 0 < sora["params_after"] < sora["params_before"]
    assert sora["live_rank_total"] == totals[-1]


def test_bad_config_is_refused_before_loading_anything():
    with pytest.raises(ConfigError, match="unknown method"):
        train(tiny("dora"))
    with pytest.raises(ConfigError, match="density"):
        train(tiny("shira", adapter={"density": 1.5}))
    with pytest.raises(ConfigError, match="schedule"):
        train(tiny("sora", sora_schedule="cosine"))
    with pytest.raises(ConfigError, match="causal LM"):
        train(tiny("lora", task="hamlet"))


def test_lr_factor_linear_warmup_then_decay_to_zero():
    from edgeadapt.train.trainer import lr_factor

    assert [lr_factor("constant", s, 5) for s in range(5)] == [1.0] * 5
    # warmup 2 of 6 steps: 1/2, 2/2, then (6 - s) / 4 for s = 2..5
    assert [lr_factor("linear", s, 6, 2) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor("linear", s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_linear_schedule_scales_the_first_steps_lr(tmp_path):
    """With warmup 4 the first step runs at lr / 4: one AdamW step moves each value by
    lr / 4 * g / (|g| + eps), i.e. by lr / 4 wherever the gradient is not tiny."""
    kw = dict(adapter={"mask": "random", "density": 0.05}, steps=1, lr=1e-2, seed=3)
    runs = {}
    for name, extra in (("const", {}), ("warm", {"lr_schedule": "linear", "warmup_steps": 4})):
        train(tiny("shira", **kw, **extra), out=tmp_path / name, progress=False)
        runs[name] = load_file(tmp_path / name / "adapter.safetensors")
    with pytest.raises(ConfigError, match="lr schedule"):
        train(tiny("shira", lr_schedule="cosine"))
    lm = load_model("tiny-minilm")
    keys = sorted(n for n in runs["const"] if n.endswith("shira_values"))
    assert len(keys) == 2 * lm.model.config.num_hidden_layers  # q and v of every layer
    for n in keys:
        v = runs["const"][n]
        big = v.abs() > 1e-3  # values start at 0: after one step |v| = step size
        assert big.any()
        torch.testing.assert_close(runs["warm"][n][big] * 4, v[big], rtol=1e-4, atol=1e-7)
