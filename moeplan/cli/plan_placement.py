"""``moeplan plan placement``: place experts (with replicas and token shares) for a routing trace
or recorded loads, under the dispatch model of the runtime that will serve the plan."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from moeplan.solvers.placement import SOLVERS, PlacementProblem, SolverOptions, solve
from moeplan.solvers.placement.incremental import replace_incremental
from moeplan.solvers.placement.options import ROBUST_MODES
from moeplan.solvers.placement.pipeline import (JUDGE_FRACTION, default_slots, objective_explained, placement_plan,
                                                plan_from_loads, split_for_judging)
from moeplan.solvers.placement.problem import DEFAULT_TOKENS_PER_DEVICE, FLOW_MODELS

from moeplan.cli.apps import plan_app
from moeplan.cli.common import console, fmt, guarded, human_bytes, human_seconds, print_table, MAX_GPUS, check_option, resolve_hardware, status
from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.loads import Workloads, read_loads
from moeplan.model import ModelSpec
from moeplan.moves import Move
from moeplan.plan import DISPATCH_MODELS, Plan
from moeplan.stats import TraceStats
from moeplan.trace import RoutingTrace


@plan_app.command("placement")
@guarded
def placement(
    model: str = typer.Option(..., help="Model preset or config.json."),
    hardware: str = typer.Option("h100-sxm", help="Hardware profile name or YAML."),
    trace_path: Path = typer.Option(None, "--trace", help="Routing trace (.npz) to fit (its traffic terms too)."),
    load: list[Path] = typer.Option(None, "--load", help="Recorded expert loads, one workload per file (repeat): "
                                                         "SGLang recorder dumps (stat .json/.pt; per_pass or "
                                                         "per_token .pt, or a directory of one .pt per rank) or "
                                                         "moeplan load files. Several make the placement robust "
                                                         "across them."),
    dispatch: str = typer.Option("even", help=f"How the serving runtime splits an expert's tokens among its "
                                              f"replicas: {' | '.join(DISPATCH_MODELS)} (even: EPLB, vLLM; "
                                              f"sglang-static: SGLang; weighted: moeplan's runtime only)."),
    robust: str = typer.Option("mean", help=f"With several workloads: minimise the {' or the '.join(ROBUST_MODES)} "
                                            "workload's max device load."),
    extrapolate: float = typer.Option(None, help="With 3+ workloads: also fit each one's deviation from their mean "
                                                 "× (1 + this); default: chosen by leave-one-out within them."),
    leave_one_out: bool = typer.Option(False, help="With several --load files: also plan on all but each one and "
                                                   "judge on it."),
    solver: str = typer.Option("ilp", help=f"Placement solver: {' | '.join(SOLVERS)}."),
    slots: int = typer.Option(None, help="Physical expert slots per layer over all GPUs (replicas included); must "
                                         "divide evenly among the GPUs. Default: every expert once plus one slot "
                                         "per GPU when the experts fill the GPUs exactly, within memory."),
    gpus: int = typer.Option(None, help="GPUs (default: the profile's cluster)."),
    nodes: int = typer.Option(None, help="Nodes (default: filled from the profile's GPUs per node)."),
    time_limit: float = typer.Option(60.0, help="ILP: seconds for the whole run (the warm-start heuristics always finish; "
                                                     "the layer MILPs share the rest)."),
    gap: float = typer.Option(0.01, help="ILP: relative gap at which a layer's MILP stops."),
    milp: str = typer.Option("cpsat", help="ILP back end: cpsat (OR-Tools CP-SAT) or pulp (PuLP + HiGHS)."),
    flows: str = typer.Option("top1", help="Where a token is between layers: top1 (its top-1 expert's device, as "
                                           "the simulator's ExFlow mode) or spread (its k experts' devices)."),
    balance_cap: float = typer.Option(1.01, help="Hold each layer's max/mean device load to this on the trace where "
                                                 "the replicas allow (0 = trade balance for traffic freely)."),
    tokens_per_device: int = typer.Option(DEFAULT_TOKENS_PER_DEVICE, help="Tokens per GPU per step for the "
                                                                          "objective, memory and prediction."),
    judge_fraction: float = typer.Option(JUDGE_FRACTION, help="Share of the trace (its end) held out: the solver "
                                                              "fits the rest, the printed and saved figures judge "
                                                              "the plan on it (0: judge on the fitted tokens)."),
    current: Path = typer.Option(None, help="Re-place this plan's placement incrementally instead of solving "
                                            "from scratch (needs --move-budget)."),
    move_budget: float = typer.Option(None, help="With --current: GiB of expert weights that may move."),
    output: Path = typer.Option(..., "-o", "--output", help="Plan JSON to write."),
) -> None:
    """Solve expert placement for a trace, write a Plan and print its quality on held-out tokens:
    balancedness, devices and nodes touched per token, top-1 hops between layers, predicted MoE
    time, and the solver's objective, bound, gap and time."""
    for name, value in (("--gpus", gpus), ("--nodes", nodes), ("--slots", slots),
                        ("--tokens-per-device", tokens_per_device)):
        check_option(name, value, minimum=1)
    check_option("--gpus", gpus, maximum=MAX_GPUS)
    check_option("--time-limit", time_limit, above=0)
    check_option("--gap", gap, minimum=0)
    check_option("--move-budget", move_budget, minimum=0)
    if balance_cap != 0:
        check_option("--balance-cap", balance_cap, minimum=1)
    spec = ModelSpec.resolve(model)
    hw = resolve_hardware(hardware)
    if gpus is not None or nodes is not None:
        hw = hw.with_cluster(devices=gpus, nodes=nodes)
    if trace_path is None and not load:
        raise InputError("nothing to plan from", field="trace", fix="give --trace FILE and/or --load FILE")
    if dispatch not in DISPATCH_MODELS:
        raise InputError(f"unknown dispatch model '{dispatch}'", field="dispatch",
                         fix=f"use one of: {', '.join(DISPATCH_MODELS)}")
    if flows not in FLOW_MODELS:
        raise InputError(f"unknown flow model '{flows}'", field="flows", fix=f"use one of: {', '.join(FLOW_MODELS)}")
    if (current is None) != (move_budget is None):
        raise InputError("--current and --move-budget go together", field="current",
                         fix="give both to re-place incrementally, or neither to solve from scratch")
    options = SolverOptions(time_limit=time_limit, gap=gap, milp=milp, robust=robust, extrapolate=extrapolate,
                            balance_cap=balance_cap or None).validate()
    cost = CostModel(spec, hw)
    per_device = default_slots(cost, slots, tokens_per_device)
    workloads = read_loads(load, spec) if load else None
    if trace_path is None:
        assert workloads is not None
        if current is not None:
            raise InputError("--current re-places against a trace", field="current", fix="give --trace as well")
        _plan_from_loads(cost, workloads, per_device, tokens_per_device, dispatch, solver, options, leave_one_out,
                         output)
        return
    trace = RoutingTrace.load(trace_path)
    trace.check_model(spec.num_experts, spec.num_moe_layers, spec.top_k, str(trace_path))
    fit, judged = split_for_judging(trace, judge_fraction)
    stats = TraceStats.of(fit)
    with status(f"reading the trace's traffic ({fit.num_tokens:,} tokens)"):
        problem = replace(PlacementProblem.build(cost, stats, per_device, tokens_per_device, flows), dispatch=dispatch)
    if workloads is not None:
        problem = replace(problem, load=workloads.pooled() * (problem.load.sum() / workloads.pooled().sum()),
                          workloads=workloads.loads if workloads.count > 1 else None).validate()
    moves: tuple[Move, ...] = ()
    if current is not None:
        base = Plan.load(current)
        if base.placement is None:
            raise InputError("the plan has no placement", source=str(current), field="placement")
        if base.model.num_experts != spec.num_experts or base.model.num_moe_layers != spec.num_moe_layers:
            raise InputError(f"the plan is for {base.model.name}, not {spec.name}", source=str(current), field="model")
        with status("re-placing within the move budget"):
            inc = replace_incremental(problem, base.placement, move_budget * 2**30, options)
        placed, report, moves = inc.placement, inc.report(), inc.moves
    else:
        with status(f"solving with {solver}"):
            result = solve(problem, solver, options)
        placed, report = result.placement, result.report()
    with status("measuring and simulating the placement"):
        plan = placement_plan(problem, cost, placed, report, judged, tokens_per_device, moves,
                              "held-out tokens" if judge_fraction > 0 else "the fitted tokens (nothing held out)",
                              stats if judge_fraction == 0 else None)
    plan.save(output)
    _print(plan, report, current is not None)
    console.print(objective_explained(problem, plan.predicted), style="dim", highlight=False, markup=False)
    console.print(f"wrote {output}")


