"""Dense GEMMs: which ones a model's layers run on one GPU under tensor parallelism, and their
time from a profile's measured ``gemm`` curves.

A GEMM here is ``y[m, n] = x[m, k] · Wᵀ`` (W [n, k], the runtime's ``x @ w.T``): ``k`` input
features, ``n`` output features, ``m`` tokens. :func:`layer_gemms` lists, per part of a layer,
the GEMMs one GPU runs when attention, shared experts, dense FFNs and the LM head are split TP
ways (Megatron's column-parallel up / row-parallel down; vLLM and SGLang shard the same way) and
routed experts ETP ways:

- GQA attention: fused QKV ``h → (heads/TP + 2·max(kv/TP, 1))·d`` (KV heads replicated past their
  count), output ``heads/TP·d → h``;
- MLA attention (DeepSeek-V2/V3): ``q_a h → q_lora`` and ``kv_a h → kv_lora + rope`` replicated
  (SGLang's ``fused_qkv_a_proj_with_mqa`` is a ReplicatedLinear), ``q_b q_lora → heads/TP·qk``,
  ``kv_b kv_lora → heads/TP·(nope + v)``, output ``heads/TP·v → h``;
- SwiGLU FFNs (shared expert, dense layers, one routed expert): gate/up ``h → 2·ffn/S``, down
  ``ffn/S → h`` with S = TP (ETP for routed experts);
- router ``h → experts`` (replicated); LM head ``h → vocab/TP``.

:class:`GemmCurves` prices a GEMM from the measured grid of ``(k, n)`` curves (x = m tokens):
the time per weight element t/(k·n) is interpolated bilinearly in (log k, log n) between the
four grid shapes around the asked one, at the asked m (each curve interpolated in log m), and
multiplied back by k·n. Past the grid's largest k or n the time grows with the weight (the
largest shape's rate); below its smallest it stays at the smallest shape's time (launch and
latency bound). Where a corner of the box was not measured, the nearest measured shape's rate
is used. Units: seconds, tokens, elements.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplan.hardware import Curve, HardwareProfile
from moeplan.model import ModelSpec

PARTS = ("attention", "shared_expert", "dense_ffn", "router", "lm_head", "expert")


@dataclass(frozen=True)
class Gemm:
    """One GEMM of a layer on one GPU: ``name``, ``k`` input and ``n`` output features."""

    name: str
    k: int
    n: int

    def flops(self, m: float) -> float:
        return 2.0 * m * self.k * self.n


def _split(dim: int, ways: int) -> int:
    return max(dim // ways, 1)


def swiglu_gemms(name: str, hidden: int, ffn: int, ways: int) -> list[Gemm]:
    """Gate/up and down GEMMs of one SwiGLU FFN of width ``ffn`` split ``ways`` ways."""
    f = _split(ffn, ways)
    return [Gemm(f"{name} gate/up", hidden, 2 * f), Gemm(f"{name} down", f, hidden)]


def attention_gemms(model: ModelSpec, tp: int) -> list[Gemm]:
    """The attention projections of one layer on one GPU of a TP group (module docstring)."""
    a, h = model.attention, model.hidden_size
    heads = _split(a.num_heads, tp)
    if a.kind == "mla":
        out = [Gemm("kv_a", h, a.kv_lora_rank + a.qk_rope_head_dim)]
        if a.q_lora_rank:
            out += [Gemm("q_a", h, a.q_lora_rank), Gemm("q_b", a.q_lora_rank, heads * a.qk_head_dim)]
        else:
            out.append(Gemm("q", h, heads * a.qk_head_dim))
        return out + [Gemm("kv_b", a.kv_lora_rank, heads * (a.qk_nope_head_dim + a.v_head_dim)),
                      Gemm("o", heads * a.v_head_dim, h)]
    kv = _split(a.num_kv_heads, tp)
    return [Gemm("qkv", h, (heads + 2 * kv) * a.head_dim), Gemm("o", heads * a.head_dim, h)]


def layer_gemms(model: ModelSpec, tp: int, etp: int = 1) -> dict[str, list[Gemm]]:
    """The GEMMs one GPU runs, by part (:data:`PARTS`; parts the model lacks are left out):
    attention, shared expert, dense FFN and LM head split ``tp`` ways, one routed expert ``etp`` ways."""
    m, h = model, model.hidden_size
    out = {"attention": attention_gemms(m, tp)}
    if m.shared_ffn:
        out["shared_expert"] = swiglu_gemms("shared", h, m.shared_ffn, tp)
    if m.dense_ffn and m.num_layers > m.num_moe_layers:
        out["dense_ffn"] = swiglu_gemms("dense", h, m.dense_ffn, tp)
    out["router"] = [Gemm("router", h, m.num_experts)]
    out["lm_head"] = [Gemm("lm_head", h, _split(m.vocab_size, tp))]
    out["expert"] = swiglu_gemms("expert", h, m.expert_ffn, etp)
    return out


class GemmCurves:
    """The measured ``gemm`` curves of a profile on their (k, n) grid (see the module docstring)."""

    def __init__(self, curves: list[Curve]) -> None:
        self.by_shape = {(int(c.key["k"]), int(c.key["n"])): c for c in curves}
        self.ks = np.array(sorted({k for k, _ in self.by_shape}), dtype=np.float64)
        self.ns = np.array(sorted({n for _, n in self.by_shape}), dtype=np.float64)

    @classmethod
    def of(cls, hardware: HardwareProfile) -> "GemmCurves | None":
        """The profile's bf16 ``gemm`` curves, or None when it has none."""
        curves = [c for c in hardware.curves_of("gemm") if c.key.get("dtype", "bf16") == "bf16"]
        return cls(curves) if curves else None

    def _rate(self, k: int, n: int, m: np.ndarray) -> np.ndarray:
        """Seconds per weight element of the measured shape (k, n) at m tokens."""
        return self.by_shape[(k, n)](m) / (k * n)

    def _nearest(self, lk: float, ln: float) -> tuple[int, int]:
        return min(self.by_shape, key=lambda s: (np.log(s[0]) - lk) ** 2 + (np.log(s[1]) - ln) ** 2)

    def time(self, m: float | np.ndarray, k: int, n: int) -> np.ndarray:
        """Seconds of one GEMM of ``m`` tokens (array allowed), ``k`` → ``n`` features."""
        q = np.maximum(np.asarray(m, dtype=np.float64), 1.0)
        kc = float(np.clip(k, self.ks[0], self.ks[-1]))
        nc = float(np.clip(n, self.ns[0], self.ns[-1]))
        lk, ln = np.log(kc), np.log(nc)
        i = int(np.clip(np.searchsorted(self.ks, kc) - 1, 0, max(len(self.ks) - 2, 0)))
        j = int(np.clip(np.searchsorted(self.ns, nc) - 1, 0, max(len(self.ns) - 2, 0)))
        k0, k1 = self.ks[i], self.ks[min(i + 1, len(self.ks) - 1)]
        n0, n1 = self.ns[j], self.ns[min(j + 1, len(self.ns) - 1)]
        corners = [(int(a), int(b)) for a in (k0, k1) for b in (n0, n1)]
        if all(c in self.by_shape for c in corners):
            wk = 0.0 if k1 == k0 else (lk - np.log(k0)) / (np.log(k1) - np.log(k0))
            wn = 0.0 if n1 == n0 else (ln - np.log(n0)) / (np.log(n1) - np.log(n0))
            logs = [np.log(self._rate(a, b, q)) for a, b in corners]
            log_rate = ((1 - wk) * ((1 - wn) * logs[0] + wn * logs[1]) + wk * ((1 - wn) * logs[2] + wn * logs[3]))
            rate = np.exp(log_rate)
        else:
            rate = self._rate(*self._nearest(lk, ln), q)
        return rate * kc * nc * max(k / kc, 1.0) * max(n / nc, 1.0)
