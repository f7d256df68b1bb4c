"""Synthetic routing traffic with knobs a user understands.

Each of a token's top-k expert choices at a MoE layer comes from one of three sources:

* **context** (probability ``locality``): the experts favoured by the token's current context.
  Contexts persist over runs of about ``segment`` consecutive tokens, so neighbouring tokens
  share experts (temporal locality) and a context's experts are chosen together
  (co-activation).
* **affinity** (probability ``affinity``, layers after the first): the favoured successors of the
  expert the token's first choice went to at the previous layer, as ExFlow observed in real
  models (inter-layer affinity).
* **popularity** (the rest): a Zipf law with exponent ``zipf`` over a random order of the
  layer's experts (0 = uniform).

Favoured sets are drawn in proportion to popularity, so the overall load stays Zipf-shaped.
Grouped routing (DeepSeek-V3's ``n_group``/``topk_group``) is respected: a token's experts lie
in at most ``topk_group`` groups. A token never picks the same expert twice in a layer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from moeplan.errors import InputError, check_memory
from moeplan.model import ModelSpec
from moeplan.trace import RoutingTrace

CONTEXTS = 32
OVERSAMPLE = 2
RESOLUTION = 8192
MAX_FILL_ROUNDS = 10_000
MAX_ZIPF = 20.0  # rank^-20 stays above float64's smallest normal for 10^15 experts


@dataclass(frozen=True)
class SyntheticTraffic:
    """Knobs of the generator (see the module docstring). tokens: trace length; zipf: popularity
    skew exponent (≥ 0); affinity, locality: probabilities (sum ≤ 1); segment: mean run length of
    a context, in tokens; seed: random seed; shuffle: popularity ranks fall on a random order of
    expert ids in each layer (False: expert 0 is the hottest, then 1, … — popularity correlated
    with ids, the worst case for contiguous placement)."""

    tokens: int = 100_000
    zipf: float = 0.6
    affinity: float = 0.4
    locality: float = 0.3
    segment: int = 64
    seed: int = 0
    shuffle: bool = True

    def validate(self) -> "SyntheticTraffic":
        if self.tokens < 1:
            raise InputError(f"must be ≥ 1, got {self.tokens}", field="tokens")
        if not 0 <= self.zipf <= MAX_ZIPF:
            raise InputError(f"must lie in [0, {MAX_ZIPF:g}], got {self.zipf}", field="zipf",
                             fix="typical routers lie between 0.3 and 1.5")
        for name in ("affinity", "locality"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise InputError(f"must lie in [0, 1], got {v}", field=name)
        if self.affinity + self.locality > 1:
            raise InputError(f"affinity + locality must be ≤ 1, got {self.affinity + self.locality}",
                             field="affinity", fix="lower one of them")
        if self.seed < 0:
            raise InputError(f"must be ≥ 0, got {self.seed}", field="seed")
        if self.segment < 1:
            raise InputError(f"must be ≥ 1, got {self.segment}", field="segment")
        return self


def zipf_popularity(num_experts: int, exponent: float, rng: np.random.Generator, shuffle: bool = True) -> np.ndarray:
    """Probabilities ∝ rank^-exponent, ranks over a random permutation of the experts (or in id order)."""
    weights = np.arange(1, num_experts + 1, dtype=np.float64) ** -exponent
    p = np.empty(num_experts)
    order = rng.permutation(num_experts) if shuffle else np.arange(num_experts)
    p[order] = weights / weights.sum()
    return p


def _favoured_rows(rows: int, size: int, popularity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``rows`` distributions, each over ``size`` experts drawn without replacement ∝ popularity
    (Gumbel top-k), with Dirichlet(2) weights among them."""
    e = popularity.size
    size = min(size, e)
    keys = np.log(popularity)[None, :] + rng.gumbel(size=(rows, e))
    chosen = np.argpartition(-keys, size - 1, axis=1)[:, :size]
    weights = rng.gamma(2.0, size=(rows, size))
    table = np.zeros((rows, e))
    np.put_along_axis(table, chosen, weights / weights.sum(axis=1, keepdims=True), axis=1)
    return table


def _context_ids(tokens: int, segment: int, rng: np.random.Generator) -> np.ndarray:
    """The context of every token: runs of geometric length with mean ``segment``."""
    starts = np.flatnonzero(rng.random(tokens) < 1.0 / segment)
    run_ids = np.zeros(tokens, dtype=np.int64)
    run_ids[starts] = 1
    run_ids = np.cumsum(run_ids)
    contexts = rng.integers(0, CONTEXTS, size=int(run_ids[-1]) + 1)
    return contexts[run_ids]


def _inverse_cdf_tables(table: np.ndarray, resolution: int) -> np.ndarray:
    """Quantised inverse CDFs: ``out[row, int(u * resolution)]`` samples row's distribution
    (expert i owns round(resolution * CDF) buckets, so probabilities are kept to 1/resolution)."""
    rows, e = table.shape
    cdf = np.cumsum(table, axis=1)
    edges = np.rint(cdf / cdf[:, -1:] * resolution).astype(np.int64)
    counts = np.diff(edges, axis=1, prepend=0)
    experts = np.broadcast_to(np.arange(e, dtype=np.int16), (rows, e))
    return np.repeat(experts.ravel(), counts.ravel()).reshape(rows, resolution)


