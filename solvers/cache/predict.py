"""TransitionPredictor: which experts layer l+1 will need, from the experts layer l chose.

Fitted on past tokens (ExpertFlow's routing-path forecast, Pre-gated MoE's "prefetch from the
previous layer" in its simplest form): ``P_l[i, j]`` = P(expert j at layer l+1 | expert i at
layer l) over all top-k × top-k pairs of each token (:meth:`moeplan.stats.TraceStats.transitions`).
For one token, ``q_j = min(1, Σ_i P_l[i, j])`` over its k choices i at layer l estimates the
chance that it picks j at layer l+1 (the expected number of its choices that land on j); a step
of B tokens needs j with probability ``1 − Π_b (1 − q_bj)``. While layer l computes, the
``width`` likeliest experts of layer l+1 are prefetched, those at least ``min_probability``
likely.

:func:`prefetch_limits` sets both from the step timeline. A prefetch that is used hides up to
min(τ, w) seconds of transfer (τ one expert's copy, w the compute it overlaps); one that is not
used costs τ of copy-stream time that later loads queue behind. It pays when
q · min(τ, w) > (1 − q) · τ, i.e. q > τ / (τ + min(τ, w)) — ½ when compute hides a whole copy,
close to 1 when transfers dwarf compute — and no more than ⌈w / τ⌉ copies fit in the window.

Everything is integer arithmetic (probabilities × 2^20, a fixed table of logarithms), so the
simulator (batched) and the executor (one step at a time) rank experts identically, ties going
to the lower expert id.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moeplan.solvers.cache.steps import StepShape, chunk_steps, iter_counts
from moeplan.stats import TraceStats
from moeplan.trace import RoutingTrace

SCALE = 1 << 20
LEVELS = 1 << 10                       # q quantised to 1/1024 before its logarithm
_MISS_LOG = np.rint(-np.log(np.maximum(1.0 - np.arange(LEVELS + 1) / LEVELS, 1e-6)) * SCALE).astype(np.int64)


def _log_score(probability: np.ndarray | float) -> np.ndarray:
    """−log(1 − p) × 2^20 as an integer (the units of :meth:`TransitionPredictor.scores`)."""
    return np.rint(-np.log(np.maximum(1.0 - np.asarray(probability, dtype=np.float64), 1e-6)) * SCALE).astype(np.int64)


@dataclass(frozen=True)
class TransitionPredictor:
    """Attributes:
        weights: float64 [layers-1, experts, experts]: round(P_l[i, j] × 2^20) (integer-valued).
        width: int64 [layers]: experts predicted per step for each layer (0 for layer 0).
        min_score: int64 [layers]: the lowest score prefetched (:func:`_log_score` of min_probability, ≥ 1).
    """

    weights: np.ndarray
    width: np.ndarray
    min_score: np.ndarray

    @classmethod
    def fit(cls, trace: RoutingTrace, shape: StepShape) -> "TransitionPredictor":
        """Fit on ``trace`` (the past). The width is the mean number of distinct experts a step
        of ``shape`` activated at each layer; any probability > 0 qualifies (see :meth:`limited`)."""
        counts = TraceStats.of(trace).all_transition_counts.astype(np.float64)
        rows = counts.sum(axis=2, keepdims=True)
        p = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        index = shape.token_index(trace.num_tokens)
        active = np.zeros(trace.num_layers)
        for _, c in iter_counts(trace.expert_ids, index, trace.num_experts,
                                chunk_steps(trace.num_layers, trace.num_experts)):
            active += (c > 0).sum(axis=(0, 2))
        width = np.maximum(np.rint(active / index.shape[0]), 1).astype(np.int64)
        width[0] = 0
        return cls(np.rint(p * SCALE), width, np.ones_like(width))

    def limited(self, width: np.ndarray, min_probability: np.ndarray) -> "TransitionPredictor":
        """This predictor prefetching at most ``width`` [layers] experts, each at least
        ``min_probability`` [layers] likely."""
        capped = np.minimum(self.width, np.asarray(width, dtype=np.int64))
        capped[0] = 0
        return replace(self, width=capped, min_score=np.maximum(_log_score(min_probability), 1))

    @property
    def num_layers(self) -> int:
        return int(self.width.size)

    def min_probability(self) -> np.ndarray:
        """[layers] the confidence a prefetch needs, as a probability."""
        return 1.0 - np.exp(-self.min_score / SCALE)

    def scores(self, ids: np.ndarray) -> np.ndarray:
        """[steps, layers, experts] int64: −log(1 − P(the step needs the expert)) × 2^20 for each
        layer (layer 0: zeros), from ``ids`` [steps, batch, layers, k], the steps' token choices."""
        n, b, nl, k = ids.shape
        per_token = np.zeros((n, b, nl - 1, self.weights.shape[-1]))
        layer = np.arange(nl - 1)[None, None, :]
        for j in range(k):
            per_token += self.weights[layer, ids[:, :, :-1, j]]
        level = np.minimum(per_token.astype(np.int64) >> 10, LEVELS)        # q per token, in 1/1024
        out = np.zeros((n, nl, self.weights.shape[-1]), dtype=np.int64)
        out[:, 1:] = _MISS_LOG[level].sum(axis=1)
        return out

    def predicted(self, ids: np.ndarray, lane_layer: np.ndarray, lane_width: np.ndarray) -> np.ndarray:
        """[steps, lanes, experts] bool: the ``lane_width`` likeliest experts of each lane's layer
        per step that reach its ``min_score``, from ``ids`` [steps, batch, layers, k]."""
        score = self.scores(ids)
        e = score.shape[-1]
        top = int(lane_width.max(initial=0))
        if top == 0:
            return np.zeros((ids.shape[0], lane_layer.size, e), dtype=bool)
        key = score * e + np.arange(e - 1, -1, -1, dtype=np.int64)           # lower id wins ties
        best = -np.sort(-np.partition(key, e - top, axis=-1)[..., e - top:], axis=-1)   # [steps, layers, top]
        threshold = best[:, lane_layer, np.maximum(lane_width, 1) - 1]        # [steps, lanes]
        confident = score[:, lane_layer] >= self.min_score[lane_layer][None, :, None]
        return (key[:, lane_layer] >= threshold[..., None]) & confident & (lane_width > 0)[None, :, None]


def prefetch_limits(copy_seconds: float, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([layers] most prefetches per step, [layers] least probability of use) that pay, from one
    expert's copy seconds and ``window`` [steps, layers] compute seconds a prefetch can overlap
    (see the module docstring)."""
    w = window.mean(axis=0)
    width = np.maximum(np.ceil(w / copy_seconds), 1).astype(np.int64)
    return width, copy_seconds / (copy_seconds + np.maximum(np.minimum(w, copy_seconds), 1e-12))
