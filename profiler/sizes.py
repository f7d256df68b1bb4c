"""What the profiler measures at which sizes, and how long it spends per point.

Sections: ``device`` (matmul, HBM copy, launch overhead), ``gemm`` (dense GEMM curves on a
(k, n) grid that spans the models' attention projections, shared/dense FFNs, routers and LM heads
whole and split up to 8 ways: :mod:`moeplan.gemms`), ``experts`` (expert FFN curves),
``attention`` (prefill, train = prefill forward + backward, and decode curves), ``host`` (host-link copies), ``collectives``.

Four plans: accelerator full (the default: about 2–3 minutes on one H100 with the default models),
accelerator ``--quick`` (under a minute), CPU full and CPU quick (tiny, for CI). Collective sizes on
the CPU are capped so that every rank's buffers fit in a sixteenth of the free host memory.
Units: bytes, tokens, sequence lengths.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from moeplan.profiler.timing import Effort

KIB, MIB, GIB = 2**10, 2**20, 2**30
SECTIONS = ("device", "gemm", "experts", "routing", "attention", "host", "collectives")
GEMM_MAX_WEIGHT_ELEMS = 2**30  # gemm grid shapes with more weight elements (2 GiB in bf16) are left out
GEMM_MAX_FLOPS = 4e12          # token counts past this many FLOPs are left out (the curve extends linearly)
DEFAULT_MODELS = ("mixtral-8x7b", "deepseek-v3", "deepseek-v2-lite", "qwen3-30b-a3b", "qwen3-235b-a22b", "olmoe-1b-7b",
                  "qwen1.5-moe-a2.7b")


def doublings(lo: int, hi: int, factor: int = 2) -> tuple[int, ...]:
    """lo, lo·factor, … up to hi (inclusive)."""
    out = [lo]
    while out[-1] * factor <= hi:
        out.append(out[-1] * factor)
    return tuple(out)


@dataclass(frozen=True)
class Sizes:
    """matmul_n: square matmul size; copy_bytes: HBM copy size (bytes copied; read + write is twice);
    expert_tokens: tokens per expert of the expert-FFN curves; grouped_experts: the two expert counts
    of the grouped kernel; prefill_seqs / decode_contexts: attention lengths (batch prefill_batch /
    decode_batch); host_bytes: host-copy sizes (each preset's expert size is added); collective_bytes:
    bytes per rank; gemm_k / gemm_n / gemm_tokens: the dense GEMM grid (input features, output
    features, tokens); effort: time budget per point (gemm_effort for the GEMM grid); passes: how many times the whole device plan is
    measured, one pass after the other (each point's curve keeps the median over passes and the
    min/max over every pass's repeats, so its spread covers both)."""

    matmul_n: int
    copy_bytes: int
    expert_tokens: tuple[int, ...]
    grouped_experts: tuple[int, int]
    prefill_seqs: tuple[int, ...]
    prefill_batch: int
    decode_contexts: tuple[int, ...]
    decode_batch: int
    host_bytes: tuple[int, ...]
    collective_bytes: tuple[int, ...]
    effort: Effort
    passes: int
    gemm_k: tuple[int, ...] = ()
    gemm_n: tuple[int, ...] = ()
    gemm_tokens: tuple[int, ...] = ()
    gemm_effort: Effort | None = None

    @classmethod
    def choose(cls, accelerator: bool, quick: bool, host_free_bytes: int, ranks_on_host: int) -> Sizes:
        if accelerator and not quick:
            return cls(matmul_n=8192, copy_bytes=GIB, expert_tokens=doublings(1, 16384), grouped_experts=(1, 8),
                       prefill_seqs=doublings(512, 16384), prefill_batch=1, decode_contexts=doublings(512, 32768),
                       decode_batch=16, host_bytes=doublings(64 * KIB, 256 * MIB, 4),
                       collective_bytes=doublings(64 * KIB, 512 * MIB),
                       effort=Effort(warmup=3, min_reps=5, max_reps=200, target_s=0.25, max_sets=32), passes=2,
                       gemm_k=doublings(64, 32768), gemm_n=doublings(64, 131072),
                       gemm_tokens=(1, 16, 64, 256, 1024, 2048, 4096, 8192, 16384),
                       gemm_effort=Effort(warmup=2, min_reps=5, max_reps=100, target_s=0.02, max_sets=16))
        if accelerator:
            return cls(matmul_n=4096, copy_bytes=256 * MIB, expert_tokens=(1, 16, 128, 1024, 4096),
                       grouped_experts=(1, 8), prefill_seqs=(1024, 4096), prefill_batch=1,
                       decode_contexts=(1024, 8192), decode_batch=16, host_bytes=(MIB, 64 * MIB),
                       collective_bytes=(64 * KIB, MIB, 16 * MIB, 64 * MIB),
                       effort=Effort(warmup=2, min_reps=3, max_reps=20, target_s=0.02, max_sets=8), passes=2,
                       gemm_k=doublings(256, 16384, 4), gemm_n=doublings(256, 65536, 4), gemm_tokens=(1, 128, 4096))
        cap = max(64 * KIB, host_free_bytes // (16 * max(ranks_on_host, 1)))
        if not quick:
            plan = cls(matmul_n=1024, copy_bytes=64 * MIB, expert_tokens=doublings(1, 256, 4), grouped_experts=(1, 4),
                       prefill_seqs=(128, 256, 512), prefill_batch=1, decode_contexts=(256, 1024, 4096),
                       decode_batch=4, host_bytes=(), collective_bytes=doublings(64 * KIB, 64 * MIB, 4),
                       effort=Effort(warmup=2, min_reps=3, max_reps=20, target_s=0.05, max_sets=8), passes=2,
                       gemm_k=(16, 64, 256), gemm_n=(16, 64, 256), gemm_tokens=(1, 16, 128))
        else:
            plan = cls(matmul_n=256, copy_bytes=4 * MIB, expert_tokens=(1, 8, 64), grouped_experts=(1, 4),
                       prefill_seqs=(64, 128), prefill_batch=1, decode_contexts=(64, 256), decode_batch=2,
                       host_bytes=(), collective_bytes=(64 * KIB, 256 * KIB, MIB),
                       effort=Effort(warmup=1, min_reps=3, max_reps=5, target_s=0.002, max_sets=2), passes=2,
                       gemm_k=(16, 64), gemm_n=(16, 64), gemm_tokens=(1, 8))
        return replace(plan, collective_bytes=tuple(b for b in plan.collective_bytes if b <= cap) or (64 * KIB,))
