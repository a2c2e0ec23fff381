"""Lab work: measurements, probes and the generator of docs/results.md (index: README.md).

Not part of the installed package and never imported by ``edgeadapt``. Each tool runs from the
repository root as ``.venv/bin/python -m experiments.<tool>``.
"""
