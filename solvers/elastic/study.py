"""AutoscaleStudy: everything an autoscaling comparison needs, priced once, then every
(shape, seed, strategy, policy) run.

1. :func:`.latency.latency_table` at every size (and the replica size);
2. the elastic step between neighbouring sizes, planned with :func:`.step.plan_scaling` on the
   trace's load (scale-ups chained from the LPT placement at the smallest size, each scale-down
   from the placement its scale-up produced), and the restart and new-replica baselines;
3. :func:`.autoscale.simulate_autoscale` for each combination.

The demand peak (1.0 in a trace) is ``peak_fraction`` × the SLO capacity of the largest size, so
the largest size can serve the peak within the SLO. The default SLO is ``DEFAULT_SLO_FACTOR`` ×
the decode step at one sequence per device on the smallest size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moeplan.cost import CostModel
from moeplan.errors import InputError

from .autoscale import AutoscaleRun, Policy, Strategy, simulate_autoscale, static_strategy, strategies
from .costs import DEFAULT_RESTART_OVERHEAD, TransferCosts, replica_baseline, restart_baseline
from .latency import LatencyTable, latency_table
from .problem import ScalingProblem
from .step import plan_scaling
from .traffic import arrival_trace

DEFAULT_SLO_FACTOR = 2.5
DEFAULT_PEAK_FRACTION = 0.9


@dataclass
class AutoscaleStudy:
    """The priced inputs and the runs (module docstring). ``elastic_seconds[(n, m)]`` and
    ``elastic_bytes[(n, m)]``: the planned step between neighbouring sizes."""

    model: str
    hardware: str
    sizes: tuple[int, ...]
    table: LatencyTable
    slo: float
    peak_rate: float
    strategies: dict[str, Strategy]
    elastic_seconds: dict[tuple[int, int], float]
    elastic_bytes: dict[tuple[int, int], float]
    restart_seconds: dict[int, float]
    replica_seconds: float
    notes: list[str]
    runs: list[AutoscaleRun] = field(default_factory=list)


def check_sizes(sizes: tuple[int, ...]) -> tuple[int, ...]:
    out = tuple(sorted(set(int(s) for s in sizes)))
    if len(out) < 2 or out[0] < 1:
        raise InputError(f"need at least two device counts ≥ 1, got {list(sizes)}", field="sizes")
    return out


def prepare(cost: CostModel, load: np.ndarray, sizes: tuple[int, ...],
            slo: float | None = None, context: int = 4096, restart_overhead: float = DEFAULT_RESTART_OVERHEAD,
            peak_fraction: float = DEFAULT_PEAK_FRACTION) -> AutoscaleStudy:
    """Price everything (steps 1–2 of the module docstring)."""
    sizes = check_sizes(sizes)
    if not 0 < peak_fraction <= 1:
        raise InputError(f"must lie in (0, 1], got {peak_fraction}", field="peak-fraction")
    model, hardware = cost.model, cost.hw
    table = latency_table(cost, load, sizes, context)
    slo_s = slo if slo is not None else DEFAULT_SLO_FACTOR * float(table.step_seconds[0, 0])
    if slo_s <= 0:
        raise InputError(f"the SLO must be > 0 seconds, got {slo_s}", field="slo")
    costs = TransferCosts.of(cost, restart_overhead)
    placements = dict(zip(table.devices, table.placements))
    seconds: dict[tuple[int, int], float] = {}
    moved: dict[tuple[int, int], float] = {}
    current = placements[sizes[0]]
    for n, m in zip(sizes[:-1], sizes[1:]):
        up = plan_scaling(ScalingProblem.build(cost, current, load, m), costs, current)
        down = plan_scaling(ScalingProblem.build(cost, up.placement, load, n), costs, up.placement)
        seconds[(n, m)], moved[(n, m)] = up.seconds, up.schedule.bytes_moved
        seconds[(m, n)], moved[(m, n)] = down.seconds, down.schedule.bytes_moved
        current = up.placement
    non_expert = float(model.non_expert_params() * model.weight_bytes)
    slots = {n: p.slots_per_device for n, p in placements.items()}
    restart = {n: restart_baseline(costs, non_expert, model.expert_bytes(), model.num_moe_layers, n, slots[n]).seconds
               for n in sizes}
    replica = replica_baseline(costs, non_expert, model.expert_bytes(), model.num_moe_layers, sizes[0],
                               slots[sizes[0]]).seconds
    peak = peak_fraction * table.capacity(sizes[-1], slo_s)
    if peak <= 0:
        raise InputError(f"even {sizes[-1]} devices cannot keep a decode step within {slo_s * 1e3:.1f} ms",
                         field="slo", fix="raise the SLO")
    strats = strategies(sizes, seconds, lambda m: restart[m], replica)
    notes = costs.provenance() + [
        f"SLO: every decode step within {slo_s * 1e3:.1f} ms" + (" (default: 2.5 × the one-sequence step at "
                                                                 f"{sizes[0]} devices)" if slo is None else ""),
        f"demand 1.0 = {peak:,.0f} output tokens/s = {peak_fraction:g} × the SLO capacity of {sizes[-1]} devices",
        "replica strategy: " + ", ".join(str(s) for s in strats["replica"].sizes) + " devices; static: the "
        "smallest size covering each trace's peak"]
    return AutoscaleStudy(model.name, hardware.name, sizes, table, slo_s, peak, strats, seconds, moved, restart,
                          replica, notes)


def run_all(study: AutoscaleStudy, shapes: tuple[str, ...], seeds: tuple[int, ...], policies: tuple[str, ...],
            horizon: float = 7200.0, interval: float = 10.0) -> list[AutoscaleRun]:
    """Step 3 of the module docstring; the runs are also kept on ``study``."""
    runs = []
    for shape in shapes:
        for seed in seeds:
            trace = arrival_trace(shape, seed, horizon, interval)
            for strategy in study.strategies.values():
                for policy in policies:
                    runs.append(simulate_autoscale(trace, study.peak_rate, study.table, strategy, Policy(policy),
                                                   study.slo))
            static = static_strategy(study.table, study.sizes, float(trace.demand.max()) * study.peak_rate, study.slo)
            run = simulate_autoscale(trace, study.peak_rate, study.table, static, Policy(), study.slo)
            run.policy = "none"
            runs.append(run)
    study.runs = runs
    return runs
