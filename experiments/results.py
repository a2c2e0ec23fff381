"""docs/results.md, generated: trains the missing quality runs, refreshes fusion and plots, renders.

    .venv/bin/python -m experiments.results [--jobs N] [--render-only] [--out PATH]
    make results                                    # the same, with the defaults

Without ``--render-only`` it trains every run of ``results_quality.RUNS`` whose ``metrics.json``
is missing (``--jobs`` at a time, default 2; each run is its own process with one torch thread),
re-runs ``python -m experiments.results_fusion --recheck`` when ``runs/mp/fusion.json`` is
missing or older than a run it fuses, re-draws ``docs/switch_size.png`` from the committed bench
JSONs, and then renders. It never runs ``edgeadapt bench`` (that needs a quiet machine): section
5 reads the committed ``docs/bench/*.json``.

Rendering reads only files (each run's ``metrics.json``, ``fusion.json``, the bench JSONs) and
computes every number and verdict from them; a missing run renders as "(not run)" and its
verdicts as "not measured". The page is written atomically (temp file + ``os.replace``).
The logic lives in ``experiments/results_doc/`` (see its ``__init__``); the page's sections, in
order, are ``results_doc.page.SECTIONS``: add one by writing a function that returns markdown.
"""

from __future__ import annotations

from experiments.results_doc.page import render
from experiments.results_doc.training import main

__all__ = ["main", "render"]

if __name__ == "__main__":
    main()
