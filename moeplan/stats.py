"""TraceStats: what a RoutingTrace says about traffic, computed vectorised.

* ``load[layer, expert]``: routed token-choices per expert (tokens × top_k per layer in total).
* ``coactivation(layer)``: ``C[i, j]`` = tokens that chose both i and j at that layer.
* ``transitions(layer)``: ``P[i, j]`` = P(expert j at layer+1 | expert i at layer), over all
  top-k × top-k pairs of each token (rows with no traffic are zero).
* Local routing consistency from Liang et al., "Not All Models Suit Expert Offloading"
  (arXiv 2505.16056; their code: github.com/ljcleo/moe-lrc): **SRP** (segment routing best
  performance: the best F1 with which one fixed expert set per segment of ``m`` tokens predicts
  the segment's routing, the set chosen by a count threshold shared by all segments) and
  **SCH** (segment cache best hit rate: the hit rate of an oracle cache of ``C`` experts that
  holds each segment's ``C`` most used experts). Segments here are non-overlapping windows; the
  paper's code slides them one token at a time, which weighs the same windows alike.

All counts come from ``np.bincount`` over flattened indices, chunked so that 1M tokens × 58
layers × top-8 stays within a few hundred MB.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moeplan.trace import RoutingTrace

CHUNK_TOKENS = 1 << 17


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
        for start in range(0, ids.shape[0], CHUNK_TOKENS):
            # one pass: int16 + intp offsets straight into the intp indices bincount wants
            flat = np.add(ids[start:start + CHUNK_TOKENS], offsets, dtype=np.intp)
            out += np.bincount(flat.ravel(), minlength=nl * e)
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
        for start in range(0, ids.shape[0], CHUNK_TOKENS):
            chunk = ids[start:start + CHUNK_TOKENS].astype(np.intp)
            # every ordered pair (i at column a, j at column b): C[i, j] + C[j, i] is what is asked
            out += np.bincount((chunk[:, a] * e + chunk[:, b]).ravel(), minlength=e * e)
        m = out.reshape(e, e)
        return m + m.T

    def transition_counts(self, layer: int) -> np.ndarray:
        """[experts, experts] int64: (i at ``layer``, j at ``layer+1``) pairs over all top-k × top-k."""
        if not 0 <= layer < self.trace.num_layers - 1:
            raise IndexError(f"no layer after {layer}")
        ids = self.trace.expert_ids
        e = self.num_experts
        out = np.zeros(e * e, dtype=np.int64)
        for start in range(0, ids.shape[0], CHUNK_TOKENS):
            src = ids[start:start + CHUNK_TOKENS, layer, :].astype(np.intp) * e
            dst = ids[start:start + CHUNK_TOKENS, layer + 1, :].astype(np.intp)
            out += np.bincount((src[:, :, None] + dst[:, None, :]).ravel(), minlength=e * e)
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
        top1 = np.ascontiguousarray(self.trace.expert_ids[:, :, 0].T).astype(np.intp)  # [layers, tokens]
        e = self.num_experts
        out = np.zeros(max(self.trace.num_layers - 1, 0))
        for layer in range(self.trace.num_layers - 1):
            c = np.bincount(top1[layer] * e + top1[layer + 1], minlength=e * e).reshape(e, e)
            out[layer] = c.max(axis=1).sum() / max(c.sum(), 1)
        return out

    def _segment_counts(self, layer: int, segment: int) -> np.ndarray:
        """[segments, experts]: how many tokens of each full segment chose each expert."""
        ids = self.trace.expert_ids[:, layer, :]
        n_seg = ids.shape[0] // segment
        e = self.num_experts
        seg_base = (np.arange(n_seg, dtype=np.int64) * e)[:, None, None]
        flat = (seg_base + ids[: n_seg * segment].reshape(n_seg, segment * ids.shape[1])[:, None, :]).ravel()
        return np.bincount(flat, minlength=n_seg * e).reshape(n_seg, e).astype(np.int32)

    def consistency(self, segment: int = 16, cache_size: int | None = None,
                    layers: list[int] | None = None) -> tuple[float, float]:
        """(SRP, SCH) in one pass over the trace: segment routing best performance (best F1 of one
        fixed expert set per segment, chosen by a count threshold shared by all segments) and
        segment cache best hit rate for ``cache_size`` experts (default 2 × top_k)."""
        k = self.trace.top_k
        size = cache_size or 2 * k
        hist = np.zeros(segment + 1, dtype=np.int64)
        hits = total = 0
        for layer in layers if layers is not None else range(self.trace.num_layers):
            counts = self._segment_counts(layer, segment)
            if counts.size == 0:
                continue
            hist += np.bincount(counts.ravel(), minlength=segment + 1)
            size_l = min(size, counts.shape[1])
            hits += int(np.partition(counts, counts.shape[1] - size_l, axis=1)[:, counts.shape[1] - size_l:].sum())
            total += int(counts.sum())
        if total == 0:
            return float("nan"), float("nan")
        c = np.arange(segment + 1)
        matches = np.cumsum((c * hist)[::-1])[::-1]  # Σ counts of experts with count ≥ j
        chosen = np.cumsum(hist[::-1])[::-1]        # experts with count ≥ j
        f1 = 2 * matches[1:] / (chosen[1:] * segment + matches[0])
        return float(f1.max()), hits / total

    def srp(self, segment: int = 16, layers: list[int] | None = None) -> float:
        """Segment routing best performance (F1 in [0, 1]; 1 = one fixed set fits every segment)."""
        return self.consistency(segment, None, layers)[0]

    def sch(self, segment: int = 16, cache_size: int | None = None, layers: list[int] | None = None) -> float:
        """Segment cache best hit rate for a cache of ``cache_size`` experts (default 2 × top_k)."""
        return self.consistency(segment, cache_size, layers)[1]

    def summary(self) -> dict[str, float]:
        """Headline numbers for tables."""
        imb = self.imbalance()
        aff = self.affinity_strength()
        srp, sch = self.consistency(16)
        return {
            "tokens": self.trace.num_tokens, "moe_layers": self.trace.num_layers, "experts": self.num_experts,
            "top_k": self.trace.top_k,
            "max_over_mean_load_mean": float(imb.mean()), "max_over_mean_load_worst": float(imb.max()),
            "top1_affinity_mean": float(aff.mean()) if aff.size else float("nan"),
            "srp_16": srp, "sch_16_2k": sch,
        }
