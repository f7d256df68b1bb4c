"""Attention as the profiler times it, through ``torch.nn.functional.scaled_dot_product_attention``
(flash / memory-efficient / cuDNN kernels on a GPU; the math kernel is kept out of prefill there,
since it materialises the S×S scores).

Shapes (:class:`AttentionShape`, from a ModelSpec):
- GQA: H query heads, KV key/value heads of width d, in both phases.
- MLA prefill: the non-absorbed form every runtime uses for prefill: H heads with key width
  qk_nope + qk_rope and value width v_head (the cost model's roofline counts the same).
- MLA decode: the absorbed form, i.e. MQA with one latent KV head: key width kv_lora + qk_rope,
  value = the first kv_lora columns of the same cache (one read of the latent cache).

Prefill: ``batch`` sequences of S tokens, causal; train: the same forward and its backward. Decode: ``batch`` sequences, one new token each
against a KV cache of C tokens; the query heads that share a KV head ride in the query-length
axis, so each KV head is read once (as GQA decode kernels do). Training: prefill's shapes, forward
and backward (:func:`train_op`). All three are timed as device work (``Op.queue_ahead``), as a
CUDA-graph replay (or a training step's host running ahead) runs them.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moeplan.cost import attention_signature
from moeplan.model import ModelSpec
from moeplan.profiler.device import Accelerator
from moeplan.profiler.timing import Op

BF16 = torch.bfloat16


@dataclass(frozen=True)
class AttentionShape:
    """Head counts and widths of one model's attention, per phase (see the module docstring)."""

    signature: str
    heads: int
    prefill_kv_heads: int
    prefill_qk_dim: int
    prefill_v_dim: int
    decode_kv_heads: int
    decode_qk_dim: int
    decode_v_dim: int
    shared_kv: bool

    @classmethod
    def of(cls, model: ModelSpec) -> AttentionShape:
        a = model.attention
        sig = attention_signature(model)
        if a.kind == "mla":
            return cls(sig, a.num_heads, a.num_heads, a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim,
                       1, a.kv_lora_rank + a.qk_rope_head_dim, a.kv_lora_rank, True)
        return cls(sig, a.num_heads, a.num_kv_heads, a.head_dim, a.head_dim, a.num_kv_heads, a.head_dim, a.head_dim,
                   False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttentionShape:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def _fused_only(acc: Accelerator) -> Callable[[], AbstractContextManager[Any]]:
    """A context that keeps SDPA off its math kernel on a GPU (no-op on CPU and NPU)."""
    if acc.kind != "cuda":
        return nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends.append(SDPBackend.CUDNN_ATTENTION)
    return lambda: sdpa_kernel(backends)


def sdpa_kernel_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, gqa: bool) -> str:
    """The SDPA kernel torch picks for these inputs (flash_attention, efficient_attention,
    cudnn_attention, math), as torch reports it; "unknown" where it cannot say."""
    try:
        from torch.nn.attention import SDPBackend
        choice = int(torch._fused_sdp_choice(q, k, v, is_causal=causal, enable_gqa=gqa))
    except (ImportError, AttributeError, RuntimeError, TypeError):
        return "unknown"
    names = {b.value: name.lower() for name, b in SDPBackend.__members__.items()}
    return names.get(choice, "unknown")


