"""The whole pipeline on one small example, top to bottom: ``edgeadapt quickstart``.

1. **train** a SHiRA adapter per task (Rotten Tomatoes sentiment, political speeches) and LoRA,
   SoRA and SiRA baselines on sentiment, briefly (:func:`edgeadapt.train.train`);
2. **export** the base model once for ONNX Runtime and ExecuTorch, and SiRA's graph variant
   (:func:`edgeadapt.export.export_base`, :func:`edgeadapt.export.adapter.ensure_variant`) —
   in a second process while step 1 trains, since neither depends on trained values; SiRA's
   static-shape ExecuTorch program only for the shapes step 3 runs (:func:`run_shapes`) —
   then every adapter into the same bundle (:func:`~edgeadapt.export.export_adapter`);
3. **load** the bundle on each backend (:func:`edgeadapt.runtime.load`) and, per adapter,
   switch to it in place, check the logits against PyTorch (the base model carrying the
   bundle's adapter file, :func:`edgeadapt.adapters.reference.reference_model`), evaluate its
   test accuracy through the runtime, and time a forward pass and a switch
   (:func:`edgeadapt.timer.time_calls`);
4. **fuse** the two SHiRA adapters (``rt.switch([a, b])``) and score each task fused vs alone;
5. print one table.

A classifier adapter carries its task head; fused, the *first* adapter's head is used, so each
task is scored with its own adapter first. Runtime evaluation pads every batch to
``EVAL_BATCH x max_len`` tokens (the shapes every exported program accepts, SiRA's static
ones included); rows added to fill the last batch are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.errors import ParityError
from edgeadapt.numeric import rel_error
from edgeadapt.timer import stopwatch, time_calls

EVAL_BATCH = 8          # ExecuTorch programs are exported for batch <= 8


@dataclass
class QuickstartConfig:
    """The quickstart's budget. Defaults fit ~6 minutes on two quiet cores."""

    out: str = "runs/quickstart"
    model: str = "minilm"
    max_train: int = 400
    max_test: int = 200
    epochs: float = 1.0
    max_len: int = 64
    rank: int = 8                     # LoRA r; SHiRA, SoRA and SiRA get about the same budget
    seed: int = 0
    backends: tuple[str, ...] = ("onnxruntime", "executorch")
    threads: int | None = 2           # runtime intra-op threads (ONNX Runtime; ExecuTorch keeps
    #                                   its per-process pool, one thread per core)
    repeats: int = 10                 # timed forwards / switches per cell (median reported)
    tolerance: float = 1e-3           # max |runtime - PyTorch| / max |PyTorch| per check
    progress: bool = True
    background_export: bool = True    # export base + SiRA variant in a second process, while
    #                                   training (they do not depend on the trained values)


@dataclass
class Row:
    """One line of the summary table; per-backend cells are keyed by backend name."""

    name: str
    method: str
    task: str
    params: int | None = None
    file_bytes: int | None = None
    acc_torch: float | None = None
    acc: dict[str, float] = field(default_factory=dict)
    forward_ms: dict[str, float] = field(default_factory=dict)
    switch_ms: dict[str, float] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    note: str = ""


