"""GPU benchmark of the live MoE runtime on one device: per-device replay of contiguous vs balanced
placements, the single-device layer stack, and expert moves through host memory, each next to the
cost model's prediction.

    python bench/gpu_runtime.py [OUT_DIR] [--profile h100-sxm|PATH.yaml] [--tiny]

OUT_DIR defaults to $OUT (else bench/out); the JSON goes to OUT_DIR/gpu_runtime.json and a short
table to stdout. ``--tiny`` runs small shapes (the CPU path, for tests); on a CPU the times are
perf_counter times in float32.

What it runs (default shapes):

1. **Per-device replay** for a DeepSeek-V2-Lite-shaped layer (64 experts, top-6, hidden 2048,
   expert FFN 1408; all 26 MoE layers) and a Mixtral-shaped layer (8 experts, top-2, 4096/14336;
   8 of its 32 MoE layers, evenly spaced), Zipf-skewed (zipf 1.2) and balanced (zipf 0) synthetic
   traces, prefill (4096 tokens per device) and decode (128 tokens per device) batches, 4 and 8
   devices, loop and grouped kernels: contiguous placement (expert e on device e // slots) vs a
   balanced one (LPT greedy: heaviest expert first onto the least-loaded device with a free slot,
   loads from the first half of the trace; the batch comes from the second half, so the plan is
   judged on traffic it did not see). Per row: the straggler's expert compute summed over layers,
   measured and predicted, and the balanced plan's cut of it.
2. **Layer stack** (world size 1, every expert local): per-layer medians, loop vs grouped.
3. **Host moves**: device → pinned host → device per expert.

Timing: CUDA events, warm-up, median of repeats (min and max kept in the JSON), fresh random
activations rotated between repeats.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeplan.cost import CostModel, CostOptions
from moeplan.hardware import HardwareProfile
from moeplan.io import write_json
from moeplan.model import ModelSpec
from moeplan.plan import Placement
from moeplan.runtime.host_moves import time_host_moves
from moeplan.runtime.kernels import KERNELS, grouped_impl
from moeplan.runtime.local_stack import time_local_stack
from moeplan.runtime.replay import replay_devices, replay_slot_tokens, trace_window
from moeplan.runtime.stack import default_dtype
from moeplan.synth import SyntheticTraffic, synthesize
from moeplan.trace import RoutingTrace

TRAFFIC = (("zipf1.2", 1.2, True), ("zipf1.2-ranked", 1.2, False), ("balanced", 0.0, True))
"""(label, Zipf exponent, shuffle): "ranked" puts the hottest experts at the lowest ids, so contiguous
placement stacks them on device 0 (popularity correlated with ids)."""


@dataclass(frozen=True)
class Setup:
    """The sizes one run uses."""

    shapes: list[tuple[str, ModelSpec, list[int]]]   # label, model, MoE layers replayed
    devices: tuple[int, ...]
    batch: tuple[tuple[str, int], ...]                # (label, tokens per device)
    warmup: int
    repeats: int
    stack_tokens: int
    stack_layers: dict[str, list[int]]
    move_experts: dict[str, list[int]]


def evenly(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over 0..n-1 (first and last included)."""
    return sorted({int(round(i * (n - 1) / max(k - 1, 1))) for i in range(min(k, n))})


def full_setup() -> Setup:
    ds = ModelSpec.preset("deepseek-v2-lite")
    mx = ModelSpec.preset("mixtral-8x7b")
    return Setup([("DeepSeek-V2-Lite", ds, list(range(ds.num_moe_layers))), ("Mixtral-8x7B", mx, evenly(32, 8))],
                 (4, 8), (("prefill", 4096), ("decode", 128)), 3, 10, 4096,
                 {"DeepSeek-V2-Lite": list(range(ds.num_moe_layers)), "Mixtral-8x7B": evenly(32, 4)},
                 {"DeepSeek-V2-Lite": list(range(8)), "Mixtral-8x7B": list(range(4))})


