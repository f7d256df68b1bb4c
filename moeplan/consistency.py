"""Local routing consistency (Liang et al., "Not All Models Suit Expert Offloading", arXiv 2505.16056),
as the paper's current code defines it: github.com/ljcleo/moe-lrc @ 7b3ca46.

* **SRP** (segment routing best performance), ``src/30_srp_calc.py::seg_stat`` + ``src/31_srp_refine.py::refine``:
  every window of ``m`` consecutive tokens (sliding by one token) predicts that each expert whose count in the
  window reaches a threshold ``j`` serves all ``m`` tokens of the window. Matches = Σ counts of the predicted
  (window, expert) pairs, predictions = predicted pairs × ``m``, activations = all token-choices; F1 =
  2·matches / (predictions + activations), maximised over one threshold ``j ∈ 0..m`` shared by every window,
  expert and pooled layer.
* **SCH** (segment cache best hit rate), ``src/41_sch_calc.py::calc_fsf`` + ``src/42_sch_refine.py``: the hit rate
  of an online cache of ``C`` experts that sees ``m`` tokens ahead. Hits are judged against the cache as it
  stands before each token; a token's choices are then brought in one by one, a miss evicting the cached expert
  with the fewest uses in the next ``m`` tokens (the current one included), ties going to the oldest last use.
  A first request while fewer than ``C`` distinct experts were seen counts as a hit. The model-level figure
  runs one cache of ``C × layers`` over every layer's choices (expert ids offset by layer, layer-major within
  a token), as ``41_sch_calc.py::main`` pools them.

The paper's traces are many 512-token sequences averaged; a RoutingTrace is one stream, so here there is one
sequence and windows run over the whole of it.
"""
from __future__ import annotations

from heapq import heapify, heappop, heappush

import numpy as np


HISTORY_WORD = 48
"""Token positions per occupancy word in :func:`window_count_histogram`: sums of distinct powers of two below
2**48 are exact in float64 (what ``np.bincount`` adds), and a word shifted left by 16 history bits still fits
63 bits."""
MAX_HISTORY_SEGMENT = 17
"""Longest window read through the per-choice history (``segment - 1`` bits index a table of ``2**16`` rows);
longer windows take the sorting path."""
HISTORY_CHUNK = 256
"""Tokens per chunk of the history path: its scratch (a few arrays of tokens × layers × top_k int64 and one
occupancy table) stays within the CPU's L2/L3 cache."""


def window_count_histogram(ids: np.ndarray, num_experts: int, segment: int) -> np.ndarray:
    """[segment + 1] int64: how many (window, layer, expert) triples have each count, over every window of
    ``segment`` consecutive tokens (sliding by one) and every layer of ``ids`` (int [tokens, layers, top_k],
    distinct experts per token and layer).

    Each (window, expert) pair with count ≥ c has a c-th use, and a use at token t is the c-th of the windows
    starting in ``(t - min(d_c, segment), t - d_(c-1)]``, ``d_j`` the distance back to the expert's j-th earlier
    use (``d_0 = 0``). So the histogram only needs, per choice, which of the previous ``segment - 1`` tokens
    chose the same expert: a ``segment - 1``-bit history, tallied by ``np.bincount`` and weighed by a table
    (:func:`_history_windows`). Windows hanging over either end of the trace are counted this way too and then
    taken off, counted directly. Segments over :data:`MAX_HISTORY_SEGMENT` sort each layer's uses instead.
    """
    tokens = ids.shape[0]
    windows = tokens - segment + 1
    hist = np.zeros(segment + 1, dtype=np.int64)
    if windows <= 0:
        return hist
    if segment > MAX_HISTORY_SEGMENT:
        for layer in range(ids.shape[1]):
            hist += _sorted_window_counts(ids[:, layer, :], num_experts, segment)
        return hist
    at_least = _history_counts(ids, num_experts, segment) @ _history_windows(segment)
    groups = ids.shape[1] * num_experts
    offsets = (np.arange(ids.shape[1], dtype=np.intp) * num_experts)[None, :, None]
    for start in [*range(1 - segment, 0), *range(windows, tokens)]:
        per_group = np.bincount((ids[max(start, 0):start + segment] + offsets).ravel(), minlength=groups)
        tally = np.bincount(per_group, minlength=segment + 2)[:segment + 2]
        at_least -= np.cumsum(tally[::-1])[::-1]
    hist[1:] = at_least[1:segment + 1] - at_least[2:]
    hist[0] = windows * groups - at_least[1]
    return hist


