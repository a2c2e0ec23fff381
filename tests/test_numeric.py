"""The one relative error (edgeadapt.numeric.rel_error), by hand."""

from __future__ import annotations

import numpy as np

from edgeadapt.numeric import rel_error


def test_rel_error_by_hand():
    want = np.array([[1.0, -4.0], [2.0, 0.5]], dtype=np.float32)
    got = want + np.array([[0.0, 0.2], [-0.1, 0.0]], dtype=np.float32)
    # max |diff| 0.2 over max |want| 4
    assert abs(rel_error(got, want) - 0.05) < 1e-7
    assert rel_error(want, want) == 0.0
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0


def test_rel_error_refuses_what_a_tolerance_check_must_not_pass():
    want = np.ones((2, 3))
    assert rel_error(np.ones((3, 2)), want) == float("inf")   # no broadcasting
    assert rel_error(np.ones(3), np.ones((1, 3))) == float("inf")
    bad = want.copy()
    bad[0, 0] = np.nan
    assert rel_error(bad, want) == float("inf")             # NaN never passes `<= tol`
    bad[0, 0] = np.inf
    assert rel_error(bad, want) == float("inf")
    assert rel_error(np.full(2, 1e-3), np.zeros(2)) > 1e20  # all-zero reference: finite, huge
