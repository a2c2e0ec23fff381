"""docs/results.md, rendered from the run files; ``python -m experiments.results`` (from the
repository root) is the entry point.

Modules (the run definitions are ``experiments.results_quality.RUNS``):

- ``data``: reading metrics / fusion / bench files, numbers, seed pairing (``Paired``), tables
- ``shira`` (sections 1-1c), ``sora`` (2), ``sira`` (3, 3b), ``fusion`` (4), ``switching`` (5),
  ``smollm2`` (7): one module per part of the page, each with its computed "what came out"
- ``claims``: the claims summary, from the sections' helpers
- ``page``: header, static sections, ``SECTIONS`` (the page order), ``render``, atomic write
- ``training``: the full run (train missing runs, refresh fusion and plots) and the CLI
"""
