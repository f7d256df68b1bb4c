"""TraceStats: what a RoutingTrace says about traffic, computed vectorised.

* ``load[layer, expert]``: routed token-choices per expert (tokens × top_k per layer in total).
* ``coactivation(layer)``: ``C[i, j]`` = tokens that chose both i and j at that layer.
* ``transitions(layer)``: ``P[i, j]`` = P(expert j at layer+1 | expert i at layer), over all
  top-k × top-k pairs of each token (rows with no traffic are zero).
* Local routing consistency, **SRP** and **SCH**, as the paper's current code defines them
  (sliding windows; an online look-ahead cache; model level pooled): see :mod:`moeplan.consistency`.

All counts come from ``np.bincount`` over flattened ``intp`` indices built in one pass from the int16 ids,
a chunk of about :data:`CHUNK_INDICES` at a time, so the scratch stays in the CPU cache (a few MB) however long
the trace.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moeplan.cores import Beside
from moeplan.consistency import best_f1, lookahead_cache_hits, window_count_histogram
from moeplan.errors import InputError
from moeplan.trace import RoutingTrace

CHUNK_INDICES = 1 << 18
"""``intp`` indices (2 MiB) built per chunk of tokens before each ``np.bincount``."""
SUMMARY_SCH_TOKENS = 8192
"""Tokens (from the start) over which :meth:`TraceStats.summary` runs the model-level SCH cache: the cache is an
online simulation, one Python step per token-choice (≈ 1 s per 1,000 tokens × 58 layers × top-8); the paper's code
likewise samples (every 16th sequence)."""


@dataclass
class TraceStats:
    """Statistics of one trace. Construct with :meth:`of`; derived matrices are computed on first use."""

    trace: RoutingTrace

    @classmethod
    def of(cls, trace: RoutingTrace) -> "TraceStats":
        return cls(trace)

    @property
    def num_experts(self) -> int:
        return self.trace.num_experts

    @cached_property
    def load(self) -> np.ndarray:
        """[layers, experts] int64: token-choices routed to each expert."""
        ids = self.trace.expert_ids
        e, nl = self.num_experts, self.trace.num_layers
        offsets = (np.arange(nl, dtype=np.intp) * e)[None, :, None]
        out = np.zeros(nl * e, dtype=np.int64)
        step = _chunk(nl * self.trace.top_k)
        for start in range(0, ids.shape[0], step):
            out += np.bincount(np.add(ids[start:start + step], offsets, dtype=np.intp).ravel(), minlength=nl * e)
        return out.reshape(nl, e)

    @cached_property
    def load_share(self) -> np.ndarray:
        """[layers, experts]: each expert's fraction of its layer's token-choices."""
        return self.load / self.load.sum(axis=1, keepdims=True)

    def imbalance(self) -> np.ndarray:
        """[layers]: max expert load / mean expert load (1 = perfectly even)."""
        return self.load.max(axis=1) / self.load.mean(axis=1)

    def coactivation(self, layer: int) -> np.ndarray:
        """[experts, experts] int64, symmetric, zero diagonal: tokens choosing both i and j."""
        ids = self.trace.expert_ids[:, layer, :]
        e, k = self.num_experts, self.trace.top_k
        a, b = np.triu_indices(k, 1)
        out = np.zeros(e * e, dtype=np.int64)
        step = _chunk(a.size)
        pairs = np.empty((step, a.size), dtype=np.intp)
        for start in range(0, ids.shape[0], step):
            chunk = ids[start:start + step]
            # every ordered pair (i at column a, j at column b): C[i, j] + C[j, i] is what is asked
            key = pairs[:chunk.shape[0]]
            np.take(np.multiply(chunk, e, dtype=np.intp), a, axis=1, out=key)
            key += chunk[:, b]
            out += np.bincount(key.ravel(), minlength=e * e)
        m = out.reshape(e, e)
        return m + m.T

    def transition_counts(self, layer: int) -> np.ndarray:
        """[experts, experts] int64: (i at ``layer``, j at ``layer+1``) pairs over all top-k × top-k."""
        if not 0 <= layer < self.trace.num_layers - 1:
            raise IndexError(f"no layer after {layer}")
        ids = self.trace.expert_ids
        e, k = self.num_experts, self.trace.top_k
        out = np.zeros(e * e, dtype=np.int64)
        step = _chunk(k * k)
        pairs = np.empty((step, k, k), dtype=np.intp)
        for start in range(0, ids.shape[0], step):
            src = np.multiply(ids[start:start + step, layer, :], e, dtype=np.intp)
            key = pairs[:src.shape[0]]
            np.add(src[:, :, None], ids[start:start + step, layer + 1, None, :], out=key)
            out += np.bincount(key.ravel(), minlength=e * e)
        return out.reshape(e, e)

    def transitions(self, layer: int) -> np.ndarray:
        """[experts, experts] float: row-normalised :meth:`transition_counts`."""
        c = self.transition_counts(layer).astype(np.float64)
        rows = c.sum(axis=1, keepdims=True)
        return np.divide(c, rows, out=np.zeros_like(c), where=rows > 0)

    @cached_property
    def all_transition_counts(self) -> np.ndarray:
        """[layers-1, experts, experts] int64: :meth:`transition_counts` for every consecutive pair."""
        nl, e = self.trace.num_layers, self.num_experts
        out = np.zeros((max(nl - 1, 0), e, e), dtype=np.int64)
        for layer in range(nl - 1):
            out[layer] = self.transition_counts(layer)
        return out

    def affinity_strength(self) -> np.ndarray:
        """[layers-1]: share of top-1 → top-1 transitions that follow each expert's most common
        successor (1/experts for independent layers, 1 for fully determined paths)."""
        nl, e = self.trace.num_layers, self.num_experts
        if nl < 2:
            return np.zeros(0)
        ids = self.trace.expert_ids
        counts = np.zeros((nl - 1, e * e), dtype=np.int64)
        step = max(_chunk(nl), 1 << 16)  # per layer pair, bincounts of that many tokens into experts² bins
        for start in range(0, ids.shape[0], step):
            top1 = np.ascontiguousarray(ids[start:start + step, :, 0].T)  # [layers, tokens of the chunk]
            for layer in range(nl - 1):
                key = np.multiply(top1[layer], e, dtype=np.intp)
                key += top1[layer + 1]
                counts[layer] += np.bincount(key, minlength=e * e)
        c = counts.reshape(nl - 1, e, e)
        return c.max(axis=2).sum(axis=1) / np.maximum(c.sum(axis=(1, 2)), 1)

    def _layers(self, layers: list[int] | None) -> list[int]:
        chosen = list(range(self.trace.num_layers)) if layers is None else list(layers)
        for layer in chosen:
            if not 0 <= layer < self.trace.num_layers:
                raise InputError(f"layer must lie in 0..{self.trace.num_layers - 1}, got {layer}", field="layer")
        return chosen

    def _check_segment(self, segment: int) -> None:
        if segment < 1:
            raise InputError(f"segment must be at least 1 token, got {segment}", field="segment")

    def srp(self, segment: int = 16, layers: list[int] | None = None) -> float:
        """Segment routing best performance (F1 in [0, 1]) over windows of ``segment`` tokens sliding by one,
        one threshold shared by the given layers (default all: the model-level figure; ``[l]``: layer l).
        NaN when the trace is shorter than one window."""
        self._check_segment(segment)
        chosen = self._layers(layers)
        ids = self.trace.expert_ids if layers is None else self.trace.expert_ids[:, chosen, :]
        return best_f1(window_count_histogram(ids, self.num_experts, segment), segment)

    def sch(self, segment: int = 16, cache_size: int | None = None, layers: list[int] | None = None) -> float:
        """Segment cache best hit rate in [0, 1]: an online cache of ``cache_size`` experts per layer
        (default 2 × top_k) that sees ``segment`` tokens ahead. Over several layers (default all: the
        model-level figure) one cache of ``cache_size × layers`` serves them all; ``[l]``: layer l alone."""
        self._check_segment(segment)
        size = 2 * self.trace.top_k if cache_size is None else cache_size
        if size < 1:
            raise InputError(f"cache size must be at least 1 expert per layer, got {size}", field="cache_size",
                             fix="give a positive --cache-size or leave it out for 2 × top-k")
        chosen = self._layers(layers)
        if not chosen or self.trace.num_tokens == 0:
            return float("nan")
        e = self.num_experts
        ids = self.trace.expert_ids[:, chosen, :].astype(np.int64) + (np.arange(len(chosen)) * e)[None, :, None]
        requests = ids.reshape(ids.shape[0], -1)
        return lookahead_cache_hits(requests, e * len(chosen), size * len(chosen), segment) / requests.size

    def consistency(self, segment: int = 16, cache_size: int | None = None,
                    layers: list[int] | None = None) -> tuple[float, float]:
        """(:meth:`srp`, :meth:`sch`) for the same windows and layers."""
        return self.srp(segment, layers), self.sch(segment, cache_size, layers)

    def head_for_sch(self) -> "TraceStats":
        """Statistics of the first :data:`SUMMARY_SCH_TOKENS` tokens (self when the trace is no longer)."""
        if self.trace.num_tokens <= SUMMARY_SCH_TOKENS:
            return self
        return TraceStats.of(self.trace.slice(0, SUMMARY_SCH_TOKENS))

    def summary(self) -> dict[str, float]:
        """Headline numbers for tables."""
        head = self.head_for_sch()
        beside = Beside(lambda: (head.sch(16), self.affinity_strength()))  # the Python-bound SCH on another core
        imb, srp = self.imbalance(), self.srp(16)
        sch, aff = beside.result()
        return {
            "tokens": self.trace.num_tokens, "moe_layers": self.trace.num_layers, "experts": self.num_experts,
            "top_k": self.trace.top_k,
            "max_over_mean_load_mean": float(imb.mean()), "max_over_mean_load_worst": float(imb.max()),
            "top1_affinity_mean": float(aff.mean()) if aff.size else float("nan"),
            "srp_16": srp, "sch_16_2k": sch,
        }


def _chunk(per_token: int) -> int:
    """Tokens per chunk when each token contributes ``per_token`` indices: about :data:`CHUNK_INDICES` in all."""
    return max(1, CHUNK_INDICES // max(per_token, 1))
