"""``moeplan simulate``: replay a trace through a plan with the cost model."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from moeplan.cli.apps import app
from moeplan.cli.common import console, guarded, human_seconds, print_table, MAX_GPUS, check_option, resolve_hardware
from moeplan.cost import CostModel, CostOptions
from moeplan.errors import InputError
from moeplan.io import write_json
from moeplan.model import ModelSpec
from moeplan.plan import Plan, contiguous_placement
from moeplan.simulate import Workload, simulate
from moeplan.trace import RoutingTrace


@app.command("simulate")
@guarded
def simulate_cmd(
    trace_path: Path = typer.Option(..., "--trace", help="Routing trace (.npz)."),
    plan_path: Path = typer.Option(None, "--plan", help="Plan JSON; default: contiguous placement (the runtime default)."),
    model: str = typer.Option(None, help="Model preset or config.json (default: the plan's model, else deepseek-v3)."),
    hardware: str = typer.Option(None, help="Hardware profile name or YAML (default: the one the plan was priced "
                                            "with; without a plan, h100-sxm)."),
    gpus: int = typer.Option(None, help="Devices (default: the plan's cluster, else 8)."),
    nodes: int = typer.Option(None, help="Nodes (default: filled from the profile's devices per node)."),
    phase: str = typer.Option("prefill", help="prefill or decode."),
    tokens_per_device: int = typer.Option(None, help="Tokens per device per step (default 4096 prefill, 128 decode)."),
    context: int = typer.Option(4096, help="Sequence length (prefill) or KV-cache length (decode)."),
    kernel: str = typer.Option(None, help="Expert kernel the runtime uses: grouped or loop (default: the plan's, "
                                          "else grouped)."),
    overlap: bool = typer.Option(False, help="Overlap dispatch with expert compute."),
    exflow: bool = typer.Option(False, help="Context-coherent execution (ExFlow): tokens stay where their last expert ran."),
    output: Path = typer.Option(None, "-o", "--output", help="Write the full result as JSON."),
) -> None:
    """Replay a routing trace through a plan batch by batch: per-layer and end-to-end time, per-device
    load, tokens crossing devices and nodes, with a readable breakdown."""
    for name, value in (("--gpus", gpus), ("--nodes", nodes), ("--tokens-per-device", tokens_per_device)):
        check_option(name, value, minimum=1)
    check_option("--gpus", gpus, maximum=MAX_GPUS)
    plan = Plan.load(plan_path) if plan_path else None
    spec = ModelSpec.resolve(model) if model else (plan.model if plan else ModelSpec.preset("deepseek-v3"))
    if plan and model and spec.num_experts != plan.model.num_experts:
        raise InputError(f"--model {model} has {spec.num_experts} experts, the plan's model {plan.model.num_experts}",
                         field="model")
    devices = gpus if gpus is not None else (plan.num_devices if plan else 8)
    profile = plan.hardware_profile(hardware, str(plan_path)) if plan else resolve_hardware(hardware or "h100-sxm")
    hw = profile.with_cluster(devices=devices, nodes=nodes if nodes is not None else (plan.nodes if plan and gpus is None else None))
    base = plan.cost_options if plan else CostOptions()
    kernel = kernel or base.kernel
    trace = RoutingTrace.load(trace_path)
    trace.check_model(spec.num_experts, spec.num_moe_layers, spec.top_k, str(trace_path))
    if plan and plan.placement is not None:
        placement = plan.placement
    else:
        placement = contiguous_placement(spec.num_moe_layers, spec.num_experts, hw.num_devices, hw.devices_per_node)
    tpd = tokens_per_device if tokens_per_device is not None else (4096 if phase == "prefill" else 128)
    cost = CostModel(spec, hw, replace(base, kernel=kernel, overlap=overlap, exflow=exflow))
    result = simulate(cost, placement, trace, Workload(phase, tpd, context))
    s = result.summary()
    rows = [("batches replayed", f"{s['batches']} × {tpd} tokens/device × {hw.num_devices} devices"),
            ("step time (mean)", human_seconds(s["step_seconds"])),
            ("  MoE layers", human_seconds(s["moe_seconds"])),
            ("    dispatch all-to-all", human_seconds(s["dispatch_seconds"])),
            ("    expert compute (slowest device)", human_seconds(s["compute_seconds"])),
            ("    combine all-to-all", human_seconds(s["combine_seconds"])),
            ("    straggler wait (slowest − mean)", human_seconds(s["straggler_wait_seconds"])),
            ("  attention", human_seconds(s["attention_seconds"])), ("  dense FFN layers", human_seconds(s["dense_seconds"])),
            ("  norms", human_seconds(s["norms_seconds"])), ("  LM head", human_seconds(s["head_seconds"])),
            ("throughput", f"{s['tokens_per_second']:,.0f} tokens/s"),
            ("balancedness (max/mean device load)", f"{s['balancedness']:.3f}"),
            ("token-choices crossing devices", f"{100 * s['cross_device_fraction']:.1f}%"),
            ("token-choices crossing nodes", f"{100 * s['cross_node_fraction']:.1f}%")]
    print_table(f"{spec.name} on {hw.num_devices}× {hw.device.name} ({phase}, {kernel} kernel"
                f"{', overlap' if overlap else ''}{', ExFlow' if exflow else ''})", ["quantity", "value"], rows)
    for note in result.notes:
        console.print(f"note: {note}", style="yellow")
    if output:
        write_json(output, {"model": spec.name, "hardware": hw.name, "devices": hw.num_devices, "phase": phase,
                            "tokens_per_device": tpd, "context": context, "kernel": kernel, "overlap": overlap,
                            "exflow": exflow, **result.to_dict()})
        console.print(f"wrote {output}")
