"""Elastic scaling benchmark: planned steps vs restarting and adding replicas, autoscaling on
bursty traffic, and a live CPU scaling run of the torch runtime.

1. **Scaling steps** (planner + cost model): DeepSeek-V3 on 32 → 40 → 48 → 32 H100s (each step
   from the placement the previous one produced, starting from EPLB on the trace) and
   Mixtral-8x22B on 8 → 16 (from the runtime-default contiguous placement): bytes moved, predicted
   step time and downtime against a restart at the new size and a whole new replica; balance
   before/after, transfers against the proved lower bound, peak extra memory. Plus the
   bytes-vs-balance trade-off of DeepSeek-V3 32 → 40.
2. **Autoscaling**: DeepSeek-V3 at 32 … 64 GPUs in steps of 8 on step / spike / diurnal traffic
   (seeds 0–2), threshold and look-ahead policies: SLO attainment, device-hours and seconds spent
   scaling for elastic scaling, restarts, whole replicas (32 GPUs each) and static provisioning.
3. **Live scaling on CPU**: 3 gloo processes serve a small MoE stack while the active set goes
   2 → 3 → 2 (four schedule rounds between two batches): per-batch wall seconds, the ledger check
   (no batch lost or served twice) and the outputs against an unscaled run.

The hardware profile is the measured ``hardware_profiles/measured/h100*.yaml`` when one exists,
else the ``h100-sxm`` datasheet profile; the report says which, and which numbers are measured.

Usage: python bench/elastic.py [--out bench/results] [--seeds 3] [--quick]
  → bench/results/elastic.md and bench/results/elastic.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from moeplan.solvers.elastic import ScalingProblem, ScalingStep, TransferCosts, plan_scaling, scaling_plans, tradeoff
from moeplan.solvers.elastic.autoscale import summary_frame
from moeplan.solvers.elastic.costs import DEFAULT_RESTART_OVERHEAD
from moeplan.solvers.elastic.study import prepare, run_all
from moeplan.solvers.placement import PlacementProblem, solve

from moeplan.cost import CostModel
from moeplan.hardware import HardwareProfile
from moeplan.io import write_json, write_text
from moeplan.model import ModelSpec
from moeplan.plan import Placement, contiguous_placement
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize

GIB = 2**30


def pick_profile() -> tuple[HardwareProfile, str]:
    """The measured H100 profile if one is bundled, else the datasheet one; and a sentence saying which."""
    measured = sorted(k for k in HardwareProfile.bundled() if k.startswith("measured/h100"))
    if measured:
        hw = HardwareProfile.resolve(measured[0])
        return hw, f"measured profile `{measured[0]}` ({hw.provenance_note()})"
    hw = HardwareProfile.resolve("h100-sxm")
    return hw, ("datasheet profile `h100-sxm` (no measured H100 profile in hardware_profiles/measured/): "
                "P2P, H2D and NVLink/InfiniBand figures are datasheet values, not measurements")


def step_row(label: str, step: ScalingStep, costs: TransferCosts) -> dict[str, Any]:
    s = step.summary()
    return {"step": label, **{k: s[k] for k in (
        "from_devices", "to_devices", "slots_per_device", "balance_before", "balance_after",
        "worst_layer_balance_after", "transfers", "transfers_lower_bound", "local_copies", "rounds",
        "expert_bytes_moved", "bring_up_bytes", "bytes_moved", "seconds", "bring_up_seconds", "transfer_seconds",
        "peak_extra_slots_max", "peak_slots_max", "capacity_slots", "solver_seconds")},
            "link_bound_seconds": step.schedule.link_bound(costs),
            "restart": s["restart"], "new_replica": s["new_replica"]}


def scaling_steps(hw: HardwareProfile, tokens: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Section 1: the steps and the DeepSeek-V3 32 → 40 trade-off."""
    rows: list[dict[str, Any]] = []
    ds = ModelSpec.preset("deepseek-v3")
    load = TraceStats.of(synthesize(ds, SyntheticTraffic(tokens=tokens, seed=0))).load.astype(np.float64)
    costs = TransferCosts.of(CostModel(ds, hw))
    start = solve(PlacementProblem.from_arrays(load, 32, 9, hw.devices_per_node, n_group=ds.n_group), "eplb").placement
    current: Placement = start
    trade: list[dict[str, Any]] = []
    for n, m in ((32, 40), (40, 48), (48, 32)):
        problem = ScalingProblem.build(CostModel(ds, hw), current, load, m)
        step = plan_scaling(problem, costs, current)
        rows.append({"model": ds.name, **step_row(f"{n} → {m}", step, costs)})
        if (n, m) == (32, 40):
            trade = [r.to_dict() for r in tradeoff(problem, costs)]
        current = step.placement
    mx = ModelSpec.preset("mixtral-8x22b")
    load = TraceStats.of(synthesize(mx, SyntheticTraffic(tokens=tokens, seed=0))).load.astype(np.float64)
    costs = TransferCosts.of(CostModel(mx, hw))
    old = contiguous_placement(mx.num_moe_layers, mx.num_experts, 8, hw.devices_per_node)
    step = plan_scaling(ScalingProblem.build(CostModel(mx, hw), old, load, 16), costs, old)
    rows.append({"model": mx.name, **step_row("8 → 16", step, costs)})
    return rows, trade


