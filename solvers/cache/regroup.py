"""Token regrouping (ExpertFlow-style): batch together queued requests that use the same experts,
so each decode step activates fewer distinct experts and the cache misses less.

Each request's *signature* is its expert-usage histogram over (layer, expert) in its first
``probe_tokens`` tokens — what its prompt's routing shows before it is scheduled — scaled to
unit length. Batches form greedily in arrival order: the oldest waiting request opens a batch,
which then takes, one at a time, the waiting request among the next ``window`` (default
4 × batch; this bounds how long a request can be passed over) whose signature is most similar
(cosine) to the batch's summed signature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moeplan.errors import InputError
from moeplan.solvers.cache.steps import StepShape, chunk_steps, iter_counts
from moeplan.trace import RoutingTrace


@dataclass(frozen=True)
class Regrouping:
    """``order``: the requests in their new batch order (batch g = order[g·B:(g+1)·B]);
    ``activated_before`` / ``activated_after`` [layers]: mean distinct experts a decode step
    activates per layer in arrival order / regrouped."""

    order: np.ndarray
    activated_before: np.ndarray
    activated_after: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"activated_before_per_layer": self.activated_before.round(3).tolist(),
                "activated_after_per_layer": self.activated_after.round(3).tolist(),
                "activated_before": float(self.activated_before.mean()),
                "activated_after": float(self.activated_after.mean())}


def activated_experts(trace: RoutingTrace, index: np.ndarray) -> np.ndarray:
    """[layers] mean distinct experts per step over the steps ``index``."""
    total = np.zeros(trace.num_layers)
    for _, counts in iter_counts(trace.expert_ids, index, trace.num_experts,
                                 chunk_steps(trace.num_layers, trace.num_experts)):
        total += (counts > 0).sum(axis=(0, 2))
    return total / index.shape[0]


def signatures(trace: RoutingTrace, shape: StepShape, probe_tokens: int) -> np.ndarray:
    """[requests, layers · experts] unit-length usage histograms of each request's first tokens."""
    n = shape.request_tokens(trace.num_tokens)
    requests = shape.num_requests(trace.num_tokens)
    probe = min(probe_tokens, n)
    nl, e = trace.num_layers, trace.num_experts
    ids = trace.expert_ids[: requests * n].reshape(requests, n, nl, -1)[:, :probe].astype(np.int64)
    flat = (np.arange(requests)[:, None, None, None] * nl + np.arange(nl)[None, None, :, None]) * e + ids
    hist = np.bincount(flat.ravel(), minlength=requests * nl * e).reshape(requests, nl * e).astype(np.float64)
    return hist / np.maximum(np.linalg.norm(hist, axis=1, keepdims=True), 1e-12)


def regroup(trace: RoutingTrace, shape: StepShape, probe_tokens: int = 16, window: int | None = None) -> Regrouping:
    """Reorder ``shape``'s decode requests into expert-sharing batches (see the module docstring)."""
    shape.validate()
    if shape.phase != "decode":
        raise InputError("regrouping batches decode requests; the phase is prefill", field="phase")
    if probe_tokens < 1:
        raise InputError(f"probe tokens must be ≥ 1, got {probe_tokens}", field="probe_tokens")
    b = shape.batch
    window = window or 4 * b
    if window < b:
        raise InputError(f"the window ({window}) must hold at least one batch ({b})", field="window")
    sig = signatures(trace, shape, probe_tokens)
    waiting = list(range(sig.shape[0]))
    order: list[int] = []
    while len(waiting) >= b:
        batch = [waiting.pop(0)]
        total = sig[batch[0]].copy()
        while len(batch) < b:
            pool = waiting[: window - 1]
            pick = pool[int(np.argmax(sig[pool] @ total))]
            waiting.remove(pick)
            batch.append(pick)
            total += sig[pick]
        order += batch
    order += waiting
    new = np.asarray(order, dtype=np.int64)
    before = activated_experts(trace, shape.token_index(trace.num_tokens))
    after = activated_experts(trace, shape.token_index(trace.num_tokens, new))
    return Regrouping(new, before, after)
