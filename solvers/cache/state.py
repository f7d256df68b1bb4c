"""CacheState: the expert caches of several *lanes* (a lane is one MoE layer's cache at one
size), updated one step at a time, vectorised over lanes. The simulator and the torch executor
both make their decisions here, so they agree on every hit, load and eviction.

Every policy is a priority (an int64 key per lane and expert; higher stays). At a step a lane
is asked for a set of experts ``need``; the ones it holds are hits, the others are loaded over
the host link. Afterwards the lane keeps the ``size`` best of (held ∪ needed), needed experts
first, then by key, then lower expert id: a needed expert that does not make the cut (more
experts needed than the cache holds) is used from a staging buffer and not kept.

* ``lru``: key = the last step that used the expert (on demand).
* ``lfu``: key = how many steps used it so far (counts survive eviction: "perfect" LFU), ties
  by recency. A needed expert is always admitted when the cache has room for all needed ones.
* ``belady``: key = −(the next step that will use it): evict the expert needed farthest in the
  future (offline optimum of demand loading; needs the future, so only the simulator runs it).
* ``prefetch``: LRU, plus :meth:`CacheState.prefetch`: before a step's layer runs, the
  predicted experts are loaded and protected, evicting by LRU (key = just below this step's
  demand uses, so a wrong guess is the first thing the next miss evicts).
"""
from __future__ import annotations

import numpy as np

from moeplan.errors import InputError

from moeplan.cache_config import POLICIES
NEVER = 1 << 40              # "no next use" for Belady
MAX_STEPS = 1 << 20          # steps one state serves: recency keys 2·step + 1 stay below 2^21
_COUNT_SHIFT = 1 << 21       # LFU: count × 2^21 + recency key
_FORCED = 1 << 46            # needed / prefetched experts rank above every key
_ABSENT = np.iinfo(np.int64).max


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise InputError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}", field="policy")
    return policy


class CacheState:
    """The caches of ``len(sizes)`` lanes over ``num_experts`` experts (see the module docstring).

    Attributes:
        sizes: int64 [lanes] experts each lane's cache holds.
        held: bool [lanes, experts] what each cache holds now.
        key: int64 [lanes, experts] the policy's priority (higher stays).
    """

    def __init__(self, sizes: np.ndarray, num_experts: int, policy: str) -> None:
        self.policy = check_policy(policy)
        self.sizes = np.asarray(sizes, dtype=np.int64).copy()
        if self.sizes.ndim != 1 or self.sizes.min(initial=0) < 0 or self.sizes.max(initial=0) > num_experts:
            raise InputError(f"cache sizes must lie in 0..{num_experts}", field="sizes")
        lanes = self.sizes.size
        self.num_experts = num_experts
        self.held = np.zeros((lanes, num_experts), dtype=bool)
        self.key = np.full((lanes, num_experts), -1, dtype=np.int64)
        self.uses = np.zeros((lanes, num_experts), dtype=np.int64)
        self._tiebreak = np.arange(num_experts - 1, -1, -1, dtype=np.int64)   # lower id stays

    def demand(self, need: np.ndarray, step: int, next_use: np.ndarray | None = None,
               lanes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Serve ``need`` [lanes, experts] at ``step``. Returns (hits, loads) [lanes, experts]:
        experts found in the cache and experts loaded over the host link (admitted or staged:
        ``loads & ~self.held`` after the call are the staged ones). ``next_use`` [lanes, experts]:
        Belady's next step needing each expert (read where ``need``). ``lanes``: the rows of the
        state ``need`` refers to (default all)."""
        rows = slice(None) if lanes is None else lanes
        held = self.held[rows]
        hits = need & held
        loads = need & ~held
        key = self.key[rows]
        if self.policy == "belady":
            if next_use is None:
                raise ValueError("belady needs next_use")
            key = np.where(need, -next_use.astype(np.int64), key)
        else:
            recency = 2 * step + 1
            if self.policy == "lfu":
                uses = self.uses[rows] + need
                self.uses[rows] = uses
                key = np.where(need, uses * _COUNT_SHIFT + recency, key)
            else:
                key = np.where(need, recency, key)
        self.key[rows] = key
        self.held[rows] = self._keep(held | need, need, key, self.sizes[rows])
        return hits, loads

    def prefetch(self, want: np.ndarray, step: int, lanes: np.ndarray | None = None) -> np.ndarray:
        """Load the predicted experts ``want`` [lanes, experts] ahead of ``step``'s demand and
        protect them; returns the experts loaded (``want`` minus those already held). Only the
        ``prefetch`` policy prefetches; callers keep ``want`` to at most the lane's size."""
        rows = slice(None) if lanes is None else lanes
        held = self.held[rows]
        loads = want & ~held
        key = np.where(want, np.maximum(self.key[rows], 2 * step), self.key[rows])
        self.key[rows] = key
        self.held[rows] = self._keep(held | want, want, key, self.sizes[rows])
        return loads

    def _keep(self, candidates: np.ndarray, forced: np.ndarray, key: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """The ``sizes`` best of ``candidates`` per lane: forced first, then key, then lower id."""
        over = np.count_nonzero(candidates, axis=1) - sizes
        crowded = np.flatnonzero(over > 0)
        if crowded.size == 0:
            return candidates
        score = (key[crowded] + forced[crowded] * _FORCED) * self.num_experts + self._tiebreak
        score[~candidates[crowded]] = _ABSENT
        drop = over[crowded]
        most = int(drop.max())
        worst = np.argpartition(score, most - 1, axis=1)[:, :most]            # the `most` lowest, unordered
        worst = np.take_along_axis(worst, np.argsort(np.take_along_axis(score, worst, axis=1), axis=1), axis=1)
        going = np.arange(most)[None, :] < drop[:, None]
        kept = candidates.copy()
        kept[np.broadcast_to(crowded[:, None], worst.shape)[going], worst[going]] = False
        return kept
