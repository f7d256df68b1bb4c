"""Placement under the runtimes' dispatch rules, from synthetic traces and from real recorded loads.

1. **Synthetic DeepSeek-V3** (32 GPUs = 4 nodes × 8, 288 slots, ``moeplan.synth`` default knobs):
   fitted on the first 70 % of the trace, judged on the held-out 30 %, every figure under
   ``even`` dispatch (each replica gets 1/replicas of its expert's tokens, what EPLB's exported
   tensors mean): moeplan's ILP under ``even``, the weighted ILP's slots served evenly (what its
   SGLang/EPLB export realises), EPLB hierarchical and global on the same fitted tokens.
2. **Real loads, leave-one-out**: the six SGLang-recorded DeepSeek-V3 workloads in
   ``../shared/data/sglang-deepseek-v3-expert-load``; for each, plan on the other five and judge
   on it, moeplan's robust equal-split placement (``even`` and ``sglang-static``) next to EPLB
   global and hierarchical fitted on the same five (pooled, each scaled to the same total).
3. **Re-placement schedule**: the six workloads as a sequence; at each change, re-place (fitted on
   the workloads seen so far) when the moved bytes' time over NVLink (profile figure, the busiest
   receiving device) is repaid by the expert-compute time per step the balance gain saves (the
   cost model's per-step objective at 4096 tokens per GPU) within ``--horizon`` steps; against keeping the first
   placement and against SGLang's EPLB every N iterations (EPLB on the last workload each time).

Usage: python bench/placement_dispatch.py [--tokens 100000] [--time-limit 60] [--out bench/results/placement_dispatch.json]
"""
from __future__ import annotations

import argparse
import glob
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from moeplan.cost import CostModel
from moeplan.dispatch import realise
from moeplan.hardware import HardwareProfile
from moeplan.io import write_json
from moeplan.loads import Workloads, read_loads
from moeplan.model import ModelSpec
from moeplan.plan import Placement
from moeplan.solvers.placement import PlacementProblem, SolverOptions, solve
from moeplan.solvers.placement.eplb import rebalance_experts
from moeplan.solvers.placement.metrics import balancedness, evaluate
from moeplan.solvers.placement.pipeline import split_for_judging
from moeplan.solvers.placement.problem import objective
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize

DATA = "../shared/data/sglang-deepseek-v3-expert-load/*.json"


def eplb(load: np.ndarray, groups: int, nodes: int, devices: int, slots: int, per_node: int) -> Placement:
    phy2log, _, _ = rebalance_experts(load, devices * slots, groups, nodes, devices)
    return Placement.from_slots(phy2log.reshape(load.shape[0], devices, slots), load.shape[1], per_node,
                                dispatch="even")


def synthetic(cost: CostModel, tokens: int, time_limit: float) -> dict[str, Any]:
    spec = cost.model
    trace = synthesize(spec, SyntheticTraffic(tokens=tokens, seed=1))
    fit, held = split_for_judging(trace)
    stats = TraceStats.of(fit)
    problem = PlacementProblem.build(cost, stats, 9)
    rows: dict[str, Any] = {}
    for name, dispatch, solver in (("moeplan ilp (even)", "even", "ilp"), ("moeplan even heuristic", "even", "even"),
                                   ("weighted ilp, served evenly", "weighted", "ilp")):
        t0 = time.perf_counter()
        r = solve(replace(problem, dispatch=dispatch), solver, SolverOptions(time_limit=time_limit))
        seconds = time.perf_counter() - t0
        served = realise(r.placement, "even", spec)
        rows[name] = {**evaluate(served, held).summary(), "fitted_balancedness": balancedness(served, fit_load(stats)),
                      "seconds": seconds, "bound": r.bound, "gap": r.gap, "objective": r.objective}
        if dispatch == "weighted":
            rows[name]["balancedness_weighted_own_shares"] = evaluate(r.placement, held).balancedness
        print(name, {k: rows[name][k] for k in ("balancedness", "devices_touched_per_token_layer",
                                                "top1_device_hops_per_transition", "seconds")}, flush=True)
    for name, groups, nodes in (("eplb hierarchical", spec.n_group, 4), ("eplb global", 1, 1)):
        p = eplb(stats.load, groups, nodes, 32, 9, 8)
        rows[name] = {**evaluate(p, held).summary(), "fitted_balancedness": balancedness(p, fit_load(stats))}
        print(name, rows[name]["balancedness"], flush=True)
    return {"tokens": tokens, "fitted_tokens": fit.num_tokens, "held_tokens": held.num_tokens, "rows": rows}


