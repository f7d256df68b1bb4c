"""Expert-cache sizing and offloading, planned from a routing trace (no torch).

- :mod:`.steps` — StepShape: how trace tokens form decode / prefill steps;
- :mod:`.state` — CacheState: the caches' decisions (LRU, LFU, Belady, prefetch), shared with
  the torch executor :mod:`moeplan.runtime.offload`;
- :mod:`.predict` — TransitionPredictor: next-layer experts from inter-layer transitions;
- :mod:`.simulate` — hit rates and transfers per step, vectorised over layers and sizes;
  LRU at every size from stack distances;
- :mod:`.steptime` — seconds per step with transfers overlapping compute;
- :mod:`.budget` — MemoryBudget: what is left for the cache;
- :mod:`.allocate` — exact DP over slots, LP bound, knee;
- :mod:`.sizing` — CacheProblem → CacheSizing → Plan; :func:`cache_table` for the dashboard;
- :mod:`.regroup` — ExpertFlow-style batching of requests that share experts;
- :class:`~moeplan.cache_config.CacheConfig` — a plan's ``cache`` section (re-exported).
"""
from moeplan.solvers.cache.allocate import Allocation, allocate, knee, lp_bound
from moeplan.solvers.cache.budget import MemoryBudget, memory_budget
from moeplan.cache_config import CacheConfig
from moeplan.solvers.cache.predict import TransitionPredictor
from moeplan.solvers.cache.regroup import Regrouping, activated_experts, regroup
from moeplan.solvers.cache.simulate import CacheRun, lru_hit_curves, simulate
from moeplan.solvers.cache.sizing import CacheProblem, CacheSizing, cache_table, evaluation_steps, solve
from moeplan.solvers.cache.state import POLICIES, CacheState
from moeplan.solvers.cache.steps import StepShape, step_counts
from moeplan.solvers.cache.steptime import (LayerTimes, StepTimes, model_layer_times,
                                            stack_layer_times, step_times)

__all__ = [
    "POLICIES",
    "Allocation",
    "CacheConfig",
    "CacheProblem",
    "CacheRun",
    "CacheSizing",
    "CacheState",
    "LayerTimes",
    "MemoryBudget",
    "Regrouping",
    "StepShape",
    "StepTimes",
    "TransitionPredictor",
    "activated_experts",
    "allocate",
    "cache_table",
    "evaluation_steps",
    "knee",
    "lp_bound",
    "lru_hit_curves",
    "memory_budget",
    "model_layer_times",
    "regroup",
    "simulate",
    "solve",
    "stack_layer_times",
    "step_counts",
    "step_times",
]