def _plan_from_loads(cost: CostModel, workloads: Workloads, per_device: int, tokens_per_device: int, dispatch: str,
                     solver: str, options: SolverOptions, leave_one_out: bool, output: Path) -> None:
    """Plan from recorded loads alone; print each workload's (and each held-out workload's) balance."""
    steps = f"solving with {solver} on {workloads.count} workload(s)" + (", then leaving each out" if leave_one_out else "")
    with status(steps):
        problem, plan, result = plan_from_loads(cost, workloads, per_device, tokens_per_device, dispatch, solver, options,
                                       leave_one_out)
    held = plan.predicted.get("leave_one_out_balancedness")
    plan.save(output)
    p, predicted = plan.placement, plan.predicted
    rows: list[tuple[str, Any]] = [("solver", result.solver), ("dispatch", p.dispatch),
                                   ("GPUs × slots", f"{plan.num_devices} × {p.slots_per_device} = {p.num_physical} "
                                                    f"physical for {p.num_experts} experts")]
    for name, value in predicted["workload_balancedness"].items():
        rows.append((f"balancedness on {name} (fitted)", value))
    for name, value in (held or {}).items():
        rows.append((f"balancedness on {name} (held out: planned on the others)", value))
    if held:
        rows.append(("leave-one-out mean balancedness", predicted["leave_one_out_mean"]))
    rows += [("objective (s/step)", fmt(result.objective)), ("proved lower bound (s/step)", fmt(result.bound)),
             ("gap", f"{100 * result.gap:.2f}%"), ("solver time", human_seconds(result.seconds))]
    print_table(f"{plan.model.name}: expert placement from recorded loads", ["quantity", "value"], rows)
    for note in result.notes:
        console.print(f"note: {note}", style="dim", highlight=False)
    console.print(objective_explained(problem), style="dim", highlight=False, markup=False)
    console.print(f"wrote {output}")


