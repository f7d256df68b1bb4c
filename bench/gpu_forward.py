"""Whole forward step of real-shaped MoE models on one GPU: measured vs the cost model.

Builds OLMoE-1B-7B and Qwen1.5-MoE-A2.7B from their presets with random bf16 weights (embedding,
per layer: RMSNorm → GQA attention through SDPA → RMSNorm → router top-k → experts through the
runtime's grouped kernel (+ shared expert), final norm, LM head), times prefill and decode steps
with CUDA events (3 warm-ups, median of 10), and predicts each with
``CostModel.forward_time`` from a measured profile, using the expert token counts the random
router actually produced.

The MoE layers build their groups on the device (:meth:`ExpertKernel.sorted_groups`, as the
runtime's one-rank stack does), so a step has no host synchronisation. Decode steps are captured
once as a CUDA graph and timed as graph replays, as serving runtimes run decode (vLLM's
``CUDAGraphRunner`` in vllm/worker/model_runner.py, SGLang's
sglang/srt/model_executor/cuda_graph_runner.py): the step's time is then the GPU's, not the host's
launch time of some 40 kernels per layer. Prefill steps run eagerly, as those runtimes run them.
A row says ``"cuda_graph"`` true when its step was replayed from a graph.

Every row keeps what ``moeplan calibrate`` needs to price it again: the model, phase, tokens,
context, the expert token counts per MoE layer and the measured seconds; ``"set"`` says whether it
is a calibration step or a judged one (:data:`CASES`).

Usage: python bench/gpu_forward.py PROFILE.yaml OUT_DIR   (CPU: tiny shapes, for the test path)
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moeplan.cost import CostModel, CostOptions
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.runtime.kernels import ExpertKernel

CASES = [("prefill", 1, 2048), ("prefill", 4, 1024), ("prefill", 2, 4096),
         ("decode", 32, 1024), ("decode", 64, 2048), ("decode", 128, 1024)]
"""The judged steps (phase, batch, sequence or context): never used by ``moeplan calibrate``."""
CALIBRATION_CASES = [("prefill", 1, 1024), ("prefill", 2, 2048), ("prefill", 1, 8192),
                     ("decode", 8, 4096), ("decode", 16, 512), ("decode", 48, 1536), ("decode", 96, 512),
                     ("decode", 192, 1024)]
"""Other steps of the same models, the ones ``moeplan calibrate`` fits on (``"set": "calibration"``)."""


class RandomMoEModel:
    """Random-weight forward pass of a ModelSpec (GQA attention only), on one device."""

    def __init__(self, m: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=g, device=device, dtype=dtype) * shape[-1] ** -0.5)
        a = m.attention
        self.m, self.device, self.dtype = m, device, dtype
        self.embed = w(m.vocab_size, m.hidden_size)
        self.head = w(m.vocab_size, m.hidden_size)
        self.layers = []
        moe = set(m.moe_layers)
        for i in range(m.num_layers):
            layer = {"q": w(a.num_heads * a.head_dim, m.hidden_size), "k": w(a.num_kv_heads * a.head_dim, m.hidden_size),
                     "v": w(a.num_kv_heads * a.head_dim, m.hidden_size), "o": w(m.hidden_size, a.num_heads * a.head_dim)}
            if i in moe:
                layer.update(router=w(m.num_experts, m.hidden_size), w13=w(m.num_experts, 2 * m.expert_ffn, m.hidden_size),
                             w2=w(m.num_experts, m.hidden_size, m.expert_ffn))
                if m.shared_ffn:
                    layer.update(s13=w(2 * m.shared_ffn, m.hidden_size), s2=w(m.hidden_size, m.shared_ffn))
            else:
                layer.update(d13=w(2 * m.dense_ffn, m.hidden_size), d2=w(m.hidden_size, m.dense_ffn))
            self.layers.append(layer)
        self.kernel = ExpertKernel("grouped", device, dtype, m.hidden_size, m.expert_ffn)
        self.counts: list[np.ndarray] = []

    @staticmethod
    def _norm(h: torch.Tensor) -> torch.Tensor:
        return h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)

    def _attention(self, lay: dict, h: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        a = self.m.attention
        b, s, _ = h.shape
        q = (h @ lay["q"].T).view(b, s, a.num_heads, a.head_dim).transpose(1, 2)
        if cache is None:
            k = (h @ lay["k"].T).view(b, s, a.num_kv_heads, a.head_dim).transpose(1, 2)
            v = (h @ lay["v"].T).view(b, s, a.num_kv_heads, a.head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            (h @ lay["k"].T, h @ lay["v"].T)  # the new token's K/V projections (cache update not timed apart)
            out = F.scaled_dot_product_attention(q, cache[0], cache[1], enable_gqa=True)
        return out.transpose(1, 2).reshape(b, s, -1) @ lay["o"].T

    def _swiglu(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ffn: int) -> torch.Tensor:
        up = x @ w13.T
        return (F.silu(up[..., :ffn]) * up[..., ffn:]) @ w2.T

    def _moe(self, lay: dict, x: torch.Tensor, record: bool) -> torch.Tensor:
        m = self.m
        logits = x @ lay["router"].T
        weights, experts = torch.topk(torch.softmax(logits.float(), dim=-1), m.top_k, dim=-1)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        if record:
            self.counts.append(torch.bincount(flat, minlength=m.num_experts).cpu().numpy())
        y = self.kernel(x[order // m.top_k], self.kernel.sorted_groups(flat[order], m.num_experts), lay["w13"], lay["w2"])
        out = torch.zeros_like(x)
        out.index_add_(0, order // m.top_k, y * weights.reshape(-1)[order, None].to(y.dtype))
        if m.shared_ffn:
            out += self._swiglu(x, lay["s13"], lay["s2"], m.shared_ffn)
        return out

    def forward(self, tokens: torch.Tensor, caches: list | None, record: bool = False) -> torch.Tensor:
        h = self.embed[tokens]
        for i, lay in enumerate(self.layers):
            h = h + self._attention(lay, self._norm(h), caches[i] if caches else None)
            x = self._norm(h)
            b, s, d = x.shape
            if "router" in lay:
                h = h + self._moe(lay, x.reshape(-1, d), record).view(b, s, d)
            else:
                h = h + self._swiglu(x, lay["d13"], lay["d2"], self.m.dense_ffn)
        return self._norm(h) @ self.head.T


def graphed(fn, device: torch.device):  # noqa: ANN001, ANN201
    """``fn`` captured as a CUDA graph (after two warm-up runs on a side stream): its replay, or None
    on the CPU or where capture fails."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize(device)
        return graph.replay
    except RuntimeError as exc:
        print(f"CUDA graph capture failed, timing eagerly: {str(exc).splitlines()[0][:200]}", flush=True)
        torch.cuda.synchronize(device)
        return None


