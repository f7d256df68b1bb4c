"""Expert-cache simulation over a trace's steps, vectorised over lanes (layer × cache size).

:func:`simulate` runs :class:`~moeplan.solvers.cache.state.CacheState` step by step (each
step vectorised over every lane) and records, per step and lane, the experts needed, the hits,
the demand loads (misses), the misses used from staging, the prefetch loads and how many of
those the same step used. Caches start empty.

:func:`lru_hit_curves` gives LRU's hits at *every* cache size in one vectorised pass, with no
loop over steps: LRU keeps the most recently used experts in a fixed order (last use, then
lower id), so a needed expert hits a cache of size s exactly when fewer than s experts come
before it in that order at the step before (its stack distance, Mattson et al. 1970).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moeplan.errors import InputError
from moeplan.solvers.cache.predict import TransitionPredictor
from moeplan.solvers.cache.state import MAX_STEPS, NEVER, CacheState, check_policy
from moeplan.solvers.cache.steps import CHUNK_ELEMENTS, chunk_steps, iter_counts, step_counts
from moeplan.trace import RoutingTrace

RECORDS = ("requests", "hits", "loads", "staged", "prefetched", "prefetch_used")


@dataclass
class CacheRun:
    """What each lane's cache did at each step: int16 [steps, lanes] arrays ``requests``
    (distinct experts needed), ``hits``, ``loads`` (demand loads = misses), ``staged`` (misses
    used from staging, not kept), ``prefetched`` (prefetch loads) and ``prefetch_used`` (of those,
    needed at the same step). ``lane_layer``/``lane_size``: the MoE layer and cache size of each lane."""

    policy: str
    lane_layer: np.ndarray
    lane_size: np.ndarray
    requests: np.ndarray
    hits: np.ndarray
    loads: np.ndarray
    staged: np.ndarray
    prefetched: np.ndarray
    prefetch_used: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.requests.shape[0])

    def hit_rate(self) -> np.ndarray:
        """[lanes] hits / experts needed."""
        req = self.requests.sum(axis=0, dtype=np.int64)
        return self.hits.sum(axis=0, dtype=np.int64) / np.maximum(req, 1)

    def transfers(self) -> np.ndarray:
        """[lanes] experts moved over the host link per step (demand + prefetch loads)."""
        moved = self.loads.sum(axis=0, dtype=np.int64) + self.prefetched.sum(axis=0, dtype=np.int64)
        return moved / max(self.num_steps, 1)

    def summary(self, expert_bytes: float) -> dict[str, Any]:
        """Totals over every lane: hit rate, loads, prefetch accuracy, bytes moved."""
        tot = {k: int(getattr(self, k).sum(dtype=np.int64)) for k in RECORDS}
        return {"policy": self.policy, "steps": self.num_steps, **tot,
                "hit_rate": tot["hits"] / max(tot["requests"], 1),
                "prefetch_accuracy": tot["prefetch_used"] / tot["prefetched"] if tot["prefetched"] else float("nan"),
                "bytes_moved": (tot["loads"] + tot["prefetched"]) * expert_bytes,
                "bytes_per_step": (tot["loads"] + tot["prefetched"]) * expert_bytes / max(self.num_steps, 1)}


def simulate(trace: RoutingTrace, index: np.ndarray, sizes: np.ndarray, policy: str,
             predictor: TransitionPredictor | None = None, lane_layer: np.ndarray | None = None) -> CacheRun:
    """Run caches of ``sizes`` [lanes] over the steps ``index`` [steps, batch] of ``trace``; lane
    i caches MoE layer ``lane_layer[i]`` (default: lane = layer). ``predictor`` drives the
    ``prefetch`` policy (each lane prefetches min(width, size) experts per step)."""
    check_policy(policy)
    nl, e = trace.num_layers, trace.num_experts
    layer_of = np.arange(nl) if lane_layer is None else np.asarray(lane_layer, dtype=np.int64)
    sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), layer_of.shape)
    if policy == "prefetch" and predictor is None:
        raise InputError("the prefetch policy needs a predictor fitted on past tokens", field="policy")
    if predictor is not None and predictor.num_layers != nl:
        raise InputError(f"predictor has {predictor.num_layers} layers, the trace {nl}", field="predictor")
    lanes = layer_of.size
    steps = index.shape[0]
    if steps >= MAX_STEPS:
        raise InputError(f"{steps:,} steps: the policies' keys hold fewer than {MAX_STEPS:,}", field="steps",
                         fix="simulate a shorter stretch of the trace")
    rec = {k: np.zeros((steps, lanes), dtype=np.int16) for k in RECORDS}
    state = CacheState(sizes, e, policy)
    width = np.minimum(predictor.width[layer_of], sizes) if policy == "prefetch" and predictor else None
    chunk = chunk_steps(nl, e, lanes)
    upcoming = _first_use_after(trace, index, chunk) if policy == "belady" else None
    for c, (start, counts) in enumerate(iter_counts(trace.expert_ids, index, e, chunk)):
        need = counts[:, layer_of] > 0
        n = need.shape[0]
        next_use = _next_use(counts > 0, start, upcoming[c])[:, layer_of] if upcoming is not None else None
        want = (predictor.predicted(trace.expert_ids[index[start:start + n]], layer_of, width)
                if width is not None else None)
        hits = np.empty_like(need)
        loads = np.empty_like(need)
        staged = np.empty_like(need)
        pre = np.zeros_like(need)
        for i in range(n):
            t = start + i
            if want is not None:
                pre[i] = state.prefetch(want[i], t)
            hits[i], loads[i] = state.demand(need[i], t, None if next_use is None else next_use[i])
            staged[i] = loads[i] & ~state.held
        rows = slice(start, start + n)
        for name, mask in (("requests", need), ("hits", hits), ("loads", loads), ("staged", staged),
                           ("prefetched", pre), ("prefetch_used", pre & need)):
            rec[name][rows] = mask.sum(axis=2)
    return CacheRun(policy, layer_of, sizes.copy(), **rec)


def _first_use_after(trace: RoutingTrace, index: np.ndarray, chunk: int) -> list[np.ndarray]:
    """For each chunk of steps: [layers, experts] the first step after the chunk that needs the
    expert (NEVER if none), by one backward pass."""
    starts = list(range(0, index.shape[0], chunk))
    out: list[np.ndarray] = [np.empty(0)] * len(starts)
    upcoming = np.full((trace.num_layers, trace.num_experts), NEVER, dtype=np.int64)
    for c in range(len(starts) - 1, -1, -1):
        out[c] = upcoming.copy()
        needed = step_counts(trace.expert_ids, index[starts[c]:starts[c] + chunk], trace.num_experts) > 0
        first = needed.argmax(axis=0)
        upcoming = np.where(needed.any(axis=0), starts[c] + first, upcoming)
    return out


def _next_use(needed: np.ndarray, start: int, after: np.ndarray) -> np.ndarray:
    """[steps, layers, experts]: the next step after each step that needs the expert."""
    n = needed.shape[0]
    t = np.where(needed, start + np.arange(n)[:, None, None], NEVER)
    later = np.minimum.accumulate(t[::-1], axis=0)[::-1]
    out = np.empty_like(later)
    out[:-1] = later[1:]
    out[-1] = NEVER
    return np.minimum(out, after[None])


def lru_hit_curves(trace: RoutingTrace, index: np.ndarray,
                   depth: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LRU at every cache size at once, over the steps ``index``, caches starting empty:

    * hits [layers, E + 1]: hits of a cache of s experts in column s;
    * requests [layers]: experts needed, summed over steps;
    * missing [depth, layers, E + 1]: ``missing[j - 1, l, s]`` = steps whose layer l misses at
      least j experts with a cache of s (the j-th largest stack distance of the step is ≥ s).

    Matches :func:`simulate` with policy ``lru`` at each size (ties by lower expert id)."""
    nl, e = trace.num_layers, trace.num_experts
    hist = np.zeros((nl, e + 1), dtype=np.int64)
    jth = np.zeros((depth, nl, e + 1), dtype=np.int64)   # steps by their j-th largest stack distance
    last = np.full((nl, e), -1, dtype=np.int32)       # last step that needed each expert
    per_step = nl * min(e, index.shape[1] * trace.top_k)              # needed experts per step, at most
    chunk = max(16, CHUNK_ELEMENTS // (per_step * e))
    order = np.arange(e - 1, -1, -1, dtype=np.int64)                      # lower id ranks first on ties
    for start, counts in iter_counts(trace.expert_ids, index, e, chunk):
        needed = counts > 0
        n = needed.shape[0]
        t = np.where(needed, np.arange(start, start + n, dtype=np.int32)[:, None, None], np.int32(-1))
        seen = np.maximum(np.maximum.accumulate(t, axis=0), last[None])      # last use up to each step
        before = np.empty_like(seen)                                          # ... up to the step before
        before[0] = last
        before[1:] = seen[:-1]
        key = before.astype(np.int64) * e + order                             # recency order, unique per row
        s, layer, expert = np.nonzero(needed)
        rows = key[s, layer]                                                  # [M, E]
        mine = rows[np.arange(s.size), expert]
        rank = np.where(before[s, layer, expert] >= 0, (rows > mine[:, None]).sum(axis=1), e)   # unseen: a miss
        hist += np.bincount(layer * (e + 1) + rank, minlength=nl * (e + 1)).reshape(nl, e + 1)
        group = s.astype(np.int64) * nl + layer                               # one (step, layer) per group,
        first = np.r_[0, np.flatnonzero(np.diff(group)) + 1]                  # contiguous in nonzero's order
        if depth == 1:
            top = np.maximum.reduceat(rank, first)
            jth[0] += np.bincount(layer[first] * (e + 1) + top, minlength=nl * (e + 1)).reshape(nl, e + 1)
        else:
            by = np.lexsort((-rank, group))
            place = np.arange(by.size) - np.repeat(first, np.diff(np.r_[first, by.size]))
            for j in range(depth):
                pick = by[place == j]
                jth[j] += np.bincount(layer[pick] * (e + 1) + rank[pick], minlength=nl * (e + 1)).reshape(nl, e + 1)
        last = seen[-1]
    hits = np.zeros((nl, e + 1), dtype=np.int64)
    hits[:, 1:] = np.cumsum(hist[:, :e], axis=1)
    missing = np.cumsum(jth[:, :, ::-1], axis=2)[:, :, ::-1]                   # j-th distance ≥ s
    return hits, hist.sum(axis=1), missing
