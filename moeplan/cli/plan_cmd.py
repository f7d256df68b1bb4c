"""``moeplan plan`` (no subcommand): the end-to-end job — trace → stats → placement → validate →
export — and ``moeplan compare``: any plans (including imported ones) on the same traffic."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from moeplan.cli.apps import app, plan_app
from moeplan.cli.common import console, guarded, human_bytes, human_seconds, print_table, report_export, MAX_GPUS, check_option, resolve_hardware, status, track
from moeplan.cost import CostModel
from moeplan.dispatch import RUNTIME_DISPATCH, realise
from moeplan.errors import InputError
from moeplan.export.registry import EXPORTERS, export_plan
from moeplan.model import ModelSpec
from moeplan.plan import DISPATCH_MODELS, Plan
from moeplan.solvers.placement import SOLVERS, PlacementProblem, SolverOptions, solve
from moeplan.solvers.placement.pipeline import (JUDGE_FRACTION, default_slots, objective_explained, placement_plan,
                                                placement_quality, split_for_judging)
from moeplan.solvers.placement.problem import DEFAULT_TOKENS_PER_DEVICE
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize
from moeplan.trace import RoutingTrace


def print_quality(title: str, rows: list[dict[str, Any]]) -> None:
    """One column per plan."""
    fields = [("balancedness (Σ max / Σ mean device load)", "balancedness", "{:.4f}"),
              ("devices touched per token per layer", "devices_touched_per_token_layer", "{:.3f}"),
              ("nodes touched per token per layer", "nodes_touched_per_token_layer", "{:.3f}"),
              ("top-1 cross-device hops per layer transition", "top1_device_hops_per_transition", "{:.3f}"),
              ("predicted MoE time per step (EP)", "moe_seconds_ep", None),
              ("predicted MoE time per step (ExFlow)", "moe_seconds_exflow", None),
              ("peak memory per GPU", "memory_peak_bytes", "bytes")]
    table = []
    for label, key, form in fields:
        cells = []
        for r in rows:
            v = r[key]
            cells.append(human_seconds(v) if form is None else human_bytes(v) if form == "bytes" else form.format(v))
        table.append((label, *cells))
    print_table(title, ["metric", *[r["name"] for r in rows]], table)


@plan_app.callback(invoke_without_command=True)
@guarded
def plan_end_to_end(
    ctx: typer.Context,
    model: str = typer.Option("deepseek-v3", help="Model preset or config.json."),
    hardware: str = typer.Option("measured/h100-sxm", help="Hardware profile name or YAML."),
    gpus: int = typer.Option(32, help="GPUs."),
    nodes: int = typer.Option(None, help="Nodes (default: filled from the profile's GPUs per node)."),
    trace_path: Path = typer.Option(None, "--trace", help="Routing trace (.npz); default: synthesise one."),
    tokens: int = typer.Option(50_000, help="Tokens to synthesise when no --trace is given."),
    solver: str = typer.Option("ilp", help=f"Placement solver: {' | '.join(SOLVERS)}."),
    slots: int = typer.Option(None, help="Physical expert slots over all GPUs (default: every expert once plus one "
                                         "redundant slot per GPU when the experts fill the GPUs exactly, within "
                                         "memory, as DeepSeek deploys V3: 288 on 32 GPUs)."),
    time_limit: float = typer.Option(30.0, help="ILP time limit, seconds."),
    export: str = typer.Option("sglang", help=f"Runtime format to export: {', '.join(EXPORTERS)} or none."),
    dispatch: str = typer.Option(None, help=f"Dispatch model to solve under: {' | '.join(DISPATCH_MODELS)} "
                                            "(default: the export's runtime: sglang-static for sglang, even for "
                                            "eplb/vllm, weighted for none/megatron)."),
    out_dir: Path = typer.Option(Path("moeplan-out"), "--out", help="Folder for the trace, plan and exports."),
) -> None:
    """Plan expert placement end to end: trace → stats → placement → validate → export, with EPLB
    (what users run today) side by side on held-out traffic. With a subcommand, runs that step alone."""
    if ctx.invoked_subcommand is not None:
        return
    check_option("--gpus", gpus, minimum=1, maximum=MAX_GPUS)
    check_option("--nodes", nodes, minimum=1)
    check_option("--slots", slots, minimum=1)
    check_option("--tokens", tokens, minimum=2)
    check_option("--time-limit", time_limit, above=0)
    if export != "none" and export not in EXPORTERS:
        raise InputError(f"unknown export format '{export}'", field="export",
                         fix=f"use {', '.join(EXPORTERS)} or none")
    dispatch = dispatch or RUNTIME_DISPATCH.get(export, "weighted")
    if dispatch not in DISPATCH_MODELS:
        raise InputError(f"unknown dispatch model '{dispatch}'", field="dispatch",
                         fix=f"use one of: {', '.join(DISPATCH_MODELS)}")
    spec = ModelSpec.resolve(model)
    if export != "none":
        EXPORTERS[export].check_model(spec, f"--export {export}", "")
    hw = resolve_hardware(hardware).with_cluster(devices=gpus, nodes=nodes)
    cost = CostModel(spec, hw)
    out_dir.mkdir(parents=True, exist_ok=True)
    if trace_path is None:
        trace_path = out_dir / f"{spec.name.lower()}-synthetic.npz"
        with status(f"1/5 synthesising {tokens:,} tokens of routing for {spec.name}"):
            synthesize(spec, SyntheticTraffic(tokens=tokens)).save(trace_path)
    trace = RoutingTrace.load(trace_path)
    trace.check_model(spec.num_experts, spec.num_moe_layers, spec.top_k, str(trace_path))
    fit, held = split_for_judging(trace, JUDGE_FRACTION)
    with status("2/5 trace statistics"):
        stats = TraceStats.of(fit)
        summary = stats.summary()
    console.print(f"trace {trace_path}: {trace.num_tokens:,} tokens; load max/mean {summary['max_over_mean_load_mean']:.2f}, "
                  f"top-1 affinity {summary['top1_affinity_mean']:.3f}, SRP {summary['srp_16']:.3f}; fitted on "
                  f"{fit.num_tokens:,}, judged on {held.num_tokens:,} held-out tokens", highlight=False)
    per_device = default_slots(cost, slots, DEFAULT_TOKENS_PER_DEVICE)
    with status("3/5 building the placement problem"):
        problem = replace(PlacementProblem.build(cost, stats, per_device, DEFAULT_TOKENS_PER_DEVICE),
                          dispatch=dispatch)
    options = SolverOptions(time_limit=time_limit).validate()
    results = {}
    for name in dict.fromkeys(["eplb", solver]):
        with status(f"3/5 solving placement with {name}"):
            results[name] = solve(problem, name, options)
    chosen = results[solver]
    tpd = max(1, min(DEFAULT_TOKENS_PER_DEVICE, held.num_tokens // hw.num_devices))
    with status("4/5 validating: structure, memory, held-out quality"):
        cost.memory(per_device, hw.num_devices, batch_tokens_per_device=DEFAULT_TOKENS_PER_DEVICE).check(
            f"{spec.name} with {per_device} expert slots per GPU")
        plan = placement_plan(problem, cost, chosen.placement, chosen.report(), held, tpd)
        rows = [{"name": name, **placement_quality(cost, realise(r.placement, dispatch, spec), held, tpd)}
                for name, r in results.items() if name != solver] + [{"name": solver, **plan.predicted}]
    plan_path = out_dir / "plan.json"
    plan.save(plan_path)
    print_quality(f"{spec.name} on {hw.num_devices}× {hw.device.name}, {per_device * hw.num_devices} slots "
                  f"({held.num_tokens:,} held-out tokens, {tpd} tokens/GPU per step, {dispatch} dispatch)", rows)
    console.print(f"solver {solver}: objective {chosen.objective * 1e3:.2f} ms/step, proved bound "
                  f"{chosen.bound * 1e3:.2f}, gap {100 * chosen.gap:.1f}%, {chosen.seconds:.1f} s", highlight=False)
    console.print(objective_explained(problem, plan.predicted), style="dim", highlight=False, markup=False)
    console.print(hw.provenance_note(), style="dim")
    console.print(f"wrote {plan_path}")
    if export != "none":
        with status(f"5/5 exporting to {export}"):
            result = export_plan(plan, export, out_dir / export)
        report_export(result)


@app.command("compare")
@guarded
def compare(
    plans: list[Path] = typer.Argument(..., help="Plan JSON files (moeplan's, or imported with `moeplan import`)."),
    trace_path: Path = typer.Option(..., "--trace", help="Routing trace (.npz) both plans serve."),
    hardware: str = typer.Option(None, help="Hardware profile name or YAML (default: the one the first plan was "
                                            "priced with)."),
    tokens_per_device: int = typer.Option(DEFAULT_TOKENS_PER_DEVICE, help="Tokens per GPU per step."),
) -> None:
    """Evaluate plans on the same traffic with the cost model: balancedness, devices and nodes touched
    per token, cross-device hops, predicted MoE time and memory."""
    loaded = [Plan.load(p) for p in plans]
    first = loaded[0]
    for path, p in zip(plans, loaded):
        if p.placement is None:
            raise InputError("the plan has no placement to compare", source=str(path), field="placement")
        if (p.model.num_experts, p.model.num_moe_layers, p.num_devices) != \
                (first.model.num_experts, first.model.num_moe_layers, first.num_devices):
            raise InputError(f"{p.model.name} on {p.num_devices} devices differs from the first plan's "
                             f"{first.model.name} on {first.num_devices}", source=str(path), field="placement")
    hw = first.cluster_hardware(hardware, str(plans[0]))
    trace = RoutingTrace.load(trace_path)
    trace.check_model(first.model.num_experts, first.model.num_moe_layers, first.model.top_k, str(trace_path))
    rows = []
    for path, p in track(zip(plans, loaded), f"evaluating {len(plans)} plan{'s' * (len(plans) != 1)}", len(plans)):
        rows.append({"name": path.stem, **placement_quality(CostModel(p.model, hw, p.cost_options), p.placement,
                                                            trace, tokens_per_device)})
    print_quality(f"{first.model.name} on {hw.num_devices}× {hw.device.name}: {trace.num_tokens:,} tokens of "
                  f"{trace_path.name}", rows)
    console.print(hw.provenance_note(), style="dim")
