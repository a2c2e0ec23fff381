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

from edgeadapt.numeric import rel_error as _rel  # noqa: E402
from edgeadapt.pipeline import (  # noqa: E402
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
                          max_len=16, backends=("onnxruntime",), threads=1, repeats=2,
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
    for name in ["rt", "politics", "lora", "sora", "sira", "rt+politics", "politics+rt"]:
        row = rows[name]  # SiRA runs through its graph variant on ONNX Runtime: never pending
        assert isinstance(row.acc["onnxruntime"], float), name
        assert isinstance(row.switch_ms["onnxruntime"], float), name
        assert "pending" not in printed[name], name
        assert 0.0 <= row.acc["onnxruntime"] <= 1.0
        assert row.forward_ms["onnxruntime"] > 0 and row.switch_ms["onnxruntime"] > 0
        assert row.parity["onnxruntime"] <= qc.tolerance
    assert "waiting for the background export" in text  # base + variant exported beside training
    bundle = json.loads((out / "bundle" / "bundle.json").read_text())
    # the variant exported before SiRA was trained is the one its adapter needs (no second one)
    assert list(bundle["variants"]) == [bundle["adapters"]["sira"]["variant"]]


def _logits(lm, inputs, hooks=()) -> np.ndarray:
    """``lm``'s logits with forward ``hooks`` = [(module name, hook)] registered in order (a
    hook returning a tensor replaces the module's output for the hooks after it)."""
    from edgeadapt.models import forward

    handles = [lm.model.get_submodule(n).register_forward_hook(h) for n, h in hooks]
    try:
        with torch.no_grad():
            return forward(lm, inputs).numpy()
    finally:
        for h in handles:
            h.remove()


def test_runtime_matches_the_trained_pytorch_models(quickstart):
    """Each adapter on ONNX Runtime (SiRA through its graph variant, the two SHiRA fused both
    ways) vs its run's trained model (load_run): the only differences allowed are the fp16
    rounding of the exported values. A fused pair a+b is a's trained model (its head) with b's
    trained weight change added to each of b's layers: the change read off b's trained model as
    its layer's output on the identity minus the base linear's. Every adapter must matter: the
    runtime's output is 10x further from the same model without any one of them (its layers
    giving the base linear's output) than from the reference."""
    from edgeadapt.models import example_inputs, load_model
    from edgeadapt.runtime import load
    from edgeadapt.train import load_run

    _, out, _, _ = quickstart
    runs = {name: load_run(out / name) for name in ["rt", "politics", "lora", "sora", "sira"]}
    info = runs["rt"][1]
    base = load_model(info["model"], num_labels=info["num_labels"], seed=info["seed"])
    layers = {name: [t.removesuffix(".weight") for t in i["targets"]]
              for name, (_, i) in runs.items()}
    # q and v of each of tiny MiniLM's layers
    assert all(len(v) == 2 * base.model.config.num_hidden_layers for v in layers.values())

    def base_out(n):  # the adapted layer as the base linear
        return lambda m, i, o: base.model.get_submodule(n)(i[0])

    def add(d):  # plus a trained weight change d (in, out)
        return lambda m, i, o: o + i[0] @ d

    def change(name):  # (in, out) weight change of each layer of a fused (SHiRA) run
        lm, d = runs[name][0], {}
        with torch.no_grad():
            for n in layers[name]:
                eye = torch.eye(base.model.get_submodule(n).in_features)
                d[n] = lm.model.get_submodule(n)(eye) - base.model.get_submodule(n)(eye)
        return d

    rt = load(out / "bundle", backend="onnxruntime", mode="live", threads=1)
    inputs = example_inputs(base, batch=3, seq=12, seed=5)
    np_in = {k: v.numpy() for k, v in inputs.items()}
    for row in ["rt", "politics", "lora", "sora", "sira", "rt+politics", "politics+rt"]:
        names = row.split("+")
        lm = runs[names[0]][0]  # the first adapter's head, as the runtime fuses
        extra = [(n, add(d)) for b in names[1:] for n, d in change(b).items()]
        want = _logits(lm, inputs, extra)
        missing = [_logits(lm, inputs, [(n, base_out(n)) for n in layers[names[0]]] + extra)]
        missing += [_logits(lm, inputs, [(n, add(d)) for c in names[1:] if c != b
                                         for n, d in change(c).items()])
                    for b in names[1:]]
        rt.switch(names)
        assert rt.active == tuple(names)
        got = rt.run(**np_in)
        err = _rel(got, want)
        assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max() + 1e-6, row
        for other in missing:
            assert _rel(got, other) > 10 * err, row
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