def time_step(fn, device: torch.device, warmup: int = 3, repeats: int = 10) -> list[float]:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def run(model_names: list[str], profile: HardwareProfile, device: torch.device,
        cases: list[tuple[str, str, int, int]], shrink: bool = False, out_file: Path | None = None,
        header: dict | None = None) -> list[dict]:
    """Time every case of every model; rows are also written to ``out_file`` as they come."""
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in model_names:
        m = ModelSpec.preset(name)
        if shrink:
            from dataclasses import replace
            m = replace(m, num_layers=2, moe_layers=(0, 1), vocab_size=256, hidden_size=64, expert_ffn=32,
                        shared_ffn=32 if m.shared_ffn else 0, num_experts=8, top_k=2,
                        attention=replace(m.attention, num_heads=4, num_kv_heads=4, head_dim=16))
        net = RandomMoEModel(m, device, dtype)
        cost = CostModel(m, profile, CostOptions(kernel="grouped"))
        a = m.attention
        for case_set, phase, batch, seq in cases:
            g = torch.Generator(device="cpu").manual_seed(batch * seq)
            with torch.no_grad():
                if phase == "prefill":
                    tokens = torch.randint(0, m.vocab_size, (batch, seq), generator=g).to(device)
                    caches = None
                    n_tokens, context = batch * seq, seq
                else:
                    tokens = torch.randint(0, m.vocab_size, (batch, 1), generator=g).to(device)
                    kv = torch.randn(2, batch, a.num_kv_heads, seq, a.head_dim, device=device, dtype=dtype)
                    caches = [(kv[0], kv[1])] * m.num_layers  # one cache (> L2) read by every layer
                    n_tokens, context = batch, seq
                net.counts = []
                net.forward(tokens, caches, record=True)
                counts = np.stack(net.counts)
                step = partial(net.forward, tokens, caches)
                replay = graphed(step, device) if phase == "decode" else None
                times = time_step(replay or step, device)
                graph_ok = replay is not None
                del replay
            pred = cost.forward_time(n_tokens, context, phase, counts).to_dict()
            measured = statistics.median(times)
            rows.append({"set": case_set, "model": m.name, "model_spec": m.to_dict(), "phase": phase, "batch": batch, "seq": seq, "tokens": n_tokens,
                         "context": context, "kernel": "grouped", "expert_counts": counts.tolist(),
                         "cuda_graph": graph_ok,
                         "measured_s": measured, "samples_s": times, "min_s": min(times), "max_s": max(times),
                         "predicted_s": pred["total"], "predicted_parts": pred,
                         "error": (pred["total"] - measured) / measured})
            if out_file is not None:
                out_file.write_text(json.dumps({**(header or {}), "rows": rows}, indent=1))
            print(f"{m.name:22s} {phase:7s} B={batch:<4d} S={seq:<5d} measured {measured * 1e3:8.3f} ms  "
                  f"predicted {pred['total'] * 1e3:8.3f} ms  error {100 * rows[-1]['error']:+6.1f}%", flush=True)
            del caches
            if phase == "decode":
                del kv
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del net
    return rows


def main() -> None:
    profile = HardwareProfile.load(sys.argv[1])
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        cases = [("calibration", *c) for c in CALIBRATION_CASES] + [("judged", *c) for c in CASES]
    else:
        cases = [("calibration", "prefill", 1, 8), ("calibration", "decode", 2, 8), ("judged", "prefill", 1, 16),
                 ("judged", "decode", 2, 16)]
    header = {"kind": "forward_step", "gpu": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "profile": profile.name, "profile_digest": profile.digest(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows = run(["olmoe-1b-7b", "qwen1.5-moe-a2.7b"], profile, device, cases, shrink=not cuda,
               out_file=out / "forward.json", header=header)
    errors = [abs(r["error"]) for r in rows if r["set"] == "judged"]
    summary = {"judged_median_abs_error": statistics.median(errors), "judged_worst_abs_error": max(errors)}
    (out / "forward.json").write_text(json.dumps({**header, "summary": summary, "rows": rows}, indent=1))
    print(f"judged steps: median |error| {100 * summary['judged_median_abs_error']:.1f}%  "
          f"worst {100 * summary['judged_worst_abs_error']:.1f}%")


if __name__ == "__main__":
    main()
