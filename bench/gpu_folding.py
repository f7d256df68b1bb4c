"""Measure the compute terms of parallel mappings on ONE GPU and compare them with the cost model.

A mapping's per-GPU compute is one layer's attention shard (heads / TP, sequence / CP) and one
MoE layer's expert shard (E / EP experts at FFN / ETP width, tokens / TP × top-k × ETP choices).
This script builds those shards for Mixtral-8x22B-like and Qwen2-57B-A14B-like layers at
TP ∈ {1, 2, 4}, CP ∈ {1, 2}, EP ∈ {1, 2, 8}, times forward + backward with CUDA events, and
prints predicted against measured: the forward from moeplan.parallel_step.attention_shard_time /
expert_shard, the backward from attention_shard_backward_time / expert_shard_backward_time (the
pricing of moeplan.backward, which the folding solver's training step uses), from the profile
given. Communication is not measured here (one GPU).

What runs is what a training framework runs. Attention: the fused QKV projection, SDPA with
native GQA (``enable_gqa``: no K/V copy per query head; flash attention on Hopper), the output
projection. A CP shard runs its s/CP local queries against s/2 keys without a mask — the FLOPs a
load-balanced causal ring gives each rank — with K/V beyond the local chunk standing in for the
ring's arrivals. Experts, with each kernel this torch can run, a row per kernel: "loop" — one
weight tensor per expert and a GEMM pair per expert (Megatron-Core's SequentialMLP,
megatron/core/transformer/moe/experts.py; one stacked parameter indexed per expert would make
autograd write a whole-stack zero gradient per expert), and "grouped_mm" — torch._grouped_mm over
stacked weights (GroupedMLP / TEGroupedMLP) when it runs forward and backward here; the JSON's
``grouped_mm`` says whether it did and why not.

Usage (one call, < 3 min on an H100):
    python bench/gpu_folding.py [--profile hardware_profiles/measured/<gpu>.yaml] [--out DIR]
    python bench/gpu_folding.py --tiny --device cpu --out /tmp/x      # CPU smoke test, tiny shapes
Writes DIR/gpu_folding.json (DIR defaults to $OUT, else bench/results).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moeplan.cost import CostModel, CostOptions
from moeplan.parallel import ParallelMapping
from moeplan.parallel_step import (attention_shard_backward_time, attention_shard_time, expert_shard,
                                   expert_shard_backward_time)
from moeplan.hardware import HardwareProfile
from moeplan.io import write_json
from moeplan.model import AttentionSpec, ModelSpec
from moeplan.profiler.attention_ops import sdpa_kernel_name
from moeplan.runtime.timing import measure as time_repeats

SEQ = 4096


@dataclass(frozen=True)
class Shard:
    """One measurement: an attention or expert shard of ``model`` under (tp, cp, ep, etp)."""

    kind: str
    model: str
    tp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1

    @property
    def name(self) -> str:
        if self.kind == "attention":
            return f"{self.model} attention TP{self.tp} CP{self.cp}"
        return f"{self.model} experts EP{self.ep} ETP{self.etp} (TP{self.tp})"

    def mapping(self) -> ParallelMapping:
        return ParallelMapping(self.tp, self.cp, 1, 1, self.etp, self.ep, 1)


SHARDS = [
    Shard("attention", "mixtral-8x22b", tp=1), Shard("attention", "mixtral-8x22b", tp=2),
    Shard("attention", "mixtral-8x22b", tp=4, cp=2), Shard("attention", "qwen2-57b-a14b", tp=1),
    Shard("attention", "qwen2-57b-a14b", tp=2, cp=2), Shard("attention", "qwen2-57b-a14b", tp=4),
    Shard("experts", "mixtral-8x22b", tp=2, ep=8), Shard("experts", "mixtral-8x22b", tp=1, ep=2),
    Shard("experts", "mixtral-8x22b", tp=2, ep=1, etp=2), Shard("experts", "qwen2-57b-a14b", tp=2, ep=8),
    Shard("experts", "qwen2-57b-a14b", tp=1, ep=2), Shard("experts", "qwen2-57b-a14b", tp=2, ep=8, etp=2),
]


def tiny(model: ModelSpec) -> ModelSpec:
    """The same family at toy size (CPU smoke test)."""
    return replace(model, num_layers=2, moe_layers=(0, 1), hidden_size=64, vocab_size=128, dense_ffn=0,
                   attention=AttentionSpec("gqa", num_heads=8, num_kv_heads=2 if model.attention.num_kv_heads < 8
                                           else 4, head_dim=8), expert_ffn=32,
                   shared_ffn=64 if model.shared_ffn else 0).validate()


def grouped_mm_probe(device: torch.device) -> str:
    """Why torch's grouped GEMM cannot run forward and backward here, or "" when it can. The
    output gradient must be a real tensor: ``.sum().backward()`` hands _grouped_mm's backward an
    expanded (stride 0) gradient, which its stride check (check_valid_strides_and_return_transposed,
    aten/src/ATen/native/GroupedMMUtils.h) rejects on every device."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        x = torch.randn(32, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(2, 64, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
        offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
        y = torch._grouped_mm(x, w, offs=offs)
        y.backward(torch.ones_like(y))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return ""
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"


