"""Generation end to end on SmolLM2: ``edgeadapt generate-demo``.

1. **train** two small SHiRA adapters on SmolLM2-135M-Instruct (q/v): ``hamlet`` (next-token
   prediction on the play's text) and ``sentiment`` (Rotten Tomatoes as a generative
   classifier: the label word after ``Movie review: ...\\nSentiment:``), while a second process
   **exports** the base with its KV-cache decoder (``export_base(..., generate=True)``);
2. **export** both adapters into the bundle;
3. **generate** on one loaded runtime, switching in place between requests: the base, each
   adapter, both fused (``rt.switch(["hamlet", "sentiment"])``). Per state: a continuation of a
   held-out Hamlet line (its greedy tokens checked against transformers' ``generate`` on the
   PyTorch model carrying the same adapters: ParityError on any difference), and the one-token
   answer to held-out reviews, constrained to the label words (``allowed=``: the decision the
   sentiment adapter was trained on; how many are right);
4. print one table: the switch's time, the first token's time, decode tokens/s, the
   sentiment score and the reply.

Defaults fit about 10 minutes on two cores (the export is the longest step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeadapt.errors import ParityError
from edgeadapt.pipeline import stage_timer
from edgeadapt.timer import stopwatch

#: the demo's adapters: name -> (task, TrainConfig fields)
ADAPTERS = {
    "hamlet": ("hamlet", {"max_len": 64, "max_test": 4}),
    "sentiment": ("rt-sentiment", {"max_len": 64, "max_train": 240, "max_test": 16}),
}
STATES: tuple[tuple[str, ...], ...] = ((), ("hamlet",), ("sentiment",), ("hamlet", "sentiment"))


@dataclass
class GenerateDemoConfig:
    """The demo's budget (defaults: about 10 minutes on two quiet cores)."""

    out: str = "runs/generate-demo"
    model: str = "smollm2"
    steps: int = 12                 # optimizer steps per adapter
    batch_size: int = 8
    density: float = 0.01           # SHiRA: fraction of each q/v matrix trained
    lr: float = 5e-3
    reviews: int = 24               # held-out reviews scored per adapter state
    line_words: int = 40            # of a held-out Hamlet line, the prompt
    max_new_tokens: int = 32        # the Hamlet continuation
    parity_tokens: int = 16         # of which checked against transformers
    threads: int = 2
    seed: int = 0
    progress: bool = True
    background_export: bool = True  # export while training (on the other core)


@dataclass
class StateRow:
    """One adapter state's results."""

    name: str
    switch_ms: float
    tokens_per_s: float
    sentiment: str
    reply: str
    parity: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)


def export_generate_bundle(model: str, bundle: str, seed: int, threads: int) -> float:
    """Export ``model`` for ONNX Runtime with its KV-cache decoder (q/v live); seconds taken.
    Runs in the demo's background process (picklable arguments), or inline."""
    import torch

    from edgeadapt.export import export_base

    torch.set_num_threads(threads)
    elapsed = stopwatch()
    export_base(model, bundle, backends=["onnxruntime"], targets="qv", seed=seed, check=False,
                generate=True)
    return elapsed()


def run_generate_demo(dc: GenerateDemoConfig, echo: Callable[[str], Any] = print
                      ) -> list[StateRow]:
    """Train, export, generate under each adapter state; print and return the rows. Raises
    ParityError where a greedy continuation differs from transformers' on the PyTorch model
    carrying the same adapters."""
    import torch

    from edgeadapt.export import export_adapter
    from edgeadapt.train import TrainConfig, train

    out = Path(dc.out)
    bundle = out / "bundle"
    stage = stage_timer(echo)
    elapsed = stopwatch()
    echo(f"edgeadapt generate-demo: {dc.model}, SHiRA adapters {', '.join(ADAPTERS)} "
         f"({dc.steps} steps each), generation on ONNX Runtime with adapters switched in place")
    pool = result = None
    threads = torch.get_num_threads()
    if dc.background_export:
        import multiprocessing

        from edgeadapt import quiet

        stage("exporting the base model and its KV-cache decoder in a background process")
        pool = multiprocessing.get_context("spawn").Pool(
            1, initializer=quiet.install if quiet.installed() else None)
        result = pool.apply_async(export_generate_bundle, (dc.model, str(bundle), dc.seed, 1))
        torch.set_num_threads(max(1, threads - 1))  # one core trains, the other exports
    try:
        for name, (task, fields) in ADAPTERS.items():
            stage(f"training {name} (SHiRA on {task})")
            cfg = TrainConfig(model=dc.model, task=task, method="shira",
                              adapter={"density": dc.density}, steps=dc.steps,
                              batch_size=dc.batch_size, lr=dc.lr, seed=dc.seed, **fields)
            train(cfg, out=out / name, progress=dc.progress)
        if result is None:
            stage("exporting the base model and its KV-cache decoder")
            took = export_generate_bundle(dc.model, str(bundle), dc.seed, threads)
        else:
            stage("waiting for the background export")
            took = result.get()
        stage(f"exported in {took:.0f} s")
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.terminate()
            pool.join()
    for name in ADAPTERS:
        stage(f"exporting adapter {name}")
        export_adapter(out / name, bundle, name, check=False)  # step 3 checks the tokens
    rows = generate_states(dc, bundle, stage)
    echo("")
    echo(format_rows(rows))
    echo(f"\ntotal {elapsed():.0f} s; bundle in {bundle}/ (try: edgeadapt chat {bundle} "
         "--adapter hamlet)")
    return rows


