"""``moeplan plan scale``: re-plan a placement for more or fewer devices, moving the fewest bytes."""
from __future__ import annotations

import math
from pathlib import Path

import typer
from moeplan.solvers.elastic import ScalingProblem, TransferCosts, plan_scaling, tradeoff
from moeplan.solvers.elastic.assign import METHODS
from moeplan.solvers.elastic.costs import DEFAULT_RESTART_OVERHEAD
from moeplan.solvers.elastic.problem import DEFAULT_BALANCE_TARGET, DEFAULT_TOKENS_PER_DEVICE
from moeplan.solvers.elastic.step import DEFAULT_TRADEOFF_TARGETS, ScalingStep

from moeplan.cli.apps import plan_app
from moeplan.cli.common import console, guarded, human_bytes, human_seconds, print_table
from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.plan import Plan
from moeplan.stats import TraceStats
from moeplan.trace import RoutingTrace


@plan_app.command("scale")
@guarded
def scale(
    plan_path: Path = typer.Option(..., "--plan", help="Current plan JSON (with a placement)."),
    trace_path: Path = typer.Option(..., "--trace", help="Routing trace (.npz) whose load the new placement balances."),
    to: int = typer.Option(None, "--to", help="Devices after the step."),
    to_nodes: int = typer.Option(None, "--to-nodes", help="Whole nodes after the step (instead of --to)."),
    model: str = typer.Option(None, help="Model preset or config.json (default: the plan's model)."),
    hardware: str = typer.Option(None, help="Hardware profile name or YAML (default: the one the plan was priced with)."),
    balance: float = typer.Option(DEFAULT_BALANCE_TARGET, help="Max / mean device load each layer should stay within."),
    slots: int = typer.Option(None, help="Expert slots per device after the step (default: every expert once, "
                                         "+1 redundant per device when the experts fill the devices exactly)."),
    method: str = typer.Option("auto", help=f"Assignment: {', '.join(METHODS)} (auto: CP-SAT per layer when "
                                            "experts × devices ≤ 2048, else greedy + local search)."),
    tokens_per_device: int = typer.Option(DEFAULT_TOKENS_PER_DEVICE, help="Activation tokens per device kept "
                                                                          "free in memory during the step."),
    kv_tokens: int = typer.Option(0, help="KV-cache tokens per device kept during the step (memory not "
                                          "available for copies in flight)."),
    restart_overhead: float = typer.Option(DEFAULT_RESTART_OVERHEAD, help="Seconds a restart or a new replica "
                                                                          "spends besides loading weights (assumed)."),
    show_tradeoff: bool = typer.Option(False, "--tradeoff", help="Also list bytes moved vs balance after the step "
                                                                 "for a range of balance targets."),
    output: Path = typer.Option(None, "-o", "--output", help="Write the new plan (placement, ordered moves, "
                                                             "predictions) as JSON."),
) -> None:
    """Plan an elastic scaling step: the new placement (balanced within --balance, fewest experts
    moved), the copy-before-delete move schedule, peak memory per device and the predicted step time,
    next to restarting at the new size and adding a whole replica."""
    plan = Plan.load(plan_path)
    if plan.placement is None:
        raise InputError("the plan has no placement", source=str(plan_path), field="placement",
                         fix="solve a placement first (or write one with contiguous_placement)")
    spec = ModelSpec.resolve(model) if model else plan.model
    if spec.num_experts != plan.model.num_experts or spec.num_moe_layers != plan.model.num_moe_layers:
        raise InputError(f"--model {model} has {spec.num_moe_layers} MoE layers × {spec.num_experts} experts, the "
                         f"plan's model {plan.model.num_moe_layers} × {plan.model.num_experts}", field="model")
    hw = plan.hardware_profile(hardware, str(plan_path))
    if (to is None) == (to_nodes is None):
        raise InputError("give exactly one of --to (devices) and --to-nodes", field="to")
    if to_nodes is not None and to_nodes < 1:
        raise InputError(f"must be ≥ 1, got {to_nodes}", field="to-nodes")
    target = to if to is not None else to_nodes * hw.devices_per_node
    if target > hw.devices_per_node and target % hw.devices_per_node:
        raise InputError(f"{target} devices do not fill whole nodes of {hw.devices_per_node}", field="to",
                         fix=f"use a multiple of {hw.devices_per_node} (or at most one node), or --to-nodes")
    new_cluster = hw.with_cluster(devices=target)
    trace = RoutingTrace.load(trace_path)
    trace.check_model(spec.num_experts, spec.num_moe_layers, spec.top_k, str(trace_path))
    cost = CostModel(spec, hw, plan.cost_options)
    problem = ScalingProblem.build(cost, plan.placement, TraceStats.of(trace).load, target, slots, balance,
                                   tokens_per_device, kv_tokens)
    costs = TransferCosts.of(cost, restart_overhead)
    step = plan_scaling(problem, costs, plan.placement, method)
    _print_step(step, spec, hw)
    if show_tradeoff:
        rows = tradeoff(problem, costs, DEFAULT_TRADEOFF_TARGETS)
        print_table("Bytes moved vs balance after the step", ["balance target", "balance after", "worst layer",
                                                               "transfers", "bytes moved", "step time",
                                                               "peak extra slots", "fits"],
                    [("none" if math.isinf(r.target) else f"{r.target:g}", f"{r.balance_after:.3f}",
                      f"{r.worst_layer_after:.3f}", r.transfers, human_bytes(r.bytes_moved), human_seconds(r.seconds),
                      r.peak_extra_slots, r.fits) for r in rows])
    if output:
        step.to_plan(spec, hw.ref(), new_cluster.devices_per_node, plan.cost_options).save(output)
        console.print(f"wrote {output}")


