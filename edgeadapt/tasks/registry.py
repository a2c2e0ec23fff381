"""The task registry: fixed splits, labels, prompts and metrics of each dataset.

Splits are *fixed*: an example goes to the test side when the hash of its group key (movie,
speech) falls in the held-out fraction, so every example of a movie or speech lands on one side
(no leakage) and the split never depends on ``seed``, Python's hash seed or the file order.
``seed`` only picks which training examples a ``max_train`` budget keeps; a ``max_test`` budget
always keeps the same test examples, so runs with different seeds are scored on one test set.

Classification tasks may mix sources (``rt+politics``): each example carries a ``group`` and is
scored only among its group's labels (``Task.groups``), for the classifier head and the
generative classifier alike.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeadapt.errors import ConfigError, UnknownNameError
from edgeadapt.tasks.sources import read_csv, read_text

TEST_FRACTION = 0.2
PASSAGE_WORDS = 60  # political speeches are cut into passages of about this many words


@dataclass(frozen=True)
class Example:
    """One example. label: index into ``Task.labels`` (-1 for language modelling)."""

    text: str
    label: int
    group: str


@dataclass
class Task:
    """A dataset with its split and metric.

    kind: ``"classification"`` (metric ``accuracy``) or ``"language-modeling"`` (metric
    ``perplexity`` = exp(mean next-token NLL over the held-out tokens)).
    labels: class names; label_words: the word whose next-token logit a causal LM uses as that
    class's score (generative classifier); groups: group -> the label ids its examples choose
    among; prompts: group -> template with ``{text}`` for causal LMs.
    For language modelling, ``train``/``test`` each hold one example with the whole text, and
    ``max_train``/``max_test`` cap the number of token blocks (applied after tokenisation).
    """

    name: str
    kind: str
    metric: str
    train: list[Example]
    test: list[Example]
    labels: tuple[str, ...] = ()
    label_words: tuple[str, ...] = ()
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    max_train: int | None = None
    max_test: int | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def _unit(salt: str, key: str) -> float:
    """sha256 of ``salt \0 key`` -> a uniform number in [0, 1), the same on every machine."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_test_split(task: str, key: str) -> bool:
    """True if group ``key`` of ``task`` is held out: ``_unit(task, key) < 0.2``."""
    return _unit(task, key) < TEST_FRACTION


def _split(task: str, items: list[tuple[str, Example]]) -> tuple[list[Example], list[Example]]:
    train = [ex for key, ex in items if not in_test_split(task, key)]
    test = [ex for key, ex in items if in_test_split(task, key)]
    return train, test


def _subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """``limit`` examples drawn with ``random.Random(seed)``, kept in their original order."""
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def _rt_sentiment() -> Task:
    """Rotten Tomatoes review snippets: fresh -> positive (1), rotten -> negative (0); plot
    summaries dropped; split by movie."""
    label = {"rotten": 0, "fresh": 1}
    items = [
        (row["movie_name"], Example(row["text"].strip(), label[row["category"]], "rt"))
        for row in read_csv("rotten_tomatoes_corpus_full.csv.bz2")
        if row["category"] in label
    ]
    train, test = _split("rt-sentiment", items)
    return Task(
        name="rt-sentiment", kind="classification", metric="accuracy", train=train, test=test,
        labels=("negative", "positive"), label_words=(" negative", " positive"),
        groups={"rt": (0, 1)}, prompts={"rt": "Movie review: {text}\nSentiment:"},
    )


def _subjectivity() -> Task:
    """Rotten Tomatoes subjectivity, as Pang & Lee's SUBJ: one sentence of a critic's review
    snippet (0, subjective) or of a plot summary (1, objective). Plot summaries are cut into
    sentences (``sentences``, >= 8 words) so that length does not give the class away; the larger
    class is thinned by hashing the text (``_unit("subjectivity-keep", text) < small / large``),
    so the classes are balanced and the choice never depends on file order or ``seed``. Split
    by movie with rt-sentiment's hash: a movie's texts are on one side in both tasks and their
    mix."""
    items: list[tuple[str, Example]] = []
    for row in read_csv("rotten_tomatoes_corpus_full.csv.bz2"):
        if row["category"] == "plot":
            items += [(row["movie_name"], Example(s, 1, "subj")) for s in sentences(row["text"])
                      if len(s.split()) >= 8]
        elif row["category"] in ("fresh", "rotten"):
            items.append((row["movie_name"], Example(row["text"].strip(), 0, "subj")))
    counts = [sum(ex.label == c for _, ex in items) for c in (0, 1)]
    large = int(counts[1] > counts[0])
    keep = min(counts) / max(counts)
    items = [(k, ex) for k, ex in items
             if ex.label != large or _unit("subjectivity-keep", ex.text) < keep]
    train, test = _split("rt-sentiment", items)
    return Task(
        name="subjectivity", kind="classification", metric="accuracy", train=train, test=test,
        labels=("review", "plot"), label_words=(" review", " plot"),
        groups={"subj": (0, 1)}, prompts={"subj": "Movie text: {text}\nKind (review or plot):"},
    )


