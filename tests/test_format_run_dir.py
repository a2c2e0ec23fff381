"""The training-run directory's torch-free side (edgeadapt.format.run_dir) on hand-written runs:
adapter.json checks, fingerprint maps, a SHiRA run's stored positions. The round trip through
the trainer is in test_train.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgeadapt.errors import AdapterFormatError, FingerprintMismatchError
from edgeadapt.format.run_dir import (
    ADAPTER_FILE,
    INFO_FILE,
    check_weight_hashes,
    read_info,
    shira_indices,
)

HASHES = {"a.weight": "1" * 64, "b.weight": "2" * 64}


def _run(path, **fields):
    path.mkdir(exist_ok=True)
    info = {"method": "shira", "config": {"method": "shira"}, "model": "m",
            "weight_sha256": HASHES, "seed": 0, "head": None, **fields}
    (path / INFO_FILE).write_text(json.dumps(info))
    return path


def test_read_info_checks_the_schema_without_torch(tmp_path):
    run = _run(tmp_path / "run")
    assert read_info(run)["weight_sha256"] == HASHES
    for field, value in (("method", "dora"), ("seed", 1.5), ("head", "../x"),
                         ("config", {"method": "lora"})):
        _run(run, **{field: value})
        with pytest.raises(AdapterFormatError, match=f"'{field}'") as caught:
            read_info(run)
        assert str(run / INFO_FILE) in str(caught.value)
    code = ("import sys, edgeadapt.format.run_dir, edgeadapt.format; "
            "assert 'torch' not in sys.modules, 'run_dir imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_weight_hashes_are_compared_from_the_callers_map():
    check_weight_hashes("src", HASHES, dict(HASHES), "m")
    with pytest.raises(FingerprintMismatchError, match="not in this base model"):
        check_weight_hashes("src", HASHES, {"a.weight": "1" * 64}, "m")
    with pytest.raises(FingerprintMismatchError, match="src: base weight b.weight differs"):
        check_weight_hashes("src", HASHES, {**HASHES, "b.weight": "3" * 64}, "m")


def test_shira_indices_must_cover_exactly_the_fingerprinted_modules(tmp_path):
    run = _run(tmp_path / "run")
    idx = np.array([1, 4, 9], dtype=np.int64)
    save_file({"a.shira_indices": idx, "a.shira_values": np.zeros(3, np.float32),
               "b.shira_indices": idx + 1}, str(run / ADAPTER_FILE))
    found = shira_indices(run, read_info(run))
    assert set(found) == {"a", "b"} and found["b"].tolist() == [2, 5, 10]
    save_file({"a.shira_indices": idx}, str(run / ADAPTER_FILE))
    with pytest.raises(AdapterFormatError, match="missing \\['b'\\]"):
        shira_indices(run, read_info(run))
    (run / ADAPTER_FILE).write_bytes(b"\x10\x00garbage")
    with pytest.raises(AdapterFormatError, match="not a valid safetensors"):
        shira_indices(run, read_info(run))
