"""Expert placement solvers side by side on synthetic DeepSeek-V3 traffic.

Traces come from ``moeplan.synth`` (Zipf-skewed popularity per layer, inter-layer affinity,
context locality, DeepSeek-V3's grouped routing: 8 groups, top-4 groups, top-8 experts). Every
solver is fitted on the first two thirds of a trace and measured on those fitted tokens and on the
held-out last third:

1. **Main**: DeepSeek-V3 on 32 H100s (4 nodes × 8), 288 physical slots (9 per GPU), the
   synthesiser's default knobs (zipf 0.6, affinity 0.4, locality 0.3, segment 64). Targets against
   EPLB: balancedness ≤ 1.02, ≥ 15 % fewer devices touched per token-layer, ≥ 30 % fewer top-1
   cross-device hops. Two structure probes run exflow with every balance limit lifted (a pure
   co-activation partition; layer-to-layer flows only) to show how much locality the trace holds.
2. **Stronger structure**: the same with affinity 0.6 (non-default knobs, labelled as such).
3. **Scale**: 64 GPUs / 320 slots and 256 GPUs / 512 slots: solve time, objective, proved bound.
4. **Incremental**: an EPLB placement fitted on one trace meets traffic from another seed (other
   hot experts); moves vs balancedness as the move budget grows.

Predicted MoE time per step comes from ``moeplan.simulate`` (held-out tokens, 4096 tokens per GPU)
on the measured H100 profile (expert kernels measured on one H100; links from the datasheet).

Usage: python bench/placement.py [--hardware PROFILE] [--tokens 150000] [--time-limit 60]
                                 [--out bench/results/placement.md]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from moeplan.solvers.placement import PlacementProblem, SolverOptions, solve
from moeplan.solvers.placement.exflow import traffic_report
from moeplan.solvers.placement.incremental import replace_incremental
from moeplan.solvers.placement.metrics import evaluate
from moeplan.solvers.placement.predict import predict_moe_step

from moeplan.cost import CostModel
from moeplan.hardware import HardwareProfile
from moeplan.io import write_json, write_text
from moeplan.model import ModelSpec
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize
from moeplan.trace import RoutingTrace

MODEL = "deepseek-v3"
HARDWARE = "measured/h100-sxm"
TOKENS_PER_DEVICE = 4096
BASELINES = ("contiguous", "round_robin", "lpt", "eplb")
TARGETS = {"balancedness": 1.02, "devices_touched_cut": 0.15, "top1_hops_cut": 0.30}


def log(msg: str) -> None:
    print(msg, flush=True)


def run_solvers(spec: ModelSpec, hw: HardwareProfile, fit: RoutingTrace, held: RoutingTrace, slots: int,
                solvers: list[tuple[str, str, SolverOptions]]) -> list[dict[str, Any]]:
    """Fit every (label, solver, options) on ``fit``; measure on fit and held-out tokens."""
    fit_stats, held_stats = TraceStats.of(fit), TraceStats.of(held)
    problem = PlacementProblem.build(CostModel(spec, hw), fit_stats, slots // hw.num_devices, TOKENS_PER_DEVICE)
    rows = []
    for label, name, options in solvers:
        result = solve(problem, name, options)
        fitted = evaluate(result.placement, fit, stats=fit_stats).summary()
        heldout = evaluate(result.placement, held, stats=held_stats).summary()
        predicted = predict_moe_step(CostModel(spec, hw), result.placement, held, TOKENS_PER_DEVICE)
        row = {"label": label, "solver": name, "objective": result.objective, "bound": result.bound,
               "gap": result.gap, "seconds": result.seconds, "notes": result.notes, "fit": fitted, "held": heldout,
               "predicted": predicted, "traffic": traffic_report(problem, result.placement),
               "extra": {k: v for k, v in result.extra.items() if not isinstance(v, (list, dict))}}
        rows.append(row)
        log(f"  {label:34s} {result.seconds:6.1f} s  objective {result.objective * 1e3:8.2f} ms  "
            f"bal {fitted['balancedness']:.4f}/{heldout['balancedness']:.4f}  "
            f"devices {heldout['devices_touched_per_token_layer']:.3f}  "
            f"hops {heldout['top1_device_hops_per_transition']:.3f}")
    return rows


def solver_table(rows: list[dict[str, Any]]) -> list[str]:
    head = ("| solver | time s | objective ms/step | bound | gap | balancedness fit / held | devices touched "
            "fit / held | nodes touched held | top-1 hops fit / held | top-1 node hops held | "
            "MoE ms/step EP / ExFlow (held) |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f, h, p = r["fit"], r["held"], r["predicted"]
        out.append(f"| {r['label']} | {r['seconds']:.1f} | {r['objective'] * 1e3:.2f} | {r['bound'] * 1e3:.2f} | "
                   f"{100 * r['gap']:.1f}% | {f['balancedness']:.4f} / {h['balancedness']:.4f} | "
                   f"{f['devices_touched_per_token_layer']:.3f} / {h['devices_touched_per_token_layer']:.3f} | "
                   f"{h['nodes_touched_per_token_layer']:.3f} | {f['top1_device_hops_per_transition']:.3f} / "
                   f"{h['top1_device_hops_per_transition']:.3f} | {h['top1_node_hops_per_transition']:.3f} | "
                   f"{p['moe_seconds_ep'] * 1e3:.1f} / {p['moe_seconds_exflow'] * 1e3:.1f} |")
    return out


def target_lines(rows: list[dict[str, Any]], labels: tuple[str, ...]) -> list[str]:
    """Each moeplan solver against EPLB, on fitted and held-out tokens (a positive percentage is a
    cut: fewer than EPLB)."""
    base = next(r for r in rows if r["solver"] == "eplb")
    out = ["Positive percentages are cuts (fewer than EPLB).", "",
           ("| solver | tokens | balancedness (≤ 1.02) | devices touched vs EPLB (≥ 15 % fewer) | "
            "top-1 hops vs EPLB (≥ 30 % fewer) | all targets |"), "|---|---|---|---|---|---|"]
    for r in rows:
        if r["label"] not in labels:
            continue
        for which in ("fit", "held"):
            m, b = r[which], base[which]
            bal = m["balancedness"]
            dev = 1 - m["devices_touched_per_token_layer"] / b["devices_touched_per_token_layer"]
            hop = 1 - m["top1_device_hops_per_transition"] / b["top1_device_hops_per_transition"]
            ok = (bal <= TARGETS["balancedness"], dev >= TARGETS["devices_touched_cut"], hop >= TARGETS["top1_hops_cut"])
            out.append(f"| {r['label']} | {which} | {bal:.4f} {'✓' if ok[0] else '✗'} | {100 * dev:+.1f}% "
                       f"{'✓' if ok[1] else '✗'} | {100 * hop:+.1f}% {'✓' if ok[2] else '✗'} | "
                       f"{'met' if all(ok) else 'missed'} |")
    return out


def probe_lines(spec: ModelSpec, hw: HardwareProfile, fit: RoutingTrace, held: RoutingTrace,
                rows: list[dict[str, Any]], options: SolverOptions, results: dict[str, Any], key: str) -> list[str]:
    """How much locality the trace holds at all: exflow with every balance limit lifted, once
    scoring only co-activation (no replicas, devices only: a pure co-activation partition) and
    once only the layer-to-layer flows (no co-activation)."""
    problem = PlacementProblem.build(CostModel(spec, hw), TraceStats.of(fit), 9, TOKENS_PER_DEVICE)
    free = replace(options, balance_cap=None, slack=1e3)
    w = problem.weights
    coact_only = replace(problem, slots_per_device=spec.num_experts // hw.num_devices, flows=problem.flows * 0.0,
                         weights=replace(w, inter_node=w.intra_node))
    flows_only = replace(problem, coactivation=problem.coactivation * 0.0)
    base = next(r for r in rows if r["solver"] == "eplb")["held"]
    out = ["Structure probes (balance limits lifted, so these are not usable placements; they show what the "
           "trace offers):", "", "| probe | balancedness held | devices touched held (vs EPLB) | "
           "top-1 hops held (vs EPLB) |", "|---|---|---|---|"]
    results[f"{key}_probes"] = []
    for label, prob, opts in (("co-activation only, no replicas", coact_only, replace(free, coactivation=1.0)),
                              ("layer-to-layer flows only", flows_only, free)):
        m = evaluate(solve(prob, "exflow", opts).placement, held).summary()
        results[f"{key}_probes"].append({"probe": label, "held": m})
        out.append(f"| {label} | {m['balancedness']:.3f} | {m['devices_touched_per_token_layer']:.3f} "
                   f"({100 * (1 - m['devices_touched_per_token_layer'] / base['devices_touched_per_token_layer']):+.1f}%)"
                   f" | {m['top1_device_hops_per_transition']:.3f} "
                   f"({100 * (1 - m['top1_device_hops_per_transition'] / base['top1_device_hops_per_transition']):+.1f}%) |")
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", default=HARDWARE, help="hardware profile (name or YAML)")
    ap.add_argument("--tokens", type=int, default=150_000, help="tokens per synthetic trace (2/3 fit, 1/3 held out)")
    ap.add_argument("--time-limit", type=float, default=60.0, help="ILP seconds per run")
    ap.add_argument("--move-budget-gib", type=float, default=8.0, help="largest move budget of the curve")
    ap.add_argument("--out", type=Path, default=Path("bench/results/placement.md"))
    args = ap.parse_args()
    spec = ModelSpec.preset(MODEL)
    profile = HardwareProfile.resolve(args.hardware)
    hw32 = profile.with_cluster(devices=32)
    default = SolverOptions(time_limit=args.time_limit)
    results: dict[str, Any] = {"model": spec.name, "hardware": args.hardware, "tokens": args.tokens,
                               "tokens_per_device": TOKENS_PER_DEVICE, "targets": TARGETS}
    lines = [f"# Expert placement: {spec.name}, synthetic traffic", "",
             f"Command: `python bench/placement.py --hardware {args.hardware} --tokens {args.tokens} "
             f"--time-limit {args.time_limit:g}`. "
             f"Traces: `moeplan.synth`, {args.tokens:,} tokens each, fitted on the first {2 * args.tokens // 3:,}, "
             f"held out the last {args.tokens - 2 * args.tokens // 3:,}. Hardware: {args.hardware} "
             f"({profile.provenance_note()}). Metrics: balancedness = Σ max / Σ mean device load; "
             "devices/nodes touched per token per layer and top-1 hops use the expected value over replica shares. "
             "Objective = the planner's cost (Σ max device compute + inter-layer token moves, s per step at "
             f"{TOKENS_PER_DEVICE} tokens/GPU); bound = its proved lower bound.", ""]

    t0 = time.perf_counter()
    log("synthesising the default trace")
    trace = synthesize(spec, SyntheticTraffic(tokens=args.tokens, seed=1))
    fit, held = trace.split(2 / 3)
    log("main: 32 GPUs / 4 nodes / 288 slots")
    main_solvers = [(s, s, default) for s in BASELINES] + [
        ("exflow", "exflow", default), ("ilp (CP-SAT)", "ilp", default),
        ("ilp (PuLP + HiGHS)", "ilp", replace(default, milp="pulp"))]
    main_rows = run_solvers(spec, hw32, fit, held, 288, main_solvers)
    results["main"] = main_rows
    lines += ["## 1. DeepSeek-V3, 32 GPUs (4 nodes × 8), 288 slots, default synthetic knobs", "",
              "zipf 0.6, affinity 0.4, locality 0.3, segment 64.", ""]
    lines += solver_table(main_rows) + [""]
    lines += ["Against the targets (EPLB as the baseline):", ""]
    lines += target_lines(main_rows, ("exflow", "ilp (CP-SAT)", "ilp (PuLP + HiGHS)")) + [""]
    lines += probe_lines(spec, hw32, fit, held, main_rows, default, results, "main")

    log("stronger structure: affinity 0.6")
    strong = synthesize(spec, SyntheticTraffic(tokens=args.tokens, affinity=0.6, locality=0.3, seed=3))
    sfit, sheld = strong.split(2 / 3)
    strong_rows = run_solvers(spec, hw32, sfit, sheld, 288, [
        ("lpt", "lpt", default), ("eplb", "eplb", default), ("exflow", "exflow", default),
        ("ilp (CP-SAT)", "ilp", default)])
    results["strong_affinity"] = strong_rows
    lines += ["## 2. Same cluster, stronger structure (non-default knobs: affinity 0.6, locality 0.3)", ""]
    lines += solver_table(strong_rows) + [""]
    lines += target_lines(strong_rows, ("exflow", "ilp (CP-SAT)")) + [""]
    lines += probe_lines(spec, hw32, sfit, sheld, strong_rows, default, results, "strong_affinity")

    lines += ["## 3. Scale (default trace)", "",
              "| GPUs / nodes / slots | solver | time s | objective ms/step | bound | gap | balancedness fit / held | "
              "layer solves | notes |", "|---|---|---|---|---|---|---|---|---|"]
    results["scale"] = []
    for gpus, slots in ((64, 320), (256, 512)):
        log(f"scale: {gpus} GPUs / {slots} slots")
        hw = profile.with_cluster(devices=gpus)
        rows = run_solvers(spec, hw, fit, held, slots, [(s, s, default) for s in ("lpt", "eplb", "exflow", "ilp")])
        for r in rows:
            results["scale"].append({"gpus": gpus, "slots": slots, **r})
            lines.append(f"| {gpus} / {hw.nodes} / {slots} | {r['label']} | {r['seconds']:.1f} | "
                         f"{r['objective'] * 1e3:.2f} | {r['bound'] * 1e3:.2f} | {100 * r['gap']:.1f}% | "
                         f"{r['fit']['balancedness']:.4f} / {r['held']['balancedness']:.4f} | "
                         f"{r['extra'].get('layer_solves', '–')} | {'; '.join(r['notes'][1:]) or '–'} |")
    lines.append("")

    log("incremental: EPLB placement meets traffic from another seed")
    drift = synthesize(spec, SyntheticTraffic(tokens=args.tokens // 3, seed=11))
    base_problem = PlacementProblem.build(CostModel(spec, hw32), TraceStats.of(fit), 9, TOKENS_PER_DEVICE)
    current = solve(base_problem, "eplb", default).placement
    new_problem = PlacementProblem.build(CostModel(spec, hw32), TraceStats.of(drift), 9, TOKENS_PER_DEVICE)
    inc = replace_incremental(new_problem, current, args.move_budget_gib * 2**30, default)
    scratch = solve(new_problem, "exflow", default)
    scratch_moves = int((scratch.placement.slot_expert != current.slot_expert).sum())
    results["incremental"] = {"curve": inc.curve, "seconds": inc.seconds, "balancedness_before": inc.balancedness_before,
                              "from_scratch": {"solver": "exflow", "balancedness": evaluate(
                                  scratch.placement, drift).balancedness, "slots_changed": scratch_moves}}
    lines += ["## 4. Incremental re-placement: moves vs balance", "",
              f"EPLB placement fitted on the default trace; new traffic from seed 11 ({drift.num_tokens:,} tokens). "
              f"Balancedness on the new traffic before any change: {inc.balancedness_before:.4f} "
              f"(token shares re-solved, no move: {inc.curve[0]['balancedness']:.4f}). One move = one layer's "
              f"expert ({new_problem.expert_bytes / 2**20:.0f} MiB). Greedy run to {args.move_budget_gib:g} GiB "
              f"took {inc.seconds:.1f} s; any smaller budget's plan is a prefix of it. For scale: re-placing from "
              f"scratch (exflow) reaches {results['incremental']['from_scratch']['balancedness']:.4f} but rewrites "
              f"{scratch_moves:,} of {current.slot_expert.size:,} slots.", "",
              "| moves | GiB moved | balancedness | objective ms/step |", "|---|---|---|---|"]
    marks = sorted({0, *[int(len(inc.curve) * f) for f in (0.05, 0.1, 0.25, 0.5, 0.75)], len(inc.curve) - 1})
    for i in marks:
        c = inc.curve[i]
        lines.append(f"| {c['moves']} | {c['bytes'] / 2**30:.2f} | {c['balancedness']:.4f} | "
                     f"{c['objective'] * 1e3:.2f} |")
    lines += ["", f"Total benchmark time {time.perf_counter() - t0:.0f} s on this machine."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out, text)
    write_json(args.out.with_suffix(".json"), results)
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
