"""The compute operations the profiler times, each as an :class:`~moeplan.profiler.timing.Op`:
dense matmul (bf16; fp8 through ``torch._scaled_mm``), HBM copy, kernel-launch overhead, and the
SwiGLU expert FFN, one expert at a time ("loop") or G experts in one grouped kernel ("grouped").

Expert FFN (one expert, n tokens, hidden h, FFN width f; weights as ``nn.Linear`` stores them):
    loop:    g = x·W_gateᵀ, u = x·W_upᵀ, a = silu(g)·u, y = a·W_downᵀ      (3 GEMMs, silu, mul: 5 launches)
    grouped: x is [G·n, h] already sorted by expert; h13 = grouped_mm(x, W13ᵀ) with W13 = [G, 2f, h]
             (gate and up fused), a = silu(gate)·up, y = grouped_mm(a, W2ᵀ) with W2 = [G, h, f];
             ``torch._grouped_mm`` where it runs, else ``torch.bmm`` on [G, n, ·] (equal n needs no padding).
FLOPs per run: 2·n·h·f for each of the three matmuls, times G.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moeplan.profiler.device import Accelerator
from moeplan.profiler.timing import Op

BF16 = torch.bfloat16
LAUNCHES_PER_RUN = 64          # tiny kernels per timed run of the launch-overhead op


def randn(acc: Accelerator, *shape: int, dtype: torch.dtype = BF16, scale: float = 1.0) -> torch.Tensor:
    """Random normal data on the device (never zeros), scaled to keep products in range."""
    native = dtype in (BF16, torch.float16, torch.float32)
    t = torch.randn(*shape, device=acc.device, dtype=dtype if native else torch.float32)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(dtype)


def matmul_op(acc: Accelerator, n: int, dtype: str) -> Op:
    """C = A·B for n×n random matrices; dtype "bf16", or "fp8" (e4m3 inputs, per-tensor scales,
    bf16 output, fast accumulation) where :meth:`Accelerator.supports_fp8`."""
    flops = 2.0 * n ** 3
    if dtype == "bf16":
        return Op(make=lambda: (randn(acc, n, n), randn(acc, n, n)), run=lambda ab: ab[0] @ ab[1],
                  set_bytes=2 * n * n * 2, work={"flops": flops}, impl="torch.matmul bf16")
    if dtype != "fp8":
        raise ValueError(f"matmul dtype must be bf16 or fp8, got {dtype}")
    f8 = torch.float8_e4m3fn

    def make() -> tuple[torch.Tensor, ...]:
        a = randn(acc, n, n, dtype=f8)
        b = randn(acc, n, n, dtype=f8).t()          # column-major, as _scaled_mm wants
        one = torch.ones((), device=acc.device, dtype=torch.float32)
        return a, b, one, one.clone()

    def run(s: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch._scaled_mm(s[0], s[1], scale_a=s[2], scale_b=s[3], out_dtype=BF16, use_fast_accum=True)
    return Op(make=make, run=run, set_bytes=2 * n * n, work={"flops": flops}, impl="torch._scaled_mm fp8 e4m3")


def copy_op(acc: Accelerator, nbytes: int) -> Op:
    """dst ← src on the device for ``nbytes`` bytes; ``work["bytes"]`` counts read plus written."""
    elems = max(nbytes // 2, 1)
    return Op(make=lambda: (randn(acc, elems), torch.empty(elems, device=acc.device, dtype=BF16)),
              run=lambda s: s[1].copy_(s[0]), set_bytes=4 * elems, work={"bytes": 4.0 * elems},
              impl="Tensor.copy_")


def launch_op(acc: Accelerator) -> Op:
    """LAUNCHES_PER_RUN back-to-back one-element kernels: the per-launch cost of eager PyTorch."""
    def run(t: torch.Tensor) -> None:
        for _ in range(LAUNCHES_PER_RUN):
            t.add_(1.0)
    return Op(make=lambda: randn(acc, 1, dtype=torch.float32), run=run, set_bytes=4,
              work={"launches": float(LAUNCHES_PER_RUN)}, impl="Tensor.add_ on one element")


def expert_loop_op(acc: Accelerator, hidden: int, ffn: int, tokens: int) -> Op:
    """One expert's SwiGLU FFN at ``tokens`` tokens, its own launches (the "loop" kernel)."""
    s = 1.0 / hidden ** 0.5

    def make() -> tuple[torch.Tensor, ...]:
        return (randn(acc, tokens, hidden), randn(acc, ffn, hidden, scale=s), randn(acc, ffn, hidden, scale=s),
                randn(acc, hidden, ffn, scale=1.0 / ffn ** 0.5))

    def run(t: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, wg, wu, wd = t
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    return Op(make=make, run=run, set_bytes=2 * (tokens * hidden + 3 * hidden * ffn),
              work=_expert_work(hidden, ffn, tokens, 1), impl="F.linear x3 + silu*mul")


def expert_grouped_op(acc: Accelerator, hidden: int, ffn: int, tokens: int, experts: int, impl: str) -> Op:
    """``experts`` experts, ``tokens`` tokens each, in one grouped kernel; impl "grouped_mm" or "bmm"."""
    s = 1.0 / hidden ** 0.5

    def make() -> tuple[torch.Tensor, ...]:
        offs = torch.arange(1, experts + 1, device=acc.device, dtype=torch.int32) * tokens
        return (randn(acc, experts * tokens, hidden), randn(acc, experts, 2 * ffn, hidden, scale=s),
                randn(acc, experts, hidden, ffn, scale=1.0 / ffn ** 0.5), offs)

    if impl == "grouped_mm":
        def run(t: tuple[torch.Tensor, ...]) -> torch.Tensor:
            x, w13, w2, offs = t
            h = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(F.silu(h[:, :ffn]) * h[:, ffn:], w2.transpose(-2, -1), offs=offs)
        name = "torch._grouped_mm"
    elif impl == "bmm":
        def run(t: tuple[torch.Tensor, ...]) -> torch.Tensor:
            x, w13, w2, _ = t
            h = torch.bmm(x.view(experts, tokens, hidden), w13.transpose(-2, -1))
            return torch.bmm(F.silu(h[..., :ffn]) * h[..., ffn:], w2.transpose(-2, -1))
        name = "torch.bmm (equal tokens per expert, no padding)"
    else:
        raise ValueError(f"grouped impl must be grouped_mm or bmm, got {impl}")
    return Op(make=make, run=run, set_bytes=2 * experts * (tokens * hidden + 3 * hidden * ffn),
              work=_expert_work(hidden, ffn, tokens, experts), impl=name)


def routing_op(acc: Accelerator, hidden: int, experts: int, top_k: int, tokens: int) -> Op:
    """Everything a MoE layer does on one device besides the expert GEMMs, at ``tokens`` tokens:
    router logits, softmax, top-k, the stable sort of token-choices by expert, the split sizes
    copied to the host (runtimes need them), the gather of rows into expert order and the
    weighted scatter-add back (the experts themselves are left out)."""
    def make() -> tuple[torch.Tensor, ...]:
        return randn(acc, tokens, hidden), randn(acc, experts, hidden, scale=1.0 / hidden ** 0.5)

    def run(t: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, wr = t
        weights, ids = torch.topk(torch.softmax(F.linear(x, wr).float(), dim=-1), top_k, dim=-1)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        torch.bincount(flat, minlength=experts).tolist()
        rows = order // top_k
        gathered = x[rows]
        out = torch.zeros_like(x)
        out.index_add_(0, rows, gathered * weights.reshape(-1)[order, None].to(x.dtype))
        return out
    nbytes = 2.0 * (tokens * hidden + experts * hidden + 3 * tokens * top_k * hidden)
    return Op(make=make, run=run, set_bytes=2 * (tokens * hidden + experts * hidden),
              work={"flops": 2.0 * tokens * hidden * experts, "bytes": nbytes},
              impl="router + softmax + top-k + stable sort + split sizes to host + gather + weighted index_add")


def grouped_impl(acc: Accelerator) -> str:
    """"grouped_mm" when ``torch._grouped_mm`` exists and agrees with bmm on a small probe here,
    else "bmm"."""
    if not hasattr(torch, "_grouped_mm"):
        return "bmm"
    probe = [expert_grouped_op(acc, 64, 32, 16, 2, impl) for impl in ("grouped_mm", "bmm")]
    inputs = probe[0].make()
    try:
        got = probe[0].run(inputs).float()
    except (RuntimeError, TypeError, ValueError):
        return "bmm"
    want = probe[1].run(inputs).float().reshape(got.shape)
    err = float((got - want).norm() / want.norm().clamp_min(1e-6))
    return "grouped_mm" if err < 2e-2 else "bmm"


def _expert_work(hidden: int, ffn: int, tokens: int, experts: int) -> dict[str, float]:
    flops = 6.0 * hidden * ffn * tokens * experts
    nbytes = 2.0 * experts * (3 * hidden * ffn + tokens * (2 * hidden + 3 * ffn))
    return {"flops": flops, "bytes": nbytes}
