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
in at most ``topk_group`` groups (the first groups its choices open, in choice order). A token
never picks the same expert twice in a layer: a choice that repeats an earlier one, or falls
outside the token's groups, is redrawn from popularity within the groups it may still use.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from moeplan.cores import cores
from moeplan.errors import InputError, check_memory
from moeplan.model import ModelSpec
from moeplan.trace import RoutingTrace

CONTEXTS = 32
RESOLUTION_BITS = 13
RESOLUTION = 1 << RESOLUTION_BITS  # inverse-CDF buckets per row: probabilities kept to 1/8192
CHUNK = 1 << 17  # tokens drawn together, each chunk from its own random stream (bounds the scratch)
REDRAWS = 16  # popularity redraws of a rejected choice, then as many uniform ones, then the exact fallback
REDRAW_BATCH = 2  # redraws drawn at once for every rejected choice (the first valid one is kept)
FULL_REDRAW_SHARE = 0.125  # above this share of rejected choices, every token draws a redraw
FALLBACK_CELLS = 1 << 22  # tokens × experts of the uniform fallback's scratch, at most
GATE_POOL = 1 << 16  # gate rows drawn per trace, indexed by a uint16
MAX_GROUPS = 64  # group bookkeeping is one uint64 bit mask per token
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
    """Peak bytes :func:`synthesize` needs: the trace (int16 ids + float16 gates), per-token state
    (context), each working chunk's scratch (previous first choices, group bookkeeping, the draws), and
    every layer's tables (the float64 [1 + contexts + experts, experts] probability rows with the Gumbel
    keys and cumulative sums built from them while one layer's are drawn, the inverse CDFs kept for every
    layer) and the gate pool."""
    t, nl, k, e = traffic.tokens, model.num_moe_layers, model.top_k, model.num_experts
    trace = t * nl * k * 4
    per_token = t * 4
    n = min(t, CHUNK)
    chunk = n * k * (2 + 2 + 4 + 8 + 2 + 2) + n * (8 + 8 + 4 + 4 + 2) + n * 8 * 8 + min(n * e, FALLBACK_CELLS) * 13
    rows = 1 + CONTEXTS + e
    confined = math.comb(model.n_group, model.topk_group) if 1 < model.n_group <= 8 else 0
    id_bytes = 1 if e <= 256 else 2
    building = rows * (e * 8 * 5 + RESOLUTION * 2 * 3)
    kept = nl * (rows + 1 + confined) * RESOLUTION * id_bytes
    return trace + per_token + cores() * (chunk + building) + kept + GATE_POOL * k * 14


