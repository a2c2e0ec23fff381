"""The CUDA checks of the switch runtime, prepared here and run on a lent GPU machine
(docs/runtime.md, "Running the CUDA checks"):

    PYTHONPATH=. .venv/bin/python scripts/cuda_check.py prepare DIR     # here, with torch
    PYTHONPATH=. python3 scripts/cuda_check.py check DIR --json OUT     # there: numpy + ORT-GPU
    PYTHONPATH=. .venv/bin/python scripts/cuda_check.py check DIR --standin  # the script, here

``prepare`` exports tiny SmolLM2 and MiniLM bundles (q/v live, blocked32), writes three
synthetic adapters into each (two SHiRA, one rank-2 LoRA) and stores the PyTorch model's logits
with the adapters of every step of :data:`STEPS` (the independent reference, computed here, so
the GPU machine needs neither this torch nor the model packages); and tiny SmolLM2 with its
KV-cache decoder (``--generate``) and transformers' greedy replies under the adapters
(:func:`check_generate` checks the decoder on the device against them). ``check`` loads each
bundle with ``device="cuda"`` twice (device buffers as torch CUDA tensors bound by pointer, then
as CUDA OrtValues) and checks: parity with the reference after every step, device buffers
bit-identical to the originals after random switch sequences end at None, bad switches (unknown
name, corrupt file) refused with the device buffers untouched, and readers that run while
another thread switches seeing only whole states. It prints one line per check, writes them to
``--json`` and exits non-zero if any failed. ``--standin`` runs the same checks on the CUDA
store's code with the CPU execution provider (``tests/cuda_standin.py``, imported as
``tests.cuda_standin`` with the repository root on ``PYTHONPATH``, as above): a dry run of this
script where there is no GPU, not a CUDA result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np

MODELS = ("tiny-smollm2", "tiny-minilm")
#: the KV-cache decoder's bundle (tiny SmolLM2 exported with --generate) and its prompt
GENERATE = "tiny-smollm2-generate"
PROMPT = [17, 301, 44, 9, 250, 77, 130]
NEW_TOKENS = 24
STEPS: list[list[tuple[str, float]]] = [
    [("s1", 1.0)], [("s1", 1.0), ("l1", 0.5)], [("s2", 1.0), ("s1", -0.5)], [("l1", 1.0)], []]
#: relative tolerance on the GPU (cuBLAS may use TF32 and another reduction order)
TOLERANCE = 1e-3


def prepare(out: Path) -> None:
    import torch

    from edgeadapt.adapters.reference import reference_logits
    from edgeadapt.export.bundle import export_base
    from edgeadapt.format import read_adapter, read_manifest
    from edgeadapt.models import example_inputs, load_model

    torch.set_num_threads(1)
    for name in MODELS:
        lm = load_model(name, num_labels=2, seed=0)
        bundle = out / name
        export_base(lm, bundle, backends="onnxruntime", targets="qv", check=False)
        _synth_adapters(bundle)
        m = read_manifest(bundle)
        inputs = example_inputs(lm, batch=2, seq=7, seed=3)
        expected = {}
        feeds = {k: v.numpy() for k, v in inputs.items()}
        for i, step in enumerate(STEPS):
            expected[f"step{i}"] = reference_logits(
                lm, [read_adapter(bundle / m.adapters[key].file) for key, _ in step], feeds,
                [scale for _, scale in step])
        np.savez(bundle / "expected.npz", **expected,
                 **{f"input_{k}": v for k, v in feeds.items()})
        print(f"{bundle}: {len(m.weights)} live weights, {len(STEPS)} reference steps")
    prepare_generate(out / GENERATE)


def _synth_adapters(bundle: Path) -> dict[str, object]:
    """s1 / s2 (SHiRA, 5% / 20%) and l1 (rank-2 LoRA) for ``bundle``, written into it and
    registered in its bundle.json."""
    from edgeadapt.bench.synth import synth_lora, synth_shira
    from edgeadapt.format import AdapterEntry, read_manifest, write_adapter
    from edgeadapt.format.manifest import write_manifest

    m = read_manifest(bundle)
    shapes = {n: tuple(w.shape) for n, w in m.weights.items()}
    sha = {n: w.sha256 for n, w in m.weights.items()}
    (bundle / "adapters").mkdir(exist_ok=True)
    made = {"s1": synth_shira(shapes, sha, density=0.05, seed=1),
            "s2": synth_shira(shapes, sha, density=0.2, seed=2),
            "l1": synth_lora(shapes, sha, rank=2, seed=3)}
    for key, ad in made.items():
        write_adapter(bundle / "adapters" / f"{key}.eadp", ad, value_dtype="float32")
        m.adapters[key] = AdapterEntry(file=f"adapters/{key}.eadp", method=ad.method)
    write_manifest(bundle, m)
    return made


def prepare_generate(bundle: Path) -> None:
    """Tiny SmolLM2 with its KV-cache decoder, the generation tests' SHiRA adapters s1 / s2
    (``tests.runtime_reference.random_adapters``: they change the greedy reply), and
    transformers' greedy reply to :data:`PROMPT` under each (and the base) as the reference."""
    from edgeadapt.adapters.reference import reference_greedy
    from edgeadapt.export.bundle import export_base
    from edgeadapt.format import read_manifest
    from edgeadapt.models import load_model
    from tests.runtime_reference import random_adapters, register_adapters

    lm = load_model("tiny-smollm2", seed=0)
    export_base(lm, bundle, backends="onnxruntime", targets="qv", generate=True,
                max_context=96, check=False)
    manifest = read_manifest(bundle)
    names = sorted(manifest.weights)
    s1, s2, _ = random_adapters(lm, names, names[:2], seed=1)
    register_adapters(bundle, manifest, {"s1": s1, "s2": s2})
    eos = manifest.extra["generate"]["eos_token_ids"]
    replies = {key: reference_greedy(lm, ad, PROMPT, NEW_TOKENS, eos)
               for key, ad in (("base", []), ("s1", [s1]), ("s2", [s2]))}
    (bundle / "expected_generate.json").write_text(json.dumps(replies))
    print(f"{bundle}: greedy replies of {NEW_TOKENS} tokens under the base, s1 and s2")


