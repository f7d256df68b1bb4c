"""The compute operations the profiler times, each as an :class:`~moeplan.profiler.timing.Op`:
dense matmul (bf16; fp8 through ``torch._scaled_mm``), one dense GEMM of any shape (the
``gemm`` grid), HBM copy, kernel-launch overhead, the
SwiGLU expert FFN and the routing around it.

Expert FFN: the runtime's own :class:`moeplan.runtime.kernels.ExpertKernel` (one kernel module
shared by the profiler, ``moeplan run`` and the runtime), "loop" (per expert: fused gate/up GEMM
on W13 [2f, h], silu, mul, down GEMM, copy out: 5 launches) or "grouped" (G experts in two
``torch._grouped_mm`` calls, or a padded ``torch.bmm``), over x [G·n, h] sorted by expert.
FLOPs per run: 2·n·h·f for each of the three matmuls, times G.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from moeplan.profiler.device import Accelerator
from moeplan.profiler.timing import Op
from moeplan.runtime.kernels import ExpertKernel

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


def gemm_op(acc: Accelerator, tokens: int, k: int, n: int) -> Op:
    """y = x·Wᵀ for x [tokens, k] and W [n, k] random bf16 (the runtime's ``h @ w.T``; see
    :mod:`moeplan.gemms`): one dense GEMM of the shape a projection or FFN shard has, timed as
    device work (``queue_ahead``: the GEMMs of a layer run back to back on the device, so the
    host's launch latency is not part of their time)."""
    return Op(make=lambda: (randn(acc, tokens, k), randn(acc, n, k, scale=k ** -0.5)), run=lambda xw: xw[0] @ xw[1].T,
              set_bytes=2 * (tokens * k + n * k),
              work={"flops": 2.0 * tokens * k * n, "bytes": 2.0 * (tokens * k + n * k + tokens * n)},
              impl="torch.matmul bf16 x @ w.T, device time (queued ahead)", queue_ahead=True)


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


def expert_op(acc: Accelerator, hidden: int, ffn: int, tokens: int, experts: int, kernel: str) -> Op:
    """``experts`` experts, ``tokens`` tokens each, through the runtime's own expert kernel
    (:class:`moeplan.runtime.kernels.ExpertKernel`, ``kernel`` "loop" or "grouped"): the very
    code ``moeplan run`` and the runtime execute, so a profile prices what runs. The token
    grouping (:meth:`ExpertKernel.groups`) is built once per input set, outside the timed run,
    as the runtime builds it once per batch. Timed as device work (``queue_ahead``), as a
    CUDA-graph replay of the layer runs it."""
    expert_kernel = ExpertKernel(kernel, acc.device, BF16, hidden, ffn)
    s = 1.0 / hidden ** 0.5

    def make() -> tuple[Any, ...]:
        return (randn(acc, experts * tokens, hidden), expert_kernel.groups([tokens] * experts),
                randn(acc, experts, 2 * ffn, hidden, scale=s), randn(acc, experts, hidden, ffn, scale=1.0 / ffn ** 0.5))

    def run(t: tuple[Any, ...]) -> torch.Tensor:
        return expert_kernel(*t)
    return Op(make=make, run=run, set_bytes=2 * experts * (tokens * hidden + 3 * hidden * ffn),
              work=_expert_work(hidden, ffn, tokens, experts),
              impl=f"moeplan.runtime.kernels {kernel}: {expert_kernel.impl}, device time (queued ahead)",
              queue_ahead=True)


def routing_op(acc: Accelerator, hidden: int, experts: int, top_k: int, tokens: int) -> Op:
    """Everything a MoE layer does on one device besides the expert GEMMs, at ``tokens`` tokens:
    router logits, softmax, top-k, the stable sort of token-choices by expert, each expert's
    group end found on the device (:meth:`moeplan.runtime.kernels.ExpertKernel.sorted_groups`:
    the sync-free layer that CUDA graphs capture), the gather of rows into expert order and the
    weighted scatter-add back (the experts themselves are left out). Timed as device work."""
    def make() -> tuple[torch.Tensor, ...]:
        return randn(acc, tokens, hidden), randn(acc, experts, hidden, scale=1.0 / hidden ** 0.5)

    def run(t: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, wr = t
        weights, ids = torch.topk(torch.softmax(F.linear(x, wr).float(), dim=-1), top_k, dim=-1)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        torch.searchsorted(flat[order], torch.arange(experts, device=flat.device), right=True, out_int32=True)
        rows = order // top_k
        gathered = x[rows]
        out = torch.zeros_like(x)
        out.index_add_(0, rows, gathered * weights.reshape(-1)[order, None].to(x.dtype))
        return out
    nbytes = 2.0 * (tokens * hidden + experts * hidden + 3 * tokens * top_k * hidden)
    return Op(make=make, run=run, set_bytes=2 * (tokens * hidden + experts * hidden),
              work={"flops": 2.0 * tokens * hidden * experts, "bytes": nbytes},
              impl="router + softmax + top-k + stable sort + group ends on the device + gather + weighted index_add,"
                   " device time (queued ahead)", queue_ahead=True)


def _expert_work(hidden: int, ffn: int, tokens: int, experts: int) -> dict[str, float]:
    flops = 6.0 * hidden * ffn * tokens * experts
    nbytes = 2.0 * experts * (3 * hidden * ffn + tokens * (2 * hidden + 3 * ffn))
    return {"flops": flops, "bytes": nbytes}