def attention_step(model: ModelSpec, shard: Shard, seq: int, device: torch.device) -> tuple[Callable[[], None], str]:
    """QKV projection, attention of s/CP queries, output projection; forward + backward. Returns
    (step, the SDPA kernel torch picks for these shapes, as the profiler names it)."""
    a, h = model.attention, model.hidden_size
    heads, kv_heads, d = a.num_heads // shard.tp, max(a.num_kv_heads // shard.tp, 1), a.head_dim
    q_len = seq // shard.cp
    k_len = seq if shard.cp == 1 else seq // 2
    bf = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(q_len, h, **bf, requires_grad=True)
    w_qkv = (torch.randn(h, (heads + 2 * kv_heads) * d, **bf) * h ** -0.5).requires_grad_()
    w_o = (torch.randn(heads * d, h, **bf) * (heads * d) ** -0.5).requires_grad_()
    extra = max(k_len - q_len, 0)
    remote_k = torch.randn(1, kv_heads, extra, d, **bf, requires_grad=True)
    remote_v = torch.randn(1, kv_heads, extra, d, **bf, requires_grad=True)
    grad = torch.randn(q_len, h, **bf)

    def step() -> None:
        qkv = x @ w_qkv
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q = q.view(1, q_len, heads, d).transpose(1, 2)
        k = k.view(1, q_len, kv_heads, d).transpose(1, 2)[:, :, :k_len]
        v = v.view(1, q_len, kv_heads, d).transpose(1, 2)[:, :, :k_len]
        if extra:
            k, v = torch.cat([k, remote_k], dim=2), torch.cat([v, remote_v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=shard.cp == 1, enable_gqa=True)
        (o.transpose(1, 2).reshape(q_len, heads * d) @ w_o).backward(grad)

    q, k = (torch.empty(1, n, length, d, **bf, requires_grad=True) for n, length in ((heads, q_len), (kv_heads, k_len)))
    return step, sdpa_kernel_name(q, k, k, shard.cp == 1, heads != kv_heads)


def expert_step(model: ModelSpec, shard: Shard, seq: int, device: torch.device,
                kernel: str) -> tuple[Callable[[], None], float]:
    """E/EP SwiGLU experts at FFN/ETP width over tokens/TP × top-k × ETP choices, balanced;
    forward + backward with ``kernel`` ("loop": a weight tensor per expert; "grouped_mm":
    stacked weights, one grouped GEMM per projection). Returns (step, choices)."""
    h, f = model.hidden_size, model.expert_ffn // shard.etp
    local = model.num_experts // shard.ep
    choices = seq / shard.tp * model.top_k * shard.etp
    per = max(round(choices / local), 1)
    bf = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(local * per, h, **bf, requires_grad=True)
    grad = torch.randn(local * per, h, **bf)

    def swiglu(u: torch.Tensor) -> torch.Tensor:
        gate, up = u.chunk(2, dim=-1)
        return F.silu(gate) * up

    if kernel == "grouped_mm":
        w13 = (torch.randn(local, h, 2 * f, **bf) * h ** -0.5).requires_grad_()
        w2 = (torch.randn(local, f, h, **bf) * f ** -0.5).requires_grad_()
        offsets = torch.arange(1, local + 1, device=device, dtype=torch.int32) * per

        def step() -> None:
            torch._grouped_mm(swiglu(torch._grouped_mm(x, w13, offs=offsets)), w2, offs=offsets).backward(grad)
    else:
        w13s = [(torch.randn(h, 2 * f, **bf) * h ** -0.5).requires_grad_() for _ in range(local)]
        w2s = [(torch.randn(f, h, **bf) * f ** -0.5).requires_grad_() for _ in range(local)]

        def step() -> None:
            torch.cat([swiglu(xe @ w13) @ w2 for xe, w13, w2 in zip(x.split(per), w13s, w2s)]).backward(grad)

    return step, float(local * per)


def measure(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median, fastest and slowest seconds of ``step`` over ``iters`` timed runs queued behind a busy
    wait (:func:`moeplan.runtime.timing.measure` with ``device_time``: the host has queued the whole
    step when the GPU reaches it, as in a training step where the host runs ahead of the GPU by
    layers, so the events time the GPU's work — what the prediction prices), and the median with
    the host's launch and autograd time inside the window (``measured_synced_s``; on the CPU the
    two are one timing)."""
    timing = time_repeats(lambda i: step(), device, warmup, iters, device_time=True)
    synced = time_repeats(lambda i: step(), device, 0, iters).median if device.type == "cuda" else timing.median
    return {"measured_s": timing.median, "measured_min_s": timing.min, "measured_max_s": timing.max,
            "measured_synced_s": synced}


def run(profile: str, device: torch.device, use_tiny: bool, warmup: int, iters: int) -> dict[str, Any]:
    hw = HardwareProfile.resolve(profile)
    grouped_why_not = grouped_mm_probe(device)
    kernels = ["loop"] + ([] if grouped_why_not else ["grouped_mm"])
    seq = 64 if use_tiny else SEQ
    rows = []
    for shard in SHARDS:
        model = ModelSpec.preset(shard.model)
        model = tiny(model) if use_tiny else model
        for kernel in (["sdpa"] if shard.kind == "attention" else kernels):
            cm = CostModel(model, hw, CostOptions(kernel="grouped" if kernel == "grouped_mm" else "loop"))
            if shard.kind == "attention":
                step, backend = attention_step(model, shard, seq, device)
                work = seq / shard.cp
                forward = attention_shard_time(cm, shard.mapping(), work, seq, "prefill")
                backward = attention_shard_backward_time(cm, shard.mapping(), work, seq)
            else:
                (step, work), backend = expert_step(model, shard, seq, device, kernel), ""
                forward = expert_shard(cm, shard.mapping(), seq)[1]
                backward = expert_shard_backward_time(cm, shard.mapping(), seq)
            timed = measure(step, device, warmup, iters)
            predicted = forward + backward
            rows.append({"name": shard.name, "kind": shard.kind, "model": model.name, "tp": shard.tp, "cp": shard.cp,
                         "ep": shard.ep, "etp": shard.etp, "tokens_or_choices": work, **timed,
                         "predicted_s": predicted, "predicted_forward_s": forward, "predicted_backward_s": backward,
                         "predicted_over_measured": predicted / timed["measured_s"], "kernel": kernel,
                         "sdpa_backend": backend})
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "profile": profile,
            "profile_note": hw.provenance_note(), "seq": seq, "tiny": use_tiny, "warmup": warmup, "iters": iters,
            "grouped_mm": {"ran": not grouped_why_not, "why_not": grouped_why_not}, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="h100-sxm", help="hardware profile name or YAML the prediction uses")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or Path(__file__).parent / "results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke test)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and not args.tiny:
        print("error: full-size shards need a CUDA GPU (use --tiny for the CPU smoke test)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    result = run(args.profile, device, args.tiny, args.warmup, args.iters)
    print(f"{result['device']}, torch {result['torch']}; profile {args.profile}: {result['profile_note']}")
    grouped = result["grouped_mm"]
    print("torch._grouped_mm: " + ("ran" if grouped["ran"] else f"not run ({grouped['why_not']})"))
    print(f"{'shard':48s} {'kernel':>10s} {'measured':>11s} {'(synced)':>11s} {'predicted':>11s} {'(fwd':>10s} "
          f"{'+ bwd)':>10s} {'pred/meas':>9s}")
    for r in result["rows"]:
        print(f"{r['name']:48s} {r['kernel'] + (' ' + r['sdpa_backend'][:5] if r['sdpa_backend'] else ''):>10s} {r['measured_s'] * 1e3:9.3f}ms {r['measured_synced_s'] * 1e3:9.3f}ms "
              f"{r['predicted_s'] * 1e3:9.3f}ms "
              f"{r['predicted_forward_s'] * 1e3:8.3f}ms {r['predicted_backward_s'] * 1e3:8.3f}ms "
              f"{r['predicted_over_measured']:9.2f}")
    out = args.out / "gpu_folding.json"
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