def _hashes(rt) -> dict[str, str]:
    return {n: hashlib.sha256(rt.store.device_array(n).tobytes()).hexdigest()
            for n in rt.store.live_weights()}


def _load(bundle: Path, buffers: str, standin: bool):
    from edgeadapt.runtime import load

    if standin:
        from tests.cuda_standin import load_cuda_standin

        return load_cuda_standin(bundle, torch_buffers=buffers == "torch")
    saved = os.environ.pop("EDGEADAPT_NO_TORCH", None)
    if buffers == "ortvalue":
        os.environ["EDGEADAPT_NO_TORCH"] = "1"
    try:
        return load(bundle, device="cuda")
    finally:
        os.environ.pop("EDGEADAPT_NO_TORCH", None)
        if saved is not None:
            os.environ["EDGEADAPT_NO_TORCH"] = saved


def _recorder(results: list[dict], bundle: Path, buffers: str):
    """``record(what, ok, **extra)``: appends one check's result to ``results`` and prints it."""
    def record(what: str, ok: bool, **extra) -> None:
        results.append({"bundle": bundle.name, "buffers": buffers, "check": what, "ok": ok,
                        **extra})
        print(f"{'ok  ' if ok else 'FAIL'} {bundle.name:13s} {buffers:8s} {what} {extra or ''}",
              flush=True)
    return record


