"""TransitionPredictor: which experts layer l+1 will need, from the experts layer l chose.

Fitted on past tokens (ExpertFlow's routing-path forecast, Pre-gated MoE's "prefetch from the
previous layer" in its simplest form): ``P_l[i, j]`` = P(expert j at layer l+1 | expert i at
layer l) over all top-k × top-k pairs of each token (:meth:`moeplan.stats.TraceStats.transitions`).
For a step, layer l+1's score of expert j is ``Σ_i c_i · P_l[i, j]`` where ``c_i`` counts the
step's token-choices of expert i at layer l (the expected number of choices j receives); the
``width`` best-scored experts are prefetched while layer l computes, those whose score (as a
probability of being needed, capped at 1) reaches ``min_probability``. Layer 0 has no
predecessor and gets no prediction.

:func:`break_even` sets ``min_probability`` from the step timeline: a prefetch that is used
hides up to min(τ, w) seconds of transfer (τ one expert's copy, w the compute it overlaps); one
that is not used costs τ of copy-stream time that later loads queue behind. It pays when
q · min(τ, w) > (1 − q) · τ, i.e. q > τ / (τ + min(τ, w)) — ½ when compute hides a whole copy,
close to 1 when transfers dwarf compute.

Probabilities are kept as integers (× 2^20), so scores are exact integers whatever the
summation order: the simulator (batched) and the executor (one step at a time) rank experts
identically, ties going to the lower expert id.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplan.solvers.cache.steps import StepShape, iter_counts, chunk_steps
from moeplan.stats import TraceStats
from moeplan.trace import RoutingTrace

SCALE = 1 << 20


@dataclass(frozen=True)
class TransitionPredictor:
    """Attributes:
        weights: float64 [layers-1, experts, experts]: round(P_l[i, j] × 2^20) (integer-valued).
        width: int64 [layers]: experts predicted per step for each layer (0 for layer 0): the
            mean number of distinct experts a step of the fitting trace activated there.
        min_score: int64 [layers]: the lowest score prefetched (min_probability × 2^20, ≥ 1).
    """

    weights: np.ndarray
    width: np.ndarray
    min_score: np.ndarray

    @classmethod
    def fit(cls, trace: RoutingTrace, shape: StepShape,
            min_probability: np.ndarray | float = 0.0) -> "TransitionPredictor":
        """Fit on ``trace`` (the past); ``shape`` sets the steps whose mean width is used;
        ``min_probability`` (per layer or one for all) the confidence a prefetch needs."""
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
        floor = np.broadcast_to(np.asarray(min_probability, dtype=np.float64), width.shape)
        return cls(np.rint(p * SCALE), width, np.maximum(np.ceil(floor * SCALE), 1).astype(np.int64))

    @property
    def num_layers(self) -> int:
        return int(self.width.size)

    def scores(self, ids: np.ndarray) -> np.ndarray:
        """[steps, layers, experts] int64 score of each expert for each layer (layer 0: zeros)
        from ``ids`` [steps, batch, layers, k], the token choices of each step."""
        n, _, nl, k = ids.shape
        out = np.zeros((n, nl, self.weights.shape[-1]))
        layer = np.arange(nl - 1)[None, None, :]
        for j in range(k):
            out[:, 1:] += self.weights[layer, ids[:, :, :-1, j]].sum(axis=1)
        return out.astype(np.int64)

    def predicted(self, ids: np.ndarray, lane_layer: np.ndarray, lane_width: np.ndarray) -> np.ndarray:
        """[steps, lanes, experts] bool: the ``lane_width`` best-scored experts of each lane's
        layer per step that reach its ``min_score``, from ``ids`` [steps, batch, layers, k]."""
        score = self.scores(ids)
        e = score.shape[-1]
        key = score * e + np.arange(e - 1, -1, -1, dtype=np.int64)           # lower id wins ties
        top = int(lane_width.max(initial=0))
        if top == 0:
            return np.zeros((ids.shape[0], lane_layer.size, e), dtype=bool)
        best = -np.sort(-np.partition(key, e - top, axis=-1)[..., e - top:], axis=-1)   # [steps, layers, top]
        width = np.maximum(lane_width, 1)
        threshold = best[:, lane_layer, width - 1]                            # [steps, lanes]
        confident = score[:, lane_layer] >= self.min_score[lane_layer][None, :, None]
        return (key[:, lane_layer] >= threshold[..., None]) & confident & (lane_width > 0)[None, :, None]


def break_even(copy_seconds: float, window: np.ndarray) -> np.ndarray:
    """[layers] the probability of use above which a prefetch pays (see the module docstring),
    from one expert's copy time and ``window`` [steps, layers] compute seconds it can overlap."""
    hidden = np.minimum(window.mean(axis=0), copy_seconds)
    return copy_seconds / (copy_seconds + np.maximum(hidden, 1e-12))