def synthesis_bytes(model: ModelSpec, traffic: SyntheticTraffic) -> int:
    """Peak bytes :func:`synthesize` needs: the trace (int16 ids + float16 gates) plus one layer's
    scratch (candidate arrays per token, and the [experts, experts] successor tables)."""
    t, nl, k, e = traffic.tokens, model.num_moe_layers, model.top_k, model.num_experts
    trace = t * nl * k * 4
    per_token = t * OVERSAMPLE * k * (8 + 8 + 2 + 8) + t * k * 8 + t * 8 * 3
    tables = (1 + CONTEXTS + e) * e * 8 * 3 + (1 + CONTEXTS + e) * RESOLUTION * 2
    return trace + per_token + tables


def synthesize(model: ModelSpec, traffic: SyntheticTraffic) -> RoutingTrace:
    """Generate a RoutingTrace for ``model`` with the given knobs (deterministic for a seed).

    Per layer, every token draws ``OVERSAMPLE × top_k`` candidates (the first ``top_k`` from the
    mixture, the rest from popularity) and keeps the first ``top_k`` that are new to it and, for
    grouped routing, inside its first ``topk_group`` groups. Vectorised over tokens.
    """
    traffic.validate()
    check_memory(synthesis_bytes(model, traffic), f"synthesising {traffic.tokens:,} tokens for {model.name}",
                 "synthesise fewer tokens (--tokens), or on a host with more memory")
    rng = np.random.default_rng(traffic.seed)
    t, nl, k, e = traffic.tokens, model.num_moe_layers, model.top_k, model.num_experts
    group_size = model.experts_per_group
    ids = np.empty((t, nl, k), dtype=np.int16)
    contexts = _context_ids(t, traffic.segment, rng)
    ctx_row0, succ_row0 = 1, 1 + CONTEXTS  # row 0 = popularity, then contexts, then successors
    probs = np.array([1.0 - traffic.locality - traffic.affinity, traffic.locality, traffic.affinity])
    for layer in range(nl):
        pop = zipf_popularity(e, traffic.zipf, rng, traffic.shuffle)
        table = np.vstack([pop[None, :], _favoured_rows(CONTEXTS, 2 * k, pop, rng), _favoured_rows(e, k, pop, rng)])
        inv = _inverse_cdf_tables(table, RESOLUTION)
        p = probs if layer else np.array([probs[0] + probs[2], probs[1], 0.0])
        comp = rng.choice(3, size=(t, k), p=p)
        row = np.zeros((t, OVERSAMPLE * k), dtype=np.int64)
        row[:, :k] = np.where(comp == 1, ctx_row0 + contexts[:, None], 0)
        if layer:
            prev = ids[:, layer - 1, 0].astype(np.int64)
            row[:, :k] = np.where(comp == 2, succ_row0 + prev[:, None], row[:, :k])
        bucket = (rng.random(row.shape) * RESOLUTION).astype(np.int64)
        cand = inv[row, bucket]
        chosen, complete = _first_k_valid(cand, k, group_size, model.n_group, model.topk_group)
        todo = np.flatnonzero(~complete)
        cand = cand[todo]
        while todo.size:  # extend unfinished rows with popularity draws, then uniform ones
            extra = (inv[0][(rng.random((todo.size, OVERSAMPLE * k)) * RESOLUTION).astype(np.int64)]
                     if cand.shape[1] < 8 * k else rng.integers(0, e, size=(todo.size, OVERSAMPLE * k)))
            cand = np.concatenate([cand, extra.astype(cand.dtype)], axis=1)
            more, done = _first_k_valid(cand, k, group_size, model.n_group, model.topk_group)
            chosen[todo[done]] = more[done]
            todo, cand = todo[~done], cand[~done]
        ids[:, layer, :] = chosen
    gates = np.empty((t, nl, k), dtype=np.float16)
    for layer in range(nl):  # layer by layer: float32 scratch of one layer, never of the whole trace
        g = -np.sort(-rng.standard_normal((t, k), dtype=np.float32), axis=1)
        g = np.exp(g - g[:, :1])
        gates[:, layer, :] = g / g.sum(axis=1, keepdims=True)
    return RoutingTrace(ids, e, model.name, gates,
                        {"source": "synthetic", "generator": "moeplan.synth", **asdict(traffic)}).validate()


def _first_k_valid(cand: np.ndarray, k: int, group_size: int, n_group: int,
                   topk_group: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``cand`` [rows, M], the first ``k`` candidates that are not repeats and lie in
    the row's first ``topk_group`` distinct groups (in candidate order). Returns the chosen ids
    [rows, k] and whether each row found ``k``.

    Works column against column on the transposed [M, rows] array (M is small: 2-8 × top_k), so
    every comparison runs over contiguous memory and nothing of size rows × num_experts is built.
    """
    rows, m = cand.shape
    cols = np.ascontiguousarray(cand.T)
    valid = np.ones((m, rows), dtype=bool)
    for j in range(1, m):
        for i in range(j):
            valid[j] &= cols[i] != cols[j]
    if n_group > 1:
        groups = cols // group_size
        new_group = valid.copy()  # the first valid candidate of its group in this row
        for j in range(1, m):
            for i in range(j):
                new_group[j] &= ~((groups[i] == groups[j]) & valid[i])
        opens_allowed = new_group & (np.cumsum(new_group, axis=0) <= topk_group)
        inside = opens_allowed.copy()
        for j in range(1, m):
            for i in range(j):
                inside[j] |= (groups[i] == groups[j]) & opens_allowed[i]
        valid &= inside
    position = np.cumsum(valid, axis=0, dtype=np.int16)
    keep = valid & (position <= k)
    complete = position[-1] >= k
    chosen = np.zeros((rows, k), dtype=cand.dtype)
    c, r = np.nonzero(keep)
    chosen[r, position[c, r] - 1] = cols[c, r]
    return chosen, complete
