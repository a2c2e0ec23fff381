"""From a bench report to the thresholds of the runtime's ``auto`` mode
(:mod:`edgeadapt.runtime.policy`): ``edgeadapt bench --write-policy``.

Per CPU backend measured, keyed by (backend, the live form its live runs read), one threshold
per batch measured (a batch class): ``2 * min over the seqs measured at that batch of the
live-vs-repack break-even`` (runs per switch; the factor 2 for the runs' spread), ``inf`` where
repack never wins at any of them. Batches whose break-even was not measured are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from edgeadapt.errors import ConfigError

SPREAD = 2.0  # thresholds are this many times the measured break-even


def thresholds(report: Mapping) -> dict[tuple[str, str], dict[int, float]]:
    """{(backend, live form): {batch: runs per switch from which repack wins}} of ``report``
    (see the module docstring); CUDA rows are left out (CUDA runs live only)."""
    forms = report.get("live_form_by_backend", {})
    table: dict[tuple[str, str], dict[int, float]] = {}
    for row in report.get("break_even", []):
        form = forms.get(f"{row['backend']}:{row['device']}")
        if row["device"] != "cpu" or form is None:
            continue
        if row.get("repack_never_wins"):
            value = math.inf
        elif row.get("runs_per_switch") is not None:
            # at least one run per switch: a break-even of 0 (repack always wins) reads as 1
            value = max(SPREAD * float(row["runs_per_switch"]), 1.0)
        else:
            continue
        classes = table.setdefault((row["backend"], form), {})
        classes[int(row["batch"])] = min(value, classes.get(int(row["batch"]), math.inf))
    return table


def write_policy(path: str | Path, report: Mapping) -> Path:
    """Write :func:`thresholds` of ``report`` into the policy file ``path``
    (:func:`edgeadapt.runtime.policy.write_thresholds`), each row citing the bench command and
    machine; other rows of the file are kept."""
    from edgeadapt.runtime.policy import write_thresholds

    table = thresholds(report)
    if not table:
        raise ConfigError("--write-policy: the report has no live-vs-repack break-even on a "
                          "CPU backend (it needs the shira-live and shira-repack forwards and "
                          "both SHiRA switches)")
    source = (f"{report.get('command', 'edgeadapt bench')} on {report.get('device', '?')}: "
              f"{SPREAD:g}x the live-vs-repack break-even")
    return write_thresholds(path, table, source)
