"""``moeplan run``: measure a plan on the device at hand and set it beside the cost model.

Two modes, both on one device (a GPU when there is one, else the CPU):

* default: the full MoE layer stack with every expert local (world size 1), timed per layer,
  next to the cost model's :meth:`~moeplan.cost.CostModel.moe_layer` for the same tokens;
* ``--replay``: each device of the plan in turn runs its share of the routed tokens through its
  own experts; measured per-device compute and the straggler, next to
  :meth:`~moeplan.cost.CostModel.device_compute` on the same slot token counts;
* ``--offload --cache-plan c.json``: the layer stack with every routed expert in pinned host
  memory and the plan's per-layer device caches (:mod:`moeplan.runtime.offload`): tokens/s, hit
  rate, stall and bytes moved over ``--steps`` held-out steps, next to the prediction.

Times are medians of ``--repeats`` after ``--warmup`` runs (device events on GPU). The
multi-rank runtime is launched with torchrun instead: ``python -m moeplan.runtime``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import typer

from moeplan.cli.apps import app
from moeplan.cli.common import console, guarded, print_table, progress
from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.io import write_json
from moeplan.plan import Plan
from moeplan.trace import RoutingTrace


@app.command("run")
@guarded
def run(
    plan_path: Path = typer.Option(None, "--plan", help="Plan JSON (its model, placement and hardware name)."),
    trace_path: Path = typer.Option(None, "--trace", help="Routing trace (.npz) for the plan's model "
                                                          "(--offload: optional, synthetic when absent)."),
    replay: bool = typer.Option(False, "--replay", help="Per-device replay of the plan's placement."),
    offload: bool = typer.Option(False, "--offload", help="Experts in host memory, the cache plan's device caches."),
    cache_plan: Path = typer.Option(None, "--cache-plan", help="--offload: plan JSON from 'moeplan plan cache'."),
    steps: int = typer.Option(64, "--steps", help="--offload: held-out steps timed."),
    kernel: str = typer.Option("grouped", "--kernel", help="Expert kernel: grouped or loop."),
    tokens_per_device: int = typer.Option(1024, "--tokens-per-device", help="Batch tokens on each device."),
    repeats: int = typer.Option(10, "--repeats", help="Timed runs (the median is reported, min and max kept)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed runs first."),
    layers: str = typer.Option(None, "--layers", help="Comma-separated MoE-layer indices (default: all)."),
    hardware: str = typer.Option(None, "--hardware", help="Hardware profile name or YAML for the prediction "
                                                          "(default: the one the plan was priced with)."),
    device: str = typer.Option(None, "--device", help="cuda, cuda:N or cpu (default: cuda when present)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and activations."),
    output: Path = typer.Option(None, "-o", "--output", help="Write the measurements and predictions as JSON."),
) -> None:
    """Measure per-layer (or, with --replay, per-device) expert times and compare with the cost model."""
    if tokens_per_device < 1 or repeats < 1 or warmup < 0:
        raise InputError("--tokens-per-device and --repeats must be ≥ 1, --warmup ≥ 0", field="options")
    if offload:
        _offload(cache_plan, trace_path, hardware, steps, warmup, kernel, device, seed, output)
        return
    if plan_path is None or trace_path is None:
        raise InputError("--plan and --trace are required", field="plan", fix="give both, or use --offload")
    plan = Plan.load(plan_path)
    if replay and plan.placement is None:
        raise InputError("the plan has no placement to replay", source=str(plan_path), field="placement",
                         fix="solve a placement first")
    trace = RoutingTrace.load(trace_path)
    m = plan.model
    trace.check_model(m.num_experts, m.num_moe_layers, m.top_k, str(trace_path))
    hw = plan.cluster_hardware(hardware, str(plan_path))
    cost = CostModel(m, hw, replace(plan.cost_options, kernel=kernel))
    torch = _import_torch()
    from moeplan.runtime.local_stack import time_local_stack
    from moeplan.runtime.replay import replay_devices, replay_slot_tokens, trace_window
    from moeplan.runtime.stack import default_dtype, parse_layers

    dev = _device(device)
    dtype = default_dtype(dev)
    chosen = parse_layers(layers, m.num_moe_layers)
    report: dict[str, Any] = {
        "command": "moeplan run", "mode": "replay" if replay else "stack", "plan": str(plan_path),
        "trace": str(trace_path), "model": m.name, "hardware": hw.name, "profile_note": hw.provenance_note(),
        "compute_measured_in_profile": cost.compute_measured, "kernel": kernel, "tokens_per_device": tokens_per_device,
        "warmup": warmup, "repeats": repeats, "seed": seed, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }
    if replay and plan.placement is not None:
        placement = plan.placement
        ids, index = trace_window(trace, tokens_per_device * placement.num_devices, str(trace_path))
        slot_tokens = replay_slot_tokens(placement, ids, index)
        with progress(f"replaying {len(chosen)} layers × {placement.num_devices} devices",
                      len(chosen) * placement.num_devices) as advance:
            replayed = replay_devices(m, placement, slot_tokens, chosen, kernel, dev, dtype, warmup, repeats, seed,
                                      advance)
        report.update(_replay_report(replayed, cost.device_compute(slot_tokens[chosen])),
                      model_spec=m.to_dict(), slot_tokens=slot_tokens[chosen].tolist())
        _print_replay(report)
    else:
        timed = time_local_stack(m, trace, tokens_per_device, chosen, kernel, dev, dtype, warmup, repeats, seed)
        k = m.top_k
        predicted = np.array([cost.moe_layer(np.array([[tokens_per_device * k]]), timed.slot_tokens[i],
                                             home_tokens=np.array([tokens_per_device])).time
                              for i in range(len(chosen))])
        report.update(_stack_report(timed, predicted))
        _print_stack(report)
    if output:
        write_json(output, report)
        console.print(f"wrote {output}")


def _offload(cache_plan: Path | None, trace_path: Path | None, hardware: str | None, steps: int, warmup: int,
             kernel: str, device: str | None, seed: int, output: Path | None) -> None:
    """``--offload``: measure the cache plan on this device and print it beside the prediction."""
    from moeplan.synth import SyntheticTraffic, synthesize

    if cache_plan is None:
        raise InputError("--offload needs --cache-plan", field="cache_plan", fix="plan one with 'moeplan plan cache'")
    if steps < 1:
        raise InputError(f"--steps must be ≥ 1, got {steps}", field="steps")
    plan = Plan.load(cache_plan)
    if plan.cache is None:
        raise InputError("the plan has no cache section", source=str(cache_plan), field="cache",
                         fix="plan one with 'moeplan plan cache'")
    config = plan.cache
    m = plan.model
    trace = (RoutingTrace.load(trace_path) if trace_path else
             synthesize(m, SyntheticTraffic(tokens=max(20_000, int(2 * steps * config.batch / (1 - config.fit_fraction))),
                                            seed=seed)))
    config.check_budget(m, str(cache_plan))  # checked again by measure_offload; here before torch is needed
    _import_torch()
    from moeplan.runtime.offload import measure_offload
    from moeplan.runtime.stack import default_dtype

    dev = _device(device)
    report = measure_offload(plan, config, trace, plan.hardware_profile(hardware, str(cache_plan)), steps, warmup,
                             kernel, dev, default_dtype(dev), seed, str(cache_plan))
    report.update(command="moeplan run --offload", cache_plan=str(cache_plan),
                  trace=str(trace_path) if trace_path else "synthetic (moeplan.synth defaults)")
    meas, pred = report["measured"], report["predicted"]
    print_table(f"Offloaded stack: {m.name} on {report['device_name']} ({config.policy}, {meas['kernel']}, "
                f"{meas['dtype']}, batch {config.batch}, {report['steps']} steps)", ["", "measured", "predicted"],
                [("tokens/s", meas["tokens_per_s"], pred["tokens_per_s"]), ("hit rate", meas["hit_rate"], pred["hit_rate"]),
                 ("stall ms/step", _ms(meas["stall_s_per_step"]), _ms(pred["stall_s_per_step"])),
                 ("moved GiB", meas["bytes_moved"] / 2**30, pred["bytes_moved"] / 2**30)],
                caption=f"cache {report['memory']['cache_bytes'] / 2**30:.2f} GiB of "
                        f"{report['memory']['all_experts_bytes'] / 2**30:.2f} GiB of experts; counts match the "
                        f"simulation: {report['counts_match_simulation']}; prediction: {report['hardware']} "
                        f"({report['profile_note']})")
    if output:
        write_json(output, report)
        console.print(f"wrote {output}")


def _import_torch() -> Any:
    """The torch module, or InputError with the install fix: the runtime needs torch, planning never does."""
    try:
        import torch
    except ModuleNotFoundError:
        raise InputError("moeplan run measures with torch, which is not installed here", field="torch",
                         fix="pip install torch (the CPU build is enough for --device cpu)") from None
    return torch


def _device(name: str | None) -> Any:
    """The torch device ``name`` (cuda, cuda:N or cpu; default cuda when present), checked to exist here."""
    torch = _import_torch()
    if name is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}", field="device", fix="use cuda, cuda:N or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available here", field="device", fix="use --device cpu")
    if dev.type not in ("cuda", "cpu"):
        raise InputError(f"unsupported device {name!r}", field="device", fix="use cuda, cuda:N or cpu")
    return torch.device("cuda", dev.index or 0) if dev.type == "cuda" else dev


def _replay_report(result: Any, predicted: np.ndarray) -> dict[str, Any]:
    measured = result.medians()
    per_device = [[{"layer": layer, "device": d, "tokens": int(result.slot_tokens[i, d].sum()),
                    "measured": result.times[i][d].to_dict(), "predicted_s": float(predicted[i, d])}
                   for d in range(measured.shape[1])] for i, layer in enumerate(result.layers)]
    return {
        "impl": result.impl, "device": result.device, "dtype": result.dtype, "layers": result.layers,
        "per_device": per_device,
        "straggler": {
            "measured_s": measured.max(axis=1).tolist(), "predicted_s": predicted.max(axis=1).tolist(),
            "measured_device": measured.argmax(axis=1).tolist(), "predicted_device": predicted.argmax(axis=1).tolist(),
            "measured_ratio": result.straggler_ratio().tolist(),
            "predicted_ratio": (predicted.max(axis=1) / np.maximum(predicted.mean(axis=1), 1e-12)).tolist(),
        },
        "totals": {"measured_straggler_s": float(measured.max(axis=1).sum()),
                   "predicted_straggler_s": float(predicted.max(axis=1).sum()),
                   "measured_device_s": measured.sum(axis=0).tolist(),
                   "predicted_device_s": predicted.sum(axis=0).tolist()},
    }


def _stack_report(result: Any, predicted: np.ndarray) -> dict[str, Any]:
    return {
        "impl": result.impl, "device": result.device, "dtype": result.dtype, "layers": result.layers,
        "per_layer": [{"layer": layer, "tokens": result.tokens, "measured": result.per_layer[i].to_dict(),
                       "predicted_s": float(predicted[i])} for i, layer in enumerate(result.layers)],
        "totals": {"measured_s": float(sum(t.median for t in result.per_layer)), "predicted_s": float(predicted.sum())},
    }


def _ms(seconds: float) -> float:
    return seconds * 1e3


def _print_replay(r: dict[str, Any]) -> None:
    s = r["straggler"]
    rows = [(layer, s["measured_device"][i], _ms(s["measured_s"][i]), _ms(s["predicted_s"][i]),
             s["measured_ratio"][i], s["predicted_ratio"][i]) for i, layer in enumerate(r["layers"])]
    print_table(f"Per-device replay: {r['model']} on {r['device_name']} ({r['impl']}, {r['dtype']})",
                ["MoE layer", "straggler", "measured ms", "predicted ms", "max/mean measured", "max/mean predicted"],
                rows, caption=f"medians of {r['repeats']} after {r['warmup']} warm-up; prediction: {r['hardware']} "
                              f"({r['profile_note']})")
    t = r["totals"]
    console.print(f"straggler compute over {len(rows)} layers: measured {_ms(t['measured_straggler_s']):.3f} ms, "
                  f"predicted {_ms(t['predicted_straggler_s']):.3f} ms")


def _print_stack(r: dict[str, Any]) -> None:
    rows = [(p["layer"], _ms(p["measured"]["median_s"]), _ms(p["measured"]["min_s"]), _ms(p["measured"]["max_s"]),
             _ms(p["predicted_s"])) for p in r["per_layer"]]
    print_table(f"Layer stack, every expert local: {r['model']} on {r['device_name']} ({r['impl']}, {r['dtype']}, "
                f"{r['tokens_per_device']} tokens)", ["MoE layer", "median ms", "min ms", "max ms", "predicted ms"],
                rows, caption=f"medians of {r['repeats']} after {r['warmup']} warm-up; prediction: {r['hardware']} "
                              f"({r['profile_note']})")
    t = r["totals"]
    console.print(f"stack total: measured {_ms(t['measured_s']):.3f} ms, predicted {_ms(t['predicted_s']):.3f} ms")