def autoscaling(hw: HardwareProfile, tokens: int, seeds: int) -> tuple[list[dict[str, Any]], list[str], dict]:
    """Section 2."""
    ds = ModelSpec.preset("deepseek-v3")
    load = TraceStats.of(synthesize(ds, SyntheticTraffic(tokens=tokens, seed=0))).load
    study = prepare(CostModel(ds, hw), load, (32, 40, 48, 56, 64))
    runs = run_all(study, ("step", "spike", "diurnal"), tuple(range(seeds)), ("threshold", "lookahead"))
    table = summary_frame(runs)
    grouped = (table.groupby(["shape", "strategy", "policy"], sort=False)
               .agg(slo_attainment=("slo_attainment", "mean"), slo_min=("slo_attainment", "min"),
                    device_hours=("device_hours", "mean"), scaling_steps=("scaling_steps", "mean"),
                    scaling_seconds=("scaling_seconds", "mean")).reset_index())
    priced = {"slo_s": study.slo, "peak_tokens_per_s": study.peak_rate,
              "elastic_step_seconds": {f"{a}->{b}": v for (a, b), v in study.elastic_seconds.items()},
              "elastic_step_bytes": {f"{a}->{b}": v for (a, b), v in study.elastic_bytes.items()},
              "restart_seconds": {str(k): v for k, v in study.restart_seconds.items()},
              "replica_seconds": study.replica_seconds,
              "slo_capacity_tokens_per_s": {str(n): study.table.capacity(n, study.slo) for n in study.sizes}}
    return grouped.to_dict(orient="records"), study.notes, priced


# ---- section 3: live scaling on CPU -------------------------------------------------------------------
def small_model() -> ModelSpec:
    """16 experts, top-2, 4 MoE layers, hidden 64, expert FFN 128, a shared expert of 64."""
    return dataclasses.replace(ModelSpec.preset("deepseek-v2-lite"), name="small-moe", num_layers=4,
                               moe_layers=(0, 1, 2, 3), hidden_size=64, expert_ffn=128, num_experts=16, top_k=2,
                               shared_ffn=64, num_shared_experts=1, n_group=1, topk_group=1).validate()


ROUNDS_PER_BATCH = 4


def _live_worker(rank: int, world: int, port: int, out: str, batches: int, every: int) -> None:
    import torch
    import torch.distributed as dist

    from moeplan.runtime.comm import Comm
    from moeplan.runtime.elastic import run_elastic

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = small_model()
    trace = synthesize(model, SyntheticTraffic(tokens=4000, zipf=1.0, seed=3))
    start = contiguous_placement(4, 16, 2, 1, 9)
    plans = scaling_plans(CostModel(model, HardwareProfile.resolve("h100-sxm")), start, TraceStats.of(trace).load,
                          [2, 3, 2])
    report = run_elastic(Comm(rank, world, torch.device("cpu")), model, start, trace, plans, batches, 192, every,
                         rounds_per_batch=ROUNDS_PER_BATCH)
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


