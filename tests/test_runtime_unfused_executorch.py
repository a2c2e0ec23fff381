"""Unfused mode on ExecuTorch: the variant .pte programs, branch tensors as mutable buffers.

Slow (exports a base program and two variant programs). Reference: the PyTorch model carrying
the same adapter (``apply_adapter_torch``); base output bit for bit after returning to None.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")

from test_runtime_unfused import RTOL, SIRA, _adapters, parity, torch_reference  # noqa: E402

from edgeadapt.errors import SwitchError  # noqa: E402
from edgeadapt.export.adapter import ensure_variant  # noqa: E402
from edgeadapt.export.bundle import export_base  # noqa: E402
from edgeadapt.format import read_manifest, write_adapter, write_manifest  # noqa: E402
from edgeadapt.format.manifest import AdapterEntry  # noqa: E402
from edgeadapt.format.types import Adapter, LoraDelta  # noqa: E402
from edgeadapt.models import example_inputs, load_model  # noqa: E402
from edgeadapt.runtime import load  # noqa: E402


@pytest.mark.slow
def test_executorch_unfused_matches_pytorch(tmp_path):
    torch.set_num_threads(1)
    lm = load_model("tiny-smollm2", seed=0)
    export_base(lm, tmp_path, formats=("onnx", "pte"), targets="qv", check=False)
    manifest = read_manifest(tmp_path)
    keys = {"sira": ensure_variant(tmp_path, manifest, SIRA, check=False),
            "lora": ensure_variant(tmp_path, manifest, ("lora", 4), check=False)}
    (tmp_path / "adapters").mkdir()
    ads = _adapters(lm, sorted(manifest.weights))
    w0 = sorted(manifest.weights)[0]
    big = Adapter("lora", {w0: LoraDelta(np.ones((5, manifest.weights[w0].shape[1]), np.float32),
                                         np.ones((manifest.weights[w0].shape[0], 5), np.float32))},
                  {w0: tuple(manifest.weights[w0].shape)},
                  {w0: manifest.weights[w0].sha256})
    ads["big"] = (big, "lora")
    for name, (ad, kind) in ads.items():
        write_adapter(tmp_path / "adapters" / f"{name}.eadp", ad, value_dtype="float32")
        manifest.adapters[name] = AdapterEntry(file=f"adapters/{name}.eadp", method=ad.method,
                                               variant=keys.get(kind))
    write_manifest(tmp_path, manifest)
    seq = int(manifest.executorch["max_seq"])
    t_in = example_inputs(lm, batch=1, seq=seq, seed=3)
    np_in = {k: v.numpy() for k, v in t_in.items()}
    rt = load(tmp_path, backend="executorch")
    base = rt.run(**np_in)
    for names, scale in [("sira", None), ("lora", 0.5), ("s1", None), ("sira", 2.0),
                         ("lora", None)]:
        rt.switch(names, scale)
        want = torch_reference(lm, tmp_path, rt.active_scales, t_in)
        got = rt.run(**np_in)
        assert parity(got, want) <= RTOL, names
        assert parity(got, base) > 10 * parity(got, want), names
    with pytest.raises(SwitchError, match="exceeds"):
        rt.switch("big")
    assert rt.active == ("lora",)
    rt.switch(None)
    assert rt.active_variant is None and np.array_equal(rt.run(**np_in), base)
