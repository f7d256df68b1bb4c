"""The whole step under a parallel mapping: a training step (1F1B pipeline, TP/SP, CP, EP and DP
collectives, memory, MFU) or serving figures (TTFT and TPOT from :mod:`moeplan.serving`, KV
capacity) when attention
layers run on TP × CP × DP × PP and MoE layers on ETP × EP × EDP × PP over the same GPUs (MoE
Parallel Folding, NVIDIA/Megatron-LM megatron/core/transformer/moe/README.md). Everything here
composes the cost model's primitives (:class:`moeplan.cost.CostModel`: attention_time, the
expert kernels, dense_time, head_time, collective_time, memory, kv_capacity_tokens); the
folding solver and the dashboard call these functions. Group placement follows Megatron's rank
order (:mod:`moeplan.parallel`).

Assumptions, stated once: balanced routing (the paper benchmarks with capacity factor 1);
backward compute priced piece by piece by :mod:`moeplan.backward` (dgrad and wgrad GEMMs at their
own shapes, flash attention's backward, the activations' backward bytes) with the same TP, EP and
ETP collectives as forward and the CP ring moving K/V and their gradients; collectives are not
overlapped with compute except the CP ring (overlapped with attention), TP collectives when
Megatron's --tp-comm-overlap is on (hidden behind the attention and FFN GEMMs of the same layer
as far as they last; the backward exposes what the forward does) and the distributed
optimizer's gradient reduce-scatter / parameter all-gather (overlapped with the last backward /
first forward micro-batch, Megatron's --overlap-grad-reduce / --overlap-param-gather); with
ETP > 1 an expert's kernel takes 1/ETP of its full-width time.

Units: seconds, bytes, FLOPs, tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
import weakref
from functools import lru_cache
from typing import Any

import numpy as np

from moeplan.backward import (attention_core_backward_time, experts_backward_time, gemm_backward_time,
                              gemms_backward_time, swiglu_backward_time)
from moeplan.cost import CostModel, MemoryReport
from moeplan.gemms import Gemm, attention_gemms
from moeplan.model import ModelSpec
from moeplan.parallel import GroupSpan, ParallelMapping, group_spans
from moeplan.precision import Precision
from moeplan.serving import ServeLayout, ServePoint, ServePredictor

GRAD_BYTES = 4.0                  # fp32 main gradients (Megatron's default; --grad-reduce-in-bf16 is opt-in)
OPTIMIZER_STATE_BYTES = 12.0      # fp32 master weights + Adam m and v
OPTIMIZER_STEP_BYTES = 30.0       # HBM bytes an Adam step touches per parameter (read/write states, grad, bf16 copy)
# NVIDIA/Megatron-LM docs/user-guide/features/dist_optimizer.md: bf16 params with fp32 grads take
# 18 bytes/param without the distributed optimizer and 6 + 12/d with it.
ATTENTION_ACT_PER_HIDDEN = 15.0   # bytes per token per hidden element kept by attention (11) and the two norms (4)
                                  # (Korthikanti et al. 2022, the non-MLP part of 34·s·b·h, flash attention)


def alltoall_group_time(cm: CostModel, nbytes: float, span: GroupSpan) -> float:
    """One all-to-all in a group of ``span.size`` ranks spread evenly over ``span.nodes`` nodes,
    ``nbytes`` in each rank's send buffer: the same-node part rides NVLink, the rest the
    per-GPU inter-node link, concurrently."""
    n, g = span.size, span.nodes
    if n <= 1 or nbytes <= 0:
        return 0.0
    if g <= 1:
        return cm.collective_time("all_to_all", nbytes, n, "intra_node")
    per_node = n // g
    intra = cm.collective_time("all_to_all", nbytes / g, per_node, "intra_node") if per_node > 1 else 0.0
    return max(intra, cm.collective_time("all_to_all", nbytes, g, "inter_node"))


def _ring_time(cm: CostModel, op: str, nbytes: float, span: GroupSpan) -> float:
    return cm.collective_time(op, nbytes, span.size, span.scope)


@dataclass(frozen=True)
class TrainSetup:
    """One training step: ``global_batch`` sequences of ``seq_len`` tokens, ``micro_batch``
    sequences per micro-batch; full activation recompute on/off; distributed optimizer on/off;
    TP communication overlapped with GEMMs (Megatron's --tp-comm-overlap) on/off."""

    seq_len: int
    global_batch: int
    micro_batch: int = 1
    recompute: bool = False
    distributed_optimizer: bool = True
    tp_comm_overlap: bool = False

    def microbatches(self, mapping: ParallelMapping) -> int:
        """Micro-batches each data-parallel rank runs per step."""
        return self.global_batch // (self.micro_batch * mapping.dp)


@dataclass(frozen=True)
class PassCost:
    """Seconds of one forward pass of one micro-batch through one pipeline stage (the last,
    which also holds the output head), by part."""

    attention: float
    moe_compute: float
    other_compute: float
    tp_comm: float
    cp_ring: float
    ep_all_to_all: float
    etp_comm: float

    @property
    def total(self) -> float:
        return sum(self.parts().values())

    def parts(self) -> dict[str, float]:
        """The parts by name (seconds)."""
        return {"attention": self.attention, "moe_compute": self.moe_compute, "other_compute": self.other_compute,
                "tp_comm": self.tp_comm, "cp_ring": self.cp_ring, "ep_all_to_all": self.ep_all_to_all,
                "etp_comm": self.etp_comm}


def kv_split(model: ModelSpec, tp: int) -> int:
    """How many ways TP splits the KV cache: GQA heads split up to their count (beyond it
    they are replicated); MLA's latent cache is replicated on every TP rank."""
    return min(tp, model.attention.num_kv_heads) if model.attention.kind == "gqa" else 1


def _kv_replication_time(cm: CostModel, mapping: ParallelMapping, tokens: float, context: float, phase: str) -> float:
    """Seconds one GPU spends reading the KV cache beyond its 1/TP share when TP exceeds the KV
    heads (or for MLA's latent cache, replicated on every TP rank)."""
    m = cm.model
    split = kv_split(m, mapping.tp)
    if split >= mapping.tp:
        return 0.0
    kv_read = m.attention.kv_cache_elems_per_token() * m.weight_bytes * context * (tokens if phase == "decode" else 1.0)
    return kv_read * (1.0 / split - 1.0 / mapping.tp) / cm.hbm


def attention_shard_time(cm: CostModel, mapping: ParallelMapping, tokens: float, context: float, phase: str) -> float:
    """One layer's attention forward on one GPU: ``tokens`` per TP group (heads / TP), each
    attending to ``context`` tokens. When TP exceeds the KV heads (or for MLA's latent cache)
    the KV cache is replicated, so each GPU reads more of it than 1/TP. The attention core is
    divided by TP; the projections are priced at their own shard shapes (heads / TP wide) by
    :meth:`CostModel.gemm_time` (the measured ``gemm`` grid, else the roofline), as their backward is."""
    time = (cm.attention_core_time(tokens, context, phase) / mapping.tp
            + float(cm.gemms_time(tokens, attention_gemms(cm.model, mapping.tp))))
    return time + _kv_replication_time(cm, mapping, tokens, context, phase)


def attention_shard_backward_time(cm: CostModel, mapping: ParallelMapping, tokens: float, context: float) -> float:
    """One layer's attention backward in training on one GPU (the shard of
    :func:`attention_shard_time`): flash attention's backward of the core / TP, the projections'
    dgrad and wgrad GEMMs at their shard shapes, and the replicated K/V read again with their
    gradients written (:mod:`moeplan.backward`)."""
    return (attention_core_backward_time(cm, tokens, context) / mapping.tp
            + float(gemms_backward_time(cm, tokens, attention_gemms(cm.model, mapping.tp)))
            + 2.0 * _kv_replication_time(cm, mapping, tokens, context, "prefill"))


def expert_shard(cm: CostModel, mapping: ParallelMapping, tokens: float) -> tuple[float, float]:
    """One MoE layer's routed experts on one GPU when its attention TP group holds ``tokens``
    tokens: (token-choices the GPU computes, seconds of its expert kernel, forward). Each GPU
    keeps E/EP experts at 1/ETP width and computes tokens/TP × top_k × ETP choices (balanced);
    a 1/ETP-wide expert takes :meth:`CostModel.expert_width_share` of the full-width kernel."""
    m = cm.model
    choices = tokens / mapping.tp * m.top_k * mapping.etp
    local = m.num_experts // mapping.ep
    share = cm.expert_width_share(choices / local, mapping.etp)
    kernel = float(cm.device_compute(np.full((1, local), choices / local))[0]) * share
    return choices, kernel


def expert_shard_backward_time(cm: CostModel, mapping: ParallelMapping, tokens: float) -> float:
    """Backward (seconds) of the routed-expert shard of :func:`expert_shard`: E/EP experts at 1/ETP
    width, each at tokens/TP × top_k × ETP / (E/EP) token-choices (:mod:`moeplan.backward`)."""
    choices, forward = expert_shard(cm, mapping, tokens)
    local = cm.model.num_experts // mapping.ep
    return float(experts_backward_time(cm, np.full(local, choices / local), mapping.etp, forward))


def _cp_ring_time(cm: CostModel, mapping: ParallelMapping, tokens: float, spans: dict[str, GroupSpan]) -> float:
    """Seconds of one layer's CP ring in the forward: the whole sequence's K and V of this TP
    rank gathered around the CP group (``tokens`` per CP chunk); 0 without CP."""
    t, a = mapping, cm.model.attention
    if t.cp <= 1:
        return 0.0
    kv_elems = 2 * a.num_kv_heads * a.head_dim if a.kind == "gqa" else a.num_heads * (a.qk_head_dim + a.v_dim)
    return _ring_time(cm, "all_gather", kv_elems / t.tp * cm.opt.act_bytes * tokens * t.cp, spans["cp"])


def forward_pass(cm: CostModel, mapping: ParallelMapping, tokens: float, context: float,
                 spans: dict[str, GroupSpan], head_tokens: float, sequence_parallel: bool,
                 tp_comm_overlap: bool = False) -> PassCost:
    """One training forward pass through the slowest (last) pipeline stage on one GPU: ``tokens`` per
    attention TP group (a CP chunk of the micro-batch in training), each attending to ``context``
    tokens. With sequence parallelism TP exchanges all-gather + reduce-scatter per block, without
    it one all-reduce (with ``tp_comm_overlap`` only the part longer than the layer's attention
    and FFN GEMMs shows); the EP all-to-all moves ``tokens / tp × top_k`` token copies per GPU."""
    m, t = cm.model, mapping
    row = m.hidden_size * cm.opt.act_bytes
    sp_tokens = tokens / t.tp
    stage = 1.0 / t.pp

    attention = attention_shard_time(cm, t, tokens, context, "prefill")
    choices, experts = expert_shard(cm, t, tokens)
    router = float(cm.router_gemm_time(sp_tokens))
    shared = float(cm.shared_expert_time(tokens, t.tp))
    dense_layers = m.num_layers - m.num_moe_layers
    dense_ffn = cm.dense_ffn_time(tokens, t.tp) if dense_layers else 0.0
    head = float(cm.head_time(head_tokens, t.tp))

    block = row * tokens                      # one gathered activation tensor of the TP group
    if t.tp > 1:
        one = (_ring_time(cm, "all_gather", block, spans["tp"]) + _ring_time(cm, "reduce_scatter", block, spans["tp"])
               if sequence_parallel else _ring_time(cm, "all_reduce", block, spans["tp"]))
    else:
        one = 0.0
    tp_blocks_per_moe_layer = 1 + (1 if m.shared_ffn else 0)
    tp_comm = one * (m.num_moe_layers * tp_blocks_per_moe_layer + dense_layers * 2)
    if tp_comm_overlap:
        gemms = m.num_layers * attention + m.num_moe_layers * shared + dense_layers * dense_ffn
        tp_comm = max(0.0, tp_comm - gemms)

    ring = m.num_layers * max(0.0, _cp_ring_time(cm, t, tokens, spans) - attention)

    a2a = 2 * alltoall_group_time(cm, sp_tokens * m.top_k * row, spans["ep"])
    etp = (_ring_time(cm, "all_gather", choices * row, spans["etp"])
           + _ring_time(cm, "reduce_scatter", choices * row, spans["etp"])) if t.etp > 1 else 0.0
    return PassCost(
        attention=m.num_layers * attention * stage,
        moe_compute=m.num_moe_layers * (experts + router + shared) * stage,
        other_compute=dense_layers * dense_ffn * stage + head,
        tp_comm=tp_comm * stage, cp_ring=ring * stage,
        ep_all_to_all=m.num_moe_layers * a2a * stage, etp_comm=m.num_moe_layers * etp * stage)


_LAYER_BACKWARD: weakref.WeakKeyDictionary[CostModel, dict[tuple, tuple[float, ...]]] = weakref.WeakKeyDictionary()
"""Per cost model (dropped with it), :func:`_layer_backward`'s results by (shard, tokens, context)."""


def _layer_backward(cm: CostModel, shard: ParallelMapping, tokens: float, context: float) -> tuple[float, ...]:
    """Backward seconds of one layer's pieces on one GPU under ``shard`` (only its TP, ETP and EP
    matter): attention, routed experts, router, shared expert, dense FFN. Cached per cost model
    (:data:`_LAYER_BACKWARD`): a search prices the same shards under many layouts."""
    cache = _LAYER_BACKWARD.setdefault(cm, {})
    key = (shard, tokens, context)
    if key not in cache:
        m, h = cm.model, cm.model.hidden_size
        cache[key] = (attention_shard_backward_time(cm, shard, tokens, context),
                      expert_shard_backward_time(cm, shard, tokens),
                      float(gemm_backward_time(cm, tokens / shard.tp, Gemm("router", h, m.num_experts))),
                      float(swiglu_backward_time(cm, tokens, m.shared_ffn, shard.tp, "shared")) if m.shared_ffn else 0.0,
                      float(swiglu_backward_time(cm, tokens, m.dense_ffn, shard.tp, "dense"))
                      if m.num_layers > m.num_moe_layers else 0.0)
    return cache[key]


def backward_pass(cm: CostModel, mapping: ParallelMapping, tokens: float, context: float,
                  spans: dict[str, GroupSpan], head_tokens: float, forward: PassCost) -> PassCost:
    """The backward of :func:`forward_pass` (same arguments; ``forward`` is that pass): every
    compute part priced by :mod:`moeplan.backward`; the TP, EP all-to-all and ETP exchanges as
    exposed as the forward's (the same collectives on gradients); the CP ring moves K/V and
    their gradients (twice the forward's bytes) behind the attention backward."""
    m, t = cm.model, mapping
    stage = 1.0 / t.pp
    attention, experts, router, shared, dense_ffn = _layer_backward(cm, ParallelMapping(t.tp, 1, 1, 1, t.etp, t.ep, 1),
                                                                    tokens, context)
    dense_layers = m.num_layers - m.num_moe_layers
    head = float(gemm_backward_time(cm, head_tokens, Gemm("lm_head", m.hidden_size, max(m.vocab_size // t.tp, 1))))
    ring = m.num_layers * max(0.0, 2.0 * _cp_ring_time(cm, t, tokens, spans) - attention)
    return PassCost(
        attention=m.num_layers * attention * stage,
        moe_compute=m.num_moe_layers * (experts + router + shared) * stage,
        other_compute=dense_layers * dense_ffn * stage + head,
        tp_comm=forward.tp_comm, cp_ring=ring * stage, ep_all_to_all=forward.ep_all_to_all,
        etp_comm=forward.etp_comm)


def train_passes(cm: CostModel, mapping: ParallelMapping, setup: TrainSetup) -> tuple[PassCost, PassCost]:
    """(forward, backward) of one training micro-batch through the last pipeline stage (they do
    not depend on vpp, recompute or the optimizer, so a search can price them once per layout)."""
    spans = group_spans(mapping, cm.hw.devices_per_node)
    tokens = setup.micro_batch * setup.seq_len / mapping.cp
    forward = forward_pass(cm, mapping, tokens, setup.seq_len, spans, tokens, mapping.tp > 1,
                           setup.tp_comm_overlap)
    return forward, backward_pass(cm, mapping, tokens, setup.seq_len, spans, tokens, forward)


@dataclass
class TrainStep:
    """A predicted training step. ``breakdown`` [seconds per step] sums to ``step``; ``mfu`` is
    model FLOPs / (step × GPUs × the profile's bf16 matmul rate)."""

    step: float
    breakdown: dict[str, float]
    microbatches: int
    model_flops: float
    mfu: float
    tokens_per_second: float
    memory: MemoryReport
    spans: dict[str, GroupSpan]

    def to_dict(self) -> dict[str, Any]:
        return {"step_s": self.step, "mfu": self.mfu, "tokens_per_s": self.tokens_per_second,
                "microbatches": self.microbatches, "model_flops": self.model_flops,
                "breakdown_s": dict(self.breakdown), "memory": self.memory.to_dict(),
                "groups": {k: {"size": s.size, "nodes": s.nodes, "scope": s.scope} for k, s in self.spans.items()}}


def train_model_flops(model: ModelSpec, setup: TrainSetup) -> float:
    """Model FLOPs of one step: 3 × (2 × matmul weights + causal attention) per token, the
    convention of Megatron's num_floating_point_operations (NVIDIA/Megatron-LM
    megatron/training/training.py: 3× for forward + two backward GEMMs, "only half of the
    attention matrix is non-zero"); the input embedding lookup is not a matmul."""
    tokens = setup.global_batch * setup.seq_len
    return 3.0 * tokens * model.flops_per_token(context=setup.seq_len // 2)


def _params_per_gpu(model: ModelSpec, mapping: ParallelMapping) -> tuple[float, float]:
    """(non-expert, expert) parameters one GPU holds: non-expert split TP × PP (evenly over
    stages), experts E/EP per MoE layer split ETP × PP."""
    dense = _non_expert_params(model) / (mapping.tp * mapping.pp)
    expert = model.num_experts / mapping.ep * model.num_moe_layers * model.expert_params() / (mapping.etp * mapping.pp)
    return dense, expert


@lru_cache(maxsize=64)
def _non_expert_params(model: ModelSpec) -> int:
    return model.non_expert_params()


def _activation_bytes(cm: CostModel, mapping: ParallelMapping, setup: TrainSetup) -> float:
    """Activations one GPU of the first stage keeps: per layer and micro-batch, attention and
    norms 15·h bytes per token, a SwiGLU FFN 2·h + 6·f per token (input, gate+up, product), an
    MoE layer that per token-choice it computes; × layers per stage × micro-batches in flight
    (min(pp, m), × (1 + (pp−1)/(pp·vpp)) when interleaved). With full recompute only each
    layer's input (2·h per token) stays, plus one layer's working set."""
    m, t = cm.model, mapping
    h, b = m.hidden_size, cm.opt.act_bytes / 2.0
    sp_tokens = setup.micro_batch * setup.seq_len / (t.cp * t.tp)
    attention = ATTENTION_ACT_PER_HIDDEN * h * sp_tokens * b
    choices = sp_tokens * m.top_k * t.etp
    shared = sp_tokens * (2 * h + 6 * m.shared_ffn) if m.shared_ffn else 0.0
    moe = (choices * (2 * h + 6 * m.expert_ffn / t.etp) + shared) * b
    dense = sp_tokens * (2 * h + 6 * m.dense_ffn) * b
    layers = [attention + moe] * m.num_moe_layers + [attention + dense] * (m.num_layers - m.num_moe_layers)
    per_layer = sum(layers) / m.num_layers
    in_flight = min(t.pp, setup.microbatches(t)) * ((1 + (t.pp - 1) / (t.pp * t.vpp)) if t.vpp > 1 else 1.0)
    layers_per_stage = m.num_layers / t.pp
    if setup.recompute:
        return layers_per_stage * 2 * h * sp_tokens * b * in_flight + max(layers)
    return layers_per_stage * per_layer * in_flight


def train_memory(cm: CostModel, mapping: ParallelMapping, setup: TrainSetup) -> MemoryReport:
    """Bytes per GPU in training: bf16 weights, fp32 main gradients, fp32 optimizer states
    (sharded over DP·CP for non-expert and EDP for expert parameters with the distributed
    optimizer) and activations (:func:`_activation_bytes`)."""
    m, t = cm.model, mapping
    weights = cm.memory(m.num_experts // t.ep, 1, training=False, non_expert_shards=t.tp * t.pp,
                        expert_shards=t.etp * t.pp)
    dense, expert = _params_per_gpu(m, t)
    shards = (t.dp * t.cp, t.edp) if setup.distributed_optimizer else (1, 1)
    return replace(weights, activations=_activation_bytes(cm, t, setup), gradients=(dense + expert) * GRAD_BYTES,
                   optimizer=OPTIMIZER_STATE_BYTES * (dense / shards[0] + expert / shards[1]))


def _gradient_sync(cm: CostModel, mapping: ParallelMapping, setup: TrainSetup, spans: dict[str, GroupSpan],
                   forward: float, backward: float) -> tuple[float, float]:
    """(exposed seconds of the data-parallel gradient/parameter exchange, optimizer step seconds).
    Distributed optimizer: reduce-scatter of fp32 gradients hidden behind the last micro-batch's
    backward, all-gather of bf16 parameters behind the first forward; otherwise one fp32
    all-reduce behind the last backward. Non-expert weights sync over DP·CP, experts over EDP."""
    m, t = cm.model, mapping
    dense, expert = _params_per_gpu(m, t)
    groups = ((dense, spans["dp_cp"]), (expert, spans["edp"]))
    if setup.distributed_optimizer:
        rs = sum(_ring_time(cm, "reduce_scatter", p * GRAD_BYTES, s) for p, s in groups)
        ag = sum(_ring_time(cm, "all_gather", p * m.weight_bytes, s) for p, s in groups)
        exposed = max(0.0, rs - backward) + max(0.0, ag - forward)
        shard = dense / spans["dp_cp"].size + expert / spans["edp"].size
    else:
        exposed = max(0.0, sum(_ring_time(cm, "all_reduce", p * GRAD_BYTES, s) for p, s in groups) - backward)
        shard = dense + expert
    return exposed, float(cm.dense_time(0.0, shard * OPTIMIZER_STEP_BYTES))


def train_step(cm: CostModel, mapping: ParallelMapping, setup: TrainSetup,
               passes: tuple[PassCost, PassCost] | None = None) -> TrainStep:
    """Predicted training step under ``mapping`` with 1F1B (interleaved when vpp > 1):
    step = (m + (pp−1)/vpp) × t_mb + exposed gradient sync + optimizer step, where t_mb is one
    micro-batch's forward + backward (+ a recomputed forward) through the last stage plus its
    pipeline sends; (pp−1)/vpp × t_mb is the bubble. ``passes`` (forward, backward) may be passed
    in when already priced by :func:`train_passes` for this mapping's layout and micro-batch size."""
    t = mapping
    spans = group_spans(t, cm.hw.devices_per_node)
    fwd, bwd = passes or train_passes(cm, t, setup)
    m_count = setup.microbatches(t)
    p2p_bytes = setup.micro_batch * setup.seq_len / (t.cp * t.tp) * cm.model.hidden_size * cm.opt.act_bytes
    p2p = 2 * t.vpp * cm.collective_time("send_recv", p2p_bytes, 2, spans["pp"].scope) if t.pp > 1 else 0.0
    recompute = fwd.total if setup.recompute else 0.0
    per_mb = fwd.total + bwd.total + recompute + p2p
    bubble = (t.pp - 1) / t.vpp * per_mb
    sync, optimizer = _gradient_sync(cm, t, setup, spans, fwd.total, bwd.total)
    backward = bwd.parts()
    parts = {k: m_count * (v + backward[k]) for k, v in fwd.parts().items()}
    parts.update(recompute=m_count * recompute, pp_p2p=m_count * p2p, pipeline_bubble=bubble,
                 dp_grad_sync=sync, optimizer_step=optimizer)
    step = sum(parts.values())
    flops = train_model_flops(cm.model, setup)
    return TrainStep(step, parts, m_count, flops, flops / (step * t.world * cm.peak_flops),
                     setup.global_batch * setup.seq_len / step, train_memory(cm, t, setup), spans)


@dataclass(frozen=True)
class ServeSetup:
    """Serving: requests of ``isl`` prompt tokens and ``osl`` output tokens, ``concurrency`` of
    them in flight over the whole deployment, weights and KV cache in ``precision``, run by
    ``backend`` (the inputs of :meth:`moeplan.serving.ServePredictor.predict`)."""

    isl: int
    concurrency: int
    osl: int = 1024
    precision: Precision = field(default_factory=Precision)
    backend: str = "sglang"


@dataclass
class ServeStep:
    """Predicted serving figures: time to first token (s), prefill throughput (tokens/s), time
    per output token (s) and decode throughput (tokens/s) at the requested concurrency — all
    from :class:`moeplan.serving.ServePredictor` — and the KV-cache capacity (tokens, whole
    deployment) and memory of the cost model's memory report."""

    ttft: float
    prefill_tokens_per_s: float
    tpot: float
    decode_tokens_per_s: float
    kv_capacity_tokens: float
    kv_needed_tokens: float
    prefill: dict[str, float]
    decode: dict[str, float]
    memory: MemoryReport
    spans: dict[str, GroupSpan]
    point: ServePoint

    @property
    def fits(self) -> bool:
        return self.kv_capacity_tokens >= self.kv_needed_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"ttft_s": self.ttft, "prefill_tokens_per_s": self.prefill_tokens_per_s, "tpot_s": self.tpot,
                "decode_tokens_per_s": self.decode_tokens_per_s, "kv_capacity_tokens": self.kv_capacity_tokens,
                "kv_needed_tokens": self.kv_needed_tokens, "prefill_breakdown_s": dict(self.prefill),
                "decode_breakdown_s": dict(self.decode), "memory": self.memory.to_dict(),
                "groups": {k: {"size": s.size, "nodes": s.nodes, "scope": s.scope} for k, s in self.spans.items()},
                "serving_model": "moeplan.serving.ServePredictor"}


def serve_layout(mapping: ParallelMapping) -> ServeLayout:
    """The serving layout of a folding mapping: attention TP × DP, MoE ETP × EP (CP, PP and EDP
    are 1 in serving mappings: the folding rules serve_cp / serve_pp / serve_edp)."""
    return ServeLayout(mapping.tp, mapping.dp, mapping.etp, mapping.ep)


def serve_step(cm: CostModel, mapping: ParallelMapping, setup: ServeSetup) -> ServeStep:
    """Serving under ``mapping``: TTFT and TPOT from the one serving model,
    :class:`moeplan.serving.ServePredictor` (the one ``moeplan plan serve`` prices with), at
    ``setup``'s concurrency, ISL/OSL, precision and backend; the memory report and KV capacity
    of the cost model (weights, a prefill workspace and the KV cache share 90% of HBM)."""
    m, t = cm.model, mapping
    spans = group_spans(t, cm.hw.devices_per_node)
    point = ServePredictor(cm, serve_layout(t), setup.precision, setup.backend).predict(
        setup.concurrency, setup.isl, setup.osl)
    context = setup.isl + setup.osl
    weights = cm.memory(m.num_experts // t.ep, 1, batch_tokens_per_device=setup.isl / t.tp, training=False,
                        non_expert_shards=t.tp * t.pp, expert_shards=t.etp * t.pp)
    kv_per_token = m.kv_cache_bytes_per_token(setup.precision.kv_bytes) / (t.pp * kv_split(m, t.tp))
    per_replica = cm.kv_capacity_tokens(weights, kv_per_token)
    needed = -(-setup.concurrency // t.dp) * context
    memory = replace(weights, kv_cache=needed * kv_per_token)
    return ServeStep(ttft=point.ttft, prefill_tokens_per_s=t.dp * setup.isl / point.prefill.total, tpot=point.tpot,
                     decode_tokens_per_s=setup.concurrency / point.tpot, kv_capacity_tokens=per_replica * t.dp,
                     kv_needed_tokens=needed * t.dp, prefill=point.prefill.parts(), decode=point.decode.parts(),
                     memory=memory, spans=spans, point=point)
