"""How few devices can a token touch? The co-location bound against EPLB and moeplan.

On the synthetic DeepSeek-V3 trace of ``bench/placement_dispatch.py --parts synthetic`` (same
seed and split; 32 GPUs × 9 slots), for every ``--stride``-th layer: the proved lower bound of
:mod:`moeplan.solvers.placement.touched_bound` on the held-out tokens' devices touched per token
(any placement, balance ignored), next to what EPLB global and moeplan's equal-split heuristic
(both fitted on the first 70 %) touch on those tokens, and the issue's target (0.85 × EPLB).

Usage: python bench/placement_touched_bound.py [--tokens 60000] [--stride 15] [--out bench/results/placement_touched_bound.json]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from moeplan.cost import CostModel
from moeplan.dispatch import realise
from moeplan.hardware import HardwareProfile
from moeplan.io import write_json
from moeplan.model import ModelSpec
from moeplan.plan import Placement
from moeplan.solvers.placement import PlacementProblem, SolverOptions, solve
from moeplan.solvers.placement.metrics import touched
from moeplan.solvers.placement.pipeline import split_for_judging
from moeplan.solvers.placement.touched_bound import touched_bound
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize

from placement_dispatch import eplb  # noqa: E402  (bench/ is the script's directory)

SLOTS = 9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=60_000)
    ap.add_argument("--stride", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("bench/results/placement_touched_bound.json"))
    args = ap.parse_args()
    spec = ModelSpec.resolve("deepseek-v3")
    cost = CostModel(spec, HardwareProfile.resolve("measured/h200-sxm").with_cluster(devices=32, nodes=4))
    fit, held = split_for_judging(synthesize(spec, SyntheticTraffic(tokens=args.tokens, seed=1)))
    stats = TraceStats.of(fit)
    layers = list(range(0, spec.num_moe_layers, args.stride))
    ids = held.expert_ids[:, layers, :]
    t0 = time.process_time()
    bound = touched_bound(held.expert_ids, spec.num_experts, SLOTS, layers)
    bound_cpu = time.process_time() - t0
    problem = replace(PlacementProblem.build(cost, stats, SLOTS), dispatch="even")
    ours = realise(solve(problem, "even", SolverOptions()).placement, "even", spec)
    theirs = eplb(stats.load, 1, 1, 32, SLOTS, 8)
    eplb_t = touched(on_layers(theirs, layers), ids, "device")
    ours_t = touched(on_layers(ours, layers), ids, "device")
    rows = []
    for n, layer in enumerate(layers):
        rows.append({"layer": layer, "bound": float(bound[n]), "eplb_global": float(eplb_t[n]),
                     "moeplan_even": float(ours_t[n]), "target_0.85x_eplb": 0.85 * float(eplb_t[n])})
        print(rows[-1], flush=True)
    write_json(args.out, {"tokens": args.tokens, "held_tokens": held.num_tokens, "slots": SLOTS, "layers": layers,
                          "bound_cpu_seconds": bound_cpu, "rows": rows,
                          "mean": {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "layer"}})


def on_layers(placement: Placement, layers: list[int]) -> Placement:
    """``placement`` restricted to ``layers`` (for metrics on those layers' tokens)."""
    return Placement(placement.slot_expert[layers], placement.replica_share[layers], placement.num_experts,
                     placement.devices_per_node, placement.dispatch)


if __name__ == "__main__":
    main()
