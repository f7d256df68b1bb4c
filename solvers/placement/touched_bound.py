"""A lower bound on the devices a token touches per layer, over every placement with ``slots``
slots per device (any replica counts, equal or weighted shares).

Let a token choose the set ``S`` (its top-k) at a layer and each choice ``i`` land on one of its
expert's replicas, device ``d`` with probability ``s[i, d]`` (the share; choices independent, as
:func:`.metrics.touched` assumes). The distinct devices touched are ``Σ_{i∈S} 1 / (1 + X_i)``
with ``X_i`` the other choices landing on ``i``'s device, so by Jensen (``1/(1+x)`` is convex)

    E[touched] ≥ Σ_{i∈S} 1 / (1 + Σ_{j∈S∖i} y[i, j]),     y[i, j] = Σ_d s[i, d] · s[j, d]

where ``y[i, j] ∈ [0, 1]`` is the chance that ``i`` and ``j`` meet on a device, and
``Σ_j y[i, j] ≤ slots − 1`` (the device ``i`` lands on holds at most ``slots − 1`` other replicas,
each with share ≤ 1). Dropping ``y``'s symmetry and every other coupling between experts, each
expert ``i`` gets its own convex problem over the tokens that chose it,

    minimise Σ_{t∋i} 1 / (1 + Σ_{j∈S_t∖i} y_j)   subject to   Σ_j y_j ≤ slots − 1,  0 ≤ y ≤ 1,

whose optimum is a lower bound. :func:`expert_bound` solves it by projected gradient descent
and certifies it by the Frank–Wolfe bound: for convex ``f`` and any feasible ``y``,
``f(y*) ≥ f(y) + min_v ∇f(y)·(v − y)`` over the feasible ``v`` (put 1 on the ``slots − 1`` most
negative gradient entries), so the figure returned is a proved lower bound whatever the descent
reached (the best over its iterations). The layer's bound is the sum over experts divided by
the tokens. It ignores balance entirely (a placement may put all of an expert's companions
beside it whatever their load), so it bounds what co-location can do at best; a balanced
placement touches more.
"""
from __future__ import annotations

import numpy as np

ITERATIONS = 400   # projected-gradient steps per expert at most
GAP = 1e-3         # stop when the certified bound is within 0.1 % of the descent's value


def expert_bound(others: np.ndarray, num_experts: int, slots: int, iterations: int = ITERATIONS) -> float:
    """Proved lower bound on ``Σ_t 1 / (1 + co-located companions)`` for one expert, from
    ``others`` [tokens, k−1] the other experts each token that chose it chose (module docstring)."""
    t, k1 = others.shape
    if t == 0:
        return 0.0
    cap = slots - 1
    flat = others.ravel()
    counts = np.bincount(flat, minlength=num_experts).astype(np.float64)
    y = np.zeros(num_experts)
    y[np.argsort(-counts, kind="stable")[:cap]] = 1.0        # start: the most frequent companions
    step = 1.0 / max(2.0 * k1 * counts.max(), 1e-300)        # 1 / Lipschitz constant of ∇f
    best = 0.0
    for _ in range(iterations):
        inv = 1.0 / (1.0 + y[others].sum(axis=1))
        value = float(inv.sum())
        grad = -np.bincount(flat, weights=np.repeat(inv ** 2, k1), minlength=num_experts)
        vertex = np.argsort(grad, kind="stable")[:cap]
        best = max(best, value + float(grad[vertex].clip(max=0.0).sum() - grad @ y))
        if value - best <= GAP * value:
            break
        y = project(y - step * grad, cap)
    return best


def project(z: np.ndarray, cap: float) -> np.ndarray:
    """Euclidean projection of ``z`` onto ``{0 ≤ y ≤ 1, Σ y ≤ cap}`` (bisection on the shift)."""
    y = z.clip(0.0, 1.0)
    if y.sum() <= cap:
        return y
    lo, hi = 0.0, float(z.max())
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if (z - mid).clip(0.0, 1.0).sum() > cap else (lo, mid)
    return (z - hi).clip(0.0, 1.0)


def layer_bound(expert_ids: np.ndarray, num_experts: int, slots: int, iterations: int = ITERATIONS) -> float:
    """Lower bound on the mean devices touched per token at one layer, for ``expert_ids``
    [tokens, k] (distinct experts per row) under any placement with ``slots`` per device."""
    t, k = expert_ids.shape
    total = 0.0
    for expert in np.unique(expert_ids):
        rows, cols = np.nonzero(expert_ids == expert)
        keep = np.ones((rows.shape[0], k), dtype=bool)
        keep[np.arange(rows.shape[0]), cols] = False
        total += expert_bound(expert_ids[rows][keep].reshape(rows.shape[0], k - 1), num_experts, slots, iterations)
    return total / max(t, 1)


def touched_bound(expert_ids: np.ndarray, num_experts: int, slots: int, layers: list[int],
                  iterations: int = ITERATIONS) -> np.ndarray:
    """[len(layers)] :func:`layer_bound` of each listed layer of ``expert_ids`` [tokens, layers, k]
    (``iterations`` descent steps per expert at most; fewer give a weaker, still proved, bound)."""
    return np.array([layer_bound(expert_ids[:, layer, :].astype(np.int64), num_experts, slots, iterations)
                     for layer in layers])