def adapter_runs(qc: QuickstartConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """(bundle name, task, TrainConfig fields) of every adapter the quickstart trains.

    Budgets at ``rank`` r = 8 on MiniLM's 12 q/v matrices (384 x 384): LoRA 73,728 parameters;
    SHiRA the same count of single weights (random masks, a different seed per task so the two
    masks barely overlap when fused); SoRA starts at r and prunes; SiRA splits r over 4 experts.
    """
    r = qc.rank
    return [
        ("rt", "rt-sentiment", {"method": "shira", "adapter": {
            "mask": "random", "budget_rank": r, "seed": qc.seed}}),
        ("politics", "politics", {"method": "shira", "adapter": {
            "mask": "random", "budget_rank": r, "seed": qc.seed + 1}}),
        ("lora", "rt-sentiment", {"method": "lora", "adapter": {"r": r}}),
        ("sora", "rt-sentiment", {"method": "sora", "adapter": {"r_max": r}}),
        ("sira", "rt-sentiment", {"method": "sira", "adapter": {
            "num_experts": 4, "r": max(r // 4, 1), "top_k": 2}}),
    ]


def run_quickstart(qc: QuickstartConfig, echo: Callable[[str], Any] = print) -> list[Row]:
    """Train, export, load, switch, check, evaluate, fuse; print and return the table rows.

    Raises ParityError if a backend's logits stray from PyTorch's by more than
    ``qc.tolerance``.
    """
    import torch

    from edgeadapt.adapters.reference import reference_logits, reference_model
    from edgeadapt.export import export_adapter
    from edgeadapt.format import read_adapter, read_manifest
    from edgeadapt.models import load_model
    from edgeadapt.runtime import load
    from edgeadapt.tasks import load_task
    from edgeadapt.train import TrainConfig, train
    from edgeadapt.train.data import encode_task

    elapsed = stopwatch()
    out = Path(qc.out)
    stage = stage_timer(echo)
    echo(f"edgeadapt quickstart: {qc.model}, {qc.max_train} training / {qc.max_test} test "
         f"examples per task, {qc.epochs:g} epoch, sequences <= {qc.max_len} tokens")

    # 1. train, while a second process exports the base model and SiRA's graph variant -------
    bundle = out / "bundle"
    runs = adapter_runs(qc)
    branches = [b for b in (variant_branch(f) for _, _, f in runs) if b is not None]
    job = _start_export(qc, bundle, branches, stage)
    rows = {"base": Row("base", "-", "-", note="no adapter: the exported model as it loads")}
    trained = []
    threads = torch.get_num_threads()
    if job is not None:  # one core trains, the other exports: no oversubscription
        torch.set_num_threads(max(1, threads - 1))
    try:
        for name, task, fields in runs:
            stage(f"training {name} ({fields['method']} on {task})")
            cfg = TrainConfig(model=qc.model, task=task, max_train=qc.max_train,
                              max_test=qc.max_test, epochs=qc.epochs, max_len=qc.max_len,
                              seed=qc.seed, **fields)
            metrics = train(cfg, out=out / name, progress=qc.progress).metrics
            rows[name] = Row(name, fields["method"], task, params=_adapter_params(metrics),
                             acc_torch=metrics["test"]["accuracy"])
            trained.append(name)

        # 2. export ---------------------------------------------------------------------------
        if job is None:
            stage(f"exporting the base model ({', '.join(qc.backends)}) and graph variants")
            took = export_bundle(qc.model, str(bundle), qc.backends, qc.seed, branches,
                                 run_shapes(qc))
        else:
            stage("waiting for the background export")
            took = job[1].get()
        stage("exported: " + ", ".join(f"{k} {v:.0f} s" for k, v in took.items()))
    finally:
        torch.set_num_threads(threads)
        if job is not None:
            job[0].terminate()  # the export is done, or training failed: stop the process
            job[0].join()
    for name in trained:
        stage(f"exporting adapter {name}")
        path = export_adapter(out / name, bundle, name, check=False,  # step 3 checks
                              pte_shapes=run_shapes(qc))
        rows[name].file_bytes = path.stat().st_size
    manifest = read_manifest(bundle)
    adapters = {name: read_adapter(bundle / manifest.adapters[name].file, manifest)
                for name in trained}

    # test sets, tokenised as in training, and the PyTorch reference of any adapter set
    base = load_model(qc.model, num_labels=2, seed=qc.seed)
    tests = {task: encode_task(base, load_task(task, seed=qc.seed, max_train=1,
                                               max_test=qc.max_test), qc.max_len).test
             for task in sorted({rows[n].task for n in trained})}
    pad_id = getattr(base.tokenizer, "pad_token_id", None) or 0
    batches = {task: eval_batches(data, qc.max_len, pad_id) for task, data in tests.items()}
    probe = {task: b[0][0] for task, b in batches.items()}  # parity inputs: a real test batch

    references: dict[str, Any] = {}  # "+"-joined adapter names -> PyTorch model carrying them

    def reference(names: list[str], inputs: dict[str, np.ndarray]) -> np.ndarray:
        key = "+".join(names)
        if key not in references:
            references[key] = reference_model(base, [adapters[n] for n in names])
        return reference_logits(references[key], None, inputs)

    fusions = [["rt", "politics"], ["politics", "rt"]]  # each task with its own head first
    for names in fusions:
        task = rows[names[0]].task
        rows["+".join(names)] = Row("+".join(names), "fused", task, acc_torch=accuracy(
            [reference(names, x) for x, _ in batches[task]], batches[task]))

    # 3.-4. every backend: switch, check against PyTorch, evaluate, time ------------------
    for backend in qc.backends:
        stage(f"loading the bundle with {backend}")
        rt = load(bundle, backend=backend, mode="live",
                  threads=qc.threads if backend == "onnxruntime" else None)
        stage(f"{backend}: live weights read as {rt.live_form}")
        one = {k: v[:1] for k, v in probe["rt-sentiment"].items()}  # batch 1 x max_len
        rows["base"].forward_ms[backend] = forward_ms(rt, one, qc.repeats)
        for name, row in rows.items():
            if name == "base":
                continue
            names = name.split("+")
            row.switch_ms[backend] = switch_ms(rt, names, qc.repeats)
            x = probe[row.task]
            row.parity[backend] = rel_error(rt.run(**x), reference(names, x))
            if row.parity[backend] > qc.tolerance:
                raise ParityError(f"{backend} with adapter(s) {names}: logits differ from "
                                  f"PyTorch by {row.parity[backend]:.2e} (relative) > "
                                  f"{qc.tolerance:g}")
            row.acc[backend] = accuracy([rt.run(**b) for b, _ in batches[row.task]],
                                        batches[row.task])
            row.forward_ms[backend] = forward_ms(rt, one, qc.repeats)
        rt.switch(None)

    # 5. the table ------------------------------------------------------------------------
    for names in fusions:
        fused, alone = rows["+".join(names)], rows[names[0]]
        fused.note = fusion_note(fused, alone)
    table = list(rows.values())
    echo("")
    echo(format_table(table, list(qc.backends), qc.max_len))
    echo(f"\ntotal {elapsed():.0f} s; runs and bundle in {out}/ "
         f"(try: edgeadapt.runtime.load('{bundle}').switch('rt'))")
    return table


# --- the pieces ------------------------------------------------------------------------------


def stage_timer(echo: Callable[[str], Any]) -> Callable[[str], None]:
    """echo(what) with the seconds since the quickstart began."""
    elapsed = stopwatch()
    return lambda what: echo(f"[{elapsed():5.0f} s] {what}")


def variant_branch(fields: dict[str, Any]) -> tuple | None:
    """The graph branch an adapter trained with TrainConfig ``fields`` will need (as
    :func:`edgeadapt.export.adapter.branch_for` derives it from the trained adapter): SiRA
    ``("sira", E, r, top_k, capacity_factor)`` with the config's defaults filled in; None for
    the fused methods."""
    if fields["method"] != "sira":
        return None
    from edgeadapt.train.trainer import adapter_config

    c = adapter_config("sira", fields["adapter"])
    return ("sira", int(c.num_experts), int(c.r), int(c.top_k), float(c.capacity_factor))


def export_bundle(model: str, bundle: str, backends: tuple[str, ...], seed: int,
                  branches: list[tuple], pte_shapes: list[tuple[int, int]]) -> dict[str, float]:
    """Export the base model (live only, unchecked: the quickstart checks every adapter against
    PyTorch after switching) and the graph variants ``branches`` into ``bundle``; returns the
    seconds each step took. Runs in the quickstart's background process (picklable
    arguments), or inline."""
    from edgeadapt.export import export_base
    from edgeadapt.export.adapter import ensure_variant
    from edgeadapt.format import read_manifest, write_manifest

    elapsed = stopwatch()
    export_base(model, bundle, backends=backends, targets="qv", seed=seed, check=False,
                pte_repack=False)  # the quickstart runs live: no constant program
    took = {"base": elapsed()}
    for branch in branches:
        elapsed = stopwatch()
        manifest = read_manifest(bundle)
        key = ensure_variant(Path(bundle), manifest, branch, check=False, pte_shapes=pte_shapes)
        write_manifest(bundle, manifest)
        took[f"variant {key}"] = elapsed()
    return took


def _export_worker(*args: Any) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)  # the other core trains
    return export_bundle(*args)


def _start_export(qc: QuickstartConfig, bundle: Path, branches: list[tuple],
                  stage: Callable[[str], None]) -> tuple[Any, Any] | None:
    """Start :func:`export_bundle` in a spawned process; returns (pool, AsyncResult), or None
    when ``qc.background_export`` is off."""
    if not qc.background_export:
        return None
    import multiprocessing

    from edgeadapt.format import variant_key

    stage(f"exporting the base model ({', '.join(qc.backends)}) and graph variants "
          f"({', '.join(variant_key(b) for b in branches) or 'none'}) in a background process")
    from edgeadapt import quiet

    # a spawned process starts with Python's default filters: quiet it as this one is
    pool = multiprocessing.get_context("spawn").Pool(
        1, initializer=quiet.install if quiet.installed() else None)
    return pool, pool.apply_async(_export_worker, (qc.model, str(bundle), tuple(qc.backends),
                                                   qc.seed, branches, run_shapes(qc)))


def run_shapes(qc: QuickstartConfig) -> list[tuple[int, int]]:
    """The (batch, seq) shapes the quickstart runs on a backend: timed forwards at 1 x max_len,
    checks and evaluation at EVAL_BATCH x max_len. SiRA's static-shape ExecuTorch program is
    lowered for these only (one full lowering per shape)."""
    return [(1, qc.max_len), (EVAL_BATCH, qc.max_len)]


def _adapter_params(metrics: dict[str, Any]) -> int:
    """Trainable adapter parameters; SoRA counts what is left after pruning."""
    return int(metrics["sora"]["params_after"]) if "sora" in metrics \
        else int(metrics["trainable_params"])


def eval_batches(data: Any, max_len: int, pad_id: int, batch: int = EVAL_BATCH
                 ) -> list[tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray, int]]]:
    """A tokenised split (train.data.Encoded) -> fixed-shape batches.

    Each: ({"input_ids", "attention_mask"} int64 (batch, max_len) right-padded,
    (labels (n,), allowed (n, labels) bool, n)) where rows past ``n`` repeat the first example.
    """
    out = []
    for start in range(0, len(data), batch):
        index = list(range(start, min(start + batch, len(data))))
        n = len(index)
        index += [index[0]] * (batch - n)
        ids = np.full((batch, max_len), pad_id, dtype=np.int64)
        mask = np.zeros((batch, max_len), dtype=np.int64)
        for row, i in enumerate(index):
            seq = data.ids[i][:max_len]
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        out.append(({"input_ids": ids, "attention_mask": mask},
                    (data.labels[index[:n]].numpy(), data.allowed[index[:n]].numpy(), n)))
    return out


def accuracy(logits: list[np.ndarray], batches: list[tuple[Any, tuple]]) -> float:
    """Share of examples whose best allowed label is right (as train.objective.evaluate)."""
    right = total = 0
    for scores, (_, (labels, allowed, n)) in zip(logits, batches, strict=True):
        s = np.where(allowed, scores[:n, : allowed.shape[1]], -np.inf)
        right += int((s.argmax(-1) == labels).sum())
        total += n
    return right / max(total, 1)


def forward_ms(rt: Any, inputs: dict[str, np.ndarray], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``rt.run(**inputs)`` in milliseconds, after ``warmup`` runs."""
    return float(np.median(time_calls(lambda: rt.run(**inputs), repeats=max(repeats, 1),
                                      warmup=warmup)))


def switch_ms(rt: Any, names: list[str], repeats: int) -> float:
    """Median time of ``rt.switch(names)`` from the base model (the file already read: one
    untimed switch first); the runtime is left with ``names`` active."""
    return float(np.median(time_calls(lambda: rt.switch(names), repeats=max(repeats, 1),
                                      warmup=1, setup=lambda: rt.switch(None))))


def fusion_note(fused: Row, alone: Row) -> str:
    """'alone 0.750 -> fused -1.5 pt' per backend that scored both (else from PyTorch)."""
    pairs = [(b, f, alone.acc[b]) for b, f in fused.acc.items() if b in alone.acc]
    b, f, a = pairs[0] if pairs else ("PyTorch", fused.acc_torch, alone.acc_torch)
    return f"{alone.name} alone {a:.3f}, fused {100 * (f - a):+.1f} pt ({b})"


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[Row], backends: list[str], seq: int = 64) -> str:
    """One row per adapter (and the base model, and each fused pair), a legend underneath."""
    head = ["adapter", "method", "task", "params", "file KB", "acc PyTorch"]
    for b in backends:
        head += [f"acc {b}", f"fwd ms {b}", f"switch ms {b}", f"err {b}"]
    head.append("note")
    lines = [head]
    for r in rows:
        line = [r.name, r.method, r.task, _cell(r.params, ","),
                _cell(None if r.file_bytes is None else r.file_bytes / 1024, ".0f"),
                _cell(r.acc_torch, ".3f")]
        for b in backends:
            line += [_cell(r.acc.get(b), ".3f"), _cell(r.forward_ms.get(b), ".1f"),
                     _cell(r.switch_ms.get(b), ".2f"), _cell(r.parity.get(b), ".0e")]
        line.append(r.note)
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    text = ["  ".join(str(c).ljust(w) if i < 3 or i == len(head) - 1 else str(c).rjust(w)
                      for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip()
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    legend = [
        "",
        "params: trainable adapter parameters (SoRA: after pruning its dead ranks); file KB: the "
        "adapter file in the bundle (fp16 values).",
        "acc: test accuracy; PyTorch = the trained run (fused rows: the PyTorch model with both "
        "adapters), onnxruntime / executorch = through that backend after switching in place, on "
        "batches padded to the exported shapes (SiRA counts pad tokens against expert "
        "capacity, so its runtime accuracy can differ a little from the run's).",
        f"fwd ms: median forward, batch 1 x {seq} tokens; switch ms: median rt.switch(...) from "
        "the base model (fused: weights edited in place; SiRA: its graph variant's branches).",
        "err: max |runtime logits - PyTorch logits| / max |PyTorch logits| on a test batch "
        "(same adapter file, applied by apply_adapter_torch).",
        "fused rows (a+b): both SHiRA adapters at once, scored on a's task with a's head; note "
        "compares with a alone.",
    ]
    return "\n".join(text + legend)
