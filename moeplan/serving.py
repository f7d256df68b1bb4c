"""Serving prediction at a given concurrency: TTFT and TPOT of a deployment running requests of
``isl`` prompt tokens and ``osl`` output tokens with ``concurrency`` requests in flight.

Three layers, read top to bottom:

1. **One step on one GPU** — :meth:`ServePredictor.decode_step` and
   :meth:`ServePredictor.prefill_step`: every component is a roofline
   ``max(FLOPs / (rate × flops_efficiency), bytes / (HBM × hbm_efficiency))`` at the precision
   of that component (:class:`moeplan.precision.Precision`: fp8 / fp4 weights read fewer bytes
   and run at their own matmul rate). A decode step reads only the routed experts its tokens
   actually hit (:func:`experts_hit`), not every local expert. TP all-reduces and EP all-to-alls
   cost the cheaper of a one-shot and a two-shot algorithm (:func:`allreduce_time`); attention-DP
   replicas hand tokens to the MoE layer by an all-gather and take them back by a
   reduce-scatter (no collective for EP without attention DP). Routed experts come from the
   profile's measured fused-MoE kernel curve of the backend where it has one. Decode runs as
   one CUDA graph (collectives from the profile's measured curves where it has them): a fitted
   per-layer gap between kernels plus a fitted per-step framework overhead (scheduler,
   sampling, detokenise), both per backend (each fuses and launches differently).
2. **Continuous batching** — :meth:`ServePredictor.predict`: with ``concurrency`` requests in
   flight, each decode step also pays its share of the prefills that keep the batch full
   (``concurrency / osl`` prompts per step, a per-backend share of each: vLLM mixes prefill
   chunks into decode steps, SGLang runs prefill batches between them, TRT-LLM batches
   context and generation requests in one iteration), and a new
   request waits behind the prefills of others already queued (an occupancy-weighted queue).
   Disaggregated prefill/decode: :func:`predict_disaggregated` (worker pools, KV transfer,
   prefill queue at the rate decode drains requests).

3. **Fitted terms** — :class:`ServeTerms`: the few constants not read from a datasheet. Their
   defaults are the values ``bench/serve_silicon.py`` fits on the H100 and B200 rows of NVIDIA
   aiconfigurator-core 0.12.0's ``systems/silicon_sample.csv`` (the H200 rows are held out).

Measured tables replace rooflines where the profile has them (``moeplan hardware-import
--aiconfigurator SYSTEM --framework F``, aiconfigurator-core 0.12.0): the attention core (scores,
softmax, values) from the backend's per-GPU attention tables (:mod:`moeplan.attention_tables`;
the projections stay a roofline), the routed experts from its fused-MoE curves, the TP all-reduce
and the attention-DP all-gather / reduce-scatter from its collective curves, and — with
``moe_dispatch="deepep"`` — the EP dispatch and combine from its DeepEP curves (``moe_a2a``), else
from the measured NCCL all-to-all.

Parallel layout (:class:`ServeLayout`): ``world`` GPUs; attention runs ``attention_tp``-way
tensor parallel in ``attention_dp`` replicas (SGLang's --enable-dp-attention, TRT-LLM's
enable_attention_dp, vLLM's data-parallel attention); the MoE layers run ``moe_tp × moe_ep``
over the same GPUs. Units: seconds, bytes, FLOPs, tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeplan.attention_tables import AttentionShape
from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.hardware import Curve
from moeplan.precision import Precision, matmul_rate

BACKENDS = ("sglang", "trtllm", "vllm")
DISPATCHES = ("gather", "deepep")
# DeepEP kernels of each phase in the imported moe_a2a curves: low-latency mode in decode,
# normal / high-throughput mode in prefill (SGLang --deepep-mode auto picks them so:
# sgl-project/sglang python/sglang/srt/layers/moe/utils.py DeepEPMode.resolve).
A2A_KERNELS = {"decode": ("deepep_ll", "trtllm_deepep_ll"),
               "prefill": ("deepep_normal", "deepep_ht", "trtllm_deepep_ht")}
A2A_DTYPES = ("bf16", "default")


@dataclass(frozen=True)
class ServeLayout:
    """GPUs of one serving instance: attention ``attention_tp × attention_dp``, MoE
    ``moe_tp × moe_ep``; both products equal ``world``."""

    attention_tp: int
    attention_dp: int
    moe_tp: int
    moe_ep: int

    @property
    def world(self) -> int:
        return self.attention_tp * self.attention_dp

    def validate(self, source: str = "layout") -> "ServeLayout":
        for name in ("attention_tp", "attention_dp", "moe_tp", "moe_ep"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be ≥ 1, got {getattr(self, name)}", source=source, field=name)
        if self.moe_tp * self.moe_ep != self.world:
            raise InputError(f"MoE layers span moe_tp × moe_ep = {self.moe_tp * self.moe_ep} GPUs but attention "
                             f"spans attention_tp × attention_dp = {self.world}", source=source, field="moe_ep",
                             fix="make moe_tp × moe_ep equal attention_tp × attention_dp")
        return self

    def label(self) -> str:
        return f"TP{self.attention_tp}·ADP{self.attention_dp} | MoE-TP{self.moe_tp}·EP{self.moe_ep}"


@dataclass(frozen=True)
class ServeTerms:
    """Constants of the serving model that no datasheet gives, fitted on measured deployments.

    hbm_efficiency / flops_efficiency: achieved fraction of the datasheet HBM bandwidth and
    matmul rate (flops_efficiency is fitted no lower than 0.4: aiconfigurator-core's measured
    prefill-sized GEMMs — m 1k–8k, n and k ≥ 4k — run at a median 0.47–0.81 of the datasheet
    rate per backend and format on H100 and B200); layer_gap_s: seconds
    per layer per step between the kernels of a CUDA-graph decode step (norms, RoPE, quantise,
    small GEMM tails), per backend; collective_latency_s: latency of one
    intra-node collective (one-shot all-reduce / all-to-all launch and sync); step_overhead_s:
    per decode step outside the GPU (scheduler, sampling, output processing), per backend;
    request_overhead_s: per request before its first token (tokenise, schedule, first
    detokenise), per backend; schedule_wait_steps: decode steps a new request waits before the
    scheduler admits its prefill;
    prefill_share: how much of each prompt's prefill a decode step absorbs (1 = all of it;
    below 1 where chunked prefill overlaps it with decode), per backend; queue_factor: how many of the
    other in-flight requests' prefills a new request waits behind, per unit of occupancy.
    """

    hbm_efficiency: float = 0.8359
    flops_efficiency: float = 0.4
    layer_gap_s: tuple[tuple[str, float], ...] = (("sglang", 7.815e-05), ("trtllm", 2.237e-05), ("vllm", 3.219e-05))
    collective_latency_s: float = 1.0e-07
    step_overhead_s: tuple[tuple[str, float], ...] = (("sglang", 1.0e-05), ("trtllm", 1.0e-05), ("vllm", 1.0e-05))
    request_overhead_s: tuple[tuple[str, float], ...] = (("sglang", 0.3247), ("trtllm", 1.147e-02), ("vllm", 1.0e-04))
    schedule_wait_steps: float = 8.312
    prefill_share: tuple[tuple[str, float], ...] = (("sglang", 1.236), ("trtllm", 0.6455), ("vllm", 1.092))
    queue_factor: float = 6.889
    source: str = ("bench/serve_silicon.py: fitted on the 861 H100 + B200 aggregated MoE configurations of "
                   "aiconfigurator-core 0.12.0 systems/silicon_sample.csv (H200 rows held out), with the "
                   "package's measured NCCL / custom all-reduce, fused-MoE, bf16 GEMM and attention curves "
                   "in the profiles")

    def layer_gap(self, backend: str) -> float:
        return _per_backend(self.layer_gap_s, backend)

    def prefill_mix(self, backend: str) -> float:
        return _per_backend(self.prefill_share, backend)

    def step_overhead(self, backend: str) -> float:
        return _per_backend(self.step_overhead_s, backend)

    def request_overhead(self, backend: str) -> float:
        return _per_backend(self.request_overhead_s, backend)

    def to_dict(self) -> dict[str, Any]:
        return {"hbm_efficiency": self.hbm_efficiency, "flops_efficiency": self.flops_efficiency,
                "layer_gap_s": dict(self.layer_gap_s), "collective_latency_s": self.collective_latency_s,
                "step_overhead_s": dict(self.step_overhead_s), "request_overhead_s": dict(self.request_overhead_s),
                "schedule_wait_steps": self.schedule_wait_steps, "prefill_share": dict(self.prefill_share), "queue_factor": self.queue_factor, "source": self.source}


def _per_backend(table: tuple[tuple[str, float], ...], backend: str) -> float:
    values = dict(table)
    if backend not in values:
        raise InputError(f"unknown backend {backend!r}", field="backend", fix=f"use one of {', '.join(values)}")
    return values[backend]


def experts_hit(tokens: float, choose_prob: np.ndarray) -> float:
    """Expected distinct experts among a device's local experts that ``tokens`` independent
    tokens hit: Σ_e 1 − (1 − p_e)^tokens, ``choose_prob[e]`` the chance that one token picks
    local expert e (k / E each under uniform routing; from a trace's expert loads otherwise)."""
    p = np.clip(np.asarray(choose_prob, dtype=np.float64), 0.0, 1.0)
    return float(np.sum(1.0 - np.power(1.0 - p, max(tokens, 0.0))))


def allreduce_time(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """All-reduce of ``nbytes`` per rank over ``ranks`` ranks: the cheaper of one-shot (every
    rank reads the others' buffers: latency + (n−1)·bytes / bw) and two-shot (reduce-scatter +
    all-gather: 2·latency + 2·(n−1)/n·bytes / bw) — the switch TRT-LLM's and SGLang's custom
    all-reduce make by message size (NVIDIA/TensorRT-LLM cpp/tensorrt_llm/kernels/customAllReduceKernels.h,
    AllReduceStrategyType ONESHOT/TWOSHOT; sgl-project/sglang sgl-kernel custom_all_reduce)."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    one_shot = latency + (ranks - 1) * nbytes / bandwidth
    two_shot = 2 * latency + 2 * (ranks - 1) / ranks * nbytes / bandwidth
    return min(one_shot, two_shot)


@dataclass(frozen=True)
class ServeStepCost:
    """Seconds of one step on one GPU, by part: ``attention`` (projections + KV reads, all
    layers), ``experts`` (routed experts hit, MoE layers), ``other`` (shared experts, dense FFN
    layers, router, LM head), ``tp_comm`` (attention-TP all-reduces), ``ep_comm`` (MoE
    dispatch/combine), ``overhead`` (kernel gaps and the framework's per-step time)."""

    attention: float
    experts: float
    other: float
    tp_comm: float
    ep_comm: float
    overhead: float

    @property
    def total(self) -> float:
        return sum(self.parts().values())

    def parts(self) -> dict[str, float]:
        return {"attention": self.attention, "experts": self.experts, "other": self.other,
                "tp_comm": self.tp_comm, "ep_comm": self.ep_comm, "overhead": self.overhead}


@dataclass(frozen=True)
class ServePoint:
    """Predicted figures at one concurrency: TTFT and TPOT (seconds, per request, as a
    benchmark client measures them), output tokens/s per GPU, and the steps behind them."""

    ttft: float
    tpot: float
    tokens_per_s_per_gpu: float
    decode: ServeStepCost
    prefill: ServeStepCost
    kv_fits: bool

    def to_dict(self) -> dict[str, Any]:
        return {"ttft_s": self.ttft, "tpot_s": self.tpot, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                "decode_step_s": self.decode.parts(), "prefill_s": self.prefill.parts(), "kv_fits": self.kv_fits}


@dataclass
class ServePredictor:
    """TTFT/TPOT of one model on one GPU type under one layout, precision and backend.
    ``cost`` supplies the model and the hardware profile; ``choose_prob`` (optional, [experts])
    the per-token chance of picking each expert (from a trace), uniform k / E otherwise.
    ``moe_dispatch``: how tokens reach the experts — ``gather`` (attention-DP replicas all-gather
    their tokens and reduce-scatter the outputs: every backend's default) or ``deepep`` (each GPU
    dispatches its 1/attention_tp share of its replica's tokens to the experts' GPUs and combines
    them back, all-to-all: SGLang --moe-a2a-backend deepep, vLLM VLLM_ALL2ALL_BACKEND=deepep_*,
    TRT-LLM TRTLLM_CAN_USE_DEEP_EP)."""

    cost: CostModel
    layout: ServeLayout
    precision: Precision
    backend: str
    terms: ServeTerms = field(default_factory=ServeTerms)
    choose_prob: np.ndarray | None = None
    moe_dispatch: str = "gather"
    moe_curve: Curve | None = field(init=False, default=None)
    attention_shape: AttentionShape | None = field(init=False, default=None)
    _collectives: dict[tuple[str, int, bool], Curve | None] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.layout.validate()
        self.precision.validate()
        self.terms.step_overhead(self.backend)
        m = self.cost.model
        traced = self.choose_prob is not None
        if self.choose_prob is None:
            self.choose_prob = np.full(m.num_experts, m.top_k / m.num_experts)
        if len(self.choose_prob) != m.num_experts:
            raise InputError(f"routing distribution has {len(self.choose_prob)} experts, the model {m.num_experts}",
                             field="choose_prob")
        self.moe_curve = None if traced else self._fused_moe_curve()
        if self.moe_dispatch not in DISPATCHES:
            raise InputError(f"unknown MoE dispatch {self.moe_dispatch!r}", field="moe_dispatch",
                             fix=f"use one of {', '.join(DISPATCHES)}")
        self.attention_shape = AttentionShape.of(m, self.layout.attention_tp, self.precision.kv_bytes)

    # ---- pieces -------------------------------------------------------------------------------
    def _fused_moe_curve(self) -> Curve | None:
        """The profile's measured fused-MoE kernel curve of this model's expert shape, dtype and
        MoE split (``moeplan hardware-import --aiconfigurator --framework``). Where the table
        lacks this moe_tp × moe_ep split, the same world as pure EP (moe_tp 1, moe_ep = world)
        stands in: each GPU holds the same share of expert weights and work either way."""
        m, lay = self.cost.model, self.layout
        shape = dict(hidden=m.hidden_size, inter=m.expert_ffn, top_k=m.top_k, experts=m.num_experts)
        for dtype in self._moe_kernel_dtypes():
            for tp, ep in ((lay.moe_tp, lay.moe_ep), (1, lay.moe_tp * lay.moe_ep)):
                curve = self.cost.hw.curve_for("fused_moe", moe_tp=tp, moe_ep=ep, dtype=dtype, **shape)
                if curve is not None and curve.prov.measured:
                    return curve
        return None

    def _moe_kernel_dtypes(self) -> tuple[str, ...]:
        """Kernel variants that run this deployment's routed experts, first choice first. TRT-LLM
        runs MXFP4 experts with MXFP8 activations where the GPU has fp4 tensor cores
        (W4A8_MXFP4_MXFP8, NVIDIA/TensorRT-LLM docs/source/deployment-guide/
        quick-start-recipe-for-gpt-oss-on-trtllm.md: Blackwell); the others dequantise to bf16 (w4a16)."""
        moe = self.precision.moe
        if moe == "mxfp4" and self.backend == "trtllm" and "fp4" in self.cost.hw.device.matmul_flops:
            return ("mxfp4_a8", moe)
        return (moe,)

    def _roofline(self, flops: float, nbytes: float, fmt: str) -> float:
        dev = self.cost.hw.device
        t = self.terms
        return max(flops / (matmul_rate(dev, fmt) * t.flops_efficiency),
                   nbytes / (dev.hbm_bandwidth.value * t.hbm_efficiency))

    def _collective(self, nbytes: float, ranks: int, op: str, span: int | None = None) -> float:
        """``op`` over ``ranks`` ranks spread over ``span`` consecutive GPUs (``ranks`` when
        None; the DP group of strided replicas spans the whole instance): a measured curve of
        the profile for this op and rank count when the group sits inside one node and the
        profile has one (``moeplan hardware import --aiconfigurator``), else the algorithm
        models above."""
        hw = self.cost.hw
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        inside = (span or ranks) <= hw.devices_per_node
        if (op, ranks, inside) not in self._collectives:
            self._collectives[op, ranks, inside] = (hw.find_curve("collective", op=op, scope="intra_node",
                                                                  ranks=ranks) if inside else None)
        curve = self._collectives[op, ranks, inside]
        if curve is not None and curve.prov.measured:
            return float(curve(nbytes))
        link = hw.intra_node if inside else hw.inter_node
        latency = self.terms.collective_latency_s + (0.0 if inside else hw.inter_node.latency.value)
        if op == "all_reduce":
            return allreduce_time(nbytes, ranks, link.bandwidth.value, latency)
        return latency + nbytes * (ranks - 1) / ranks / link.bandwidth.value

    def _a2a_curves(self, phase: str) -> tuple[Curve, Curve] | None:
        """The profile's measured DeepEP (dispatch, combine) curves of this model's MoE shape over
        moe_ep ranks for ``phase``'s kernel (:data:`A2A_KERNELS`), or None."""
        m = self.cost.model
        shape = dict(hidden=m.hidden_size, top_k=m.top_k, experts=m.num_experts, ranks=self.layout.moe_ep)
        for kernel in A2A_KERNELS[phase]:
            for dtype in A2A_DTYPES:
                pair = tuple(self.cost.hw.curve_for("moe_a2a", backend=kernel, phase=p, dtype=dtype, **shape)
                             for p in ("dispatch", "combine"))
                if all(c is not None and c.prov.measured for c in pair):
                    return pair
        return None

    def _deepep_time(self, tokens_per_rank: float, phase: str) -> float:
        """One MoE layer's dispatch + combine when each GPU sends ``tokens_per_rank`` tokens:
        the measured DeepEP curves where the profile has them for this shape and EP size (one
        node), else two all-to-alls of each token's top-k copies (:meth:`_collective`: the
        measured NCCL all-to-all curve, else the link model)."""
        lay = self.layout
        if lay.moe_ep <= 1 or tokens_per_rank <= 0:
            return 0.0
        pair = self._a2a_curves(phase) if lay.world <= self.cost.hw.devices_per_node else None
        if pair is not None:
            return float(pair[0](tokens_per_rank)) + float(pair[1](tokens_per_rank))
        m = self.cost.model
        nbytes = tokens_per_rank * m.top_k * m.hidden_size * 2.0
        return 2.0 * self._collective(nbytes, lay.moe_ep, "all_to_all", lay.world)

    def _attention(self, tokens: float, context: float, phase: str) -> float:
        """All layers' attention on one GPU: ``tokens`` new tokens of its replica, each attending
        to ``context`` tokens. Projections are a roofline at the GEMM precision; the core (scores,
        softmax, values) is the backend's measured attention table at this GPU's heads where the
        profile has it (a prefill of ``tokens`` tokens over a ``ctx``-token window counts as
        tokens / ctx sequences of ctx tokens), else in the same roofline (KV reads split over
        the TP ranks that hold distinct KV heads)."""
        m, lay, pr = self.cost.model, self.layout, self.precision
        a, tp = m.attention, self.layout.attention_tp
        kv_split = min(tp, a.num_kv_heads) if a.kind == "gqa" else 1
        causal = 0.5 if phase == "prefill" else 1.0
        att_w = a.params(m.hidden_size)
        proj_flops, proj_bytes = 2.0 * att_w * tokens / tp, att_w * pr.gemm_bytes / tp
        tables = self.cost.attention_tables
        measured = tables is not None and tables.has(phase, self.attention_shape)
        attention = 0.0
        for layers, ctx in m.attention_layer_contexts(context):      # full / sliding-window / linear layers
            if measured and ctx > 0:
                core = tables.core_time(phase, self.attention_shape, tokens, ctx)
                attention += layers * (self._roofline(proj_flops, proj_bytes, pr.gemm) + core)
                continue
            score = 2.0 * a.num_heads * (a.qk_head_dim + a.v_dim) * tokens * ctx * causal / tp
            kv_read = a.kv_cache_elems_per_token() * pr.kv_bytes * ctx * (tokens if phase == "decode" else 1.0) / kv_split
            attention += layers * self._roofline(proj_flops + score, proj_bytes + kv_read, pr.gemm)
        return attention

    def _local_expert_probs(self) -> np.ndarray:
        """Per-token pick probabilities of the experts on the busiest EP rank (contiguous
        blocks of E / EP experts, the default placement of every backend)."""
        p = np.asarray(self.choose_prob, dtype=np.float64)
        blocks = p.reshape(self.layout.moe_ep, -1) if len(p) % self.layout.moe_ep == 0 else p[None, :]
        return blocks[int(np.argmax(blocks.sum(axis=1)))]

    def step(self, tokens: float, context: float, phase: str) -> ServeStepCost:
        """One step on one GPU: ``tokens`` new tokens per attention replica (decode: one per
        sequence; prefill: prompt tokens), each attending to ``context`` tokens."""
        m, lay, pr = self.cost.model, self.layout, self.precision
        h, tp = m.hidden_size, lay.attention_tp
        attention = self._attention(tokens, context, phase)

        moe_tokens = tokens * lay.attention_dp                  # distinct tokens entering each MoE layer
        local = self._local_expert_probs()
        choices = moe_tokens * float(local.sum())
        hit = experts_hit(moe_tokens, local)
        expert_w = m.expert_params() / lay.moe_tp
        if self.moe_curve is not None:
            experts = m.num_moe_layers * float(self.moe_curve(moe_tokens))
        else:
            experts = m.num_moe_layers * self._roofline(2.0 * expert_w * choices, hit * expert_w * pr.moe_bytes, pr.moe)

        shared = m.shared_params() / tp
        router = m.router_params()
        dense = m.dense_ffn_params() / tp
        other = (m.num_moe_layers * self._roofline(2.0 * (shared + router) * tokens,
                                                   shared * pr.gemm_bytes + router * 2.0, pr.gemm)
                 + len(m.dense_layers) * self._roofline(2.0 * dense * tokens, dense * pr.gemm_bytes, pr.gemm))
        head_w = m.vocab_size * h / tp
        head_tokens = tokens if phase == "decode" else 1.0
        other += self._roofline(2.0 * head_w * head_tokens, head_w * pr.head_bytes, pr.head)

        act = tokens * h * 2.0                                  # bf16 activations of one replica's tokens
        tp_comm = 2 * m.num_layers * self._collective(act, tp, "all_reduce")
        ep_comm = 0.0
        if self.moe_dispatch == "deepep":
            ep_comm = m.num_moe_layers * self._deepep_time(tokens / tp, phase)
        elif lay.attention_dp > 1:
            # Attention replicas hand their tokens to the MoE layer by an all-gather over the DP group
            # and take the expert outputs back by a reduce-scatter, the default of all three backends
            # on one NVLink node: vLLM's VLLM_ALL2ALL_BACKEND=allgather_reducescatter (vllm/envs.py),
            # SGLang's dp_gather / dp_scatter (sglang/srt/layers/dp_attention.py) without DeepEP,
            # TRT-LLM's allgather / reducescatter in fused_moe_cutlass.py where no all-to-all
            # (MNNVL / DeepEP) is enabled. Without attention DP every GPU already holds the layer's
            # tokens after the TP all-reduce and the next one sums the expert outputs, so EP adds
            # no collective there.
            gathered = act * lay.attention_dp
            ep_comm = m.num_moe_layers * (self._collective(gathered, lay.attention_dp, "all_gather", lay.world)
                                          + self._collective(gathered, lay.attention_dp, "reduce_scatter", lay.world))
        overhead = m.num_layers * self.terms.layer_gap(self.backend) + (self.terms.step_overhead(self.backend)
                                                            if phase == "decode" else 0.0)
        return ServeStepCost(attention, experts, other, tp_comm, ep_comm, overhead)

    def decode_step(self, sequences: float, context: float) -> ServeStepCost:
        """One decode step of ``sequences`` sequences per attention replica at ``context`` tokens each."""
        return self.step(sequences, context, "decode")

    def prefill_step(self, prompt_tokens: float) -> ServeStepCost:
        """Prefill of one prompt of ``prompt_tokens`` tokens on its replica."""
        return self.step(prompt_tokens, prompt_tokens, "prefill")

    def kv_fits(self, concurrency: int, context: float) -> bool:
        """Whether ``concurrency`` sequences of ``context`` tokens fit in the KV cache next to
        the weights (90% of HBM, as the backends' memory-fraction defaults leave)."""
        m, lay, pr = self.cost.model, self.layout, self.precision
        a = m.attention
        kv_split = min(lay.attention_tp, a.num_kv_heads) if a.kind == "gqa" else 1
        weights = (m.non_expert_params() * pr.gemm_bytes / lay.attention_tp
                   + m.num_moe_layers * m.num_experts * m.expert_params() * pr.moe_bytes / lay.world)
        kv = math.ceil(concurrency / lay.attention_dp) * context * m.kv_cache_bytes_per_token(pr.kv_bytes) / kv_split
        return weights + kv <= 0.9 * self.cost.hw.device.memory.value

    # ---- request level ------------------------------------------------------------------------
    def predict(self, concurrency: int, isl: int, osl: int) -> ServePoint:
        """TTFT and TPOT with ``concurrency`` requests in flight, each ``isl`` prompt tokens and
        ``osl`` output tokens (see the module docstring, part 2)."""
        if concurrency < 1 or isl < 1 or osl < 1:
            raise InputError("concurrency, isl and osl must be ≥ 1", field="concurrency")
        t = self.terms
        per_replica = math.ceil(concurrency / self.layout.attention_dp)
        decode = self.decode_step(per_replica, isl + osl / 2.0)
        prefill = self.prefill_step(isl)
        t_pf = prefill.total
        tpot = decode.total + t.prefill_mix(self.backend) * per_replica / osl * t_pf
        occupancy = t_pf / (t_pf + osl * tpot)
        ttft = (t.request_overhead(self.backend) + t_pf * (1.0 + t.queue_factor * (per_replica - 1) * occupancy)
                + t.schedule_wait_steps * tpot)
        return ServePoint(ttft=ttft, tpot=tpot, tokens_per_s_per_gpu=concurrency / tpot / self.layout.world,
                          decode=decode, prefill=prefill, kv_fits=self.kv_fits(concurrency, isl + osl))


def predict_disaggregated(prefill: ServePredictor, decode: ServePredictor, prefill_workers: int,
                          decode_workers: int, concurrency: int, isl: int, osl: int) -> ServePoint:
    """TTFT and TPOT of disaggregated serving: ``prefill_workers`` instances of ``prefill``'s
    layout run prompts, ``decode_workers`` instances of ``decode``'s layout run the
    ``concurrency`` requests' decode steps (no prefill mixed in). Prompts arrive at the rate the
    decode side finishes requests (concurrency / (osl × TPOT)); each prefill worker is an M/D/1
    queue at that share of the rate (waiting ρ / (2(1 − ρ)) × service, ρ capped at 0.95 where the
    prefill side cannot keep up); the KV cache of a prompt crosses the inter-node link once.
    Throughput per GPU counts both pools."""
    if min(prefill_workers, decode_workers, concurrency, isl, osl) < 1:
        raise InputError("workers, concurrency, isl and osl must be ≥ 1", field="concurrency")
    t = decode.terms
    per_replica = math.ceil(concurrency / (decode_workers * decode.layout.attention_dp))
    step = decode.decode_step(per_replica, isl + osl / 2.0)
    tpot = step.total
    first = prefill.prefill_step(isl)
    t_pf = first.total
    rho = min(concurrency / (osl * tpot) * t_pf / (prefill_workers * prefill.layout.attention_dp), 0.95)
    m = decode.cost.model
    kv_bytes = isl * m.kv_cache_bytes_per_token(decode.precision.kv_bytes)
    transfer = kv_bytes / decode.cost.hw.inter_node.bandwidth.value
    ttft = t.request_overhead(prefill.backend) + t_pf * (1.0 + rho / (2.0 * (1.0 - rho))) + transfer
    gpus = prefill_workers * prefill.layout.world + decode_workers * decode.layout.world
    fits = decode.kv_fits(math.ceil(concurrency / decode_workers), isl + osl)
    return ServePoint(ttft=ttft, tpot=tpot, tokens_per_s_per_gpu=concurrency / tpot / gpus, decode=step,
                      prefill=first, kv_fits=fits)
