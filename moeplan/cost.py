"""The cost model: one place that turns a model, a hardware profile, a plan and routing into
seconds and bytes. Solvers, the simulator, the CLI and the dashboard all call it.

Read it top to bottom:

1. **Kernels** — :meth:`CostModel.expert_time` (one expert's SwiGLU FFN at n tokens, one launch
   sequence per expert: the "loop" kernel), :meth:`CostModel.grouped_time` (all local experts
   of a device in one grouped GEMM) and :meth:`CostModel.routing_time` (router, sort, gather and
   scatter around the experts). Both come from the profile's measured curves when it has
   them; otherwise from the roofline ``max(FLOPs / peak, bytes / HBM) + launches × overhead``
   and the result says ``measured=False``.
2. **Links** — :meth:`CostModel.alltoall_time`: per-device time of an all-to-all from the bytes
   each device sends and receives, split into intra-node and inter-node parts (measured
   collective curves when present, else latency + bytes / datasheet bandwidth).
3. **One MoE layer** — :meth:`CostModel.moe_layer`: dispatch, expert compute, combine and shared
   experts per device for a traffic matrix; each phase ends at a collective, so the layer takes
   the slowest device of each phase (stragglers matter). ``overlap`` overlaps dispatch with
   compute in chunks. ExFlow's context-coherent execution (``exflow``) changes the traffic
   matrices, not the formula: :mod:`moeplan.simulate` builds them.
4. **Dense parts** — attention (prefill and decode, GQA or MLA) and dense FFN layers.
5. **Memory** — :meth:`CostModel.memory`: weights with replicas, KV cache, activations and, for
   training, gradients and optimizer states; :meth:`MemoryReport.check` rejects a plan that
   does not fit, with the numbers.
6. **Whole step under a parallel mapping** — :func:`train_step` and :func:`serve_step` compose
   the pieces above into a training step (1F1B pipeline, TP/SP, CP, EP and DP collectives,
   memory, MFU) or serving figures (prefill, decode, KV capacity) for an attention
   TP × CP × DP × PP / MoE ETP × EP × EDP × PP mapping (MoE Parallel Folding).

Units: seconds, bytes, FLOPs, tokens. Activations are bf16 (2 bytes) unless set otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np

from moeplan.errors import InputError
from moeplan.hardware import Curve, HardwareProfile
from moeplan.model import ModelSpec

LAUNCHES_PER_EXPERT = 5     # gate/up GEMM, activation, down GEMM, gather, scatter-add (loop kernel)
LAUNCHES_PER_GROUPED = 4    # 2 grouped GEMMs, activation, offsets
LAUNCHES_PER_ROUTING = 14   # router GEMM, softmax, top-k, sort, bincount, host copy, gather, scale, index_add
ACTIVATION_FACTOR = 34      # bytes of live activations per token per hidden element in training
                            # without recompute (Korthikanti et al. 2022: 34·s·b·h per layer)


@dataclass(frozen=True)
class CostOptions:
    """How the runtime executes. kernel: "grouped" or "loop" expert kernel; overlap: dispatch
    overlapped with compute; exflow: context-coherent execution (a token's next dispatch starts
    from the device of its previous top-1 expert and its combine ends there, so it never returns
    home between layers — ExFlow's single all-to-all per layer);
    act_bytes: bytes per activation element; overlap_chunks: pipeline depth of the overlap."""

    kernel: str = "grouped"
    overlap: bool = False
    exflow: bool = False
    act_bytes: float = 2.0
    overlap_chunks: int = 4

    def validate(self) -> "CostOptions":
        if self.kernel not in ("grouped", "loop"):
            raise InputError(f"kernel must be grouped or loop, got {self.kernel!r}", field="kernel")
        return self


@dataclass
class LayerCost:
    """One MoE layer. Per-device arrays [..., devices] in seconds; ``time`` [...] is the layer's
    time (leading dimensions are batches, or none); bytes are dispatch bytes crossing devices/nodes."""

    dispatch: np.ndarray
    compute: np.ndarray
    combine: np.ndarray
    shared: np.ndarray
    routing: np.ndarray
    time: np.ndarray
    tokens_per_device: np.ndarray
    cross_device_bytes: np.ndarray
    cross_node_bytes: np.ndarray

    @property
    def work(self) -> np.ndarray:
        """Per-device compute phase: experts, shared experts, routing and permutation."""
        return self.compute + self.shared + self.routing

    @property
    def straggler_wait(self) -> np.ndarray:
        """Time the average device idles waiting for the slowest one in the compute phase."""
        return self.work.max(axis=-1) - self.work.mean(axis=-1)

    def breakdown(self) -> dict[str, float]:
        """Phase times (slowest device of each phase), averaged over leading batch dimensions."""
        return {"dispatch": float(np.mean(self.dispatch.max(axis=-1))),
                "compute": float(np.mean(self.work.max(axis=-1))),
                "combine": float(np.mean(self.combine.max(axis=-1))),
                "straggler_wait": float(np.mean(self.straggler_wait)), "total": float(np.mean(self.time))}


@dataclass
class MemoryReport:
    """Bytes per device: weights (non-expert + expert slots), KV cache, activations, training state."""

    capacity: float
    non_expert_weights: float
    expert_weights: np.ndarray
    kv_cache: float
    activations: float
    gradients: float = 0.0
    optimizer: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def per_device(self) -> np.ndarray:
        return (self.non_expert_weights + self.expert_weights + self.kv_cache + self.activations
                + self.gradients + self.optimizer + sum(self.extra.values()))

    @property
    def peak(self) -> float:
        return float(self.per_device.max())

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    def check(self, what: str = "plan") -> None:
        """Raise InputError with the numbers when the busiest device does not fit."""
        if not self.fits:
            d = int(self.per_device.argmax())
            raise InputError(
                f"{what} does not fit: device {d} needs {self.peak / 2**30:.1f} GiB "
                f"(weights {self.non_expert_weights / 2**30:.1f} + experts {self.expert_weights[d] / 2**30:.1f} + "
                f"KV {self.kv_cache / 2**30:.1f} + activations {self.activations / 2**30:.1f}"
                + (f" + grads {self.gradients / 2**30:.1f} + optimizer {self.optimizer / 2**30:.1f}"
                   if self.gradients or self.optimizer else "")
                + f" GiB) of {self.capacity / 2**30:.1f} GiB", field="memory",
                fix="use more devices, fewer replica slots, a smaller batch or lower-precision weights")

    def to_dict(self) -> dict[str, Any]:
        return {"capacity_bytes": self.capacity, "non_expert_weights": self.non_expert_weights,
                "expert_weights_max": float(self.expert_weights.max()), "kv_cache": self.kv_cache,
                "activations": self.activations, "gradients": self.gradients, "optimizer": self.optimizer,
                "peak": self.peak, "fits": self.fits}


class CostModel:
    """Predictions for one model on one hardware profile (see the module docstring)."""

    def __init__(self, model: ModelSpec, hardware: HardwareProfile, options: CostOptions | None = None) -> None:
        self.model = model
        self.hw = hardware
        self.opt = (options or CostOptions()).validate()
        dev = hardware.device
        self.peak_flops = dev.matmul_flops["bf16"].value
        self.hbm = dev.hbm_bandwidth.value
        self.launch = dev.launch_overhead.value
        self._loop_curve = hardware.find_curve("expert_ffn", hidden=model.hidden_size, ffn=model.expert_ffn,
                                               kernel="loop")
        self._grouped = self._fit_grouped(hardware.curves_of("expert_ffn"))
        self._routing_curve = hardware.find_curve("moe_routing", hidden=model.hidden_size, experts=model.num_experts,
                                                  top_k=model.top_k)

    # ---- 1. kernels ---------------------------------------------------------------------------
    @property
    def compute_measured(self) -> bool:
        """True when expert time comes from a measured curve for this model's expert shape."""
        return (self._grouped is not None) if self.opt.kernel == "grouped" else self._loop_curve is not None

    def expert_roofline(self, tokens: np.ndarray | float) -> np.ndarray:
        """Roofline time of one expert at ``tokens`` tokens, without launch overhead (seconds)."""
        m = self.model
        n = np.asarray(tokens, dtype=np.float64)
        flops = 6.0 * m.hidden_size * m.expert_ffn * n
        nbytes = m.expert_bytes() + n * (2 * m.hidden_size + 3 * m.expert_ffn) * self.opt.act_bytes
        return np.maximum(flops / self.peak_flops, nbytes / self.hbm)

    def expert_time(self, tokens: np.ndarray | float) -> np.ndarray:
        """One expert's FFN at ``tokens`` tokens with its own launches (loop kernel); 0 at 0 tokens."""
        n = np.asarray(tokens, dtype=np.float64)
        if self._loop_curve is not None:
            t = self._loop_curve(np.maximum(n, 1.0))
        else:
            t = self.expert_roofline(n) + LAUNCHES_PER_EXPERT * self.launch
        return np.where(n > 0, t, 0.0)

    def _fit_grouped(self, curves: list[Curve]) -> tuple[float, Curve] | None:
        """From grouped-kernel curves at two expert counts G1 < G2, the fixed cost c0 and the
        per-expert increment h(n) = (t(G2, n) − t(G1, n)) / (G2 − G1), as a curve over n."""
        m = self.model
        mine = sorted((c for c in curves if c.key.get("kernel") == "grouped" and c.key.get("hidden") == m.hidden_size
                       and c.key.get("ffn") == m.expert_ffn), key=lambda c: int(c.key.get("experts", 1)))
        if len(mine) < 2:
            return None
        a, b = mine[0], mine[-1]
        ga, gb = int(a.key["experts"]), int(b.key["experts"])
        x = np.asarray(a.x)
        ta, tb = a(x), b(x)
        h = np.maximum((tb - ta) / (gb - ga), 1e-9)
        c0 = float(np.median(np.maximum(ta - ga * h, 0.0)))
        return c0, Curve("expert_ffn", {"derived": "per-expert increment"}, tuple(x), tuple(h), a.prov)

    def grouped_time(self, slot_tokens: np.ndarray) -> np.ndarray:
        """Per-device time of one grouped expert kernel over its slots: ``slot_tokens`` is
        [..., slots] (tokens per local slot); returns [...] seconds (0 for a device with no tokens)."""
        n = np.asarray(slot_tokens, dtype=np.float64)
        busy = n.sum(axis=-1) > 0
        if self._grouped is not None:
            c0, h = self._grouped
            t = c0 + np.where(n > 0, h(np.maximum(n, 1.0)), 0.0).sum(axis=-1)
        else:
            t = np.where(n > 0, self.expert_roofline(n), 0.0).sum(axis=-1) + LAUNCHES_PER_GROUPED * self.launch
        return np.where(busy, t, 0.0)

    def device_compute(self, slot_tokens: np.ndarray) -> np.ndarray:
        """Expert compute per device for tokens per slot [..., devices, slots], with the chosen kernel."""
        if self.opt.kernel == "grouped":
            return self.grouped_time(slot_tokens)
        return self.expert_time(slot_tokens).sum(axis=-1)

    def routing_time(self, tokens: np.ndarray | float) -> np.ndarray:
        """Everything a MoE layer does on one device besides the expert GEMMs, for ``tokens`` tokens
        homed there: router, softmax, top-k, sort by expert, split sizes to the host, gather into
        expert order and the weighted scatter-add back. Measured curve when the profile has one
        (profiler section ``routing``), else roofline on the bytes moved plus launches."""
        m = self.model
        n = np.asarray(tokens, dtype=np.float64)
        if self._routing_curve is not None:
            t = self._routing_curve(np.maximum(n, 1.0))
        else:
            h, e, k = m.hidden_size, m.num_experts, m.top_k
            nbytes = self.opt.act_bytes * (n * h + e * h + 3 * n * k * h)
            t = np.maximum(2.0 * n * h * e / self.peak_flops, nbytes / self.hbm) + LAUNCHES_PER_ROUTING * self.launch
        return np.where(n > 0, t, 0.0)

    def dense_time(self, flops: float | np.ndarray, weight_bytes: float | np.ndarray,
                   launches: int = 1) -> np.ndarray:
        """A dense matmul block: roofline on the (measured or datasheet) bf16 rate and HBM bandwidth."""
        return np.maximum(np.asarray(flops) / self.peak_flops, np.asarray(weight_bytes) / self.hbm) + launches * self.launch

    def shared_expert_time(self, tokens: np.ndarray | float) -> np.ndarray:
        """Shared expert(s) of one MoE layer at ``tokens`` tokens on one device."""
        m = self.model
        if not m.shared_ffn:
            return np.zeros_like(np.asarray(tokens, dtype=np.float64))
        n = np.asarray(tokens, dtype=np.float64)
        flops = 6.0 * m.hidden_size * m.shared_ffn * n
        nbytes = m.shared_params() * m.weight_bytes + n * 2 * m.hidden_size * self.opt.act_bytes
        return np.where(n > 0, self.dense_time(flops, nbytes, 3), 0.0)

    # ---- 2. links -----------------------------------------------------------------------------
    def _link_time(self, scope: str, nbytes: np.ndarray, ranks: int) -> np.ndarray:
        b = np.asarray(nbytes, dtype=np.float64)
        curve = self._collective_curve("all_to_all", scope, ranks)
        if curve is not None:
            n = int(curve.key.get("ranks", ranks))
            return np.where(b > 0, curve(np.maximum(b * n / max(n - 1, 1), 1.0)), 0.0)
        link = self.hw.intra_node if scope == "intra_node" else self.hw.inter_node
        return link.time(b)

    def _collective_curve(self, op: str, scope: str, ranks: int) -> Curve | None:
        best = None
        for c in self.hw.curves_of("collective"):
            if c.key.get("op") == op and c.key.get("scope") == scope:
                if best is None or abs(int(c.key.get("ranks", 0)) - ranks) < abs(int(best.key.get("ranks", 0)) - ranks):
                    best = c
        return best

    @property
    def links_measured(self) -> bool:
        return self.hw.links_measured

    def alltoall_time(self, traffic_bytes: np.ndarray) -> np.ndarray:
        """Per-device all-to-all time from ``traffic_bytes[..., src, dst]`` (diagonal ignored): each
        device's intra- and inter-node parts (max of what it sends and receives) move concurrently.
        Leading dimensions (batches) are kept: returns [..., devices]."""
        b = np.asarray(traffic_bytes, dtype=np.float64)
        d = b.shape[-1]
        per = self.hw.devices_per_node
        node = np.arange(d) // per
        same = node[:, None] == node[None, :]
        intra_mask = same & ~np.eye(d, dtype=bool)
        intra = np.maximum((b * intra_mask).sum(axis=-1), (b * intra_mask).sum(axis=-2))
        inter = np.maximum((b * ~same).sum(axis=-1), (b * ~same).sum(axis=-2))
        t_intra = self._link_time("intra_node", intra, min(d, per))
        t_inter = self._link_time("inter_node", inter, max(d // per, 1)) if d > per else np.zeros_like(intra)
        return np.maximum(t_intra, t_inter)

    def collective_time(self, op: str, nbytes: float, ranks: int, scope: str = "intra_node") -> float:
        """Time of a collective of ``nbytes`` per rank over ``ranks`` ranks (ring model with the
        nccl-tests bus-bandwidth factors when no measured curve exists)."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        curve = self._collective_curve(op, scope, ranks)
        if curve is not None:
            return float(curve(nbytes))
        link = self.hw.intra_node if scope == "intra_node" else self.hw.inter_node
        factor = {"all_reduce": 2.0 * (ranks - 1) / ranks, "all_gather": (ranks - 1) / ranks,
                  "reduce_scatter": (ranks - 1) / ranks, "all_to_all": (ranks - 1) / ranks}.get(op, 1.0)
        return float(link.latency.value * (ranks - 1 if op != "all_to_all" else 1) + nbytes * factor / link.bandwidth.value)

    # ---- 3. one MoE layer -----------------------------------------------------------------------
    def moe_layer(self, dispatch_tokens: np.ndarray, slot_tokens: np.ndarray,
                  combine_tokens: np.ndarray | None = None, home_tokens: np.ndarray | None = None) -> LayerCost:
        """Cost of one MoE layer; every argument may carry leading batch dimensions.

        Args:
            dispatch_tokens: [..., src, dst] token-choices sent from device src to the device
                holding the chosen replica (src == dst stays local).
            slot_tokens: [..., devices, slots] token-choices computed by each physical slot.
            combine_tokens: [..., src, dst] token-choices whose results travel back (default: the
                transpose of dispatch).
            home_tokens: [..., devices] tokens whose residual stream lives on each device (for the
                shared experts; default: row sums of dispatch / top_k).
        """
        m, o = self.model, self.opt
        row = m.hidden_size * o.act_bytes
        disp_tokens = np.asarray(dispatch_tokens, dtype=np.float64)
        disp_b = disp_tokens * row
        comb_b = (np.swapaxes(disp_b, -1, -2) if combine_tokens is None
                  else np.asarray(combine_tokens, dtype=np.float64) * row)
        dispatch = self.alltoall_time(disp_b)
        combine = self.alltoall_time(comb_b)
        compute = self.device_compute(slot_tokens)
        home = disp_tokens.sum(axis=-1) / m.top_k if home_tokens is None else np.asarray(home_tokens, dtype=np.float64)
        shared = self.shared_expert_time(home)
        routing = self.routing_time(home)
        work = compute + shared + routing
        d_max, w_max, c_max = dispatch.max(axis=-1), work.max(axis=-1), combine.max(axis=-1)
        if o.overlap:
            time = np.maximum(d_max, w_max) + np.minimum(d_max, w_max) / o.overlap_chunks + c_max
        else:
            time = d_max + w_max + c_max
        d = disp_b.shape[-1]
        node = np.arange(d) // self.hw.devices_per_node
        off = ~np.eye(d, dtype=bool)
        cross_node = node[:, None] != node[None, :]
        return LayerCost(dispatch, compute, combine, shared, routing, time, np.asarray(slot_tokens).sum(axis=-1),
                         (disp_b * off).sum(axis=(-1, -2)), (disp_b * cross_node).sum(axis=(-1, -2)))

    # ---- 4. dense parts -------------------------------------------------------------------------
    def attention_time(self, tokens: float, context: float, phase: str) -> float:
        """One layer's attention on one device: ``tokens`` new tokens each attending to ``context``
        tokens (prefill: the sequence so far; decode: the KV cache). Measured curve when the
        profile has one for this model's attention shape, else roofline."""
        m = self.model
        a = m.attention
        kind = "attention_prefill" if phase == "prefill" else "attention_decode"
        curve = self.hw.find_curve(kind, signature=attention_signature(m))
        if curve is not None:
            seqs = float(curve.key.get("batch", 1))
            per_seq = float(curve(max(context, 1.0)))
            return per_seq * max(tokens / (context if phase == "prefill" else 1.0), 1e-9) / seqs
        proj_flops = 2.0 * a.params(m.hidden_size) * tokens
        score_flops = 2.0 * a.num_heads * (a.qk_head_dim + a.v_dim) * tokens * context * (0.5 if phase == "prefill" else 1.0)
        kv_bytes = a.kv_cache_elems_per_token() * m.weight_bytes * context * (tokens if phase == "decode" else 1.0)
        nbytes = a.params(m.hidden_size) * m.weight_bytes + kv_bytes
        return float(self.dense_time(proj_flops + score_flops, nbytes, 6))

    def dense_ffn_time(self, tokens: float) -> float:
        """A dense (non-MoE) layer's FFN on one device."""
        m = self.model
        return float(self.dense_time(6.0 * m.hidden_size * m.dense_ffn * tokens, m.dense_ffn_params() * m.weight_bytes, 3))

    def forward_time(self, tokens: float, context: float, phase: str, expert_tokens: np.ndarray,
                     include_head: bool = True) -> dict[str, float]:
        """One forward step of the whole model on ONE device holding every expert (the single-GPU
        case): ``tokens`` new tokens attending to ``context`` tokens; ``expert_tokens[moe_layer,
        expert]`` token-choices per expert. Returns seconds per part and their sum ("total")."""
        m = self.model
        counts = np.asarray(expert_tokens, dtype=np.float64)
        attention = m.num_layers * self.attention_time(tokens, context, phase)
        dense = len(m.dense_layers) * self.dense_ffn_time(tokens)
        routing = m.num_moe_layers * float(self.routing_time(tokens))
        experts = float(self.device_compute(counts[:, None, :]).sum())
        shared = m.num_moe_layers * float(self.shared_expert_time(tokens))
        norms = (2 * m.num_layers + 1) * float(self.dense_time(0.0, 4.0 * tokens * m.hidden_size * self.opt.act_bytes, 1))
        head = float(self.dense_time(2.0 * m.hidden_size * m.vocab_size * tokens,
                                     m.vocab_size * m.hidden_size * m.weight_bytes, 1)) if include_head else 0.0
        parts = {"attention": attention, "dense_ffn": dense, "routing": routing, "experts": experts,
                 "shared_experts": shared, "norms": norms, "head": head}
        parts["total"] = sum(parts.values())
        return parts

    # ---- 5. memory ------------------------------------------------------------------------------
    def memory(self, slots_per_device: np.ndarray | int, num_devices: int, kv_tokens_per_device: float = 0.0,
               batch_tokens_per_device: float = 0.0, training: bool = False, non_expert_shards: int = 1,
               expert_shards: int = 1) -> MemoryReport:
        """Bytes per device. ``slots_per_device``: expert slots per MoE layer on each device
        (replicas included); ``non_expert_shards``: how many ways the non-expert weights are
        split (TP × PP); ``expert_shards``: ETP × PP split of each expert."""
        m = self.model
        slots = np.broadcast_to(np.asarray(slots_per_device, dtype=np.float64), (num_devices,))
        non_expert = m.non_expert_params() * m.weight_bytes / non_expert_shards
        experts = slots * m.num_moe_layers * m.expert_bytes() / expert_shards
        kv = m.kv_cache_bytes_per_token() * kv_tokens_per_device / non_expert_shards
        act = batch_tokens_per_device * m.hidden_size * self.opt.act_bytes * (ACTIVATION_FACTOR * m.num_layers
                                                                                   if training else 8)
        grads = optim = 0.0
        if training:
            params = non_expert / m.weight_bytes + float(experts.max()) / m.expert_bytes() * m.expert_params()
            grads = params * 4.0          # fp32 gradient accumulation
            optim = params * 12.0         # fp32 master weights + Adam moments
        return MemoryReport(self.hw.device.memory.value, non_expert, experts, kv, act, grads, optim)


def attention_signature(model: ModelSpec) -> str:
    """A key naming an attention shape, shared by the profiler's curves and the cost model."""
    a = model.attention
    if a.kind == "mla":
        return f"mla-h{model.hidden_size}-n{a.num_heads}-kv{a.kv_lora_rank}-r{a.qk_rope_head_dim}-v{a.v_head_dim}"
    return f"gqa-h{model.hidden_size}-n{a.num_heads}-kv{a.num_kv_heads}-d{a.head_dim}"


# ================================================================================================
# 6. Whole step under a parallel mapping
# ================================================================================================
# A training step or a serving step of the whole model when attention layers run on
# TP × CP × DP × PP and MoE layers on ETP × EP × EDP × PP over the same GPUs (MoE Parallel
# Folding, NVIDIA/Megatron-LM megatron/core/transformer/moe/README.md). Everything below composes
# the primitives above (attention_time, grouped/expert kernels, dense_time, collective_time,
# memory); the folding solver, the simulator and the dashboard all call these functions.
#
# Rank order (NVIDIA/Megatron-LM megatron/core/parallel_state.py, initialize_model_parallel,
# default order "tp-cp-ep-dp-pp"; RankGenerator keeps CP only in the dense generator and EP only
# in the expert one): dense rank = tp + TP·(cp + CP·(dp + DP·pp)), expert rank = etp + ETP·(ep +
# EP·(edp + EDP·pp)). The innermost dimensions hold contiguous ranks, so they stay inside a node.
#
# Assumptions, stated once: balanced routing (the paper benchmarks with capacity factor 1);
# backward = 2 × forward compute and the same collectives as forward; collectives are not
# overlapped with compute except the CP ring (overlapped with attention), TP collectives when
# Megatron's --tp-comm-overlap is on (hidden behind the attention and FFN GEMMs of the same layer
# as far as they last; the backward exposes what the forward does) and the distributed
# optimizer's gradient reduce-scatter / parameter all-gather (overlapped with the last backward /
# first forward micro-batch, Megatron's --overlap-grad-reduce / --overlap-param-gather); with
# ETP > 1 an expert's kernel takes 1/ETP of its full-width time.

GRAD_BYTES = 4.0                  # fp32 main gradients (Megatron's default; --grad-reduce-in-bf16 is opt-in)
OPTIMIZER_STATE_BYTES = 12.0      # fp32 master weights + Adam m and v
OPTIMIZER_STEP_BYTES = 30.0       # HBM bytes an Adam step touches per parameter (read/write states, grad, bf16 copy)
# NVIDIA/Megatron-LM docs/user-guide/features/dist_optimizer.md: bf16 params with fp32 grads take
# 18 bytes/param without the distributed optimizer and 6 + 12/d with it.
ATTENTION_ACT_PER_HIDDEN = 15.0   # bytes per token per hidden element kept by attention (11) and the two norms (4)
                                  # (Korthikanti et al. 2022, the non-MLP part of 34·s·b·h, flash attention)
SERVE_MEMORY_FRACTION = 0.9       # vLLM's default --gpu-memory-utilization


@dataclass(frozen=True)
class ParallelMapping:
    """Attention layers on ``tp × cp × dp × pp``, MoE layers on ``etp × ep × edp × pp`` (same PP);
    ``vpp`` virtual pipeline stages per pipeline rank (interleaved 1F1B)."""

    tp: int
    cp: int
    dp: int
    pp: int
    etp: int
    ep: int
    edp: int
    vpp: int = 1

    @property
    def world(self) -> int:
        """GPUs the attention layers span (TP·CP·DP·PP)."""
        return self.tp * self.cp * self.dp * self.pp

    @property
    def expert_world(self) -> int:
        """GPUs the MoE layers span (ETP·EP·EDP·PP); equals ``world`` in a valid mapping."""
        return self.etp * self.ep * self.edp * self.pp

    def label(self) -> str:
        return (f"TP{self.tp}·CP{self.cp}·DP{self.dp}·PP{self.pp} | ETP{self.etp}·EP{self.ep}·EDP{self.edp}"
                + (f" | VPP{self.vpp}" if self.vpp > 1 else ""))


@dataclass(frozen=True)
class GroupSpan:
    """One kind of process group: ``size`` ranks; ``nodes`` the most nodes any one group spans."""

    size: int
    nodes: int

    @property
    def scope(self) -> str:
        """``intra_node`` when every group stays inside one node's NVLink domain, else ``inter_node``."""
        return "intra_node" if self.nodes <= 1 else "inter_node"


def group_spans(mapping: ParallelMapping, devices_per_node: int) -> dict[str, GroupSpan]:
    """Where each process group lands under Megatron's default rank order (see the section
    header): ``tp``, ``cp``, ``dp``, ``dp_cp`` (dense gradient group), ``pp``, ``etp``, ``ep``, ``edp``."""
    m = mapping
    return _group_spans((m.tp, m.cp, m.dp, m.pp, m.etp, m.ep, m.edp), devices_per_node)


def _group_spans(dims: tuple[int, ...], devices_per_node: int) -> dict[str, GroupSpan]:
    tp, cp, dp, pp, etp, ep, edp = dims
    world = tp * cp * dp * pp
    # A group is an arithmetic progression of ranks: (stride, size) from the rank formulas above.
    return {"tp": _span(1, tp, world, devices_per_node), "cp": _span(tp, cp, world, devices_per_node),
            "dp": _span(tp * cp, dp, world, devices_per_node), "dp_cp": _span(tp, cp * dp, world, devices_per_node),
            "pp": _span(tp * cp * dp, pp, world, devices_per_node), "etp": _span(1, etp, world, devices_per_node),
            "ep": _span(etp, ep, world, devices_per_node), "edp": _span(etp * ep, edp, world, devices_per_node)}


@lru_cache(maxsize=4096)
def _span(stride: int, size: int, world: int, devices_per_node: int) -> GroupSpan:
    """The groups {r, r + stride, …, r + (size−1)·stride} that tile ``world`` ranks: the most
    nodes one of them touches."""
    ranks = np.arange(world).reshape(world // (stride * size), size, stride)
    nodes = ranks // devices_per_node
    return GroupSpan(size, int((1 + (np.diff(nodes, axis=1) != 0).sum(axis=1)).max()))


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

    def scaled(self, compute: float, comm: float) -> "PassCost":
        """This pass with compute times × ``compute`` and communication × ``comm`` (the exposed
        CP ring follows compute: it hides behind attention)."""
        return PassCost(self.attention * compute, self.moe_compute * compute, self.other_compute * compute,
                        self.tp_comm * comm, self.cp_ring * compute, self.ep_all_to_all * comm, self.etp_comm * comm)


def kv_split(model: ModelSpec, tp: int) -> int:
    """How many ways TP splits the KV cache: GQA heads split up to their count (beyond it
    they are replicated); MLA's latent cache is replicated on every TP rank."""
    return min(tp, model.attention.num_kv_heads) if model.attention.kind == "gqa" else 1


def attention_shard_time(cm: CostModel, mapping: ParallelMapping, tokens: float, context: float, phase: str) -> float:
    """One layer's attention forward on one GPU: ``tokens`` per TP group (heads / TP), each
    attending to ``context`` tokens. When TP exceeds the KV heads (or for MLA's latent cache)
    the KV cache is replicated, so each GPU reads more of it than 1/TP."""
    m, a = cm.model, cm.model.attention
    time = cm.attention_time(tokens, context, phase) / mapping.tp
    split = kv_split(m, mapping.tp)
    if split < mapping.tp:
        kv_read = a.kv_cache_elems_per_token() * m.weight_bytes * context * (tokens if phase == "decode" else 1.0)
        time += kv_read * (1.0 / split - 1.0 / mapping.tp) / cm.hbm
    return time


def expert_shard(cm: CostModel, mapping: ParallelMapping, tokens: float) -> tuple[float, float]:
    """One MoE layer's routed experts on one GPU when its attention TP group holds ``tokens``
    tokens: (token-choices the GPU computes, seconds of its expert kernel, forward). Each GPU
    keeps E/EP experts at 1/ETP width and computes tokens/TP × top_k × ETP choices (balanced)."""
    m = cm.model
    choices = tokens / mapping.tp * m.top_k * mapping.etp
    local = m.num_experts // mapping.ep
    kernel = float(cm.device_compute(np.full((1, local), choices / local))[0]) / mapping.etp
    return choices, kernel


def forward_pass(cm: CostModel, mapping: ParallelMapping, tokens: float, context: float, phase: str,
                 spans: dict[str, GroupSpan], head_tokens: float, sequence_parallel: bool,
                 tp_comm_overlap: bool = False) -> PassCost:
    """One forward pass through the slowest (last) pipeline stage on one GPU: ``tokens`` per
    attention TP group (a CP chunk of the micro-batch in training), each attending to ``context``
    tokens. With sequence parallelism TP exchanges all-gather + reduce-scatter per block, without
    it one all-reduce (with ``tp_comm_overlap`` only the part longer than the layer's attention
    and FFN GEMMs shows); the EP all-to-all moves ``tokens / tp × top_k`` token copies per GPU."""
    m, t = cm.model, mapping
    a = m.attention
    row = m.hidden_size * cm.opt.act_bytes
    sp_tokens = tokens / t.tp
    stage = 1.0 / t.pp

    attention = attention_shard_time(cm, t, tokens, context, phase)
    choices, experts = expert_shard(cm, t, tokens)
    router = float(cm.dense_time(2.0 * m.hidden_size * m.num_experts * sp_tokens, m.router_params() * m.weight_bytes))
    shared = float(cm.shared_expert_time(tokens)) / t.tp
    dense_layers = m.num_layers - m.num_moe_layers
    dense_ffn = cm.dense_ffn_time(tokens) / t.tp if dense_layers else 0.0
    head = float(cm.dense_time(2.0 * m.hidden_size * m.vocab_size * head_tokens / t.tp,
                               m.vocab_size * m.hidden_size * m.weight_bytes / t.tp))

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

    ring = 0.0
    if t.cp > 1:
        kv_elems = 2 * a.num_kv_heads * a.head_dim if a.kind == "gqa" else a.num_heads * (a.qk_head_dim + a.v_dim)
        kv_bytes = kv_elems / t.tp * cm.opt.act_bytes * tokens * t.cp    # the whole sequence's K and V of this TP rank
        ring = m.num_layers * max(0.0, _ring_time(cm, "all_gather", kv_bytes, spans["cp"]) - attention)

    a2a = 2 * alltoall_group_time(cm, sp_tokens * m.top_k * row, spans["ep"])
    etp = (_ring_time(cm, "all_gather", choices * row, spans["etp"])
           + _ring_time(cm, "reduce_scatter", choices * row, spans["etp"])) if t.etp > 1 else 0.0
    return PassCost(
        attention=m.num_layers * attention * stage,
        moe_compute=m.num_moe_layers * (experts + router + shared) * stage,
        other_compute=dense_layers * dense_ffn * stage + head,
        tp_comm=tp_comm * stage, cp_ring=ring * stage,
        ep_all_to_all=m.num_moe_layers * a2a * stage, etp_comm=m.num_moe_layers * etp * stage)


def train_forward_pass(cm: CostModel, mapping: ParallelMapping, setup: TrainSetup) -> PassCost:
    """Forward pass of one training micro-batch through the last pipeline stage (it does not
    depend on vpp, recompute or the optimizer, so a search can price it once per layout)."""
    spans = group_spans(mapping, cm.hw.devices_per_node)
    tokens = setup.micro_batch * setup.seq_len / mapping.cp
    return forward_pass(cm, mapping, tokens, setup.seq_len, "prefill", spans, tokens, mapping.tp > 1,
                        setup.tp_comm_overlap)


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
               forward: PassCost | None = None) -> TrainStep:
    """Predicted training step under ``mapping`` with 1F1B (interleaved when vpp > 1):
    step = (m + (pp−1)/vpp) × t_mb + exposed gradient sync + optimizer step, where t_mb is one
    micro-batch's forward + backward (+ a recomputed forward) through the last stage plus its
    pipeline sends; (pp−1)/vpp × t_mb is the bubble. ``forward`` may be passed in when already
    priced by :func:`train_forward_pass` for this mapping's layout and micro-batch size."""
    t = mapping
    spans = group_spans(t, cm.hw.devices_per_node)
    fwd = forward or train_forward_pass(cm, t, setup)
    bwd = fwd.scaled(compute=2.0, comm=1.0)
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
    """Serving: requests of ``context`` tokens; ``concurrency`` sequences decode together over
    the whole deployment; a prefill step takes ``prefill_batch`` prompts per attention replica."""

    context: int
    concurrency: int
    prefill_batch: int = 1


@dataclass
class ServeStep:
    """Predicted serving figures: time to first token of a prefill batch (s), prefill throughput
    (tokens/s, pipelined), time per output token (s) and decode throughput (tokens/s) at the
    requested concurrency, and the KV-cache capacity (tokens, whole deployment)."""

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

    @property
    def fits(self) -> bool:
        return self.kv_capacity_tokens >= self.kv_needed_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"ttft_s": self.ttft, "prefill_tokens_per_s": self.prefill_tokens_per_s, "tpot_s": self.tpot,
                "decode_tokens_per_s": self.decode_tokens_per_s, "kv_capacity_tokens": self.kv_capacity_tokens,
                "kv_needed_tokens": self.kv_needed_tokens, "prefill_breakdown_s": dict(self.prefill),
                "decode_breakdown_s": dict(self.decode), "memory": self.memory.to_dict(),
                "groups": {k: {"size": s.size, "nodes": s.nodes, "scope": s.scope} for k, s in self.spans.items()}}


def serve_step(cm: CostModel, mapping: ParallelMapping, setup: ServeSetup) -> ServeStep:
    """Serving under ``mapping`` (attention TP × DP × PP, MoE ETP × EP × EDP; DP attention
    replicas run in lock-step, synchronised by the EP all-to-all). Prefill: each replica runs
    ``prefill_batch`` prompts; TTFT = pp × stage time, throughput pipelined over stages. Decode:
    ``concurrency`` sequences spread over DP replicas and split into pp micro-batches in flight;
    TPOT = pp × stage time, throughput = concurrency / TPOT. Weights, a prefill activation
    workspace and the KV cache share 90% of HBM."""
    m, t = cm.model, mapping
    spans = group_spans(t, cm.hw.devices_per_node)
    prompts = setup.prefill_batch * setup.context
    prefill = forward_pass(cm, t, prompts, setup.context, "prefill", spans, setup.prefill_batch, False)
    seqs = -(-setup.concurrency // t.dp) / t.pp
    decode = forward_pass(cm, t, seqs, setup.context, "decode", spans, seqs, False)
    weights = cm.memory(m.num_experts // t.ep, 1, batch_tokens_per_device=prompts / t.tp, training=False,
                        non_expert_shards=t.tp * t.pp, expert_shards=t.etp * t.pp)
    kv_per_token = m.kv_cache_bytes_per_token() / (t.pp * kv_split(m, t.tp))
    free = SERVE_MEMORY_FRACTION * weights.capacity - (weights.peak - weights.kv_cache)
    per_replica = max(free, 0.0) / kv_per_token
    needed = -(-setup.concurrency // t.dp) * setup.context
    memory = replace(weights, kv_cache=needed * kv_per_token)
    return ServeStep(ttft=t.pp * prefill.total, prefill_tokens_per_s=t.dp * prompts / prefill.total,
                     tpot=t.pp * decode.total, decode_tokens_per_s=setup.concurrency / (t.pp * decode.total),
                     kv_capacity_tokens=per_replica * t.dp, kv_needed_tokens=needed * t.dp,
                     prefill=prefill.parts(), decode=decode.parts(), memory=memory, spans=spans)
