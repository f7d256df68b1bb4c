"""Cache sizing: per-layer expert-cache sizes that maximise predicted throughput (or meet a
latency target) within a device's memory, planned from a routing trace.

1. **Budget** (:mod:`.budget`): slots left after non-expert weights, KV cache and activations.
2. **Fit, size, judge**: the trace's first ``fit_fraction`` fits the prefetcher
   (:class:`.predict.TransitionPredictor`); of the held-out rest (at most ``max_steps``
   steps) the first half is what the curves are measured on and the second half what every
   configuration is judged on, so no figure is judged on the steps that chose it.
3. **Curves** per layer and cache size s = 0..E: hit rate, transfers and seconds of stall per
   step (:func:`.steptime.separable_stall`). LRU's come exact for every size from stack
   distances (and its stall is exactly the full timeline's); other policies are simulated on a
   grid of sizes (lanes of one vectorised run), their difference from LRU interpolated linearly
   in between.
4. **Allocation** (:mod:`.allocate`): exact DP over slots, its LP bound, the curve of predicted
   tokens/s against total cache slots and its knee.
5. **Evaluation** with the full step timeline (:func:`.steptime.step_times`): the plan, every
   policy at the planned sizes, and LRU on demand with uniform sizes of the same total.

Tokens/s = tokens per step / mean step seconds; every figure is a prediction from the cost
model and the hardware profile (whose provenance note travels with the plan).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from moeplan.cost import CostModel, PricedProblem
from moeplan.errors import InputError
from moeplan.plan import Plan
from moeplan.solvers.cache.allocate import Allocation, allocate, knee
from moeplan.solvers.cache.budget import MemoryBudget, memory_budget
from moeplan.cache_config import CacheConfig
from moeplan.solvers.cache.predict import TransitionPredictor, prefetch_limits
from moeplan.solvers.cache.simulate import CacheRun, lru_hit_curves, simulate
from moeplan.solvers.cache.state import POLICIES, check_policy
from moeplan.solvers.cache.steps import StepShape
from moeplan.solvers.cache.steptime import LayerTimes, model_layer_times, separable_stall, step_times
from moeplan.trace import RoutingTrace

GRID_POINTS = 17       # cache sizes simulated per layer for policies without stack distances


@dataclass(frozen=True)
class CacheProblem(PricedProblem):
    """What to plan: ``cost.model`` on one device of ``cost.hw`` (priced with ``cost``'s
    options) serving ``shape``'s steps with
    ``context`` tokens of KV cache per sequence, routing like ``trace``; ``policy`` the cache
    runs; ``memory_bytes`` the device memory to plan within (default: the profile's × 0.9);
    ``latency_target`` seconds per step to meet with the smallest cache (default: maximise
    throughput); ``stage_slots`` staging experts; ``max_steps`` held-out steps judged."""

    cost: CostModel
    trace: RoutingTrace
    shape: StepShape
    policy: str = "prefetch"
    context: int = 4096
    memory_bytes: float | None = None
    latency_target: float | None = None
    fit_fraction: float = 0.5
    stage_slots: int = 2
    max_steps: int = 10_000

    def validate(self) -> "CacheProblem":
        m = self.model
        self.trace.check_model(m.num_experts, m.num_moe_layers, m.top_k)
        self.shape.validate()
        check_policy(self.policy)
        if self.context < 1:
            raise InputError(f"context must be ≥ 1 token, got {self.context}", field="context")
        if self.memory_bytes is not None and not 0 < self.memory_bytes < math.inf:
            raise InputError(f"the memory budget must be a finite number of bytes > 0, got {self.memory_bytes}",
                             field="budget")
        if self.latency_target is not None and not 0 < self.latency_target < math.inf:
            raise InputError(f"the latency target must be a finite time > 0 s, got {self.latency_target}",
                             field="latency_target")
        if not 1 <= self.stage_slots <= m.num_experts:
            raise InputError(f"staging slots must lie in 1..{m.num_experts}, got {self.stage_slots}",
                             field="stage_slots")
        if self.max_steps < 1:
            raise InputError(f"max steps must be ≥ 1, got {self.max_steps}", field="max_steps")
        return self


@dataclass(frozen=True)
class SizeCurves:
    """Per layer and cache size s = 0..E (column s): ``stall`` seconds per step (separable),
    ``hit_rate``, ``transfers`` experts moved per step; ``grid`` the sizes actually simulated."""

    stall: np.ndarray
    hit_rate: np.ndarray
    transfers: np.ndarray
    grid: np.ndarray


@dataclass(frozen=True)
class Evaluated:
    """One configuration judged on the held-out steps with the full step timeline."""

    name: str
    policy: str
    sizes: np.ndarray
    run: CacheRun
    tokens_per_s: float
    step_seconds: float
    stall_seconds: float

    def to_dict(self, expert_bytes: float) -> dict[str, Any]:
        s = self.run.summary(expert_bytes)
        return {"name": self.name, "policy": self.policy, "sizes": self.sizes.tolist(),
                "cached_experts": int(self.sizes.sum()), "hit_rate": s["hit_rate"],
                "transfers_per_step": (s["loads"] + s["prefetched"]) / max(s["steps"], 1),
                "bytes_per_step": s["bytes_per_step"], "prefetch_accuracy": s["prefetch_accuracy"],
                "tokens_per_s": self.tokens_per_s, "step_s": self.step_seconds, "stall_s_per_step": self.stall_seconds}


@dataclass
class CacheSizing:
    """The solved problem: the budget, the layer times and curves of the sizing steps, the
    allocation, the evaluations on the judged steps (``steps`` of them); ``floor`` [layers] the
    probability of use a prefetch needs."""

    problem: CacheProblem
    budget: MemoryBudget
    slots: int
    times: LayerTimes
    predictor: TransitionPredictor
    curves: SizeCurves
    allocation: Allocation
    evaluations: list[Evaluated]
    floor: np.ndarray
    steps: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def sizes(self) -> np.ndarray:
        return self.allocation.sizes

    @property
    def resident_step(self) -> float:
        """Mean seconds per step with every expert resident."""
        return float(self.times.resident_step().mean())

    def tokens_per_s(self, stall: np.ndarray | float) -> np.ndarray:
        """Separable-model tokens/s for a total stall (seconds per step)."""
        return self.problem.shape.batch / (self.resident_step + np.asarray(stall))

    def throughput_curve(self) -> np.ndarray:
        """[slots 0..layers·E] predicted tokens/s of the best allocation with at most that many slots."""
        return self.tokens_per_s(self.allocation.best)

    def evaluation(self, name: str) -> Evaluated:
        return next(e for e in self.evaluations if e.name == name)

    def config(self) -> CacheConfig:
        p = self.problem
        prefetch = p.policy == "prefetch"
        return CacheConfig(tuple(int(s) for s in self.sizes), p.policy, self.budget.left, p.stage_slots,
                           p.shape.phase, p.shape.batch, p.shape.sequence_tokens, p.context, p.fit_fraction,
                           tuple(int(w) for w in self.predictor.width) if prefetch else (),
                           tuple(float(x) for x in self.floor) if prefetch else ())

    def summary(self) -> dict[str, Any]:
        """Headline numbers: memory, the plan's prediction, the baseline, the bound, the knee."""
        p, b = self.problem, self.budget
        curve = self.throughput_curve()
        k = knee(self.allocation.best)
        plan = self.evaluation("plan")
        baseline = self.evaluation("lru-uniform")
        cache_bytes = b.cache_bytes(self.sizes, p.stage_slots)
        return {
            "policy": p.policy, "phase": p.shape.phase, "batch": p.shape.batch, "context": p.context,
            "steps_judged": self.steps, "budget_slots": self.slots, "cached_experts": int(self.sizes.sum()),
            "cache_bytes": cache_bytes, "memory_saved_bytes": b.all_experts - cache_bytes,
            "memory_saved_fraction": 1 - cache_bytes / b.all_experts,
            "tokens_per_s": plan.tokens_per_s, "hit_rate": plan.run.summary(b.expert_bytes)["hit_rate"],
            "bytes_per_step": plan.run.summary(b.expert_bytes)["bytes_per_step"],
            "lru_uniform_tokens_per_s": baseline.tokens_per_s,
            "speedup_vs_lru_uniform": plan.tokens_per_s / baseline.tokens_per_s,
            "resident_tokens_per_s": p.shape.batch / self.resident_step,
            "separable_tokens_per_s": float(self.tokens_per_s(self.allocation.stall)),
            "lp_bound_tokens_per_s": float(self.tokens_per_s(self.allocation.lp_bound)),
            "knee_slots": k, "knee_bytes": k * b.expert_bytes, "knee_tokens_per_s": float(curve[k]),
            "copy_seconds_per_expert": self.times.copy_seconds,
        }

    def to_plan(self) -> Plan:
        """The plan: the cache section, the solver's report and the predicted metrics."""
        p = self.problem
        s = self.summary()
        solver = {"name": "cache-sizing", "method": "exact DP over slots on the separable stall model",
                  "objective_stall_s_per_step": self.allocation.stall,
                  "lp_bound_stall_s_per_step": self.allocation.lp_bound,
                  "bound": "LP relaxation (lower convex envelope per layer): no allocation of this budget stalls less",
                  "seconds": self.seconds, "steps_judged": self.steps, "fit_fraction": p.fit_fraction,
                  "max_steps": p.max_steps}
        predicted = {**s, "memory": self.budget.to_dict(),
                     "evaluations": [e.to_dict(self.budget.expert_bytes) for e in self.evaluations],
                     "profile_note": p.hardware.provenance_note()}
        return Plan(p.model, p.hardware.ref(), 1, 1, cache=self.config(), cost_options=p.cost.opt, solver=solver,
                    predicted=predicted, notes="; ".join(self.notes))


def evaluation_steps(trace: RoutingTrace, shape: StepShape, fit_fraction: float,
                     max_steps: int) -> tuple[RoutingTrace, RoutingTrace, np.ndarray]:
    """(fit part, held-out part, its first ``max_steps`` steps)."""
    fit, held = trace.split(fit_fraction)
    index = shape.token_index(held.num_tokens)
    return fit, held, index[:max_steps]


def size_grid(num_experts: int, top_k: int) -> np.ndarray:
    """The cache sizes simulated for interpolated curves: every size up to 16 experts, else an even
    grid with top_k and 2·top_k added."""
    if num_experts <= GRID_POINTS - 1:
        return np.arange(num_experts + 1)
    grid = np.rint(np.linspace(0, num_experts, GRID_POINTS)).astype(np.int64)
    return np.unique(np.concatenate([grid, [1, top_k, min(2 * top_k, num_experts)]]))


def size_curves(held: RoutingTrace, index: np.ndarray, policy: str, predictor: TransitionPredictor | None,
                times: LayerTimes) -> SizeCurves:
    """Per-layer curves over every cache size (see the module docstring, step 3): LRU's exact at
    every size; another policy's simulated on a grid of sizes, its difference from LRU
    interpolated linearly in between (the difference is smoother than the curve itself)."""
    nl, e = held.num_layers, held.num_experts
    tau = times.copy_seconds
    steps = index.shape[0]
    most = min(e, index.shape[1] * held.top_k)                        # no step misses more experts than this
    depth = int(min(max(np.ceil(times.post.max(initial=0.0) / tau), 1), most))
    hits, requests, missing = lru_hit_curves(held, index, depth)
    misses = requests[:, None] - hits
    lru = SizeCurves(_demand_stall(misses, missing, times) / steps, hits / np.maximum(requests[:, None], 1),
                     misses / steps, np.arange(e + 1))
    if policy == "lru":
        return lru
    grid = size_grid(e, held.top_k)
    lane_layer = np.repeat(np.arange(nl), grid.size)
    run = simulate(held, index, np.tile(grid, nl), policy, predictor, lane_layer)
    measured = (separable_stall(run, times), run.hit_rate(), run.transfers())
    every = np.arange(e + 1)
    def fill(values: np.ndarray, exact: np.ndarray) -> np.ndarray:
        delta = values.reshape(nl, grid.size) - exact[:, grid]
        return exact + np.stack([np.interp(every, grid, row) for row in delta])
    return SizeCurves(*(fill(v, x) for v, x in zip(measured, (lru.stall, lru.hit_rate, lru.transfers))), grid)


def _demand_stall(misses: np.ndarray, missing: np.ndarray, times: LayerTimes) -> np.ndarray:
    """[layers, E+1] LRU's stall summed over steps, exactly: a step that misses m experts of a
    layer waits max(0, m·τ − post), the sum over j = 1..m of the j-th copy's exposed part
    ``c_j`` = max(0, j·τ − post) − max(0, (j−1)·τ − post) (τ once j·τ ≥ post + τ), so the total
    is τ · misses − Σ_j (τ − c_j) · (steps missing ≥ j), with ``missing`` [depth, layers, E+1]
    deep enough that c_j = τ beyond it."""
    tau, post = times.copy_seconds, times.post[:, None]
    total = misses * tau
    for j in range(1, missing.shape[0] + 1):
        exposed = np.maximum(j * tau - post, 0.0) - np.maximum((j - 1) * tau - post, 0.0)
        total = total - (tau - exposed) * missing[j - 1]
    return total


def evaluate(name: str, policy: str, sizes: np.ndarray, held: RoutingTrace, index: np.ndarray,
             predictor: TransitionPredictor | None, times: LayerTimes, batch: int) -> Evaluated:
    """Judge one configuration with the full step timeline."""
    run = simulate(held, index, sizes, policy, predictor)
    st = step_times(run, times)
    return Evaluated(name, policy, np.asarray(sizes), run, st.tokens_per_s(batch), float(st.total.mean()),
                     float(st.stall.sum(axis=1).mean()))


def uniform_sizes(total: int, layers: int, num_experts: int) -> np.ndarray:
    """``total`` slots spread evenly (the first layers take the remainder)."""
    sizes = np.full(layers, total // layers)
    sizes[: total % layers] += 1
    return np.minimum(sizes, num_experts)


def solve(problem: CacheProblem) -> CacheSizing:
    """Plan the per-layer cache sizes (see the module docstring)."""
    start = time.perf_counter()
    p = problem.validate()
    m, shape = p.model, p.shape
    cost = p.cost
    budget = memory_budget(cost, shape, p.context, p.memory_bytes)
    slots = budget.slots(p.stage_slots)
    fit, held, index = evaluation_steps(p.trace, shape, p.fit_fraction, p.max_steps)
    if index.shape[0] < 2:
        raise InputError(f"the held-out part of the trace has {index.shape[0]} step(s); sizing and judging need 2",
                         field="trace", fix="give a longer trace or a smaller batch")
    sizing_index, judge_index = np.array_split(index, 2)
    times = model_layer_times(cost, held, sizing_index, shape.phase, p.context)
    judge = model_layer_times(cost, held, judge_index, shape.phase, p.context)
    width, floor = prefetch_limits(times.copy_seconds, times.overlap())
    predictor = TransitionPredictor.fit(fit, shape).limited(width, floor)
    curves = size_curves(held, sizing_index, p.policy, predictor, times)
    notes: list[str] = []
    allocation = allocate(curves.stall, slots)
    if p.latency_target is not None:
        allocation = _meet_latency(curves.stall, allocation, times, p.latency_target)
        notes.append(f"smallest cache meeting {p.latency_target * 1e3:.3f} ms per step")
    if slots >= m.num_moe_layers * m.num_experts:
        notes.append("every expert fits: no offloading needed")
    sizes = allocation.sizes
    evaluations = [evaluate("plan", p.policy, sizes, held, judge_index, predictor, judge, shape.batch),
                   evaluate("lru-uniform", "lru", uniform_sizes(int(sizes.sum()), m.num_moe_layers, m.num_experts),
                            held, judge_index, predictor, judge, shape.batch)]
    evaluations += [evaluate(f"{pol}-planned", pol, sizes, held, judge_index, predictor, judge, shape.batch)
                    for pol in POLICIES if pol != p.policy]
    return CacheSizing(p, budget, slots, times, predictor, curves, allocation, evaluations, floor,
                       judge_index.shape[0], time.perf_counter() - start, notes)


def _meet_latency(stall: np.ndarray, full: Allocation, times: LayerTimes, target: float) -> Allocation:
    """The allocation with the fewest slots whose separable step time meets ``target``."""
    resident = float(times.resident_step().mean())
    ok = np.flatnonzero(resident + full.best <= target)
    if ok.size == 0:
        raise InputError(f"no cache within the budget meets {target * 1e3:.3f} ms per step: the best is "
                         f"{(resident + full.best[-1]) * 1e3:.3f} ms ({resident * 1e3:.3f} ms of it compute with "
                         f"every expert resident)", field="latency_target",
                         fix="raise the target, give more memory or a smaller batch")
    return replace(allocate(stall, int(ok[0])), best=full.best)


def cache_table(sizing: CacheSizing) -> dict[str, Any]:
    """For the dashboard: per layer and cache size, the hit rate, transfers and stall per step,
    and the predicted tokens/s with that layer at that size and every other at its planned size
    (separable model); the memory each size frees against holding the layer's experts; and the
    plan's memory totals. Pure: reads ``sizing`` only."""
    c, b, sizes = sizing.curves, sizing.budget, sizing.sizes
    nl, width = c.stall.shape
    planned_stall = c.stall[np.arange(nl), sizes]
    total = planned_stall.sum()
    rows = [{"layer": layer, "size": s, "planned": bool(s == sizes[layer]), "simulated": bool(s in c.grid),
             "hit_rate": float(c.hit_rate[layer, s]), "transfers_per_step": float(c.transfers[layer, s]),
             "stall_s_per_step": float(c.stall[layer, s]),
             "tokens_per_s": float(sizing.tokens_per_s(total - planned_stall[layer] + c.stall[layer, s])),
             "memory_freed_bytes": (width - 1 - s) * b.expert_bytes}
            for layer in range(nl) for s in range(width)]
    cache_bytes = b.cache_bytes(sizes, sizing.problem.stage_slots)
    memory = {"all_experts_bytes": b.all_experts, "cache_bytes": cache_bytes,
              "freed_bytes": b.all_experts - cache_bytes, "budget": b.to_dict()}
    return {"rows": rows, "memory": memory, "curve_tokens_per_s": sizing.throughput_curve().tolist(),
            "knee_slots": knee(sizing.allocation.best)}