def _history_counts(ids: np.ndarray, num_experts: int, segment: int) -> np.ndarray:
    """[2 ** (segment - 1)] int64: choices of ``ids`` [tokens, layers, top_k] by history, bit ``i`` set when the
    same (layer, expert) was chosen ``segment - 1 - i`` tokens earlier.

    Tokens go in chunks, each with the ``HISTORY_WORD`` tokens before it as context. One weighted ``np.bincount``
    writes the chunk's occupancy, word ``w`` of (layer, expert) ``g`` holding bit ``t % HISTORY_WORD`` for each use
    at chunk position t; each word joined with the top bits of the word before gives any choice's history by one
    shift.
    """
    tokens, layers, top_k = ids.shape
    bits = segment - 1
    groups = layers * num_experts
    rows = HISTORY_WORD + HISTORY_CHUNK
    words = -(-rows // HISTORY_WORD) + 1  # word 0 stays empty: the "word before" of the first one
    pos = np.arange(rows, dtype=np.intp)[:, None, None]
    slot = np.broadcast_to((pos // HISTORY_WORD + 1) * groups + np.arange(layers)[None, :, None] * num_experts,
                           (rows, layers, top_k)).copy()
    weight = np.broadcast_to(np.ldexp(1.0, pos % HISTORY_WORD), (rows, layers, top_k)).ravel()
    shift = np.broadcast_to(pos[HISTORY_WORD:] % HISTORY_WORD, (HISTORY_CHUNK, layers, top_k)).copy()
    mask = (1 << bits) - 1
    joined = np.zeros((words, groups), dtype=np.int64)
    out = np.zeros(1 << bits, dtype=np.int64)
    for first in range(0, tokens, HISTORY_CHUNK):
        stop = min(tokens, first + HISTORY_CHUNK)
        begin = max(0, first - HISTORY_WORD)
        lead = HISTORY_WORD - (first - begin)  # context rows missing before the first chunk
        n = stop - begin
        index = np.add(ids[begin:stop], slot[lead:lead + n], dtype=np.intp)
        occupancy = np.bincount(index.ravel(), weights=weight[lead * layers * top_k:(lead + n) * layers * top_k],
                                minlength=words * groups).astype(np.int64).reshape(words, groups)
        np.left_shift(occupancy[1:], bits, out=joined[1:])
        joined[1:] |= occupancy[:-1] >> (HISTORY_WORD - bits)
        history = np.take(joined.ravel(), index[first - begin:])
        history >>= shift[:stop - first]
        history &= mask
        out += np.bincount(history.ravel(), minlength=1 << bits)
    return out


def _history_windows(segment: int) -> np.ndarray:
    """[2 ** (segment - 1), segment + 2] int64: for a choice with that history (see :func:`_history_counts`),
    how many windows (virtual ones over the trace's ends included) it is the c-th use of, c = column."""
    bits = segment - 1
    history = np.arange(1 << bits, dtype=np.int64)
    back = np.full((history.size, segment + 1), segment, dtype=np.int64)  # back[h, j]: distance to j-th earlier use
    back[:, 0] = 0
    seen = np.zeros(history.size, dtype=np.int64)
    for distance in range(1, segment):
        hit = np.nonzero((history >> (bits - distance)) & 1)[0]
        seen[hit] += 1
        back[hit, seen[hit]] = distance
    out = np.zeros((history.size, segment + 2), dtype=np.int64)
    out[:, 1:segment + 1] = (back[:, 1:] - back[:, :-1]) * (back[:, :-1] < segment)
    return out


def _sorted_window_counts(ids: np.ndarray, num_experts: int, segment: int) -> np.ndarray:
    """:func:`window_count_histogram` of one layer (``ids`` int [tokens, top_k]) by sorting its uses.

    A use at token p lies in the windows starting at p-segment+1 .. p, so each expert's count is a step
    function of the window start; sorting the steps of all experts costs O(tokens × top_k), not O(tokens × experts).
    """
    tokens = ids.shape[0]
    windows = tokens - segment + 1
    hist = np.zeros(segment + 1, dtype=np.int64)
    pos = np.repeat(np.arange(tokens, dtype=np.int64), ids.shape[1])
    expert_base = ids.ravel().astype(np.int64) * (windows + 1)
    keys = np.concatenate([expert_base + np.maximum(pos - segment + 1, 0), expert_base + np.minimum(pos + 1, windows)])
    steps = np.concatenate([np.ones(pos.size, dtype=np.int64), -np.ones(pos.size, dtype=np.int64)])
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], np.cumsum(steps[order])
    spans = np.diff(keys, append=keys[-1])
    hist += np.bincount(counts, weights=spans, minlength=segment + 1).astype(np.int64)[:segment + 1]
    hist[0] = windows * num_experts - hist[1:].sum()
    return hist


def best_f1(hist: np.ndarray, segment: int) -> float:
    """SRP from a pooled :func:`window_count_histogram`: the best F1 over thresholds 0..segment."""
    c = np.arange(segment + 1)
    matches = np.cumsum((c * hist)[::-1])[::-1]
    predictions = np.cumsum(hist[::-1])[::-1] * segment
    if matches[0] == 0:
        return float("nan")
    return float((2 * matches / (predictions + matches[0])).max())


def lookahead_cache_hits(requests: np.ndarray, universe: int, cache_size: int, lookahead: int) -> int:
    """Hits of the look-ahead cache described in the module docstring.

    The victim is the cached expert with the smallest (uses ahead, last use) in a heap of such entries. An entry
    is pushed when its expert is used (its key falls: one use fewer ahead, a later last use ranks it after
    older ones only on a tie of uses ahead, which the lower count breaks first); when a token enters the
    look-ahead, its experts' keys rise and nothing is pushed: each expert's newest entry stays a lower bound of
    its key. A popped entry whose last use is no longer current is dropped; one whose uses ahead rose since is
    pushed again with the current count; the first popped entry that is current is the true minimum (every other
    cached expert's newest entry is at least as large, and no larger than its key). The heap is rebuilt from the
    newest entries when stale ones make it 4 × ``cache_size`` long. Once ``cache_size`` distinct experts were
    seen, a token's hits are one ``sum`` over the cached flags of its row.

    Args:
        requests: int [tokens, choices]: the experts each token asks for, in processing order, distinct per row.
        universe: number of distinct expert ids (ids lie in 0..universe-1).
        cache_size: experts the cache holds (≥ 1).
        lookahead: tokens the cache sees ahead, the current one included (≥ 1).
    """
    rows = requests.tolist()
    future = [0] * universe
    for row in rows[:lookahead]:
        for x in row:
            future[x] += 1
    last = [0] * universe
    cached = [False] * universe
    is_cached = cached.__getitem__
    heap: list[tuple[int, int, int]] = []
    held = seen = hits = stamp = 0
    longest = 4 * cache_size + 64
    for i, row in enumerate(rows):
        if seen < cache_size:
            for x in row:
                if cached[x]:
                    hits += 1
                elif last[x] == 0:
                    hits += seen < cache_size
                    seen += 1
        else:
            hits += sum(map(is_cached, row))
        for x in row:
            if not cached[x]:
                if held < cache_size:
                    held += 1
                else:
                    while True:
                        f, t, y = heappop(heap)
                        if last[y] != t or not cached[y]:
                            continue
                        if future[y] == f:
                            break
                        heappush(heap, (future[y], t, y))
                    cached[y] = False
                cached[x] = True
            f = future[x] - 1
            future[x] = f
            stamp += 1
            last[x] = stamp
            heappush(heap, (f, stamp, x))
        if i + lookahead < len(rows):
            for x in rows[i + lookahead]:
                future[x] += 1
        if len(heap) > longest:
            heap = [(future[y], t, y) for f, t, y in heap if cached[y] and last[y] == t]
            heapify(heap)
    return hits
