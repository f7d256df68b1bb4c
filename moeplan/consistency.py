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

import heapq

import numpy as np


def window_count_histogram(ids: np.ndarray, num_experts: int, segment: int) -> np.ndarray:
    """[segment + 1] int64: how many (window, expert) pairs have each count, over every window of
    ``segment`` consecutive tokens (sliding by one). ``ids``: int [tokens, top_k] of one layer.

    A use at token p lies in the windows starting at p-segment+1 .. p, so each expert's count is a step
    function of the window start; sorting the steps of all experts costs O(tokens × top_k), not O(tokens × experts).
    """
    tokens = ids.shape[0]
    windows = tokens - segment + 1
    hist = np.zeros(segment + 1, dtype=np.int64)
    if windows <= 0:
        return hist
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
    heap: list[tuple[int, int, int]] = []
    held = seen = hits = stamp = 0
    for i, row in enumerate(rows):
        for x in row:
            if cached[x]:
                hits += 1
            elif last[x] == 0:
                hits += seen < cache_size
                seen += 1
        for x in row:
            if not cached[x]:
                if held < cache_size:
                    held += 1
                else:
                    while True:
                        f, t, y = heapq.heappop(heap)
                        if cached[y] and future[y] == f and last[y] == t:
                            break
                    cached[y] = False
                cached[x] = True
            future[x] -= 1
            stamp += 1
            last[x] = stamp
            heapq.heappush(heap, (future[x], stamp, x))
        if i + lookahead < len(rows):
            for x in rows[i + lookahead]:
                future[x] += 1
                if cached[x]:
                    heapq.heappush(heap, (future[x], last[x], x))
    return hits
