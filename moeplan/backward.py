"""The backward pass of training on one GPU, priced piece by piece from the cost model's
primitives (:class:`moeplan.cost.CostModel`). The folding solver's training step
(:func:`moeplan.parallel_step.train_step`) and ``bench/gpu_folding.py`` both price it here.

- A dense GEMM ``y[m, n] = x[m, k]·W[n, k]ᵀ`` has two backward GEMMs, each priced at its own
  shape by :meth:`CostModel.gemm_time` (the measured ``gemm`` grid, else the roofline): dgrad
  ``dx[m, k] = dy[m, n]·W`` (m rows, inner n, k out) and wgrad ``dW[n, k] = dyᵀ·x`` (n rows,
  inner m = the tokens, k out) — the two GEMMs of Megatron's
  ``LinearWithGradAccumulationAndAsyncCommunication.backward``
  (megatron/core/tensor_parallel/layers.py).
- A SwiGLU FFN (shared expert, dense FFN): the backward GEMMs of gate/up and down, plus the
  activation's backward at HBM bandwidth: it reads gate, up and the product's gradient and writes
  the gradients of gate and up, 5 × ffn elements per token (the forward moves 3).
- Routed experts run the forward's kernel (loop or grouped, its measured curve and calibration):
  their backward is that forward time × the ratio of the SwiGLU backward's price to the forward's
  price at the same tokens per expert (both from the GEMM grid, else the roofline), so the kernel's
  own efficiency carries over to the backward.
- The attention core as flash attention's backward: measured when the profile has an
  ``attention_train`` curve (forward + backward, the profiler's ``train_op``) for the model's
  attention shape, else :data:`FLASH_BACKWARD_RATIO` × the forward core (its measured curve, else
  its roofline): FlashAttention-2 (Dao 2023, §3.2) runs 5 matmuls backward against 2 forward over
  the same tiles, with the softmax recomputed inside them.

Units: seconds, tokens, elements.
"""
from __future__ import annotations

import numpy as np

from moeplan.cost import CostModel
from moeplan.gemms import Gemm, swiglu_gemms

FLASH_BACKWARD_RATIO = 2.5        # flash attention backward / forward matmul FLOPs (5 matmuls vs 2)
SWIGLU_BACKWARD_ELEMS = 5.0       # elements per token and ffn column the SwiGLU backward moves


def gemm_backward_time(cm: CostModel, tokens: np.ndarray | float, gemm: Gemm) -> np.ndarray:
    """Seconds of the two backward GEMMs of ``gemm`` run forward on ``tokens`` rows (array
    allowed, elementwise): dgrad at (m rows, n → k) plus wgrad at (n rows, m → k); 0 at 0 tokens."""
    m = np.asarray(tokens, dtype=np.float64)
    dgrad = cm.gemm_time(m, gemm.n, gemm.k)
    if m.ndim == 0:
        return dgrad + (cm.gemm_time(gemm.n, float(m), gemm.k) if m > 0 else 0.0)
    inner, index = np.unique(m, return_inverse=True)
    wgrad = [float(cm.gemm_time(gemm.n, float(t), gemm.k)) if t > 0 else 0.0 for t in inner]
    return dgrad + np.asarray(wgrad)[index].reshape(m.shape)


def gemms_backward_time(cm: CostModel, tokens: np.ndarray | float, gemms: list[Gemm]) -> np.ndarray:
    """Sum of :func:`gemm_backward_time` over ``gemms`` at ``tokens`` rows each."""
    m = np.asarray(tokens, dtype=np.float64)
    return sum((gemm_backward_time(cm, m, g) for g in gemms), np.zeros_like(m))


def swiglu_backward_time(cm: CostModel, tokens: np.ndarray | float, ffn: int, ways: int, name: str) -> np.ndarray:
    """Backward of one SwiGLU FFN of width ``ffn`` split ``ways`` ways at ``tokens`` rows: its
    four GEMMs (each with the launch :meth:`CostModel.gemm_time` counts) and the activation's bytes."""
    n = np.asarray(tokens, dtype=np.float64)
    act = cm.dense_time(0.0, SWIGLU_BACKWARD_ELEMS * n * (ffn / ways) * cm.opt.act_bytes, 0)
    gemms = gemms_backward_time(cm, n, swiglu_gemms(name, cm.model.hidden_size, ffn, ways))
    return np.where(n > 0, gemms + act, 0.0)


def experts_backward_time(cm: CostModel, slot_tokens: np.ndarray, ways: int, forward_s: np.ndarray | float) -> np.ndarray:
    """Backward of one device's routed experts, each 1/``ways`` wide (ETP), with ``slot_tokens``
    [..., slots] token-choices per local expert, whose forward kernel took ``forward_s`` [...]
    seconds: ``forward_s`` × (SwiGLU backward price / SwiGLU forward price) summed over the
    experts with tokens; returns [...] seconds."""
    n = np.asarray(slot_tokens, dtype=np.float64)
    f = cm.model.expert_ffn
    backward = swiglu_backward_time(cm, n, f, ways, "expert").sum(axis=-1)
    forward = np.where(n > 0, cm.swiglu_time(n, f, ways, "expert"), 0.0).sum(axis=-1)
    return np.where(forward > 0, np.asarray(forward_s, dtype=np.float64) * backward / np.where(forward > 0, forward, 1.0),
                    0.0)


def attention_core_backward_time(cm: CostModel, tokens: float, context: float) -> float:
    """Backward of one layer's attention core (all heads) in training: ``tokens`` queries each
    attending to ``context`` tokens causally. The profile's measured forward + backward
    (``attention_train``) less the forward when it has one, else :data:`FLASH_BACKWARD_RATIO` ×
    the forward core."""
    forward = cm.attention_core_time(tokens, context, "prefill")
    train = cm.attention_train_core_time(tokens, context)
    if train is not None:
        return max(train - forward, 0.0)
    return FLASH_BACKWARD_RATIO * forward