def _print(plan: Plan, report: dict[str, Any], incremental: bool) -> None:
    p, predicted = plan.placement, plan.predicted
    metrics = predicted
    rows = [("solver", report["name"]),
            ("GPUs × slots", f"{plan.num_devices} ({plan.nodes} node(s) × {plan.devices_per_node}) × "
                             f"{p.slots_per_device} = {p.num_physical} physical for {p.num_experts} experts"),
            ("dispatch", p.dispatch),
            ("balancedness (Σ max / Σ mean device load)", metrics["balancedness"]),
            ("devices touched per token per layer", metrics["devices_touched_per_token_layer"]),
            ("nodes touched per token per layer", metrics["nodes_touched_per_token_layer"]),
            ("top-1 cross-device hops per layer transition", metrics["top1_device_hops_per_transition"]),
            ("top-1 cross-node hops per layer transition", metrics["top1_node_hops_per_transition"]),
            (f"predicted MoE time per step, EP ({predicted['tokens_per_device']} tokens/GPU)",
             human_seconds(predicted["moe_seconds_ep"])),
            ("predicted MoE time per step, context-coherent (ExFlow)", human_seconds(predicted["moe_seconds_exflow"])),
            ("objective (s/step)", fmt(report["objective"]))]
    if "bound" in report:
        rows += [("proved lower bound (s/step)", fmt(report["bound"])), ("gap", f"{100 * report['gap']:.2f}%")]
    if incremental:
        rows += [("moves", f"{len(plan.moves)} ({human_bytes(report['bytes_moved'])})"),
                 ("balancedness before", report["balancedness_before"])]
    rows.append(("solver time", human_seconds(report["seconds"])))
    rows += [("cross-device hops per token per layer (of top-k rows)", predicted["cross_device_hops_per_token_layer"]),
             ("all-to-all bytes per step: EP → context-coherent",
              f"{human_bytes(predicted['alltoall_bytes_per_step_ep'])} → "
              f"{human_bytes(predicted['alltoall_bytes_per_step_coherent'])}")]
    rows.append(("judged on", f"{predicted['judged_tokens']:,} {predicted['judged_on']}"))
    print_table(f"{plan.model.name}: expert placement", ["quantity", "value"], rows)
    for note in list(report.get("notes", [])) + list(predicted.get("notes", [])):
        console.print(f"note: {note}", style="dim", highlight=False)