def generate_states(dc: GenerateDemoConfig, bundle: Path, stage: Callable[[str], None]
                    ) -> list[StateRow]:
    """Step 3: one runtime, every state of :data:`STATES` switched in place in turn (after one
    untimed pass that reads the adapters and opens the decoder)."""
    from edgeadapt.runtime import load
    from edgeadapt.runtime.tokenizer import Tokenizer
    from edgeadapt.tasks import load_task
    from edgeadapt.train.data import encode_task

    rt = load(bundle, backend="onnxruntime", mode="live", threads=dc.threads)
    tok = Tokenizer(bundle / rt.manifest.extra["generate"]["tokenizer"])
    hamlet = load_task("hamlet", seed=dc.seed, max_train=1, max_test=1).test[0].text
    line = tok.encode(" ".join(hamlet.split()[:dc.line_words]))
    checker = _Reference(dc, bundle)
    # held-out reviews as the sentiment adapter was trained on them (prompt, review cut to
    # max_len, the label words' shared prefix); the answer is constrained to the label words'
    # first distinguishing tokens: the decision the generative classifier learnt
    reviews = encode_task(checker.lm, load_task("rt-sentiment", seed=dc.seed, max_train=1,
                                                max_test=dc.reviews),
                          ADAPTERS["sentiment"][1]["max_len"])
    answers = [int(t) for t in reviews.label_tokens]
    prompts, labels = reviews.test.ids, [int(y) for y in reviews.test.labels]
    for state in STATES:  # warm up: adapters read and planned, the decoder opened
        rt.switch(list(state) or None)
        rt.generate(line, max_new_tokens=2)
    rows = []
    for state in STATES:
        name = "+".join(state) or "base"
        stage(f"switching to {name} and generating")
        watch = stopwatch()
        rt.switch(list(state) or None)
        switch_ms = watch() * 1e3
        watch, first, ids = stopwatch(), None, []
        for piece in rt.stream(line, max_new_tokens=dc.max_new_tokens):
            first = watch() if first is None else first
            ids.append(piece.token)
        total = watch()
        want = checker.greedy(state, line, dc.parity_tokens)
        if ids[:len(want)] != want:
            raise ParityError(f"{name}: greedy tokens {ids[:len(want)]} differ from "
                              f"transformers' {want} on the PyTorch model with the same adapters")
        right = sum(rt.generate(p, max_new_tokens=1, allowed=answers).ids[0] == answers[y]
                    for p, y in zip(prompts, labels, strict=True))
        rate = (len(ids) - 1) / (total - first) if len(ids) > 1 and total > first else 0.0
        rows.append(StateRow(name, switch_ms, rate, f"{right}/{len(prompts)}",
                             tok.decode(ids).strip(),
                             extra={"first_token_ms": 1e3 * first, "parity_tokens": len(want)}))
    rt.switch(None)
    return rows


class _Reference:
    """The PyTorch model and the bundle's adapters: transformers' greedy tokens under a set of
    them (the demo's independent check of the runtime's tokens)."""

    def __init__(self, dc: GenerateDemoConfig, bundle: Path) -> None:
        from edgeadapt.format import read_adapter, read_manifest
        from edgeadapt.models import load_model

        self.lm = load_model(dc.model, seed=dc.seed)
        self.manifest = read_manifest(bundle)
        self.adapters = {n: read_adapter(bundle / self.manifest.adapters[n].file, self.manifest)
                         for n in ADAPTERS}

    def greedy(self, state: tuple[str, ...], ids: list[int], n: int) -> list[int]:
        from edgeadapt.adapters.reference import reference_greedy

        return reference_greedy(self.lm, [self.adapters[a] for a in state], ids, n,
                                self.manifest.extra["generate"]["eos_token_ids"])


def format_rows(rows: list[StateRow], width: int = 60) -> str:
    """The demo's table (markdown)."""
    lines = ["| adapters | switch ms | first token ms | decode tokens/s | sentiment right "
             "| Hamlet continuation (greedy) |", "|---|---|---|---|---|---|"]
    for r in rows:
        reply = " ".join(r.reply.split())
        reply = reply if len(reply) <= width else reply[:width - 3] + "..."
        lines.append(f"| {r.name} | {r.switch_ms:.2f} | {r.extra['first_token_ms']:.0f} "
                     f"| {r.tokens_per_s:.1f} | {r.sentiment} | {reply} |")
    return "\n".join(lines)
