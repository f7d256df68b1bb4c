"""Equal-split heuristic: extrapolated workloads, their leave-one-out choice, plateau swaps."""
from __future__ import annotations

import numpy as np
import pytest

from moeplan.errors import InputError
from moeplan.solvers.placement import SolverOptions
from moeplan.solvers.placement.even import (EXTRAPOLATIONS, LayerPacking, _load_layer, choose_extrapolation,
                                            extrapolated)


def test_extrapolated_amplifies_each_deviation_and_keeps_totals() -> None:
    rng = np.random.default_rng(0)
    loads = rng.gamma(2.0, size=(3, 2, 16))
    assert extrapolated(loads, 0.0) is loads
    assert extrapolated(loads[:2], 1.0).shape == (2, 2, 16)   # fewer than three: unchanged
    out = extrapolated(loads, 1.0)
    assert out.shape == (6, 2, 16)
    np.testing.assert_array_equal(out[:3], loads)
    np.testing.assert_allclose(out[3:].sum(axis=2), loads.sum(axis=2))
    assert (out >= 0).all()
    mean = loads.mean(axis=0)
    # where nothing is clipped, the deviation from the mean doubles (before renormalising)
    raw = mean + 2.0 * (loads - mean)
    if (raw > 0).all():
        np.testing.assert_allclose(out[3:], raw * (loads.sum(axis=2, keepdims=True) / raw.sum(axis=2, keepdims=True)))


def test_extrapolation_is_chosen_without_the_judged_workload() -> None:
    rng = np.random.default_rng(2)
    base = rng.gamma(0.8, size=(4, 32))
    loads = base[None] * rng.gamma(3.0, size=(5, 4, 32)) / 3.0
    alpha, scores = choose_extrapolation(loads, 8, 5, "even", "mean", 0.02)
    assert alpha in EXTRAPOLATIONS and set(scores) == {f"{a:g}" for a in EXTRAPOLATIONS}
    assert scores[f"{alpha:g}"] == min(scores.values())
    assert all(1.0 <= v < 2.0 for v in scores.values())
    # fewer than four workloads: each inner plan would have under three, nothing to extrapolate
    assert choose_extrapolation(loads[:3], 8, 5, "even", "mean", 0.02) == (0.0, {})


def test_balance_swaps_leave_a_plateau_of_equal_maxima() -> None:
    # two devices share the max (5); no single swap lowers it, the squares tie-break walks off it
    loads = np.array([[3.0, 3.0, 2.0, 2.0, 1.0, 1.0]])
    pk = LayerPacking(loads, np.ones(6, dtype=np.int64), 3, 2)
    _load_layer(pk, np.array([[0, 2], [1, 3], [4, 5]]))
    assert pk.dev_load.max() == 5.0
    pk.improve(np.zeros((6, 3)), 1.0, "mean", None)
    assert pk.dev_load.max() == pytest.approx(4.0)


def test_negative_extrapolation_is_refused() -> None:
    with pytest.raises(InputError):
        SolverOptions(extrapolate=-0.5).validate()