def live_cpu(batches: int, every: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "live.json")
        t0 = time.perf_counter()
        mp.start_processes(_live_worker, args=(3, port, out, batches, every), nprocs=3, start_method="spawn")
        report = json.loads(Path(out).read_text())
    report["wall_seconds"] = time.perf_counter() - t0
    return report


def phases(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Median per-batch seconds in each phase of the live run: steady on an active set, or
    serving while a step's rounds run between batches."""
    seconds, epochs, active = report["batch_seconds"], report["batch_epoch"], report["batch_active"]
    starts = {s["after"] for s in report["steps"]}
    out: list[dict[str, Any]] = []
    running = False
    for i, (sec, epoch, act) in enumerate(zip(seconds, epochs, active)):
        if i in starts:
            running = True
        if i > 0 and epoch != epochs[i - 1]:
            running = False
        label = f"{act} active, " + ("serving + scaling rounds" if running else "steady")
        if not running and i > 0 and epoch != epochs[i - 1]:
            label += " (first after the switch)"
        if out and out[-1]["phase"] == label and out[-1]["epoch"] == epoch:
            out[-1]["seconds"].append(sec)
        else:
            out.append({"phase": label, "epoch": epoch, "first_batch": i, "seconds": [sec]})
    for p in out:
        p["batches"] = len(p["seconds"])
        p["median_ms"] = 1e3 * float(np.median(p.pop("seconds")))
    return out


# ---- report --------------------------------------------------------------------------------------------
def gib(x: float) -> str:
    return f"{x / GIB:,.1f} GiB"


def secs(x: float) -> str:
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def markdown(data: dict[str, Any]) -> str:
    lines = ["# Elastic scaling", "", f"Hardware: {data['profile']}.", "",
             f"Restart overhead (process start, runtime + communicator init, graph capture, warm-up) is "
             f"**assumed** {data['restart_overhead_s']:g} s — no profile measures it; the *loading* column is the "
             "baselines' pure weight-load time (every device reading its weights from host memory at H2D "
             "bandwidth, in parallel), i.e. the baselines with a zero restart overhead. Expert traffic: synthetic "
             "trace, Zipf 0.6.", "",
             "## 1. Scaling steps: elastic vs restart vs a new replica", "",
             "| model | step | slots/dev | balance before → after | transfers (bound) | bytes moved | rounds | "
             "elastic step | restart: time / loading / downtime | restart bytes | new replica: time / loading | "
             "replica bytes → devices | peak extra slots | planner |",
             "| --- | --- | --- | --- | --- | --- | ---: | ---: | --- | ---: | --- | --- | ---: | ---: |"]
    for r in data["steps"]:
        rs, nr = r["restart"], r["new_replica"]
        lines.append(
            f"| {r['model']} | {r['step']} | {r['slots_per_device']['before']} → {r['slots_per_device']['after']} | "
            f"{r['balance_before']:.3f} → {r['balance_after']:.3f} | {r['transfers']:,} ({r['transfers_lower_bound']:,}) | "
            f"{gib(r['bytes_moved'])} | {r['rounds']:,} | **{secs(r['seconds'])}**, 0 downtime | "
            f"{secs(rs['seconds'])} / {secs(rs['load_seconds'])} / {secs(rs['downtime_s'])} | {gib(rs['bytes'])} | "
            f"{secs(nr['seconds'])} / {secs(nr['load_seconds'])} | {gib(nr['bytes'])} → {nr['devices_after']} | "
            f"{r['peak_extra_slots_max']} | {r['solver_seconds']:.1f} s |")
    lines += ["", "Elastic step = bring-up (non-expert weights to joining devices over P2P) + rounds of expert "
              "copies (≤ 1 send and 1 receive per device per round) + the switch; `bytes moved` counts both. "
              "Bound: no placement with the same replica counts keeps more experts in place (max-flow). "
              "Link bound of the transfer phase (busiest device back to back): "
              + ", ".join(f"{r['step']} {secs(r['link_bound_seconds'])}" for r in data["steps"]) + ".", "",
              "### Bytes moved vs balance after the step (DeepSeek-V3, 32 → 40)", "",
              "| balance target | balance after | worst layer | transfers | bytes moved | step time | peak extra slots |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in data["tradeoff"]:
        target = "none" if math.isinf(t["target"]) else f"{t['target']:g}"
        lines.append(f"| {target} | {t['balance_after']:.3f} | {t['worst_layer_balance_after']:.3f} | "
                     f"{t['transfers']:,} | {gib(t['bytes_moved'])} | {secs(t['seconds'])} | {t['peak_extra_slots']} |")
    a = data["autoscale"]
    lines += ["", "## 2. Autoscaling DeepSeek-V3 (32 … 64 H100s in steps of 8; decode, 4096-token context)", "",
              *[f"- {n}" for n in a["notes"]],
              "- elastic step seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in a["priced"]["elastic_step_seconds"].items()),
              f"- {len(a['seeds'])} seeds per shape ({', '.join(map(str, a['seeds']))}), 2-hour traces, 10-s decisions; "
              "SLO attainment = share of output tokens served with every decode step within the SLO and no queue "
              "(mean over seeds, min in brackets).", "",
              "| shape | strategy | policy | SLO attainment | device-hours | scaling steps | seconds scaling |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in a["rows"]:
        lines.append(f"| {r['shape']} | {r['strategy']} | {r['policy']} | {100 * r['slo_attainment']:.1f}% "
                     f"({100 * r['slo_min']:.1f}%) | {r['device_hours']:.1f} | {r['scaling_steps']:.1f} | "
                     f"{r['scaling_seconds']:.1f} |")
    live = data["live"]
    lines += ["", "## 3. Live scaling on CPU (gloo, 3 processes, active set 2 → 3 → 2)", "",
              f"Model: {live['model']}; {live['batches']} batches of {live['global_tokens']} tokens; "
              f"{ROUNDS_PER_BATCH} schedule rounds between two batches; steps after batches {', '.join(str(s['after']) for s in live['steps'])}. "
              f"Epochs (active sets): {live['epochs']}. Every batch served exactly once by its epoch's active set "
              f"(ledger checked on all ranks; batches served per rank {live['served']}); received experts equal "
              f"their deterministic weights ({live['weight_mismatches']} mismatches); outputs vs the unscaled run: "
              f"max |diff| {live['outputs_max_abs_diff']:.2g} (0 before the first switch; after it, float32 "
              "rounding from GEMMs over regrouped rows).", "",
              "| phase | first batch | batches | median ms / batch |", "| --- | ---: | ---: | ---: |"]
    for p in live["phases"]:
        lines.append(f"| {p['phase']} | {p['first_batch']} | {p['batches']} | {p['median_ms']:.2f} |")
    lines += ["", "Per-batch seconds (slowest rank): " + ", ".join(f"{1e3 * s:.1f}" for s in live["batch_seconds"])
              + " ms.", "", "CPU timings are functional only: 2 shared cores, tiny shapes."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=20_000, help="Synthetic trace tokens for expert loads.")
    p.add_argument("--quick", action="store_true", help="One seed, fewer live batches (smoke run).")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    hw, profile = pick_profile()
    t0 = time.perf_counter()
    steps, trade = scaling_steps(hw, args.tokens)
    seeds = 1 if args.quick else args.seeds
    rows, notes, priced = autoscaling(hw, args.tokens, seeds)
    live = live_cpu(24 if args.quick else 40, 8 if args.quick else 12)
    live.update(model=small_model().name + " (16 experts, top-2, 4 MoE layers, hidden 64, FFN 128)",
                phases=phases(live))
    data = {"profile": profile, "restart_overhead_s": DEFAULT_RESTART_OVERHEAD,
            "steps": steps, "tradeoff": trade,
            "autoscale": {"rows": rows, "notes": notes, "priced": priced, "seeds": list(range(seeds))},
            "live": live, "bench_seconds": time.perf_counter() - t0}
    out = Path(args.out)
    write_json(out / "elastic.json", data)
    text = markdown(data)
    write_text(out / "elastic.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
