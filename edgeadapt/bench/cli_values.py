"""Parsers of the ``edgeadapt bench`` options' values."""

from __future__ import annotations

import click


def positive_ints(value: str) -> list[int]:
    """``"1,8"`` -> [1, 8]; click.BadParameter unless every item is an integer >= 1."""
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{value!r}: expected positive integers")
    return out
