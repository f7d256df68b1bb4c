"""GPU benchmark of expert offloading on ONE device: experts in pinned host memory, a device cache
per layer, decode tokens/s and hit rate measured next to the prediction.

    python bench/gpu_offload.py [OUT_DIR] [--profile h100-sxm|PATH.yaml] [--tiny] [--budget-s 170]

OUT_DIR defaults to $OUT (else bench/out); the JSON goes to OUT_DIR/gpu_offload.json (rewritten
after each model, so a run cut short keeps what it measured) and a short table to stdout.
``--profile`` is the hardware profile of the cost-model prediction (default h100-sxm). ``--tiny`` runs small shapes (the CPU path, for tests). Made to finish in about
four minutes on one H100 (80 GB) with 128 GB of host memory, weight generation included; a
time budget (``--budget-s``, default 170 s) skips what is left when it runs out, and says so.

Shapes (bf16): **Mixtral-8x7B** experts (8 × 336 MiB per layer; all 32 layers are 86 GB, more than
the GPU holds) for as many layers as host memory allows, at most ``MIXTRAL_LAYERS``, and
**DeepSeek-V2-Lite** experts (64 × 16.5 MiB, 26 layers). Weights are made on the GPU from the
deterministic seeds and copied into pinned host memory.

Traces (moeplan.synth, segment 64): low locality (0.05, affinity 0.4) and high locality (0.7,
affinity 0.3). The first half fits the prefetcher; the held-out half is split into the steps
measured (the first ``steps``) and later steps the sizes are planned on (never measured).

Per model, trace and total cache size (a fraction of all experts), decode with batch 1:

* (a) **LRU on demand**, uniform sizes;
* (b) **planned sizes** (exact DP on the LRU curves, same total), LRU on demand;
* (c) **planned sizes + prefetch** (DP on the prefetch policy's curves, same total).

Also every expert resident (the ceiling, and the calibration of per-layer compute). The
predictions: ``calibrated`` = the step timeline with the measured H2D copy time per expert and
the measured resident compute per layer; ``cost model`` = the same with compute from the cost
model on ``--profile`` (its measured expert curves when it has them, else roofline). Each run's counts are checked against the
simulation (they must match exactly).

Targets (reported, met or not, with the reason): (c) vs (a) ≥ 1.5× decode tokens/s on the
high-locality trace; GPU memory saved against holding all experts; predicted within 15% of
measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeplan.cost import CostModel
from moeplan.hardware import HardwareProfile
from moeplan.io import write_json
from moeplan.model import ModelSpec
from moeplan.runtime.offload import HostExperts, OffloadStack
from moeplan.runtime.stack import default_dtype
from moeplan.solvers.cache import (LayerTimes, StepShape, TransitionPredictor, allocate, simulate, stack_layer_times,
                                   step_times)
from moeplan.solvers.cache.predict import prefetch_limits
from moeplan.solvers.cache.simulate import RECORDS
from moeplan.solvers.cache.sizing import size_curves, uniform_sizes
from moeplan.synth import SyntheticTraffic, synthesize
from moeplan.trace import RoutingTrace

MIXTRAL_LAYERS = 12
HOST_MARGIN = 24 * 2**30          # host memory left free beside the pinned experts
TRACES = (("low", 0.05, 0.4), ("high", 0.7, 0.3))


@dataclasses.dataclass(frozen=True)
class Shape:
    """One model shape: its label, ModelSpec, total cache fractions, steps measured and planned on."""

    label: str
    model: ModelSpec
    fractions: tuple[float, ...]
    steps: int
    plan_steps: int
    tokens: int


def pinned_layer_bytes(model: ModelSpec) -> int:
    """Host bytes one layer's pinned buffers take: torch's caching host allocator rounds each
    allocation (w13 and w2 of a layer) up to a power of two."""
    w13 = model.num_experts * 2 * model.expert_ffn * model.hidden_size * 2
    return sum(1 << (n - 1).bit_length() for n in (w13, w13 // 2))


def full_shapes(host_bytes: float) -> tuple[list[Shape], str]:
    """DeepSeek-V2-Lite, then Mixtral with as many layers as host memory allows (≤ MIXTRAL_LAYERS)."""
    ds = ModelSpec.preset("deepseek-v2-lite")
    mx = ModelSpec.preset("mixtral-8x7b")
    per_layer = pinned_layer_bytes(mx)
    ds_bytes = ds.num_moe_layers * pinned_layer_bytes(ds)                  # still pinned (torch caches host blocks)
    layers = int(max(1, min(MIXTRAL_LAYERS, (host_bytes - HOST_MARGIN - ds_bytes) // per_layer)))
    mixtral = dataclasses.replace(mx, name=f"Mixtral-8x7B ({layers} of 32 layers)", num_layers=layers,
                                  moe_layers=tuple(range(layers))).validate()
    note = (f"Mixtral: {layers} of 32 MoE layers ({layers * per_layer / 1e9:.1f} GB pinned for its experts; host memory "
            f"available {host_bytes / 1e9:.0f} GB, DeepSeek's {ds_bytes / 1e9:.1f} GB and {HOST_MARGIN / 2**30:.0f} GiB "
            f"kept aside)")
    return [Shape("DeepSeek-V2-Lite", ds, (0.125, 0.25), 64, 3000, 16_000),
            Shape("Mixtral-8x7B", mixtral, (0.25, 0.5), 32, 3000, 16_000)], note


def tiny_shapes() -> tuple[list[Shape], str]:
    base = ModelSpec.preset("deepseek-v2-lite")
    a = dataclasses.replace(base, name="tiny-16e", num_layers=4, moe_layers=(0, 1, 2, 3), hidden_size=32,
                            expert_ffn=48, num_experts=16, top_k=4, shared_ffn=32, n_group=1, topk_group=1).validate()
    b = dataclasses.replace(base, name="tiny-8e", num_layers=3, moe_layers=(0, 1, 2), hidden_size=64, expert_ffn=96,
                            num_experts=8, top_k=2, shared_ffn=0, num_shared_experts=0, n_group=1,
                            topk_group=1).validate()
    return [Shape("tiny-16e", a, (0.25,), 8, 200, 1200), Shape("tiny-8e", b, (0.5,), 8, 200, 1200)], "tiny shapes"


def host_available() -> float:
    """Available host memory (bytes) from /proc/meminfo, else 0."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return 0.0


