"""Autoscaling simulation: a demand trace, a scaling strategy and a policy → SLO attainment,
device-hours and time spent scaling.

**Strategies** (how capacity changes; :func:`strategies` builds all four):

* ``elastic``: live scaling between the given sizes; a step between neighbouring sizes takes the
  planner's predicted seconds (:func:`.step.plan_scaling` on the trace's load), a larger jump
  the neighbouring steps back to back; the old devices keep serving until the switch;
* ``restart``: the same sizes, but every change restarts the deployment at the new size (restart
  overhead + every device reloading its weights from host memory); nothing is served meanwhile;
* ``replica``: whole replicas of the smallest deployment; adding replicas takes the new-replica
  baseline's time (they start in parallel) while the others serve; removing one is immediate;
* ``static``: the smallest size whose SLO capacity covers the trace's own peak, all the time.

New devices count from the start of a step, released ones until its end.

**Policies** (when to scale; decided at the start of each interval, never while a step runs):

* ``threshold``: when the last interval's demand exceeded ``up`` × the current SLO capacity, up
  to the smallest size it fits under ``up`` × capacity; down one size when, for ``cooldown``
  consecutive intervals, demand stayed below ``down`` × the SLO capacity of the next size down
  (hysteresis: ``down`` < ``up``);
* ``lookahead``: knows the demand ahead (an oracle forecast, an upper bound on what prediction
  can buy): up to the smallest size whose ``up`` × capacity covers the peak demand within the
  next step time plus ``lead`` seconds, and down one size when the peak within ``lead`` + the
  cooldown window fits under ``up`` × the capacity of the size below.

**Serving model** (fluid, per interval, split where a step starts or ends): a size serves up to
its SLO capacity with every step within the TPOT SLO and up to its KV-memory capacity beyond it
(slower); demand above that queues. Tokens arriving while the queue is non-empty, while demand
exceeds the SLO capacity, or while nothing is served, miss the SLO. SLO attainment is the share
of tokens that meet it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from moeplan.errors import InputError

from .latency import LatencyTable
from .traffic import ArrivalTrace

if TYPE_CHECKING:
    import pandas as pd

POLICIES = ("threshold", "lookahead")
STRATEGIES = ("elastic", "restart", "replica", "static")


@dataclass(frozen=True)
class Strategy:
    """How capacity changes (module docstring).

    Attributes:
        name: one of :data:`STRATEGIES`.
        sizes: device counts it can run at, ascending (replica: multiples of the smallest).
        step_seconds: (from, to) → seconds of that step.
        serves_during_step: the old size keeps serving while a step runs (False: nothing serves).
        replica_devices: devices of one replica (replica strategy), else 0.
    """

    name: str
    sizes: tuple[int, ...]
    step_seconds: Callable[[int, int], float]
    serves_during_step: bool
    replica_devices: int = 0

    def capacity(self, table: LatencyTable, devices: int, slo: float | None) -> float:
        """Tokens/s ``devices`` devices serve within ``slo`` (or at most, when None)."""
        if self.replica_devices:
            return devices // self.replica_devices * table.capacity(self.replica_devices, slo)
        return table.capacity(devices, slo)

    def tpot(self, table: LatencyTable, devices: int, demand: float) -> float:
        if self.replica_devices:
            replicas = devices // self.replica_devices
            return table.tpot(self.replica_devices, demand / replicas)
        return table.tpot(devices, demand)


@dataclass(frozen=True)
class Policy:
    """When to scale (module docstring). ``up``/``down``: utilisation thresholds; ``cooldown``:
    intervals demand must stay low before a scale-down; ``lead``: look-ahead seconds."""

    name: str = "threshold"
    up: float = 0.8
    down: float = 0.6
    cooldown: int = 6
    lead: float = 60.0

    def validate(self) -> Policy:
        if self.name not in POLICIES:
            raise InputError(f"unknown policy '{self.name}'", field="policy", fix=f"use one of: {', '.join(POLICIES)}")
        if not 0 < self.down < self.up <= 1:
            raise InputError(f"need 0 < down < up ≤ 1, got down {self.down}, up {self.up}", field="thresholds")
        if self.cooldown < 1 or self.lead < 0:
            raise InputError("cooldown must be ≥ 1 interval and lead ≥ 0 seconds", field="cooldown")
        return self


@dataclass
class AutoscaleRun:
    """One strategy × policy on one trace. Per-interval arrays [T]: ``devices`` billed (time
    average), ``capacity`` SLO tokens/s (time average), ``tpot`` seconds per step at the demand
    (inf while nothing serves or demand exceeds the most the size serves), ``met`` tokens that
    met the SLO, ``backlog`` queued tokens at the interval's end, ``scaling`` a step ran."""

    strategy: str
    policy: str
    trace: ArrivalTrace
    demand: np.ndarray
    devices: np.ndarray
    capacity: np.ndarray
    tpot: np.ndarray
    met: np.ndarray
    backlog: np.ndarray
    scaling: np.ndarray
    steps: int
    scaling_seconds: float

    def summary(self) -> dict[str, Any]:
        dt = self.trace.interval
        arrived = float(self.demand.sum() * dt)
        return {"strategy": self.strategy, "policy": self.policy, "shape": self.trace.shape, "seed": self.trace.seed,
                "slo_attainment": float(self.met.sum()) / arrived if arrived > 0 else 1.0,
                "device_hours": float(self.devices.sum() * dt / 3600), "scaling_steps": self.steps,
                "scaling_seconds": self.scaling_seconds, "peak_devices": int(np.ceil(self.devices.max())),
                "final_backlog_tokens": float(self.backlog[-1])}