def fit_load(stats: TraceStats) -> np.ndarray:
    return stats.load


def leave_one_out(cost: CostModel, w: Workloads) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, name in enumerate(w.names):
        rest = w.without(i)
        row: dict[str, float] = {}
        for dispatch in ("even", "sglang-static"):
            t0 = time.perf_counter()
            r = solve(PlacementProblem.from_loads(cost, rest.loads, 9, dispatch=dispatch), "even", SolverOptions())
            row[f"moeplan {dispatch}"] = balancedness(realise(r.placement, dispatch, cost.model), w.loads[i])
            row[f"moeplan {dispatch} seconds"] = time.perf_counter() - t0
            row[f"moeplan {dispatch} extrapolate"] = r.extra["extrapolate"]
            row[f"moeplan {dispatch} fitted mean"] = float(np.mean([balancedness(realise(r.placement, dispatch,
                                                                                         cost.model), x)
                                                                    for x in rest.loads]))
        row["eplb global"] = balancedness(eplb(rest.pooled(), 1, 1, 32, 9, 8), w.loads[i])
        row["eplb hierarchical"] = balancedness(eplb(rest.pooled(), cost.model.n_group, 4, 32, 9, 8), w.loads[i])
        row["eplb on itself"] = balancedness(eplb(w.loads[i], 1, 1, 32, 9, 8), w.loads[i])
        out[name] = row
        print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)
    return out


def schedule(cost: CostModel, w: Workloads, horizon: int) -> dict[str, Any]:
    """Re-placement schedule over the workloads taken as a sequence (module docstring, part 3)."""
    spec, hw = cost.model, cost.hw
    expert_bytes = spec.expert_bytes()
    nvlink = float(hw.intra_node.bandwidth.value)
    current = None
    rows = []
    for i, name in enumerate(w.names):
        seen = Workloads(w.loads[:max(i, 1)], w.names[:max(i, 1)])
        candidate = realise(solve(PlacementProblem.from_loads(cost, seen.loads, 9, dispatch="sglang-static"),
                                  "even", SolverOptions()).placement, "sglang-static", spec)
        if current is None:
            current = candidate
        b_keep = balancedness(current, w.loads[i])
        b_new = balancedness(candidate, w.loads[i])
        moved = int((candidate.slot_expert != current.slot_expert).sum())
        # moves run in parallel over the devices; each device receives its new experts over NVLink
        move_s = float(np.max([((candidate.slot_expert[:, d] != current.slot_expert[:, d]).sum()) * expert_bytes
                               for d in range(hw.num_devices)]) / nvlink)
        judge = PlacementProblem.from_loads(cost, w.loads[i:i + 1], 9)
        saved_per_step = objective(judge, current).compute - objective(judge, candidate).compute
        replace_now = saved_per_step * horizon > move_s and i > 0
        prev_eplb = eplb(w.loads[max(i - 1, 0)], 1, 1, 32, 9, 8)
        rows.append({"workload": name, "keep": b_keep, "re-placed": b_new, "moved_slots": moved,
                     "moved_bytes": moved * expert_bytes, "move_seconds": move_s,
                     "saved_seconds_per_step": saved_per_step, "re-place": bool(replace_now),
                     "sglang eplb (last workload)": balancedness(prev_eplb, w.loads[i])})
        if replace_now:
            current = candidate
        print(rows[-1], flush=True)
    return {"horizon_steps": horizon, "nvlink_bytes_per_s": nvlink, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--horizon", type=int, default=1000)
    ap.add_argument("--parts", default="synthetic,loo,schedule")
    ap.add_argument("--out", type=Path, default=Path("bench/results/placement_dispatch.json"))
    args = ap.parse_args()
    spec = ModelSpec.resolve("deepseek-v3")
    cost = CostModel(spec, HardwareProfile.resolve("measured/h200-sxm").with_cluster(devices=32, nodes=4))
    result: dict[str, Any] = {}
    parts = args.parts.split(",")
    w = read_loads(sorted(glob.glob(DATA)), spec)
    if "loo" in parts:
        result["leave_one_out"] = leave_one_out(cost, w)
    if "schedule" in parts:
        result["schedule"] = schedule(cost, w, args.horizon)
    if "synthetic" in parts:
        result["synthetic"] = synthetic(cost, args.tokens, args.time_limit)
    write_json(args.out.with_name(args.out.stem + "_" + "_".join(parts) + ".json"), result)


if __name__ == "__main__":
    main()
