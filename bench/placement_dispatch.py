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
   cost model's per-step objective at 4096 tokens per GPU) within ``--horizon`` steps; next to it the
   budgeted incremental re-placement (``moeplan plan placement --current``, ``--move-budget`` GiB
   per step, moves scored under the same equal split) and SGLang's EPLB every N iterations (EPLB
   on the last workload each time).

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
from moeplan.solvers.placement.incremental import replace_incremental
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


def synthetic(cost: CostModel, tokens: int, time_limit: float, seed: int) -> dict[str, Any]:
    spec = cost.model
    trace = synthesize(spec, SyntheticTraffic(tokens=tokens, seed=seed))
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
    return {"tokens": tokens, "seed": seed, "fitted_tokens": fit.num_tokens, "held_tokens": held.num_tokens,
            "rows": rows}


def over_seeds(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per placement, [min, mean, max] over the seeds' traces of held-out balancedness and of devices
    touched and top-1 hops relative to EPLB global's on the same trace."""
    out: dict[str, dict[str, list[float]]] = {}
    for name in runs[0]["rows"]:
        figures = {"balancedness": [r["rows"][name]["balancedness"] for r in runs]}
        for metric in ("devices_touched_per_token_layer", "top1_device_hops_per_transition"):
            figures[metric + "_vs_eplb_global"] = [r["rows"][name][metric] / r["rows"]["eplb global"][metric]
                                                   for r in runs]
        out[name] = {k: [min(v), sum(v) / len(v), max(v)] for k, v in figures.items()}
    return out


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


def move_seconds(old: Placement, new: Placement, expert_bytes: float, nvlink: float) -> float:
    """Seconds to turn ``old`` into ``new``: the moves run in parallel over the devices, each device
    receiving its new experts over NVLink (``nvlink`` bytes/s; inter-node and host copies not modelled)."""
    per_device = (old.slot_expert != new.slot_expert).sum(axis=(0, 2))
    return float(per_device.max()) * expert_bytes / nvlink


def schedule(cost: CostModel, w: Workloads, horizon: int, budget_gib: float) -> dict[str, Any]:
    """Re-placement schedule over the workloads taken as a sequence (module docstring, part 3): at
    each workload, a full re-placement and a budgeted incremental one (``--current``,
    :func:`replace_incremental`, ``budget_gib`` GiB of slot writes), both fitted on the workloads
    before it under ``sglang-static`` and each adopted when its move time is repaid within
    ``horizon`` steps; next to SGLang's EPLB re-run on the last workload."""
    spec, hw = cost.model, cost.hw
    expert_bytes = spec.expert_bytes()
    nvlink = float(hw.intra_node.bandwidth.value)
    current = incremental = last_eplb = None
    rows = []
    for i, name in enumerate(w.names):
        seen = Workloads(w.loads[:max(i, 1)], w.names[:max(i, 1)])
        fitted = PlacementProblem.from_loads(cost, seen.loads, 9, dispatch="sglang-static")
        candidate = realise(solve(fitted, "even", SolverOptions()).placement, "sglang-static", spec)
        if current is None:
            current = incremental = candidate
        t0 = time.perf_counter()
        stepped = realise(replace_incremental(fitted, incremental, budget_gib * 2**30).placement, "sglang-static",
                          spec)
        incremental_s = time.perf_counter() - t0
        judge = PlacementProblem.from_loads(cost, w.loads[i:i + 1], 9)

        def saved(old: Placement, new: Placement) -> float:
            return objective(judge, old).compute - objective(judge, new).compute

        move_s, inc_move_s = (move_seconds(current, candidate, expert_bytes, nvlink),
                              move_seconds(incremental, stepped, expert_bytes, nvlink))
        replace_now = saved(current, candidate) * horizon > move_s and i > 0
        step_now = saved(incremental, stepped) * horizon > inc_move_s and i > 0
        new_eplb = eplb(w.loads[max(i - 1, 0)], 1, 1, 32, 9, 8)
        eplb_moved = 0 if last_eplb is None else int((new_eplb.slot_expert != last_eplb.slot_expert).sum())
        rows.append({"workload": name, "keep": balancedness(current, w.loads[i]),
                     "re-placed": balancedness(candidate, w.loads[i]),
                     "moved_slots": int((candidate.slot_expert != current.slot_expert).sum()),
                     "move_seconds": move_s, "saved_seconds_per_step": saved(current, candidate),
                     "re-place": bool(replace_now),
                     "incremental keep": balancedness(incremental, w.loads[i]),
                     "incremental": balancedness(stepped, w.loads[i]),
                     "incremental_moved_slots": int((stepped.slot_expert != incremental.slot_expert).sum()),
                     "incremental_move_seconds": inc_move_s,
                     "incremental_saved_seconds_per_step": saved(incremental, stepped),
                     "incremental_step": bool(step_now), "incremental_solve_seconds": incremental_s,
                     "sglang eplb (last workload)": balancedness(new_eplb, w.loads[i]),
                     "sglang eplb moved_slots": eplb_moved,
                     "sglang eplb move_seconds": 0.0 if last_eplb is None else move_seconds(last_eplb, new_eplb,
                                                                                          expert_bytes, nvlink)})
        if replace_now:
            current = candidate
        if step_now:
            incremental = stepped
        last_eplb = new_eplb
        print(rows[-1], flush=True)
    return {"horizon_steps": horizon, "nvlink_bytes_per_s": nvlink, "expert_bytes": expert_bytes,
            "incremental_budget_gib": budget_gib, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--horizon", type=int, default=1000)
    ap.add_argument("--move-budget", type=float, default=64.0, help="GiB of slot writes per incremental step")
    ap.add_argument("--parts", default="synthetic,loo,schedule")
    ap.add_argument("--seeds", default="1", help="comma-separated seeds of the synthetic traces (one trace each)")
    ap.add_argument("--data", default=DATA, help="glob of the SGLang load files (the six workloads)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/placement_dispatch.json"))
    args = ap.parse_args()
    spec = ModelSpec.resolve("deepseek-v3")
    cost = CostModel(spec, HardwareProfile.resolve("measured/h200-sxm").with_cluster(devices=32, nodes=4))
    result: dict[str, Any] = {}
    parts = args.parts.split(",")
    w = read_loads(sorted(glob.glob(args.data)), spec) if {"loo", "schedule"} & set(parts) else None
    if "loo" in parts:
        result["leave_one_out"] = leave_one_out(cost, w)
    if "schedule" in parts:
        result["schedule"] = schedule(cost, w, args.horizon, args.move_budget)
    if "synthetic" in parts:
        runs = [synthetic(cost, args.tokens, args.time_limit, int(seed)) for seed in args.seeds.split(",")]
        result["synthetic"] = runs[0] if len(runs) == 1 else {"runs": runs, "over_seeds": over_seeds(runs)}
    write_json(args.out.with_name(args.out.stem + "_" + "_".join(parts) + ".json"), result)


if __name__ == "__main__":
    main()