def prefill_op(acc: Accelerator, shape: AttentionShape, seq: int, batch: int, impl: str) -> Op:
    """Causal attention over ``batch`` sequences of ``seq`` tokens. impl "sdpa": native shapes
    (``enable_gqa`` for GQA); "sdpa-padded": KV heads expanded to H and values padded to the key
    width before timing, for kernels that need equal heads and widths (same FLOPs counted)."""
    h, kv, dq, dv = shape.heads, shape.prefill_kv_heads, shape.prefill_qk_dim, shape.prefill_v_dim
    padded = impl == "sdpa-padded"
    if impl not in ("sdpa", "sdpa-padded"):
        raise ValueError(f"prefill impl must be sdpa or sdpa-padded, got {impl}")
    kv_store, dv_store = (h, dq) if padded else (kv, dv)
    scope = _fused_only(acc)
    gqa = kv_store != h
    what = f"SDPA causal{' (GQA)' if gqa else ''}{', KV expanded / V padded' if padded else ''}"

    def make() -> tuple[torch.Tensor, ...]:
        q = torch.randn(batch, h, seq, dq, device=acc.device, dtype=BF16)
        k = torch.randn(batch, kv, seq, dq, device=acc.device, dtype=BF16)
        v = torch.randn(batch, kv, seq, dv, device=acc.device, dtype=BF16)
        if padded:
            k = k.repeat_interleave(h // kv, dim=1)
            v = F.pad(v.repeat_interleave(h // kv, dim=1), (0, dq - dv))
        with scope():
            op.impl = f"{what}, {sdpa_kernel_name(q, k, v, True, gqa)} kernel"
        return q, k, v

    def run(t: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with scope():
            if gqa:
                return F.scaled_dot_product_attention(t[0], t[1], t[2], is_causal=True, enable_gqa=True)
            return F.scaled_dot_product_attention(t[0], t[1], t[2], is_causal=True)
    flops = 2.0 * batch * h * seq * seq * (dq + dv) * 0.5
    nbytes = 2.0 * batch * seq * (h * dq + kv_store * (dq + dv_store) + h * dv_store)
    op = Op(make=make, run=run, set_bytes=int(nbytes), work={"flops": flops, "bytes": nbytes}, impl=what,
            queue_ahead=True)
    return op


def train_op(acc: Accelerator, shape: AttentionShape, seq: int, batch: int) -> Op:
    """Causal attention forward + backward over ``batch`` sequences of ``seq`` tokens, native
    shapes (``enable_gqa`` for GQA), as a training step runs it (flash attention's backward on a
    GPU): the output, then the gradients of q, k and v from an output gradient. Work: the forward's
    2 matmuls and the backward's 5 (FlashAttention-2, Dao 2023, §3.2), 3.5 × the prefill FLOPs."""
    h, kv, dq, dv = shape.heads, shape.prefill_kv_heads, shape.prefill_qk_dim, shape.prefill_v_dim
    scope = _fused_only(acc)
    gqa = kv != h
    what = f"SDPA causal forward + backward{' (GQA)' if gqa else ''}"

    def make() -> tuple[torch.Tensor, ...]:
        q = torch.randn(batch, h, seq, dq, device=acc.device, dtype=BF16, requires_grad=True)
        k = torch.randn(batch, kv, seq, dq, device=acc.device, dtype=BF16, requires_grad=True)
        v = torch.randn(batch, kv, seq, dv, device=acc.device, dtype=BF16, requires_grad=True)
        with scope():
            op.impl = f"{what}, {sdpa_kernel_name(q, k, v, True, gqa)} kernel"
        return q, k, v, torch.randn(batch, h, seq, dv, device=acc.device, dtype=BF16)

    def run(t: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with scope():
            out = F.scaled_dot_product_attention(t[0], t[1], t[2], is_causal=True, enable_gqa=gqa)
            return torch.autograd.grad(out, t[:3], t[3])[0]
    flops = 3.5 * 2.0 * batch * h * seq * seq * (dq + dv) * 0.5
    nbytes = 2.0 * batch * seq * (3 * h * dq + 2 * kv * (dq + dv) + 2 * h * dv)
    op = Op(make=make, run=run, set_bytes=int(nbytes), work={"flops": flops, "bytes": nbytes}, impl=what,
            queue_ahead=True)
    return op


def decode_op(acc: Accelerator, shape: AttentionShape, context: int, batch: int) -> Op:
    """One new token per sequence for ``batch`` sequences against ``context`` cached tokens."""
    h, kv, dq, dv = shape.heads, shape.decode_kv_heads, shape.decode_qk_dim, shape.decode_v_dim
    group = h // kv

    what = "SDPA, query heads of a KV head in the query axis" + (", V = view of the latent K" if shape.shared_kv
                                                                  else "")

    def make() -> tuple[torch.Tensor, ...]:
        q = torch.randn(batch, kv, group, dq, device=acc.device, dtype=BF16)
        k = torch.randn(batch, kv, context, dq, device=acc.device, dtype=BF16)
        v = k[..., :dv] if shape.shared_kv else torch.randn(batch, kv, context, dv, device=acc.device, dtype=BF16)
        op.impl = f"{what}, {sdpa_kernel_name(q, k, v, False, False)} kernel"
        return q, k, v

    def run(t: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.scaled_dot_product_attention(t[0], t[1], t[2])
    cache = batch * kv * context * (dq if shape.shared_kv else dq + dv)
    nbytes = 2.0 * (cache + batch * h * (dq + dv))
    flops = 2.0 * batch * h * context * (dq + dv)
    op = Op(make=make, run=run, set_bytes=int(nbytes), work={"flops": flops, "bytes": nbytes}, impl=what,
            queue_ahead=True)
    return op
