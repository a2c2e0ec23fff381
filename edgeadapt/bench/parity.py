"""The parity rule the benchmark applies before reporting any timing, and the rows it records.

The rule: ``rel_error(backend, reference) = max |backend - reference| / max |reference| <= tol``
(:func:`edgeadapt.numeric.rel_error`; default 1e-3: the adapters' values are stored in fp16 and
both sides read the same stored values, so the gap is float32 reordering only), else
:class:`~edgeadapt.errors.ParityError` — a fast wrong answer is never timed.

The reference is the subject's (:mod:`edgeadapt.bench.reference`): the PyTorch model carrying
the same adapter. :class:`ParityLog` caches the references per (adapter, inputs) and keeps one
row per check for the report's ``parity`` list.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgeadapt.bench.adapters import AdapterSet
from edgeadapt.bench.backends import Target
from edgeadapt.bench.reference import Subject
from edgeadapt.bench.timing import INSTANCE_SEP
from edgeadapt.errors import ParityError
from edgeadapt.numeric import rel_error

PARITY_TOL = 1e-3


def check_parity(got: np.ndarray, want: np.ndarray, what: str, tol: float = PARITY_TOL
                 ) -> float:
    """Raise ParityError unless ``got`` matches ``want`` (see the module docstring); returns
    the relative error."""
    err = rel_error(got, want)
    if not err <= tol:
        raise ParityError(
            f"{what}: output differs from the PyTorch reference (max rel error {err:.3g} > "
            f"{tol:g}); refusing to time it — a stale packed weight or a broken export would "
            "look fast and be wrong")
    return err


class ParityLog:
    """The parity rows of one run, and the references they compare with.

    check_inputs: the inputs every switch / reload check runs (the run's first shape), checked
    once; their references are cached per adapter for the whole run.
    """

    def __init__(self, subject: Subject, adapters: AdapterSet,
                 check_inputs: dict[str, np.ndarray]) -> None:
        self.subject = subject
        self.adapters = adapters
        self.check_inputs = check_inputs
        self.rows: list[dict] = []
        self._check_refs: dict[str | None, np.ndarray] = {}

    def reference(self, adapter_name: str | None, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The subject's output for ``inputs`` with adapter ``adapter_name`` (None: the base)."""
        adapter = self.adapters.adapters[adapter_name] if adapter_name else None
        return self.subject.reference(adapter, inputs)

    def check_reference(self, adapter_name: str | None) -> np.ndarray:
        """:meth:`reference` for :attr:`check_inputs`, computed once per adapter."""
        if adapter_name not in self._check_refs:
            self._check_refs[adapter_name] = self.reference(adapter_name, self.check_inputs)
        return self._check_refs[adapter_name]

    def row(self, target: Target, variant: str, inputs: dict[str, np.ndarray], err: float,
            **extra: object) -> None:
        """Record one check: ``variant`` on ``target``, the shape of ``inputs``, its error."""
        x = next(iter(inputs.values()))
        self.rows.append({**target.fields(), "variant": variant,
                          "instance": extra.pop("instance", 0), "batch": int(x.shape[0]),
                          "seq": int(x.shape[1]) if x.ndim > 1 else None,
                          "max_rel_error": err, **extra})

    def forward(self, target: Target, case: str, fn: Callable[[dict], np.ndarray],
                adapter_name: str | None, inputs: dict[str, np.ndarray],
                refs: dict[str | None, np.ndarray]) -> None:
        """Check one forward case (``variant#i``) against the reference; ``refs`` caches the
        references per adapter for these inputs (every instance compares with the same one)."""
        if adapter_name not in refs:
            refs[adapter_name] = self.reference(adapter_name, inputs)
        err = check_parity(fn(inputs), refs[adapter_name], f"{target.key} {case}")
        variant, _, instance = case.partition(INSTANCE_SEP)
        self.row(target, variant, inputs, err, instance=int(instance or 0), check="forward",
                 adapter=adapter_name)