def measured_copy_seconds(host: HostExperts, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of one expert host → device (w13 and w2), pinned, measured here."""
    if device.type != "cuda":
        buf = [torch.empty_like(host.w13[0][0]), torch.empty_like(host.w2[0][0])]
        start = time.perf_counter()
        for _ in range(repeats):
            buf[0].copy_(host.w13[0][0])
            buf[1].copy_(host.w2[0][0])
        return (time.perf_counter() - start) / repeats
    a = torch.empty_like(host.w13[0][0], device=device)
    b = torch.empty_like(host.w2[0][0], device=device)
    times = []
    for i in range(repeats + 1):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a.copy_(host.w13[0][i % host.w13[0].shape[0]], non_blocking=True)
        b.copy_(host.w2[0][i % host.w2[0].shape[0]], non_blocking=True)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return float(np.median(times[1:]))


def measure(model: ModelSpec, host: HostExperts, sizes: np.ndarray, policy: str, predictor: TransitionPredictor | None,
            held: RoutingTrace, index: np.ndarray, device: torch.device, preload: bool = False) -> dict[str, Any]:
    """Run one configuration; its counts beside the simulation's."""
    stack = OffloadStack(model, host, sizes, policy, 2, device, default_dtype(device), "grouped", predictor)
    if preload:
        stack.preload()
    run, _ = stack.run(held, index, warmup=2, cold=not preload)
    out = {"policy": policy, "sizes": sizes.tolist(), "cached": int(sizes.sum()), "gpu_cache_bytes": stack.slot_bytes,
           **run.to_dict(host.expert_bytes), "run": run}
    if not preload:
        sim = simulate(held, index, sizes, policy, predictor)
        out["counts_match_simulation"] = all(np.array_equal(getattr(run.counts, k), getattr(sim, k)) for k in RECORDS)
    del stack
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def predicted(run_counts: Any, times: LayerTimes) -> float:
    return step_times(run_counts, times).tokens_per_s(1)


def calibrated(steps: int, layers: int, per_layer: float, tau: float) -> LayerTimes:
    """Every layer's compute as measured with every expert resident; transfers as measured."""
    return LayerTimes(np.zeros(layers), np.zeros(layers), np.full((steps, layers), per_layer), 0.0, tau)


def bench_shape(shape: Shape, device: torch.device, hw: HardwareProfile, deadline: float,
                log: list[str]) -> dict[str, Any]:
    m = shape.model
    dtype = default_dtype(device)
    cost = CostModel(m, hw)
    t0 = time.perf_counter()
    host = HostExperts.materialise(m, 0, dtype, device.type == "cuda", device)
    gen_s = time.perf_counter() - t0
    tau = measured_copy_seconds(host, device)
    all_bytes = m.num_moe_layers * m.num_experts * host.expert_bytes
    say(log, f"{shape.label}: {m.num_moe_layers} layers × {m.num_experts} experts of "
             f"{host.expert_bytes / 2**20:.1f} MiB = {all_bytes / 2**30:.1f} GiB in pinned host memory "
             f"(made in {gen_s:.1f} s); one expert H2D {tau * 1e3:.3f} ms ({host.expert_bytes / tau / 1e9:.1f} GB/s)")
    shape_out: dict[str, Any] = {"model": shape.label, "layers": m.num_moe_layers, "experts": m.num_experts,
                                 "expert_bytes": host.expert_bytes, "all_experts_bytes": all_bytes,
                                 "weights_made_s": gen_s, "copy_s_per_expert": tau,
                                 "profile_copy_s_per_expert": cost.host_copy_time(host.expert_bytes),
                                 "traces": []}
    batch = StepShape("decode", 1)
    nl, e = m.num_moe_layers, m.num_experts
    for name, locality, affinity in TRACES:
        if time.perf_counter() > deadline:
            shape_out["traces"].append({"trace": name, "skipped": "time budget spent"})
            continue
        trace = synthesize(m, SyntheticTraffic(tokens=shape.tokens, locality=locality, affinity=affinity, segment=64,
                                               seed=1))
        fit, held = trace.split(0.5)
        index_all = batch.token_index(held.num_tokens)
        index = index_all[: shape.steps]
        plan_index = index_all[shape.steps: shape.steps + shape.plan_steps]
        resident = measure(m, host, np.full(nl, e), "lru", None, held, index, device, preload=True)
        per_layer = resident["seconds"] / shape.steps / nl
        modelled = stack_layer_times(cost, held, index)
        modelled = dataclasses.replace(modelled, copy_seconds=tau)
        plan_times = calibrated(plan_index.shape[0], nl, per_layer, tau)
        width, floor = prefetch_limits(tau, plan_times.overlap())
        predictor = TransitionPredictor.fit(fit, batch).limited(width, floor)
        curves = {p: size_curves(held, plan_index, p, predictor, plan_times) for p in ("lru", "prefetch")}
        trace_out: dict[str, Any] = {"trace": name, "locality": locality, "affinity": affinity,
                                     "resident_tokens_per_s": resident["tokens_per_s"],
                                     "compute_s_per_layer": per_layer, "prefetch_width": width.tolist(),
                                     "prefetch_min_probability": floor.tolist(), "totals": []}
        for fraction in shape.fractions:
            if time.perf_counter() > deadline:
                trace_out["totals"].append({"fraction": fraction, "skipped": "time budget spent"})
                continue
            total = int(round(fraction * nl * e))
            configs = {"a_lru_uniform": (uniform_sizes(total, nl, e), "lru"),
                       "b_planned_lru": (allocate(curves["lru"].stall, total).sizes, "lru"),
                       "c_planned_prefetch": (allocate(curves["prefetch"].stall, total).sizes, "prefetch")}
            row: dict[str, Any] = {"fraction": fraction, "total": total}
            for label, (sizes, policy) in configs.items():
                r = measure(m, host, sizes, policy, predictor if policy == "prefetch" else None, held, index, device)
                counts = r.pop("run").counts
                r["predicted_tokens_per_s"] = predicted(counts, calibrated(index.shape[0], nl, per_layer, tau))
                r["predicted_cost_model_tokens_per_s"] = predicted(counts, modelled)
                r["prediction_error"] = r["predicted_tokens_per_s"] / r["tokens_per_s"] - 1
                r["prediction_error_cost_model"] = r["predicted_cost_model_tokens_per_s"] / r["tokens_per_s"] - 1
                r["memory_saved_bytes"] = all_bytes - r["gpu_cache_bytes"]
                row[label] = r
                say(log, f"  {name:4} {fraction:5.3f} {label:19} cached {r['cached']:4d} hit {r['hit_rate']:.3f} "
                         f"{r['tokens_per_s']:8.2f} tok/s (pred {r['predicted_tokens_per_s']:8.2f}, cost model "
                         f"{r['predicted_cost_model_tokens_per_s']:8.2f}) stall {r['stall_s_per_step'] * 1e3:7.2f} "
                         f"ms/step counts match {r['counts_match_simulation']}")
            row["speedup_c_vs_a"] = row["c_planned_prefetch"]["tokens_per_s"] / row["a_lru_uniform"]["tokens_per_s"]
            row["speedup_b_vs_a"] = row["b_planned_lru"]["tokens_per_s"] / row["a_lru_uniform"]["tokens_per_s"]
            row["predicted_speedup_c_vs_a"] = (row["c_planned_prefetch"]["predicted_tokens_per_s"]
                                               / row["a_lru_uniform"]["predicted_tokens_per_s"])
            trace_out["totals"].append(row)
        shape_out["traces"].append(trace_out)
    del host
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return shape_out


def targets(shapes: list[dict[str, Any]]) -> dict[str, Any]:
    """The three targets over every measured configuration."""
    rows = [(s["model"], t, r) for s in shapes for t in s["traces"] if "totals" in t for r in t["totals"]
            if "total" in r]
    high = [r["speedup_c_vs_a"] for _, t, r in rows if t["trace"] == "high"]
    runs = [r[k] for _, _, r in rows for k in ("a_lru_uniform", "b_planned_lru", "c_planned_prefetch")]
    errors = [abs(x["prediction_error"]) for x in runs]
    errors_model = [abs(x["prediction_error_cost_model"]) for x in runs]
    saved = [x["memory_saved_bytes"] / (x["memory_saved_bytes"] + x["gpu_cache_bytes"]) for x in runs]
    return {
        "speedup_c_vs_a_high_locality": high, "speedup_target_1_5x_met": bool(high) and max(high) >= 1.5,
        "memory_saved_fraction_min": min(saved, default=float("nan")),
        "prediction_error_max": max(errors, default=float("nan")),
        "prediction_within_15pct": sum(x <= 0.15 for x in errors), "runs": len(errors),
        "cost_model_prediction_error_max": max(errors_model, default=float("nan")),
        "cost_model_within_15pct": sum(x <= 0.15 for x in errors_model),
        "counts_match_simulation": all(x.get("counts_match_simulation", False) for x in runs),
    }


def say(log: list[str], line: str) -> None:
    log.append(line)
    print(line, flush=True)


def print_table(shapes: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    print("\nDecode tokens/s (batch 1), measured vs predicted (calibrated), same total cache per row")
    print(f"{'model':17} {'trace':5} {'cache':>6} {'saved':>6} {'a LRU unif':>11} {'b planned':>10} {'c +prefetch':>11} "
          f"{'c/a':>5} {'pred c/a':>8} {'hit a→c':>11} {'max err':>7}")
    for s in shapes:
        for t in s["traces"]:
            for r in t.get("totals", []):
                if "total" not in r:
                    continue
                a, b, c = r["a_lru_uniform"], r["b_planned_lru"], r["c_planned_prefetch"]
                err = max(abs(x["prediction_error"]) for x in (a, b, c))
                print(f"{s['model'][:17]:17} {t['trace']:5} {r['fraction']:6.3f} "
                      f"{a['memory_saved_bytes'] / s['all_experts_bytes']:6.0%} {a['tokens_per_s']:11.2f} "
                      f"{b['tokens_per_s']:10.2f} {c['tokens_per_s']:11.2f} {r['speedup_c_vs_a']:5.2f} "
                      f"{r['predicted_speedup_c_vs_a']:8.2f} {a['hit_rate']:5.3f}→{c['hit_rate']:5.3f} {err:7.1%}")
            if "resident_tokens_per_s" in t:
                print(f"{'':17} {t['trace']:5} every expert resident: {t['resident_tokens_per_s']:.2f} tokens/s")
    print(f"\ntargets: c/a on high locality {['%.2f' % x for x in summary['speedup_c_vs_a_high_locality']]} "
          f"(≥ 1.5×: {summary['speedup_target_1_5x_met']}); memory saved ≥ {summary['memory_saved_fraction_min']:.0%}; "
          f"prediction within 15%: {summary['prediction_within_15pct']}/{summary['runs']} (max "
          f"{summary['prediction_error_max']:.1%}; cost model alone {summary['cost_model_within_15pct']}/"
          f"{summary['runs']}); counts match simulation: {summary['counts_match_simulation']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--tiny", action="store_true", help="Small shapes (the CPU path).")
    ap.add_argument("--profile", default="h100-sxm", help="Hardware profile of the cost-model prediction.")
    ap.add_argument("--budget-s", type=float, default=170.0, help="Stop starting new runs after this many seconds.")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    shapes, note = tiny_shapes() if args.tiny else full_shapes(host_available())
    hw = HardwareProfile.resolve(args.profile)
    log: list[str] = []
    say(log, f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch "
             f"{torch.__version__}; {note}; cost-model profile {hw.name} ({hw.provenance_note()})")
    out = Path(args.out) / "gpu_offload.json"
    results: list[dict[str, Any]] = []
    for shape in shapes:
        results.append(bench_shape(shape, device, hw, start + args.budget_s, log))
        summary = targets(results)
        write_json(out, {"device": str(device), "torch": torch.__version__, "note": note, "profile": hw.name,
                         "profile_note": hw.provenance_note(), "seconds": time.perf_counter() - start,
                         "shapes": results, "targets": summary, "log": log})
    print_table(results, targets(results))
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
