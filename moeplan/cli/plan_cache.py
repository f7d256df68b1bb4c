"""``moeplan plan cache``: per-layer expert-cache sizes for offloading, planned from a trace."""
from __future__ import annotations

from pathlib import Path

import typer
from moeplan.solvers.cache import (CacheProblem, CacheSizing, StepShape, cache_table, evaluation_steps, regroup,
                                   solve)
from moeplan.solvers.cache.sizing import evaluate
from moeplan.solvers.cache.steptime import model_layer_times

from moeplan.cli.apps import plan_app
from moeplan.cli.common import check_option, console, guarded, human_bytes, print_table, resolve_hardware, status
from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.io import write_json
from moeplan.model import ModelSpec
from moeplan.trace import RoutingTrace

MAX_BUDGET_GIB = 1e6   # a million GiB: above any device's memory; keeps the budget in bytes finite


@plan_app.command("cache")
@guarded
def cache(
    model: str = typer.Option(..., help="Model preset or config.json."),
    hardware: str = typer.Option("h100-sxm", help="Hardware profile name or YAML (H2D copy curve, memory)."),
    trace_path: Path = typer.Option(..., "--trace", help="Routing trace (.npz) for the model."),
    output: Path = typer.Option(..., "-o", "--output", help="Plan JSON to write (its 'cache' section)."),
    budget_gb: float = typer.Option(None, "--budget-gb", help="GPU memory to plan within, GiB (default: the "
                                                               "profile's memory × 0.9)."),
    policy: str = typer.Option("prefetch", help="lru, lfu, belady (offline bound) or prefetch (LRU + "
                                                "transition-predicted prefetch)."),
    phase: str = typer.Option("decode", help="decode or prefill."),
    batch: int = typer.Option(1, help="Decode: sequences per step; prefill: tokens per chunk."),
    request_tokens: int = typer.Option(0, help="Decode: tokens per request (0: the trace split into --batch "
                                               "streams)."),
    context: int = typer.Option(4096, help="KV-cache tokens per sequence (attention time and memory)."),
    latency_ms: float = typer.Option(None, "--latency-ms", help="Meet this time per step with the smallest "
                                                                "cache instead of maximising throughput."),
    stage_slots: int = typer.Option(2, help="Staging slots for misses a layer does not keep."),
    fit_fraction: float = typer.Option(0.5, help="Share of the trace the predictor is fitted on; the rest judges."),
    max_steps: int = typer.Option(10_000, help="Held-out steps judged (the first ones)."),
    regroup_requests: bool = typer.Option(False, "--regroup", help="Also report ExpertFlow-style regrouping of "
                                                                    "decode requests (needs --request-tokens)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the full report (curves, table) as JSON."),
) -> None:
    """Size each MoE layer's expert cache under the GPU memory left after weights, KV cache and
    activations; compare LRU, LFU, Belady and prefetch; show where more cache stops paying."""
    check_option("--budget-gb", budget_gb, above=0, maximum=MAX_BUDGET_GIB)
    check_option("--latency-ms", latency_ms, above=0)
    spec = ModelSpec.resolve(model)
    trace = RoutingTrace.load(trace_path)
    trace.check_model(spec.num_experts, spec.num_moe_layers, spec.top_k, str(trace_path))
    if regroup_requests and not request_tokens:
        raise InputError("--regroup batches requests: give their length", field="request_tokens",
                         fix="add --request-tokens N")
    problem = CacheProblem(CostModel(spec, resolve_hardware(hardware)), trace,
                           StepShape(phase, batch, request_tokens), policy, context,
                           None if budget_gb is None else budget_gb * 2**30,
                           None if latency_ms is None else latency_ms / 1e3, fit_fraction, stage_slots, max_steps)
    with status(f"planning {spec.num_moe_layers} layers × {spec.num_experts} experts ({policy})"):
        sizing = solve(problem)
    _print(sizing)
    report = {"summary": sizing.summary(), "sizes": sizing.sizes.tolist()}
    if regroup_requests:
        report["regroup"] = _regroup(sizing)
    plan = sizing.to_plan()
    plan.save(output)
    console.print(f"wrote {output}")
    if json_out:
        write_json(json_out, {**report, "plan_predicted": plan.predicted, "table": cache_table(sizing)})
        console.print(f"wrote {json_out}")


