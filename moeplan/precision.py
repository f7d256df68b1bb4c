"""Precision per component of a served model: how many bytes one weight element of the
attention/dense GEMMs, of the routed experts and of one KV-cache element take, and which
matmul rate each component runs at on a given GPU.

Storage formats (bytes per element, scales included):

- ``bf16``: 2.
- ``fp8`` (per-tensor scale) and ``fp8_block`` (one fp32 scale per 128 × 128 block, DeepSeek-V3's
  format): 1 and 1 + 4 / 16384.
- ``nvfp4``: 4-bit E2M1 values with one fp8 scale per 16 elements: 0.5 + 1 / 16.
- ``mxfp4``: 4-bit values with one 8-bit shared exponent per 32 elements: 0.5 + 1 / 32 (GPT-OSS's
  expert format).
- ``int4_wo``: int4 weight-only with one bf16 scale per 128-element group: 0.5 + 2 / 128; it
  computes at the bf16 rate (weights are dequantised in the kernel).

Compute: fp8 formats run at the profile's ``fp8`` rate, 4-bit float formats at its ``fp4`` rate
where the GPU has one (Blackwell) and at the ``fp8`` rate otherwise (Hopper runs MXFP4/NVFP4
weights through fp8 or bf16 tensor cores after dequantisation), everything else at ``bf16``.
"""
from __future__ import annotations

from dataclasses import dataclass

from moeplan.errors import InputError
from moeplan.hardware import DeviceSpec

FORMAT_BYTES: dict[str, float] = {
    "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "fp8_block": 1.0 + 4.0 / 16384, "nvfp4": 0.5 + 1.0 / 16,
    "mxfp4": 0.5 + 1.0 / 32, "int4_wo": 0.5 + 2.0 / 128,
}
FORMAT_RATE: dict[str, tuple[str, ...]] = {
    "bf16": ("bf16",), "fp16": ("bf16",), "fp8": ("fp8", "bf16"), "fp8_block": ("fp8", "bf16"),
    "nvfp4": ("fp4", "fp8", "bf16"), "mxfp4": ("fp4", "fp8", "bf16"), "int4_wo": ("bf16",),
}


def format_bytes(fmt: str, field: str = "precision") -> float:
    """Bytes per element of storage format ``fmt`` (scales included)."""
    if fmt not in FORMAT_BYTES:
        raise InputError(f"unknown number format {fmt!r}", field=field, fix=f"use one of {', '.join(FORMAT_BYTES)}")
    return FORMAT_BYTES[fmt]


def matmul_rate(device: DeviceSpec, fmt: str) -> float:
    """Peak dense matmul FLOP/s of ``device`` for weights in ``fmt`` (see the module docstring)."""
    format_bytes(fmt)
    for key in FORMAT_RATE[fmt]:
        if key in device.matmul_flops:
            return device.matmul_flops[key].value
    return device.matmul_flops["bf16"].value


@dataclass(frozen=True)
class Precision:
    """Number formats of a deployment: ``gemm`` for attention, dense-FFN and shared-expert
    weights, ``moe`` for routed experts, ``kv`` for the KV cache, ``head`` for the LM head
    (left in bf16 by every quantised checkpoint in aiconfigurator-core's silicon sample)."""

    gemm: str = "bf16"
    moe: str = "bf16"
    kv: str = "bf16"
    head: str = "bf16"

    def validate(self) -> "Precision":
        for name in ("gemm", "moe", "kv", "head"):
            format_bytes(getattr(self, name), field=f"precision.{name}")
        return self

    @property
    def gemm_bytes(self) -> float:
        return FORMAT_BYTES[self.gemm]

    @property
    def moe_bytes(self) -> float:
        return FORMAT_BYTES[self.moe]

    @property
    def kv_bytes(self) -> float:
        return FORMAT_BYTES[self.kv]

    @property
    def head_bytes(self) -> float:
        return FORMAT_BYTES[self.head]

    def label(self) -> str:
        return f"gemm {self.gemm} · moe {self.moe} · kv {self.kv}"
