"""AttentionTables: one layer's attention core priced from measured per-GPU attention tables.

NVIDIA aiconfigurator-core 0.12.0 (Apache-2.0) measures each backend's attention kernels under
``systems/data/<system>/attention/<framework>/<version>/{context,generation}_attention_perf.parquet``
(GQA/MHA: per-GPU query heads, KV heads, head dim, KV-cache dtype, batch, prompt length or
KV-cache length) and ``systems/data/<system>/mla/<framework>/<version>/{context,generation}_mla_perf.parquet``
(DeepSeek-V3's MLA: per-GPU heads, KV-cache dtype, batch, length). :mod:`moeplan.aiconfigurator_import`
turns them into ``attention_context`` / ``attention_generation`` curves, one per
(:class:`AttentionShape`, batch), x = tokens per sequence (prompt length / KV-cache length), y =
seconds of the whole batch. This module looks them up: between the two measured batches around a
batch it interpolates log-log, beyond the largest it scales in proportion (the throughput of the
largest batch). The core is scores, softmax and values only — the projections are GEMMs, priced
elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moeplan.hardware import Curve, HardwareProfile
from moeplan.model import ModelSpec

# The MLA tables time DeepSeek-V3's MLA (kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim
# 128, v_head_dim 128: aiconfigurator-core's collector for context_mla / generation_mla); a model
# with other MLA dims has no table.
MLA_DIMS = (512, 64, 128, 128)
PHASE_KIND = {"prefill": "attention_context", "decode": "attention_generation"}


@dataclass(frozen=True)
class AttentionShape:
    """The attention of one GPU after tensor parallelism: ``attention`` gqa or mla, ``heads``
    query heads and ``kv_heads`` KV heads on the GPU (MLA: 1, its latent cache), ``head_dim``
    (MLA: 0, its dims are :data:`MLA_DIMS`), ``kv_dtype`` bf16 or fp8 (the KV cache's)."""

    attention: str
    heads: int
    kv_heads: int
    head_dim: int
    kv_dtype: str

    @classmethod
    def of(cls, model: ModelSpec, tp: int, kv_bytes: float) -> "AttentionShape | None":
        """The shape ``model``'s attention has on each of ``tp`` GPUs with a KV cache of
        ``kv_bytes`` bytes per element (1: fp8, else bf16); None where no table can hold it
        (heads not divisible by TP, MLA with other dims, linear attention)."""
        a = model.attention
        if a.num_heads % tp:
            return None
        kv_dtype = "fp8" if kv_bytes <= 1 else "bf16"
        if a.kind == "mla":
            dims = (a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim, a.v_head_dim)
            return cls("mla", a.num_heads // tp, 1, 0, kv_dtype) if dims == MLA_DIMS else None
        if a.kind != "gqa":
            return None
        return cls("gqa", a.num_heads // tp, max(a.num_kv_heads // tp, 1), a.head_dim, kv_dtype)

    def key(self) -> tuple:
        return (self.attention, self.heads, self.kv_heads, self.head_dim, self.kv_dtype)

    @classmethod
    def from_curve(cls, curve: Curve) -> "AttentionShape":
        k = curve.key
        return cls(str(k["attention"]), int(k["heads"]), int(k["kv_heads"]), int(k["head_dim"]), str(k["kv_dtype"]))


@dataclass(frozen=True)
class AttentionTables:
    """The profile's measured attention curves by (phase, :meth:`AttentionShape.key`): the
    measured batches in increasing order and one curve per batch."""

    by_shape: dict[tuple[str, tuple], tuple[tuple[float, ...], tuple[Curve, ...]]]

    @classmethod
    def of(cls, hw: HardwareProfile) -> "AttentionTables | None":
        """The tables of ``hw``'s measured attention_context / attention_generation curves, or None
        without any."""
        grouped: dict[tuple[str, tuple], list[tuple[float, Curve]]] = {}
        for phase, kind in PHASE_KIND.items():
            for c in hw.curves_of(kind):
                if c.prov.measured:
                    grouped.setdefault((phase, AttentionShape.from_curve(c).key()), []).append((float(c.key["batch"]), c))
        if not grouped:
            return None
        by_shape = {}
        for key, pairs in grouped.items():
            pairs.sort(key=lambda p: p[0])
            by_shape[key] = (tuple(b for b, _ in pairs), tuple(c for _, c in pairs))
        return cls(by_shape)

    def has(self, phase: str, shape: AttentionShape | None) -> bool:
        return shape is not None and (phase, shape.key()) in self.by_shape

    def core_time(self, phase: str, shape: AttentionShape, tokens: float, context: float) -> float:
        """Seconds of one layer's attention core on one GPU for ``tokens`` new tokens each attending
        to ``context`` tokens: decode, ``tokens`` sequences of ``context`` cached tokens; prefill,
        ``tokens / context`` prompts of ``context`` tokens. Call :meth:`has` first."""
        return self.time(phase, shape, tokens if phase == "decode" else tokens / context, context)

    def time(self, phase: str, shape: AttentionShape, batch: float, length: float) -> float:
        """Seconds of one layer's attention core on one GPU for ``batch`` sequences (may be
        fractional: a share of one prompt) of ``length`` tokens each (prefill: prompt tokens;
        decode: KV-cache tokens, one new token each). Call :meth:`has` first."""
        batches, curves = self.by_shape[phase, shape.key()]
        b = max(batch, 1e-9)
        x = max(length, 1.0)
        if b <= batches[0]:
            return float(curves[0](x)) * b / batches[0]
        if b >= batches[-1]:
            return float(curves[-1](x)) * b / batches[-1]
        i = int(np.searchsorted(batches, b))
        lo, hi = batches[i - 1], batches[i]
        t_lo, t_hi = float(curves[i - 1](x)), float(curves[i](x))
        w = (math.log(b) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return math.exp((1 - w) * math.log(t_lo) + w * math.log(t_hi))