def _print_step(step: ScalingStep, spec: ModelSpec, hw: HardwareProfile) -> None:
    s = step.summary()
    p = step.problem
    restart, replica = step.restart, step.new_replica
    print_table(f"{spec.name}: {p.old_devices} → {p.new_devices} × {hw.device.name} "
                f"({p.old_slots_per_device} → {p.slots_per_device} slots per device)",
                ["way to scale", "time to new capacity", "of which loading", "downtime", "bytes moved", "devices after"],
                [("elastic (this plan)", human_seconds(step.seconds),
                  human_seconds(step.schedule.bring_up_seconds + float(step.schedule.round_seconds.sum())),
                  "0", human_bytes(s["bytes_moved"]), p.new_devices),
                 ("restart at the new size", human_seconds(restart.seconds), human_seconds(restart.load_seconds),
                  human_seconds(restart.downtime), human_bytes(restart.bytes), restart.devices_after),
                 ("add a whole replica", human_seconds(replica.seconds), human_seconds(replica.load_seconds), "0",
                  human_bytes(replica.bytes), replica.devices_after)])
    sch = step.schedule
    rows = [("balance (max/mean load) before → after", f"{s['balance_before']:.3f} → {s['balance_after']:.3f} "
             f"(worst layer {s['worst_layer_balance_after']:.3f}, target {p.balance_target:g}"
             f"{'' if step.target_met else ', not reached'})"),
            ("expert transfers", f"{s['transfers']:,} (lower bound {s['transfers_lower_bound']:,}), "
                                 f"{human_bytes(s['expert_bytes_moved'])}; {s['local_copies']:,} local copies"),
            ("non-expert weights to joining devices", human_bytes(s["bring_up_bytes"])),
            ("transfer rounds", f"{sch.rounds:,} (≤ 1 send and 1 receive per device each)"),
            ("predicted step", f"bring-up {human_seconds(s['bring_up_seconds'])} + transfers "
                               f"{human_seconds(s['transfer_seconds'])} + switch {human_seconds(s['switch_seconds'])}"),
            ("peak expert slots per device", f"{s['peak_slots_max']:,} of {s['capacity_slots']:,} "
                                             f"(at most {s['peak_extra_slots_max']:,} in flight beyond before/after)"),
            ("planner", f"{s['solver_seconds']:.2f} s")]
    print_table("Scaling step", ["quantity", "value"], rows)
    for note in s["notes"]:
        console.print(f"note: {note}", style="dim", highlight=False)