def strategies(sizes: tuple[int, ...], elastic_seconds: dict[tuple[int, int], float],
               restart_seconds: Callable[[int], float], replica_seconds: float) -> dict[str, Strategy]:
    """The scaling strategies of the module docstring. ``elastic_seconds[(n, m)]``: the planned
    step between neighbouring sizes; ``restart_seconds(m)``: a restart at m devices;
    ``replica_seconds``: starting replicas of ``sizes[0]`` devices."""
    base = sizes[0]
    replicas = tuple(base * k for k in range(1, sizes[-1] // base + 1))

    def elastic(n: int, m: int) -> float:
        i, j = sizes.index(n), sizes.index(m)
        path = sizes[i:j + 1] if j > i else sizes[j:i + 1][::-1]
        return float(sum(elastic_seconds[(a, b)] for a, b in zip(path[:-1], path[1:])))

    return {
        "elastic": Strategy("elastic", sizes, elastic, True),
        "restart": Strategy("restart", sizes, lambda n, m: restart_seconds(m), False),
        "replica": Strategy("replica", replicas, lambda n, m: replica_seconds if m > n else 0.0, True, base),
    }


def static_strategy(table: LatencyTable, sizes: tuple[int, ...], peak_demand: float, slo: float) -> Strategy:
    """The smallest of ``sizes`` whose SLO capacity covers ``peak_demand`` (the largest if none)."""
    fits = [n for n in sizes if table.capacity(n, slo) >= peak_demand]
    return Strategy("static", (fits[0] if fits else sizes[-1],), lambda n, m: 0.0, True)


def simulate_autoscale(trace: ArrivalTrace, peak_rate: float, table: LatencyTable, strategy: Strategy,
                       policy: Policy, slo: float) -> AutoscaleRun:
    """Run ``strategy`` under ``policy`` over ``trace`` scaled to ``peak_rate`` tokens/s at 1.0
    (module docstring). Starts at the smallest size."""
    policy.validate()
    if slo <= 0 or peak_rate <= 0:
        raise InputError("the SLO and the peak rate must be > 0", field="slo")
    sizes, dt = strategy.sizes, trace.interval
    demand = trace.demand * peak_rate
    n_int = demand.size
    slo_cap = {n: strategy.capacity(table, n, slo) for n in sizes}
    max_cap = {n: strategy.capacity(table, n, None) for n in sizes}
    level = 0
    step: tuple[int, float] | None = None      # (target level, seconds left)
    low_run, steps, scaling_seconds, backlog = 0, 0, 0.0, 0.0
    out = {k: np.zeros(n_int) for k in ("devices", "capacity", "tpot", "met", "backlog", "scaling")}
    for i in range(n_int):
        if step is None and len(sizes) > 1:
            target = _decide(policy, strategy, trace, demand, i, level, slo_cap, low_run)
            low_run = low_run + 1 if _low(policy, demand, i, level, sizes, slo_cap) else 0
            if target != level:
                seconds = strategy.step_seconds(sizes[level], sizes[target])
                step, steps, low_run = (target, seconds), steps + 1, 0
                scaling_seconds += seconds
        remaining = dt
        devices = capacity = met = 0.0
        tpot_weight = 0.0
        tpot_sum = 0.0
        while remaining > 1e-12:
            if step is not None:
                span = min(remaining, step[1])
                serving = sizes[level] if strategy.serves_during_step else 0
                billed = max(sizes[level], sizes[step[0]])
            else:
                span, serving, billed = remaining, sizes[level], sizes[level]
            arrived = demand[i] * span
            cap_slo = slo_cap[serving] if serving else 0.0
            cap_max = max_cap[serving] if serving else 0.0
            keeps_up = backlog <= 1e-9 and demand[i] <= cap_slo
            met += arrived if keeps_up else 0.0
            backlog = max(backlog + arrived - cap_max * span, 0.0)
            devices += billed * span
            capacity += cap_slo * span
            t = strategy.tpot(table, serving, demand[i]) if serving else float("inf")
            tpot_sum += (t if np.isfinite(t) else 0.0) * span
            tpot_weight += span if np.isfinite(t) else 0.0
            remaining -= span
            if step is not None:
                step = (step[0], step[1] - span)
                if step[1] <= 1e-12:
                    level, step = step[0], None
        out["devices"][i] = devices / dt
        out["capacity"][i] = capacity / dt
        out["tpot"][i] = tpot_sum / tpot_weight if tpot_weight > dt / 2 else float("inf")
        out["met"][i] = met
        out["backlog"][i] = backlog
        out["scaling"][i] = step is not None or out["devices"][i] != sizes[level]
    return AutoscaleRun(strategy.name, policy.name, trace, demand, out["devices"], out["capacity"], out["tpot"],
                        out["met"], out["backlog"], out["scaling"].astype(bool), steps, scaling_seconds)


def _low(policy: Policy, demand: np.ndarray, i: int, level: int, sizes: tuple[int, ...],
         slo_cap: dict[int, float]) -> bool:
    """The last interval's demand fits under ``down`` × the SLO capacity of the next size down."""
    return level > 0 and i > 0 and demand[i - 1] < policy.down * slo_cap[sizes[level - 1]]


def _decide(policy: Policy, strategy: Strategy, trace: ArrivalTrace, demand: np.ndarray, i: int, level: int,
            slo_cap: dict[int, float], low_run: int) -> int:
    """The size index to move to at the start of interval ``i`` (``level`` when staying)."""
    sizes = strategy.sizes
    top = len(sizes) - 1

    def fitting(rate: float) -> int:
        ok = [j for j, n in enumerate(sizes) if rate <= policy.up * slo_cap[n]]
        return ok[0] if ok else top

    if policy.name == "threshold":
        seen = demand[i - 1] if i > 0 else demand[0]
        if level < top and seen > policy.up * slo_cap[sizes[level]]:
            return max(fitting(seen), level + 1)
        if low_run + 1 >= policy.cooldown and _low(policy, demand, i, level, sizes, slo_cap):
            return level - 1
        return level
    dt = trace.interval
    up_seconds = strategy.step_seconds(sizes[level], sizes[top]) if level < top else 0.0
    near = demand[i:i + max(int(np.ceil((up_seconds + policy.lead) / dt)), 1)].max()
    if level < top and near > policy.up * slo_cap[sizes[level]]:
        return max(fitting(near), level + 1)
    far = demand[i:i + max(int(np.ceil(policy.lead / dt)) + policy.cooldown, 1)].max()
    if level > 0 and far <= policy.up * slo_cap[sizes[level - 1]]:
        return level - 1
    return level


def autoscale_frame(runs: list[AutoscaleRun]) -> pd.DataFrame:
    """Load, devices and latency over time, one row per run and interval (for plots)."""
    import pandas as pd

    frames = []
    for r in runs:
        frames.append(pd.DataFrame({
            "strategy": r.strategy, "policy": r.policy, "shape": r.trace.shape, "seed": r.trace.seed,
            "time_s": r.trace.times, "demand_tokens_per_s": r.demand, "devices": r.devices,
            "slo_capacity_tokens_per_s": r.capacity, "tpot_s": r.tpot,
            "slo_met_fraction": np.divide(r.met, r.demand * r.trace.interval, out=np.ones_like(r.met),
                                          where=r.demand > 0),
            "backlog_tokens": r.backlog, "scaling": r.scaling}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summary_frame(runs: list[AutoscaleRun]) -> pd.DataFrame:
    """One row per run: SLO attainment, device-hours, steps and time spent scaling."""
    import pandas as pd

    return pd.DataFrame([r.summary() for r in runs])
