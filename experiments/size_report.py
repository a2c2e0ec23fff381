"""Measure .eadp SHiRA file sizes against PEFT's layout (bytes per trained parameter).

Run: ``.venv/bin/python -m experiments.size_report`` (prints the markdown table of docs/format.md).
Targets: SmolLM2-135M's 30 q_proj (576x576) and v_proj (192x576) weights, random masks (the
mask PEFT builds in) at several densities. PEFT's layout is written with the safetensors
package as PEFT does: per target fp32 values (K,) and int32 indices (2, K).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edgeadapt.format.adapter_file import write_adapter
from edgeadapt.format.types import Adapter, ShiraDelta

SHAPES = {f"model.layers.{i}.self_attn.{p}.weight": s for i in range(30)
          for p, s in (("q_proj", (576, 576)), ("v_proj", (192, 576)))}


def _adapter(density: float, seed: int = 0) -> Adapter:
    rng = np.random.default_rng(seed)
    targets = {}
    for name, (o, n) in SHAPES.items():
        k = max(1, round(density * o * n))
        idx = np.sort(rng.choice(o * n, size=k, replace=False))
        targets[name] = ShiraDelta(idx, (rng.standard_normal(k) * 1e-2).astype(np.float32))
    return Adapter("shira", targets, dict(SHAPES), {n: "0" * 64 for n in SHAPES})


def _peft_bytes(adapter: Adapter, path: Path) -> int:
    from safetensors.numpy import save_file

    tensors = {}
    for name, d in adapter.targets.items():
        o, n = adapter.shapes[name]
        rows, cols = np.divmod(d.indices, n)
        base = name.removesuffix(".weight")
        tensors[f"base_model.model.{base}.shira_indices"] = np.stack([rows, cols]).astype(np.int32)
        tensors[f"base_model.model.{base}.shira_weight"] = d.values.astype(np.float32)
    save_file(tensors, str(path))
    return path.stat().st_size


def main() -> None:
    rows = ["| density | trained params | PEFT B/param | eadp fp32 | eadp bf16 | eadp fp16 "
            "| PEFT / eadp fp16 |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for density in (0.005, 0.01, 0.02, 0.05):
            a = _adapter(density)
            k = sum(d.indices.size for d in a.targets.values())
            peft = _peft_bytes(a, Path(tmp) / "peft.safetensors") / k
            ours = {}
            for vd in ("float32", "bfloat16", "float16"):
                ours[vd] = write_adapter(Path(tmp) / f"{vd}.eadp", a, vd).stat().st_size / k
            rows.append(f"| {density:.1%} | {k:,} | {peft:.2f} | {ours['float32']:.2f} | "
                        f"{ours['bfloat16']:.2f} | {ours['float16']:.2f} | "
                        f"{peft / ours['float16']:.2f}x |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
