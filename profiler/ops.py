"""One entry point that rebuilds any timed compute or host operation from its recorded
``(kind, params, x)`` — the profiler builds its ops through it and the plain-loop reference
(:mod:`moeplan.profiler.reference`) rebuilds the very same ops from a raw-measurement JSON."""
from __future__ import annotations

from typing import Any

from moeplan.profiler.attention_ops import AttentionShape, decode_op, prefill_op, train_op
from moeplan.profiler.compute_ops import copy_op, expert_op, gemm_op, launch_op, matmul_op, routing_op
from moeplan.profiler.device import Accelerator
from moeplan.profiler.host_ops import host_copy_op
from moeplan.profiler.timing import Op

KINDS = ("matmul", "gemm", "copy", "launch", "expert_ffn", "moe_routing", "attention_prefill", "attention_decode",
         "attention_train", "host_copy")


def build_op(acc: Accelerator, kind: str, params: dict[str, Any], x: float) -> Op:
    """The op of a measurement: ``x`` is n (matmul), tokens (gemm), bytes (copy, host_copy), tokens per expert
    (expert_ffn), tokens per device (moe_routing), sequence length (attention_prefill, attention_train) or context
    (attention_decode)."""
    n = int(x)
    if kind == "matmul":
        return matmul_op(acc, n, params["dtype"])
    if kind == "gemm":
        return gemm_op(acc, n, int(params["k"]), int(params["n"]))
    if kind == "copy":
        return copy_op(acc, n)
    if kind == "launch":
        return launch_op(acc)
    if kind == "expert_ffn":
        return expert_op(acc, params["hidden"], params["ffn"], n, int(params.get("experts", 1)), params["kernel"])
    if kind == "moe_routing":
        return routing_op(acc, params["hidden"], params["experts"], params["top_k"], n)
    if kind == "attention_prefill":
        return prefill_op(acc, AttentionShape.from_dict(params["shape"]), n, params["batch"], params["impl"])
    if kind == "attention_train":
        return train_op(acc, AttentionShape.from_dict(params["shape"]), n, params["batch"])
    if kind == "attention_decode":
        return decode_op(acc, AttentionShape.from_dict(params["shape"]), n, params["batch"])
    if kind == "host_copy":
        return host_copy_op(acc, n, params["direction"], params["memory"])
    raise ValueError(f"unknown op kind {kind!r}; expected one of {', '.join(KINDS)}")