def synthesize(model: ModelSpec, traffic: SyntheticTraffic) -> RoutingTrace:
    """Generate a RoutingTrace for ``model`` with the given knobs (deterministic for a seed, whatever
    the number of cores).

    Each layer's tables come from the layer's own random stream; each chunk of ``CHUNK`` tokens then
    runs through every layer from the chunk's own stream, chunks spread over :func:`moeplan.cores.cores`
    threads (numpy releases the GIL in the array work). Per layer, each of a token's ``top_k`` choices
    (in order) draws one candidate from its source (a quantised inverse-CDF lookup, vectorised over the
    chunk). A candidate that repeats one of the token's earlier choices, or, under grouped routing, lies
    outside the token's first ``topk_group`` groups, is redrawn from popularity (after ``REDRAWS`` failed
    redraws, uniformly among the experts still allowed: uniform draws kept when allowed, then one exact
    draw from the allowed set); only the tokens that need it are redrawn. Gate weights: the softmax of
    ``top_k`` sorted standard normals, each (token, layer) taking a row of a pool of ``GATE_POOL`` such
    rows drawn for the trace.
    """
    traffic.validate()
    if model.n_group > MAX_GROUPS:
        raise InputError(f"synthesis handles at most {MAX_GROUPS} routing groups, the model has {model.n_group}",
                         field="n_group", fix="synthesise for a model with fewer groups, or import a trace")
    check_memory(synthesis_bytes(model, traffic), f"synthesising {traffic.tokens:,} tokens for {model.name}",
                 "synthesise fewer tokens (--tokens), or on a host with more memory")
    t, nl, k, e = traffic.tokens, model.num_moe_layers, model.top_k, model.num_experts
    root = np.random.SeedSequence(traffic.seed)
    trace_seed, layer_seeds, chunk_seeds = root.spawn(1)[0], root.spawn(nl), root.spawn(-(-t // CHUNK))
    rng = np.random.default_rng(trace_seed)
    context_base = ((1 + _context_ids(t, traffic.segment, rng)) * RESOLUTION).astype(np.int32)
    row = np.dtype((np.void, 2 * k))  # one token-layer's k int16 ids or float16 gates as one item: one move
    pool = _gate_pool(k, rng).view(row).reshape(GATE_POOL)
    sampler = _ChoiceSampler(model, traffic, np.uint8 if e <= 256 else np.uint16)
    ids = np.empty((t, nl, k), dtype=np.int16)
    id_rows = ids.view(row).reshape(t, nl)
    gates = np.empty((t, nl, k), dtype=np.float16)
    gate_rows = gates.view(row).reshape(t * nl)

    def run_chunk(index: int) -> None:
        """Every layer's choices and the gates of chunk ``index``'s tokens, from the chunk's stream."""
        lo, hi = index * CHUNK, min(t, (index + 1) * CHUNK)
        chunk_rng = np.random.default_rng(chunk_seeds[index])
        prev = np.zeros(hi - lo, dtype=sampler.id_dtype)  # every token's first choice at the previous layer
        for layer, tables in enumerate(layer_tables):
            chosen = sampler.draw(tables, chunk_rng, context_base[lo:hi], prev)
            # transposed inside the cache, then one strided move per token
            id_rows[lo:hi, layer] = chosen.T.astype(np.int16, order="C").view(row).reshape(hi - lo)
            prev = chosen[0]
        np.take(pool, _uniform_u16(chunk_rng, (hi - lo) * nl), out=gate_rows[lo * nl:hi * nl])

    with ThreadPoolExecutor(cores()) as workers:
        layer_tables = list(workers.map(
            lambda layer: sampler.layer_tables(layer, np.random.default_rng(layer_seeds[layer])), range(nl)))
        list(workers.map(run_chunk, range(len(chunk_seeds))))
    # Valid by construction (ids in range, distinct, inside the allowed groups; gates finite), so the
    # trace is not re-checked with RoutingTrace.validate's sort of every token's choices.
    return RoutingTrace(ids, e, model.name, gates,
                        {"source": "synthetic", "generator": "moeplan.synth", **asdict(traffic)})


def _uniform_u16(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` independent uniform uint16 values (four per raw 64-bit draw of the generator)."""
    return rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n]


def _gate_pool(k: int, rng: np.random.Generator) -> np.ndarray:
    """``GATE_POOL`` rows [GATE_POOL, k] float16: softmax of k standard normals, sorted decreasing."""
    g = -np.sort(-rng.standard_normal((GATE_POOL, k)), axis=1)
    g = np.exp(g - g[:, :1])
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float16)


@dataclass(frozen=True)
class _LayerTables:
    """One layer's sampling tables. inv: the inverse CDFs (``RESOLUTION`` ids each, flattened) of
    popularity, the contexts' and the experts' successors' favoured rows, in that order; redraw_inv:
    popularity's, then its restriction to each confined group set; thresholds: the uint16 source draw
    below the first picks popularity, below the second the context, else the successor."""

    inv: np.ndarray
    redraw_inv: np.ndarray
    thresholds: tuple[int, int]


class _ChoiceSampler:
    """Building a layer's tables, and the per-chunk draw of every token's ``top_k`` distinct choices."""

    def __init__(self, model: ModelSpec, traffic: SyntheticTraffic, id_dtype: type) -> None:
        self.model, self.traffic, self.id_dtype = model, traffic, id_dtype
        e = model.num_experts
        self.grouped = model.n_group > 1
        group_of = np.arange(e) // model.experts_per_group
        self.mask_dtype = next(d for d in (np.uint8, np.uint16, np.uint32, np.uint64)
                               if np.iinfo(d).bits >= model.n_group)
        self.group_bit = np.left_shift(1, group_of.astype(np.uint64)).astype(self.mask_dtype)
        self.all_groups = self.mask_dtype(np.iinfo(self.mask_dtype).max)
        # Redraws come from popularity inside the token's allowed groups: one inverse CDF per group
        # set a token can be confined to (every ``topk_group``-subset, plus all groups), looked up
        # by the token's bit mask, where the masks fit a uint8; with more groups, from popularity
        # over all experts, redrawn when outside (the same distribution, more redraws).
        self.confined_sets = ([m for m in range(1 << model.n_group) if bin(m).count("1") == model.topk_group]
                              if self.grouped and model.n_group <= 8 else [])
        self.set_row = np.zeros(256 if self.confined_sets else 1, dtype=np.int32)
        for row, m in enumerate(self.confined_sets, start=1):
            self.set_row[m] = row * RESOLUTION
        self.set_members = np.array([(m >> group_of) & 1 for m in self.confined_sets], dtype=bool).reshape(-1, e)

    def layer_tables(self, layer: int, rng: np.random.Generator) -> _LayerTables:
        """Draw the layer's popularity, context and successor rows, and build their inverse CDFs."""
        m, tr = self.model, self.traffic
        k, e = m.top_k, m.num_experts
        pop = zipf_popularity(e, tr.zipf, rng, tr.shuffle)
        table = np.vstack([pop[None, :], _favoured_rows(CONTEXTS, 2 * k, pop, rng), _favoured_rows(e, k, pop, rng)])
        confined = np.vstack([pop[None, :], np.where(self.set_members, pop[None, :], 0.0)])
        affinity = tr.affinity if layer else 0.0
        popularity = 1.0 - tr.locality - affinity
        return _LayerTables(_inverse_cdf_tables(table, RESOLUTION).astype(self.id_dtype).ravel(),
                            _inverse_cdf_tables(confined, RESOLUTION).astype(self.id_dtype).ravel(),
                            (int(round(popularity * 65536)), int(round((popularity + tr.locality) * 65536))))

    def draw(self, tables: _LayerTables, rng: np.random.Generator, context_base: np.ndarray,
             prev: np.ndarray) -> np.ndarray:
        """The chosen experts [top_k, n] of ``n`` tokens (column order = choice order) at the layer of
        ``tables``, given each token's context row offset (int32) and first choice at the previous layer."""
        k, n = self.model.top_k, context_base.size
        bits = _uniform_u16(rng, 2 * k * n).reshape(2, k, n)
        pop_end, ctx_end = tables.thresholds
        succ_minus_ctx = (1 + CONTEXTS + prev.astype(np.int32)) * RESOLUTION - context_base
        chosen = np.empty((k, n), dtype=self.id_dtype)
        mask = np.zeros(n, dtype=self.mask_dtype)  # bit g set: the token opened group g
        opened = np.zeros(n, dtype=np.uint8)
        allowed = np.full(n, self.all_groups, dtype=self.mask_dtype)  # groups the next choice may lie in
        for s in range(k):
            source, bucket = bits[0, s], bits[1, s] >> (16 - RESOLUTION_BITS)
            x = np.take(tables.inv, (source >= pop_end) * context_base + (source >= ctx_end) * succ_minus_ctx + bucket)
            bad = self._invalid(x, chosen[:s], allowed)
            todo = np.flatnonzero(bad)
            if todo.size > n * FULL_REDRAW_SHARE:  # cheaper to redraw every token and keep what is needed
                y = self._redraw(tables, rng, allowed[None, :])[0]
                x = np.where(bad, y, x)
                todo = np.flatnonzero(bad & self._invalid(y, chosen[:s], self._unless_confined(allowed)))
            for attempt in range(2 * REDRAWS // REDRAW_BATCH + 1):
                if not todo.size:
                    break
                earlier, sub_allowed = chosen[:s, todo], allowed[todo]
                if attempt < REDRAWS // REDRAW_BATCH:
                    y = self._redraw(tables, rng, np.broadcast_to(sub_allowed, (REDRAW_BATCH, todo.size)))
                    ok = ~self._invalid(y, earlier, self._unless_confined(sub_allowed))
                elif attempt < 2 * REDRAWS // REDRAW_BATCH:  # uniform draws, kept when allowed
                    y = rng.integers(0, self.model.num_experts, size=(REDRAW_BATCH, todo.size), dtype=self.id_dtype)
                    ok = ~self._invalid(y, earlier, sub_allowed)
                else:
                    y = self._uniform_allowed(rng, earlier, sub_allowed)[None, :]
                    ok = np.ones(y.shape, dtype=bool)
                pick, found = y[-1], ok[-1]
                for row, row_ok in zip(y[-2::-1], ok[-2::-1]):  # the first valid redraw wins
                    pick = np.where(row_ok, row, pick)
                    found = found | row_ok
                x[todo[found]] = pick[found]
                todo = todo[~found]
            chosen[s] = x
            if self.grouped and s < k - 1:
                bit = self._group_bits(x)
                opened += (mask & bit) == 0
                mask |= bit
                if s + 1 >= self.model.topk_group:  # before that no token has opened all its groups
                    allowed = np.where(opened >= self.model.topk_group, mask, self.all_groups)
        return chosen

    def _group_bits(self, x: np.ndarray) -> np.ndarray:
        """The group bit (mask dtype) of each expert id in ``x``: :attr:`group_bit` computed, which is
        cheaper than looking it up."""
        return np.left_shift(self.mask_dtype(1), (x // self.model.experts_per_group).astype(self.mask_dtype))

    def _redraw(self, tables: _LayerTables, rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
        """One popularity draw per entry of ``allowed`` [..., n] (group bit masks), inside those
        groups where :attr:`confined_sets` tabulates them."""
        bucket = _uniform_u16(rng, allowed.size).reshape(allowed.shape) >> (16 - RESOLUTION_BITS)
        return np.take(tables.redraw_inv, np.take(self.set_row, allowed) + bucket if self.confined_sets else bucket)

    def _unless_confined(self, allowed: np.ndarray) -> np.ndarray | None:
        """``allowed`` where redraws can still fall outside the groups, None where they cannot."""
        return None if self.confined_sets else allowed

    def _invalid(self, x: np.ndarray, earlier: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        """Whether each candidate ``x`` [..., n] repeats one of ``earlier`` [s, n] or lies outside
        the groups ``allowed`` [n] (bit masks; None: no group check) to the token."""
        bad = ((self._group_bits(x) & allowed) == 0 if self.grouped and allowed is not None
               else np.zeros(x.shape, dtype=bool))
        for row in earlier:
            bad |= row == x
        return bad

    def _uniform_allowed(self, rng: np.random.Generator, earlier: np.ndarray, allowed_groups: np.ndarray) -> np.ndarray:
        """One expert per token, uniform among those it may still choose (not in ``earlier``
        [s, n], inside its ``allowed_groups`` [n]); in blocks of ``FALLBACK_CELLS`` cells."""
        e, n = self.model.num_experts, allowed_groups.size
        out = np.empty(n, dtype=self.id_dtype)
        block = max(1, FALLBACK_CELLS // e)
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            allowed = np.ones((hi - lo, e), dtype=bool)
            rows = np.arange(hi - lo)
            for row in earlier[:, lo:hi]:
                allowed[rows, row] = False
            if self.grouped:
                allowed &= (allowed_groups[lo:hi, None] & self.group_bit[None, :]) != 0
            keys = rng.random((hi - lo, e), dtype=np.float32) + allowed
            out[lo:hi] = np.argmax(keys, axis=1)
        return out