def sentences(text: str) -> list[str]:
    """``text`` cut after ``.``, ``!`` or ``?`` followed by white space, and at line breaks."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def speech_passages(text: str, words: int = PASSAGE_WORDS) -> list[str]:
    """Cut a speech into consecutive passages of whole sentences, each about ``words`` words
    (a passage closes at the first sentence end past ``words``); fragments < 8 words dropped."""
    passages, current = [], []
    for sentence in sentences(text):
        current.extend(sentence.split())
        if len(current) >= words:
            passages.append(" ".join(current))
            current = []
    if len(current) >= 8:
        passages.append(" ".join(current))
    return passages


def _politics() -> Task:
    """2012 US convention speeches, democrat (0) / republican (1), as passage-level examples;
    split by speaker (a speech without a speaker name is its own group), so no speech (and no
    speaker) is on both sides."""
    label = {"democrat": 0, "republican": 1}
    items = []
    for i, row in enumerate(read_csv("political_data.csv")):
        key = row["speaker"].strip() or f"speech-{i}"
        for passage in speech_passages(row["text"]):
            items.append((key, Example(passage, label[row["party"]], "politics")))
    train, test = _split("politics", items)
    return Task(
        name="politics", kind="classification", metric="accuracy", train=train, test=test,
        labels=("democrat", "republican"), label_words=(" Democrat", " Republican"),
        groups={"politics": (0, 1)},
        prompts={"politics": "Convention speech: {text}\nParty:"},
    )


def _hamlet() -> Task:
    """Hamlet as language modelling: the last 20% of the text (cut at a line start) held out."""
    text = read_text("hamlet.txt")
    cut = text.index("\n", int(len(text) * (1 - TEST_FRACTION))) + 1
    return Task(
        name="hamlet", kind="language-modeling", metric="perplexity",
        train=[Example(text[:cut], -1, "hamlet")], test=[Example(text[cut:], -1, "hamlet")],
    )


def _mixture(parts: list[Task], name: str) -> Task:
    """Classification tasks mixed: labels concatenated, each part's label ids shifted."""
    labels, words, groups, prompts, train, test = [], [], {}, {}, [], []
    for part in parts:
        offset = len(labels)
        labels += part.labels
        words += part.label_words
        for group, ids in part.groups.items():
            groups[group] = tuple(i + offset for i in ids)
        prompts.update(part.prompts)
        train += [Example(e.text, e.label + offset, e.group) for e in part.train]
        test += [Example(e.text, e.label + offset, e.group) for e in part.test]
    return Task(
        name=name, kind="classification", metric="accuracy", train=train, test=test,
        labels=tuple(labels), label_words=tuple(words), groups=groups, prompts=prompts,
    )


BUILDERS: dict[str, Callable[[], Task]] = {
    "rt-sentiment": _rt_sentiment,
    "politics": _politics,
    "hamlet": _hamlet,
    "subjectivity": _subjectivity,
    "rt+politics": lambda: _mixture([_rt_sentiment(), _politics()], "rt+politics"),
    "rt+subjectivity": lambda: _mixture([_rt_sentiment(), _subjectivity()], "rt+subjectivity"),
}
TASKS = tuple(BUILDERS)


def _cap_per_group(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """Subsample to ``limit`` with an equal share per group (mixtures stay balanced)."""
    if limit is None:
        return examples
    groups = sorted({e.group for e in examples})
    share = [limit // len(groups) + (i < limit % len(groups)) for i in range(len(groups))]
    kept = {id(e) for g, n in zip(groups, share, strict=True)
            for e in _subsample([e for e in examples if e.group == g], n, seed)}
    return [e for e in examples if id(e) in kept]


def load_task(name: str, seed: int = 0, max_train: int | None = None,
              max_test: int | None = None) -> Task:
    """Load task ``name`` with its fixed split.

    seed: chooses the ``max_train`` subsample (the test subsample is fixed: seed 0).
    max_train / max_test: example budgets (token blocks for language modelling); None = all.
    Raises UnknownNameError for an unknown name, MissingPackageError without the data wheel.
    """
    if name not in BUILDERS:
        raise UnknownNameError(f"unknown task {name!r}: use one of {', '.join(TASKS)}")
    for option, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be a positive number of examples, got {value}")
    task = BUILDERS[name]()
    if task.kind == "language-modeling":
        task.max_train, task.max_test = max_train, max_test
        return task
    task.train = _cap_per_group(task.train, max_train, seed)
    task.test = _cap_per_group(task.test, max_test, 0)
    return task