def check_bundle(bundle: Path, buffers: str, standin: bool = False) -> list[dict]:
    """Every check on one bundle; ``buffers``: "torch" or "ortvalue" device buffers."""
    from edgeadapt.errors import AdapterFormatError, UnknownNameError
    from edgeadapt.format import AdapterEntry
    from edgeadapt.numeric import rel_error

    results: list[dict] = []
    record = _recorder(results, bundle, buffers)

    rt = _load(bundle, buffers, standin)
    record("store", rt.store.buffers == buffers,
           store=type(rt.store).__name__, device=rt.store.device,
           providers=rt.store.session.get_providers())
    data = np.load(bundle / "expected.npz")
    inputs = {k.removeprefix("input_"): data[k] for k in data.files if k.startswith("input_")}
    base, before = rt.run(**inputs), _hashes(rt)
    last = data[f"step{len(STEPS) - 1}"]
    record("base parity", rel_error(base, last) <= TOLERANCE, rel_error=rel_error(base, last))
    moved = [rel_error(data[f"step{i}"], last) for i in range(len(STEPS) - 1)]
    record("every adapter step moves the reference by > 10x the tolerance",
           min(moved) > 10 * TOLERANCE, rel_change=moved)
    for i, step in enumerate(STEPS):
        rt.switch([k for k, _ in step] or None, [s for _, s in step] or None)
        err = rel_error(rt.run(**inputs), data[f"step{i}"])
        record(f"parity after {step or 'None'}", err <= TOLERANCE, rel_error=err)
    record("None: device buffers bit-identical", _hashes(rt) == before)
    record("None: output bit-identical", bool(np.array_equal(rt.run(**inputs), base)))

    rng = np.random.default_rng(0)
    names = ["s1", "s2", "l1"]
    for _ in range(30):
        pick = [n for n in names if rng.random() < 0.5]
        rt.switch(pick or None, [float(rng.choice([1.0, 0.5, -2.0])) for _ in pick] or None)
    rt.switch(None)
    record("30 random switches, then None: device buffers bit-identical", _hashes(rt) == before)

    rt.switch(["s1", "l1"])
    kept, out = _hashes(rt), rt.run(**inputs)
    refused = []
    try:
        rt.switch("nope")
    except UnknownNameError:
        refused.append("unknown name")
    good = (bundle / "adapters" / "s2.eadp").read_bytes()
    broken = bundle / "adapters" / "broken.eadp"
    broken.write_bytes(good[: len(good) // 2])
    rt.manifest.adapters["broken"] = AdapterEntry(file="adapters/broken.eadp", method="shira")
    try:
        rt.switch(["s1", "broken"])
    except AdapterFormatError:
        refused.append("corrupt file")
    broken.unlink()
    record("bad switches refused, device buffers untouched",
           refused == ["unknown name", "corrupt file"] and _hashes(rt) == kept
           and bool(np.array_equal(rt.run(**inputs), out)), refused=refused)

    states = [None, ["s1"], ["l1"], ["s1", "s2"]]
    valid = []
    for s in states:
        rt.switch(s)
        valid.append(rt.run(**inputs))
    seen: list[np.ndarray] = []
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.append(rt.run(**inputs))
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(200):
        rt.switch(states[int(rng.integers(len(states)))])
    stop.set()
    for t in threads:
        t.join()
    whole = sum(any(np.array_equal(y, v) for v in valid) for y in seen)
    record("3 readers during 200 switches see whole states",
           not errors and whole == len(seen) > 0, runs=len(seen), errors=errors[:3])
    return results


def check_generate(bundle: Path, buffers: str, standin: bool = False) -> list[dict]:
    """The KV-cache decoder on the device store: greedy replies under the base, s1 and s2
    equal transformers' (each adapter changes the reply), a switch between the turns of one
    conversation re-prefills it (its reply equals a fresh conversation's), and the device
    buffers are bit-identical to the originals after switching back to the base."""
    want = json.loads((bundle / "expected_generate.json").read_text())
    results: list[dict] = []
    record = _recorder(results, bundle, buffers)

    rt = _load(bundle, buffers, standin)
    before = _hashes(rt)
    record("adapters change the reference reply",
           want["s1"] != want["base"] and want["s2"] != want["base"])
    for key in ("s1", "s2", "base"):
        rt.switch(None if key == "base" else key)
        got = rt.generate(PROMPT, max_new_tokens=NEW_TOKENS).ids
        record(f"greedy reply under {key} = transformers'", got == want[key], got=got[:8])
    rt.switch("s1")
    chat = rt.conversation()
    first = chat.send(PROMPT, max_new_tokens=6)
    rt.switch("s2")
    second = chat.send([40, 41, 42], max_new_tokens=10)
    fresh = rt.generate(PROMPT + first.ids + [40, 41, 42], max_new_tokens=10)
    record("a switch between turns re-prefills", second.reprefills == 1
           and second.ids == fresh.ids, reprefills=second.reprefills)
    rt.switch(None)
    record("None: device buffers bit-identical", _hashes(rt) == before)
    return results


def check(root: Path, out: Path | None, standin: bool = False) -> int:
    import onnxruntime as ort

    if not standin and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA / cuDNN from the nvidia-* pip packages
    print("onnxruntime", ort.__version__, ort.get_available_providers(), flush=True)
    results = []
    for name in (*MODELS, GENERATE):
        for buffers in ("torch", "ortvalue"):
            try:
                results += (check_generate if name == GENERATE else check_bundle)(
                    root / name, buffers, standin)
            except Exception as exc:  # one broken path must not hide the others
                results.append({"bundle": name, "buffers": buffers, "check": "crashed",
                                "ok": False, "error": repr(exc)})
                print(f"FAIL {name} {buffers} crashed: {exc!r}", flush=True)
    if out is not None:
        out.write_text(json.dumps({"onnxruntime": ort.__version__, "standin": standin,
                                   "results": results}, indent=1))
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", type=Path)
    c = sub.add_parser("check")
    c.add_argument("dir", type=Path)
    c.add_argument("--json", type=Path)
    c.add_argument("--standin", action="store_true",
                   help="the CUDA store's code on the CPU execution provider (no GPU needed)")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.dir)
    else:
        sys.exit(check(args.dir, args.json, args.standin))


if __name__ == "__main__":
    main()