def tiny_setup() -> Setup:
    base = ModelSpec.preset("deepseek-v2-lite")
    a = dataclasses.replace(base, name="tiny-64e", num_layers=4, moe_layers=(0, 1, 2, 3), hidden_size=32,
                            expert_ffn=48, num_experts=16, top_k=4, shared_ffn=32, n_group=1, topk_group=1).validate()
    b = dataclasses.replace(base, name="tiny-8e", num_layers=2, moe_layers=(0, 1), hidden_size=64, expert_ffn=128,
                            num_experts=8, top_k=2, shared_ffn=0, num_shared_experts=0, n_group=1,
                            topk_group=1).validate()
    return Setup([("tiny-16e", a, [0, 3]), ("tiny-8e", b, [0, 1])], (4, 8), (("prefill", 64), ("decode", 8)), 1, 2,
                 64, {"tiny-16e": [0, 1, 2, 3], "tiny-8e": [0, 1]}, {"tiny-16e": [0, 1], "tiny-8e": [0]})


# ---- placements -------------------------------------------------------------------------------
def contiguous(model: ModelSpec, devices: int) -> Placement:
    """Expert e on device e // (experts / devices), in order."""
    e = model.num_experts
    se = np.tile(np.arange(e).reshape(devices, e // devices), (model.num_moe_layers, 1, 1))
    return Placement.from_slots(se, e, devices)


def lpt(load: np.ndarray, devices: int) -> Placement:
    """Per layer, experts by decreasing load onto the least-loaded device that has a free slot
    (longest processing time first); ``load`` [layers, experts] token-choices."""
    layers, e = load.shape
    slots = e // devices
    se = np.zeros((layers, devices, slots), dtype=np.int32)
    for layer in range(layers):
        total = np.zeros(devices)
        used = np.zeros(devices, dtype=np.int64)
        for expert in np.argsort(-load[layer], kind="stable"):
            free = np.flatnonzero(used < slots)
            d = free[np.argmin(total[free])]
            se[layer, d, used[d]] = expert
            used[d] += 1
            total[d] += load[layer, expert]
    return Placement.from_slots(se, e, devices)


def expert_load(trace: RoutingTrace) -> np.ndarray:
    """[layers, experts] token-choices per expert."""
    ids = trace.expert_ids.astype(np.int64)
    return np.stack([np.bincount(ids[:, i].ravel(), minlength=trace.num_experts) for i in range(trace.num_layers)])


# ---- 1. per-device replay ---------------------------------------------------------------------
def replay_matrix(setup: Setup, hw: HardwareProfile, device: torch.device, log: list[str]) -> list[dict[str, Any]]:
    dtype = default_dtype(device)
    rows = []
    max_tokens = max(setup.devices) * max(t for _, t in setup.batch)
    for label, model, layers in setup.shapes:
        costs = {k: CostModel(model, hw, CostOptions(kernel=k)) for k in KERNELS}
        for traffic, zipf, shuffle in TRAFFIC:
            fit, held_out = synthesize(model, SyntheticTraffic(tokens=2 * max_tokens, zipf=zipf, seed=1,
                                                                shuffle=shuffle)).split(0.5)
            load = expert_load(fit)
            for devices in setup.devices:
                plans = {"contiguous": contiguous(model, devices), "balanced": lpt(load, devices)}
                for batch_label, tokens in setup.batch:
                    ids, index = trace_window(held_out, tokens * devices)
                    counts = {name: replay_slot_tokens(p, ids, index) for name, p in plans.items()}
                    for kernel in KERNELS:
                        t0 = time.perf_counter()
                        row: dict[str, Any] = {"model": label, "model_spec": model.to_dict(), "traffic": traffic, "devices": devices,
                                               "batch": batch_label, "tokens_per_device": tokens, "kernel": kernel,
                                               "layers": layers}
                        for name, placement in plans.items():
                            rep = replay_devices(model, placement, counts[name], layers, kernel, device, dtype,
                                                 setup.warmup, setup.repeats)
                            measured = rep.medians()
                            predicted = costs[kernel].device_compute(counts[name][layers])
                            device_tokens = counts[name][layers].sum(axis=2)
                            row[name] = {
                                "impl": rep.impl, "replay": rep.to_dict(), "predicted_s": predicted.tolist(),
                                "straggler_per_layer_s": measured.max(axis=1).tolist(),
                                "straggler_measured_s": float(measured.max(axis=1).sum()),
                                "straggler_predicted_s": float(predicted.max(axis=1).sum()),
                                "straggler_tokens": int(device_tokens.max(axis=1).sum()),
                                "max_over_mean_measured": float(rep.straggler_ratio().mean()),
                                "max_over_mean_predicted": float((predicted.max(axis=1)
                                                                  / predicted.mean(axis=1)).mean()),
                                "max_over_mean_tokens": float((device_tokens.max(axis=1)
                                                               / device_tokens.mean(axis=1)).mean()),
                                "prediction_error_median": float(np.median(np.abs(predicted - measured)
                                                                           / np.maximum(measured, 1e-12))),
                            }
                        c, b = row["contiguous"], row["balanced"]
                        row["cut_measured"] = c["straggler_measured_s"] / b["straggler_measured_s"]
                        row["cut_predicted"] = c["straggler_predicted_s"] / b["straggler_predicted_s"]
                        row["cut_tokens"] = c["straggler_tokens"] / b["straggler_tokens"]
                        row["cut_per_layer_measured"] = (np.asarray(c["straggler_per_layer_s"])
                                                         / np.asarray(b["straggler_per_layer_s"])).tolist()
                        row["seconds"] = time.perf_counter() - t0
                        rows.append(row)
                        log.append(f"  {label} {traffic} {devices} dev {batch_label} {kernel}: cut measured "
                                   f"{row['cut_measured']:.2f}× predicted {row['cut_predicted']:.2f}× "
                                   f"tokens {row['cut_tokens']:.2f}× ({row['seconds']:.1f} s)")
                        print(log[-1], flush=True)
    return rows


# ---- 2. single-device layer stack -------------------------------------------------------------
def stack_mode(setup: Setup, hw: HardwareProfile, device: torch.device) -> list[dict[str, Any]]:
    dtype = default_dtype(device)
    out = []
    for label, model, _ in setup.shapes:
        trace = synthesize(model, SyntheticTraffic(tokens=setup.stack_tokens, zipf=1.2, seed=2))
        for kernel in KERNELS:
            res = time_local_stack(model, trace, setup.stack_tokens, setup.stack_layers[label], kernel, device, dtype,
                                   setup.warmup, setup.repeats)
            cost = CostModel(model, hw, CostOptions(kernel=kernel))
            pred = [cost.moe_layer(np.array([[setup.stack_tokens * model.top_k]]), res.slot_tokens[i],
                                   home_tokens=np.array([setup.stack_tokens])).time for i in range(len(res.layers))]
            out.append({"model": label, "kernel": kernel, **res.to_dict(), "predicted_s": pred,
                        "predicted_total_s": float(sum(pred))})
            _release(device)
    return out


# ---- 3. host moves ----------------------------------------------------------------------------
def host_mode(setup: Setup, hw: HardwareProfile, device: torch.device) -> list[dict[str, Any]]:
    out = []
    for label, model, _ in setup.shapes:
        res = time_host_moves(model, 0, setup.move_experts[label], device, default_dtype(device),
                              setup.warmup, setup.repeats)
        d = res.to_dict()
        d2h = float(np.median([t.median for t in res.d2h]))
        h2d = float(np.median([t.median for t in res.h2d]))
        d.update({"model": label, "d2h_median_s": d2h, "h2d_median_s": h2d,
                  "move_median_s": float(np.median([t.median for t in res.move])),
                  "d2h_bytes_per_s": res.expert_bytes / d2h, "h2d_bytes_per_s": res.expert_bytes / h2d,
                  "predicted_d2h_s": res.expert_bytes / hw.device.d2h_bandwidth.value,
                  "predicted_h2d_s": res.expert_bytes / hw.device.h2d_bandwidth.value})
        out.append(d)
        _release(device)
    return out


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- report -----------------------------------------------------------------------------------
def print_tables(replay: list[dict[str, Any]], stack: list[dict[str, Any]], moves: list[dict[str, Any]]) -> None:
    print("\nPer-device replay: straggler expert compute summed over the replayed layers (ms), contiguous → balanced")
    print(f"{'model':17} {'traffic':8} {'dev':>3} {'batch':7} {'kernel':7} {'contig meas':>11} {'pred':>8} "
          f"{'bal meas':>9} {'pred':>8} {'cut meas':>8} {'pred':>6} {'tokens':>6} {'max/mean':>8} {'pred err':>8}")
    for r in replay:
        c, b = r["contiguous"], r["balanced"]
        print(f"{r['model']:17} {r['traffic']:8} {r['devices']:3d} {r['batch']:7} {r['kernel']:7} "
              f"{1e3 * c['straggler_measured_s']:11.3f} {1e3 * c['straggler_predicted_s']:8.3f} "
              f"{1e3 * b['straggler_measured_s']:9.3f} {1e3 * b['straggler_predicted_s']:8.3f} "
              f"{r['cut_measured']:7.2f}× {r['cut_predicted']:5.2f}× {r['cut_tokens']:5.2f}× "
              f"{c['max_over_mean_measured']:8.2f} {100 * c['prediction_error_median']:7.0f}%")
    print("\nLayer stack, every expert local (ms per layer: median of medians; total over layers)")
    for s in stack:
        med = [t["median_s"] for t in s["per_layer"]]
        print(f"  {s['model']:17} {s['kernel']:7} ({s['impl']}, {len(med)} layers, {s['tokens']} tokens): "
              f"layer {1e3 * float(np.median(med)):.3f} ms, total {1e3 * s['total_median_s']:.2f} ms, "
              f"predicted {1e3 * s['predicted_total_s']:.2f} ms")
    print("\nExpert moves through pinned host memory (median per expert)")
    for m in moves:
        print(f"  {m['model']:17} {m['expert_bytes'] / 2**20:8.1f} MiB: d2h {1e3 * m['d2h_median_s']:.3f} ms "
              f"({m['d2h_bytes_per_s'] / 1e9:.1f} GB/s, predicted {1e3 * m['predicted_d2h_s']:.3f}), "
              f"h2d {1e3 * m['h2d_median_s']:.3f} ms ({m['h2d_bytes_per_s'] / 1e9:.1f} GB/s, predicted "
              f"{1e3 * m['predicted_h2d_s']:.3f}), round trip {1e3 * m['move_median_s']:.3f} ms, intact {m['intact']}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=os.environ.get("OUT") or "bench/out", help="Folder for the JSON.")
    p.add_argument("--profile", default="h100-sxm", help="Hardware profile for predictions: bundled name or YAML path.")
    p.add_argument("--tiny", action="store_true", help="Small shapes (the CPU test path).")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    hw = HardwareProfile.resolve(args.profile)
    setup = tiny_setup() if args.tiny else full_setup()
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "dtype": str(default_dtype(device)), "profile": hw.name, "profile_note": hw.provenance_note(),
           "grouped_impl": {label: grouped_impl(device, default_dtype(device), m.hidden_size, m.expert_ffn)
                            for label, m, _ in setup.shapes},
           "warmup": setup.warmup, "repeats": setup.repeats}
    print(f"{env['device_name']} · torch {env['torch']} · {env['dtype']} · grouped kernel {env['grouped_impl']} · "
          f"prediction from {hw.name} ({env['profile_note']})", flush=True)
    log: list[str] = []
    sections: dict[str, float] = {}
    t0 = time.perf_counter()
    replay = replay_matrix(setup, hw, device, log)
    sections["replay_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stack = stack_mode(setup, hw, device)
    sections["stack_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    moves = host_mode(setup, hw, device)
    sections["host_moves_s"] = time.perf_counter() - t0
    sections["total_s"] = time.perf_counter() - t_start
    print_tables(replay, stack, moves)
    headline = [r for r in replay if r["model"] == setup.shapes[0][0] and r["traffic"].startswith("zipf1.2")
                and r["devices"] == setup.devices[0] and r["batch"] == "prefill"]
    for r in headline:
        per_layer = r["cut_per_layer_measured"]
        print(f"\nheadline ({r['model']}, {r['traffic']}, {r['devices']} devices, {r['tokens_per_device']} tokens/device, "
              f"{r['kernel']}): balanced placement cuts the straggler's expert compute {r['cut_measured']:.2f}× "
              f"measured ({r['cut_predicted']:.2f}× predicted, {r['cut_tokens']:.2f}× in tokens); per layer "
              f"{min(per_layer):.2f}–{max(per_layer):.2f}× (median {float(np.median(per_layer)):.2f}×); contiguous "
              f"straggler max/mean {r['contiguous']['max_over_mean_measured']:.2f} (≈ the most any placement can cut)")
    out = Path(args.out)
    write_json(out / "gpu_runtime.json", {"env": env, "sections": sections, "replay": replay, "stack": stack,
                                          "host_moves": moves})
    print(f"\nwrote {out / 'gpu_runtime.json'} in {sections['total_s']:.1f} s (replay {sections['replay_s']:.1f} s, "
          f"stack {sections['stack_s']:.1f} s, moves {sections['host_moves_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
