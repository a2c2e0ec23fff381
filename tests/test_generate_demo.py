"""``edgeadapt generate-demo`` end to end on tiny SmolLM2 saved as a Hugging Face directory
with a byte-level tokenizer: two SHiRA adapters trained for two steps, the decoder exported,
every adapter state generated. The demo checks its own greedy tokens against transformers
(ParityError otherwise); this test also recomputes each state's sentiment score from the
PyTorch model carrying the same adapters."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from generate_bundle import byte_tokenizer  # noqa: E402

from edgeadapt.adapters.reference import reference_logits  # noqa: E402
from edgeadapt.format import read_adapter, read_manifest  # noqa: E402
from edgeadapt.models import load_model  # noqa: E402
from edgeadapt.pipeline_generate import (  # noqa: E402
    ADAPTERS,
    GenerateDemoConfig,
    run_generate_demo,
)
from edgeadapt.tasks import load_task  # noqa: E402
from edgeadapt.train.data import encode_task  # noqa: E402


def test_generate_demo_on_tiny_model(tmp_path):
    torch.set_num_threads(1)
    hf = tmp_path / "hf"
    load_model("tiny-smollm2", seed=0).model.save_pretrained(hf)
    byte_tokenizer().save_pretrained(hf)
    dc = GenerateDemoConfig(out=str(tmp_path / "demo"), model=str(hf), steps=2, batch_size=2,
                            lr=0.05, reviews=4, line_words=6, max_new_tokens=6,
                            parity_tokens=6, threads=1, progress=False,
                            background_export=False)
    lines: list[str] = []
    rows = run_generate_demo(dc, echo=lines.append)
    assert [r.name for r in rows] == ["base", "hamlet", "sentiment", "hamlet+sentiment"]
    assert all(r.switch_ms > 0 and r.extra["parity_tokens"] == 6 and r.reply for r in rows)
    table = next(line for line in lines if line.startswith("| adapters"))
    assert table.count("\n") == 5 and "| hamlet+sentiment |" in table
    assert lines[-1].startswith("\ntotal ")

    bundle = tmp_path / "demo" / "bundle"
    manifest = read_manifest(bundle)
    adapters = {n: read_adapter(bundle / manifest.adapters[n].file, manifest) for n in ADAPTERS}
    lm = load_model(str(hf))
    enc = encode_task(lm, load_task("rt-sentiment", max_train=1, max_test=4),
                      ADAPTERS["sentiment"][1]["max_len"])
    answers = enc.label_tokens.tolist()
    for row in rows:
        state = [] if row.name == "base" else row.name.split("+")
        right = 0
        for ids, label in zip(enc.test.ids, enc.test.labels.tolist(), strict=True):
            logits = reference_logits(lm, [adapters[a] for a in state],
                                      {"input_ids": torch.tensor([ids]).numpy()})[0, -1]
            right += int(logits[answers].argmax()) == label
        assert row.sentiment == f"{right}/4", row.name
