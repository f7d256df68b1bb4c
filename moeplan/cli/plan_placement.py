"""``moeplan plan placement``: place experts (with replicas and token shares) for a routing trace."""
from __future__ import annotations

from pathlib import Path

import typer
from moeplan.solvers.placement import SOLVERS, PlacementProblem, SolverOptions, solve
from moeplan.solvers.placement.exflow import traffic_report
from moeplan.solvers.placement.incremental import replace_incremental
from moeplan.solvers.placement.metrics import evaluate
from moeplan.solvers.placement.predict import predict_moe_step
from moeplan.solvers.placement.problem import (DEFAULT_TOKENS_PER_DEVICE, FLOW_MODELS, default_slots_per_device,
                                               slots_per_device_of)

from moeplan.cli.apps import plan_app
from moeplan.cli.common import console, fmt, guarded, human_bytes, human_seconds, print_table
from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.plan import Plan
from moeplan.stats import TraceStats
from moeplan.trace import RoutingTrace


@plan_app.command("placement")
@guarded
def placement(
    model: str = typer.Option(..., help="Model preset or config.json."),
    hardware: str = typer.Option("h100-sxm", help="Hardware profile name or YAML."),
    trace_path: Path = typer.Option(..., "--trace", help="Routing trace (.npz) to fit."),
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
    current: Path = typer.Option(None, help="Re-place this plan's placement incrementally instead of solving "
                                            "from scratch (needs --move-budget)."),
    move_budget: float = typer.Option(None, help="With --current: GiB of expert weights that may move."),
    output: Path = typer.Option(..., "-o", "--output", help="Plan JSON to write."),
) -> None:
    """Solve expert placement for a trace, write a Plan and print its quality: balancedness, devices
    and nodes touched per token, top-1 hops between layers, predicted MoE time, and the solver's
    objective, bound, gap and time."""
    spec = ModelSpec.resolve(model)
    hw = HardwareProfile.resolve(hardware)
    if gpus is not None or nodes is not None:
        hw = hw.with_cluster(devices=gpus, nodes=nodes)
    trace = RoutingTrace.load(trace_path)
    trace.check_model(spec.num_experts, spec.num_moe_layers, spec.top_k, str(trace_path))
    if flows not in FLOW_MODELS:
        raise InputError(f"unknown flow model '{flows}'", field="flows", fix=f"use one of: {', '.join(FLOW_MODELS)}")
    if (current is None) != (move_budget is None):
        raise InputError("--current and --move-budget go together", field="current",
                         fix="give both to re-place incrementally, or neither to solve from scratch")
    options = SolverOptions(time_limit=time_limit, gap=gap, milp=milp,
                            balance_cap=balance_cap if balance_cap > 0 else None).validate()
    cost = CostModel(spec, hw)
    d = hw.num_devices
    per_device = (slots_per_device_of(slots, d, spec.num_experts) if slots is not None
                  else default_slots_per_device(cost, spec.num_experts, d, tokens_per_device))
    stats = TraceStats.of(trace)
    with console.status(f"reading the trace's traffic ({trace.num_tokens:,} tokens)"):
        problem = PlacementProblem.build(spec, hw, stats, per_device, tokens_per_device, cost, flows)
    moves = None
    if current is not None:
        base = Plan.load(current)
        if base.placement is None:
            raise InputError("the plan has no placement", source=str(current), field="placement")
        if base.model.num_experts != spec.num_experts or base.model.num_moe_layers != spec.num_moe_layers:
            raise InputError(f"the plan is for {base.model.name}, not {spec.name}", source=str(current), field="model")
        with console.status("re-placing within the move budget"):
            inc = replace_incremental(problem, base.placement, move_budget * 2**30, options)
        placed, report, moves = inc.placement, inc.report(), inc.moves
    else:
        with console.status(f"solving with {solver}"):
            result = solve(problem, solver, options)
        placed, report = result.placement, result.report()
    with console.status("measuring and simulating the placement"):
        metrics = evaluate(placed, trace, stats=stats)
        predicted = {**predict_moe_step(spec, hw, placed, trace, tokens_per_device),
                     **traffic_report(problem, placed)}
    plan = Plan(model=spec, hardware=hw.name, devices_per_node=hw.devices_per_node, nodes=hw.nodes, placement=placed,
                moves=moves, solver={**report, "flows": flows, "slots_per_device": per_device},
                predicted={**metrics.summary(), **predicted})
    plan.save(output)
    _print(plan, metrics.summary(), predicted, report, moves)
    console.print(f"wrote {output}")


def _print(plan: Plan, metrics: dict, predicted: dict, report: dict, moves: list | None) -> None:
    p = plan.placement
    rows = [("solver", report["name"]),
            ("GPUs × slots", f"{plan.num_devices} ({plan.nodes} node(s) × {plan.devices_per_node}) × "
                             f"{p.slots_per_device} = {p.num_physical} physical for {p.num_experts} experts"),
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
    if moves is not None:
        rows += [("moves", f"{len(moves)} ({human_bytes(report['bytes_moved'])})"),
                 ("balancedness before", report["balancedness_before"])]
    rows.append(("solver time", human_seconds(report["seconds"])))
    rows += [("cross-device hops per token per layer (of top-k rows)", predicted["cross_device_hops_per_token_layer"]),
             ("all-to-all bytes per step: EP → context-coherent",
              f"{human_bytes(predicted['alltoall_bytes_per_step_ep'])} → "
              f"{human_bytes(predicted['alltoall_bytes_per_step_coherent'])}")]
    print_table(f"{plan.model.name}: expert placement", ["quantity", "value"], rows)
    for note in list(report.get("notes", [])) + list(metrics.get("notes", [])) + list(predicted.get("notes", [])):
        console.print(f"[dim]note: {note}[/]", highlight=False)
