"""Data-parallel training under ``torchrun --nproc_per_node=2`` (gloo, CPU).

Both ranks must end with bit-identical adapter and head tensors, equal (to float rounding) to a
single process training on the whole batch. The batch of 5 splits 3 + 2, so the exact-mean
gradient scaling is exercised, and SNIP masks are calibrated on each rank separately.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgeadapt.adapters import adapter_state
from edgeadapt.train import TrainConfig, train
from edgeadapt.train.run import head_parameters

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    dict(model="tiny-minilm", task="rt-sentiment", method="shira",
         adapter={"mask": "snip", "density": 0.05}, max_train=15, max_test=8, max_len=24,
         batch_size=5, steps=3, lr=1e-2, seed=1),
    dict(model="tiny-minilm", task="rt-sentiment", method="lora", adapter={"r": 2},
         max_train=15, max_test=8, max_len=24, batch_size=5, steps=3, lr=1e-2, seed=1),
]

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from safetensors.torch import save_file
    from edgeadapt.adapters import adapter_state
    from edgeadapt.train import TrainConfig, train
    from edgeadapt.train.run import head_parameters

    torch.set_num_threads(1)
    out = sys.argv[1]
    for i, cfg in enumerate(json.loads(sys.argv[2])):
        res = train(TrainConfig(**cfg), out=f"{out}/run{i}", progress=False)
        state = {**adapter_state(res.lm.model), **head_parameters(res.lm)}
        save_file({k: v.detach().contiguous() for k, v in state.items()},
                  f"{out}/cfg{i}-rank{os.environ['RANK']}.safetensors")
""")


def test_two_ranks_match_each_other_and_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(worker), str(tmp_path), json.dumps(CONFIGS)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, cfg in enumerate(CONFIGS):
        rank0 = load_file(tmp_path / f"cfg{i}-rank0.safetensors")
        rank1 = load_file(tmp_path / f"cfg{i}-rank1.safetensors")
        assert rank0.keys() == rank1.keys()
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), key
        metrics = json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())
        assert metrics["world_size"] == 2

        single = train(TrainConfig(**cfg), progress=False)  # one process, whole batches
        ref = {**adapter_state(single.lm.model), **head_parameters(single.lm)}
        assert ref.keys() == rank0.keys()
        for key, value in ref.items():
            torch.testing.assert_close(rank0[key], value.detach(), atol=2e-6, rtol=1e-5)
        # the compared tensors were trained: SHiRA values and LoRA B start at zero
        trained = [v for k, v in ref.items() if k.endswith(("shira_values", "lora_B"))]
        assert trained and all(torch.count_nonzero(v) > 0 for v in trained)
