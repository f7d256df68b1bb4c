"""Per-layer cache sizes under a slot budget: exact dynamic programme, LP bound, knee.

The objective is separable: ``stall[l, s]`` seconds per step that layer l loses waiting for
transfers with a cache of s experts; the sizes minimise Σ_l stall[l, s_l] with Σ_l s_l ≤ budget.
That is a multiple-choice knapsack over at most layers × experts slots, so :func:`allocate`
solves it exactly by dynamic programming over the slot count (for every budget at once, which
is the "cache size vs throughput" curve). It also reports the LP relaxation's bound: greedy
marginal gains on each layer's lower convex envelope, with the last segment taken
fractionally. The LP bound never exceeds the optimum; the gap says how far from convex (from
"every slot pays less than the one before") the curves are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Allocation:
    """``sizes`` [layers] cache sizes; ``stall`` their total seconds per step; ``lp_bound`` the
    LP relaxation's total (≤ stall); ``best`` [layers · E + 1] the optimal total stall with at
    most b slots, for every b up to caching every expert (non-increasing)."""

    sizes: np.ndarray
    stall: float
    lp_bound: float
    best: np.ndarray


def allocate(stall: np.ndarray, budget: int) -> Allocation:
    """Minimise Σ_l stall[l, s_l] over s_l in 0..E with Σ s_l ≤ ``budget`` (``stall`` [layers, E+1])."""
    nl, width = stall.shape
    full = nl * (width - 1)
    b = np.arange(full + 1)
    s = np.arange(width)
    gap = b[:, None] - s[None, :]
    valid = gap >= 0
    prev = np.zeros(full + 1)                      # the best of the layers so far, with at most b slots
    choice = np.zeros((nl, full + 1), dtype=np.int64)
    for layer in range(nl):
        total = np.where(valid, prev[np.maximum(gap, 0)] + stall[layer][None, :], np.inf)
        choice[layer] = total.argmin(axis=1)       # ties go to the smaller cache
        prev = total[b, choice[layer]]
    cap = int(min(max(budget, 0), full))
    sizes = np.zeros(nl, dtype=np.int64)
    left = cap
    for layer in range(nl - 1, -1, -1):
        sizes[layer] = choice[layer, left]
        left -= sizes[layer]
    return Allocation(sizes, float(prev[cap]), lp_bound(stall, cap), prev)


def lp_bound(stall: np.ndarray, budget: int) -> float:
    """The LP relaxation of :func:`allocate`: each layer's lower convex envelope, segments taken
    by decreasing gain per slot, the last one fractionally."""
    gains: list[tuple[float, float]] = []          # (gain per slot, slots) of every envelope segment
    for row in stall:
        hull = _lower_hull(row)
        for a, c in zip(hull[:-1], hull[1:]):
            gains.append(((row[a] - row[c]) / (c - a), float(c - a)))
    total = float(stall[:, 0].sum())
    left = float(budget)
    for gain, slots in sorted(gains, key=lambda g: -g[0]):
        if left <= 0 or gain <= 0:
            break
        take = min(slots, left)
        total -= gain * take
        left -= take
    return total


def _lower_hull(y: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points (i, y[i]) (monotone chain)."""
    hull: list[int] = []
    for i in range(y.size):
        while len(hull) >= 2:
            a, c = hull[-2], hull[-1]
            if (y[c] - y[a]) * (i - a) >= (y[i] - y[a]) * (c - a):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def knee(stall: np.ndarray) -> int:
    """Where adding cache stops paying, on ``stall`` [slots 0..n] (non-increasing seconds per
    step): the point of the stall removed that lies farthest above the chord from no cache to
    the last point, both axes scaled to [0, 1] (Satopää et al.'s Kneedle). 0 when flat."""
    n = stall.size - 1
    drop = stall[0] - stall[-1]
    if n < 1 or drop <= 0:
        return 0
    removed = (stall[0] - stall) / drop
    return int(np.argmax(removed - np.arange(n + 1) / n))
