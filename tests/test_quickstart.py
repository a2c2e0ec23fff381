"""The quickstart pipeline (``edgeadapt.pipeline``) end to end on tiny MiniLM, ONNX Runtime only
(an ExecuTorch export of even a tiny model takes minutes here): train -> export -> load ->
switch -> check -> fuse -> table. The references are independent of the pipeline's own
check: the runs' recorded metrics, and the *trained* PyTorch models (``load_run``, fp32
adapter values) against the runtime running the exported fp16 adapter files."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgeadapt.pipeline import (  # noqa: E402
    PENDING,
    QuickstartConfig,
    accuracy,
    eval_batches,
    run_quickstart,
)
from edgeadapt.train.data import Encoded  # noqa: E402

NAMES = ["base", "rt", "politics", "lora", "sora", "sira", "rt+politics", "politics+rt"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("qs")
    lines: list[str] = []
    qc = QuickstartConfig(out=str(out), model="tiny-minilm", max_train=8, max_test=10,
                          max_len=16, formats=("onnx",), threads=1, repeats=2,
                          progress=False)
    rows = run_quickstart(qc, echo=lines.append)
    return qc, out, {r.name: r for r in rows}, "\n".join(lines)


def test_table_has_every_adapter_and_its_recorded_accuracy(quickstart):
    qc, out, rows, text = quickstart
    assert list(rows) == NAMES
    lines = text.splitlines()
    top = next(i for i, ln in enumerate(lines) if ln.startswith("adapter "))  # the header
    printed = {ln.split()[0]: ln for ln in lines[top + 2:top + 2 + len(NAMES)]}
    assert list(printed) == NAMES
    for name in ["rt", "politics", "lora", "sora", "sira"]:
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert rows[name].acc_torch == metrics["test"]["accuracy"]
        assert f"{metrics['test']['accuracy']:.3f}" in printed[name]
        file = out / "bundle" / "adapters" / f"{name}.eadp"
        assert rows[name].file_bytes == file.stat().st_size
    assert rows["rt"].task == rows["rt+politics"].task == "rt-sentiment"
    assert rows["politics+rt"].task == "politics"
    for name in ["rt", "politics", "lora", "sora", "rt+politics", "politics+rt"]:
        row = rows[name]
        assert 0.0 <= row.acc["onnxruntime"] <= 1.0
        assert row.forward_ms["onnxruntime"] > 0 and row.switch_ms["onnxruntime"] > 0
        assert row.parity["onnxruntime"] <= qc.tolerance
    assert "waiting for the background export" in text  # base + variant exported beside training
    bundle = json.loads((out / "bundle" / "bundle.json").read_text())
    # the variant exported before SiRA was trained is the one its adapter needs (no second one)
    assert list(bundle["variants"]) == [bundle["adapters"]["sira"]["variant"]]
    sira = rows["sira"]  # runs through its graph variant, or is marked pending: never faked
    if sira.acc["onnxruntime"] == PENDING:
        assert "unfused: pending" in printed["sira"]
    else:
        assert sira.parity["onnxruntime"] <= qc.tolerance


def test_runtime_matches_the_trained_pytorch_models(quickstart):
    """Each fused adapter on ONNX Runtime vs its run's trained model (load_run): the only
    differences allowed are the fp16 rounding of the exported values."""
    from edgeadapt.models import example_inputs, forward
    from edgeadapt.runtime import load
    from edgeadapt.train import load_run

    _, out, _, _ = quickstart
    rt = load(out / "bundle", backend="onnxruntime", mode="live", threads=1)
    for name in ["rt", "politics", "lora", "sora"]:
        lm, _ = load_run(out / name)
        inputs = example_inputs(lm, batch=3, seq=12, seed=5)
        with torch.no_grad():
            want = forward(lm, inputs).numpy()
        rt.switch(name)
        got = rt.run(**{k: v.numpy() for k, v in inputs.items()})
        assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max() + 1e-6, name
    rt.switch(None)


def test_eval_batches_pad_to_fixed_shapes_and_accuracy_ignores_filler_rows():
    data = Encoded(ids=[[5, 6, 7], [8], [9, 10]], labels=torch.tensor([1, 0, 1]),
                   allowed=torch.tensor([[True, True], [True, True], [True, False]]))
    batches = eval_batches(data, max_len=4, pad_id=0, batch=2)
    assert len(batches) == 2
    (x0, (labels0, _, n0)), (x1, (labels1, _, n1)) = batches
    np.testing.assert_array_equal(x0["input_ids"], [[5, 6, 7, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(x0["attention_mask"], [[1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(x1["input_ids"], [[9, 10, 0, 0], [9, 10, 0, 0]])  # filler
    assert (n0, n1) == (2, 1) and labels0.tolist() == [1, 0] and labels1.tolist() == [1]
    logits = [np.array([[0.0, 1.0], [0.0, 1.0]]),   # right, wrong
              np.array([[0.0, 9.0], [9.0, 0.0]])]   # label 1 not allowed -> predicts 0: wrong
    assert accuracy(logits, batches) == pytest.approx(1 / 3)