def _print(sizing: CacheSizing) -> None:
    p, b, s = sizing.problem, sizing.budget, sizing.summary()
    gib = 2**30
    console.print(f"{p.model.name} on {p.hardware.device.name}: {p.shape.phase}, batch {p.shape.batch}, "
                  f"context {p.context}; {sizing.steps:,} held-out steps judged; one expert "
                  f"{human_bytes(b.expert_bytes)}, {s['copy_seconds_per_expert'] * 1e3:.3f} ms over the host link")
    console.print(f"memory: {b.capacity / gib:.2f} GiB usable − non-expert {b.non_expert / gib:.2f} − KV "
                  f"{b.kv_cache / gib:.2f} − activations {b.activations / gib:.2f} = {b.left / gib:.2f} GiB → "
                  f"{sizing.slots} cache slots + {p.stage_slots} staging (all experts: {b.all_experts / gib:.2f} GiB)")
    e = p.model.num_experts
    sizes = sizing.sizes
    rows = [(i, int(sizes[i]), float(sizing.curves.hit_rate[i, sizes[i]]), float(sizing.curves.transfers[i, sizes[i]]),
             sizing.curves.stall[i, sizes[i]] * 1e3) for i in range(sizes.size)]
    print_table(f"Planned cache per MoE layer (of {e} experts)", ["layer", "size", "hit rate", "loads/step",
                                                                  "stall ms/step"], rows)
    eb = b.expert_bytes
    rows = [(ev.name, ev.policy, int(ev.sizes.sum()), ev.to_dict(eb)["hit_rate"], ev.to_dict(eb)["transfers_per_step"],
             human_bytes(ev.to_dict(eb)["bytes_per_step"]), ev.stall_seconds * 1e3, ev.tokens_per_s)
            for ev in sizing.evaluations]
    print_table("Policies at the same total cache (full step timeline)",
                ["configuration", "policy", "cached", "hit rate", "loads/step", "moved/step", "stall ms/step",
                 "tokens/s"], rows,
                caption=f"every expert resident: {s['resident_tokens_per_s']:.1f} tokens/s; "
                        f"{p.hardware.provenance_note()}")
    console.print(f"plan: {s['tokens_per_s']:.2f} tokens/s ({s['speedup_vs_lru_uniform']:.2f}× LRU on demand with "
                  f"uniform sizes); saves {s['memory_saved_bytes'] / gib:.2f} GiB "
                  f"({100 * s['memory_saved_fraction']:.0f}%) against holding every expert")
    console.print(f"bound: separable model {s['separable_tokens_per_s']:.2f} tokens/s, LP relaxation ≤ "
                  f"{s['lp_bound_tokens_per_s']:.2f}; knee at {s['knee_slots']} slots "
                  f"({s['knee_bytes'] / gib:.2f} GiB, {s['knee_tokens_per_s']:.2f} tokens/s)")
    for note in sizing.notes:
        console.print(note, style="dim")


def _regroup(sizing: CacheSizing) -> dict[str, float]:
    """Regroup the held-out requests; judge the plan's policy and sizes on both orders."""
    p = sizing.problem
    _, held, arrival = evaluation_steps(p.trace, p.shape, p.fit_fraction, p.max_steps)
    moved = regroup(held, p.shape)
    regrouped = p.shape.token_index(held.num_tokens, moved.order)[: p.max_steps]
    eb = sizing.budget.expert_bytes
    runs = [evaluate(name, p.policy, sizing.sizes, held, index, sizing.predictor,
                     model_layer_times(p.cost, held, index, p.shape.phase, p.context),
                     p.shape.batch) for name, index in (("arrival", arrival), ("regrouped", regrouped))]
    out = {**moved.to_dict(), "hit_rate_before": runs[0].to_dict(eb)["hit_rate"],
           "hit_rate_after": runs[1].to_dict(eb)["hit_rate"], "tokens_per_s_before": runs[0].tokens_per_s,
           "tokens_per_s_after": runs[1].tokens_per_s}
    print_table("Regrouping decode requests (ExpertFlow-style), the plan's cache", ["", "arrival order", "regrouped"],
                [("activated experts per layer per step", out["activated_before"], out["activated_after"]),
                 ("hit rate", out["hit_rate_before"], out["hit_rate_after"]),
                 ("tokens/s", out["tokens_per_s_before"], out["tokens_per_s_after"])])
    return out
