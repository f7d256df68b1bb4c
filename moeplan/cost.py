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
4. **Dense parts** — attention (prefill and decode, GQA or MLA), dense FFN layers, shared
   experts, router and LM head. Their GEMMs (:mod:`moeplan.gemms`) come from the profile's
   measured ``gemm`` grid when it has one (:meth:`CostModel.gemm_time`: the rate of the measured
   shapes around each GEMM's own (k, n), so a thin TP shard is not priced at the square matmul's
   rate), else from the roofline on the 8192³ matmul rate.
5. **Memory** — :meth:`CostModel.memory`: weights with replicas, KV cache, activations and, for
   training, gradients and optimizer states; :meth:`MemoryReport.check` rejects a plan that
   does not fit, with the numbers.
6. **One forward step** — :meth:`CostModel.step_cost` composes the parts above into a
   :class:`StepCost` (attention, dense, routing, experts, shared experts, dispatch, combine,
   head, norms, overheads; ``overheads`` is the profile's fitted ``forward_step`` correction,
   see :mod:`moeplan.calibration`) for the simulator, the single-device forward check, elastic latency
   and the cache planner's step time. The whole step under a parallel mapping (training and
   serving with TP/CP/PP/EP/ETP collectives) is :mod:`moeplan.parallel_step`, built on the
   same primitives (:meth:`CostModel.head_time`, :meth:`CostModel.kv_capacity_tokens`).

Units: seconds, bytes, FLOPs, tokens. Activations are bf16 (2 bytes) unless set otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from moeplan.attention_tables import AttentionShape, AttentionTables
from moeplan.errors import InputError
from moeplan.gemms import Gemm, GemmCurves, attention_gemms, swiglu_gemms
from moeplan.hardware import Correction, Curve, HardwareProfile
from moeplan.model import ModelSpec

LAUNCHES_PER_EXPERT = 5     # runtime loop kernel per expert: fused gate/up GEMM, silu, mul, down GEMM, copy out
LAUNCHES_PER_GROUPED = 5    # runtime grouped kernel: group offsets to the device, 2 grouped GEMMs, silu, mul
LAUNCHES_PER_ROUTING = 14   # router GEMM, softmax, top-k, sort, bincount, host copy, gather, scale, index_add
ACTIVATION_FACTOR = 34      # bytes of live activations per token per hidden element in training
                            # without recompute (Korthikanti et al. 2022: 34·s·b·h per layer)
SERVE_MEMORY_FRACTION = 0.9  # share of HBM a server gives weights + KV cache (vLLM's --gpu-memory-utilization)


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


@dataclass(frozen=True)
class StepCost:
    """Seconds of one forward step of the whole model, by part. MoE phases end at a collective,
    so each is the slowest device's: ``dispatch`` and ``combine`` are the all-to-alls (the part of
    the dispatch overlapped with compute left out), ``experts``, ``shared_experts`` and
    ``routing`` the slowest device's compute phase split by what it ran. ``attention`` (all
    layers), ``dense`` (dense FFN layers), ``norms`` and ``head`` (the LM head) are per device;
    ``overheads`` is per-step time outside all of them: the profile's measured ``forward_step``
    correction (per-layer host and launch time, rate errors), 0 without one. Averaged over batches when priced from
    a trace."""

    attention: float
    dense: float
    routing: float
    experts: float
    shared_experts: float
    dispatch: float
    combine: float
    head: float
    norms: float
    overheads: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.parts().values())

    @property
    def moe(self) -> float:
        """The MoE layers' share: routing, experts, shared experts, dispatch and combine."""
        return self.routing + self.experts + self.shared_experts + self.dispatch + self.combine

    def parts(self) -> dict[str, float]:
        """The parts by name (seconds)."""
        return {"attention": self.attention, "dense": self.dense, "routing": self.routing, "experts": self.experts,
                "shared_experts": self.shared_experts, "dispatch": self.dispatch, "combine": self.combine,
                "head": self.head, "norms": self.norms, "overheads": self.overheads}

    def to_dict(self) -> dict[str, float]:
        return {**self.parts(), "total": self.total}


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
        self._compute_correction = hardware.find_correction("expert_compute", hidden=model.hidden_size,
                                                            ffn=model.expert_ffn, kernel=self.opt.kernel)
        self._gemms = GemmCurves.of(hardware)
        self.attention_tables = AttentionTables.of(hardware)

    def with_options(self, **changes: Any) -> "CostModel":
        """The same model and hardware priced with these :class:`CostOptions` fields changed."""
        return CostModel(self.model, self.hw, replace(self.opt, **changes))

    def with_cluster(self, devices: int) -> "CostModel":
        """The same model, hardware and options on ``devices`` devices (nodes filled as
        :meth:`HardwareProfile.with_cluster` fills them)."""
        return CostModel(self.model, self.hw.with_cluster(devices=devices), self.opt)

    # ---- 1. kernels ---------------------------------------------------------------------------
    @property
    def compute_measured(self) -> bool:
        """True when expert time comes from a measured curve for this model's expert shape."""
        return (self._grouped is not None) if self.opt.kernel == "grouped" else self._loop_curve is not None

    def expert_roofline(self, tokens: np.ndarray | float) -> np.ndarray:
        """Time of one expert at ``tokens`` tokens when no expert curve was measured for its shape,
        without launch overhead (seconds): its two GEMMs from the measured ``gemm`` grid plus the
        SwiGLU's bytes when the profile has the grid, else the roofline."""
        m = self.model
        n = np.asarray(tokens, dtype=np.float64)
        if self._gemms is not None:
            act = self.dense_time(0.0, 3.0 * n * m.expert_ffn * self.opt.act_bytes, 0)
            return self.gemms_time(n, swiglu_gemms("expert", m.hidden_size, m.expert_ffn, 1)) + act
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
        """Expert compute per device for tokens per slot [..., devices, slots], with the chosen kernel;
        corrected by the profile's ``expert_compute`` correction (:meth:`Correction.expert_time`)
        when ``moeplan calibrate`` fitted one for this expert shape and kernel."""
        n = np.asarray(slot_tokens, dtype=np.float64)
        t = self.grouped_time(n) if self.opt.kernel == "grouped" else self.expert_time(n).sum(axis=-1)
        if self._compute_correction is None:
            return t
        return self._compute_correction.expert_time(t, n)

    def step_correction(self, phase: str) -> Correction | None:
        """The profile's ``forward_step`` correction for this model and phase (one fitted for this
        model first, else one fitted for every model), or None."""
        hw, name = self.hw, self.model.name
        return (hw.find_correction("forward_step", model=name, phase=phase)
                or hw.find_correction("forward_step", model="*", phase=phase))

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

    @property
    def gemms_measured(self) -> bool:
        """True when the profile has a measured ``gemm`` grid (dense GEMMs priced by their shape)."""
        return self._gemms is not None

    def gemm_time(self, tokens: np.ndarray | float, k: int, n: int) -> np.ndarray:
        """One dense GEMM x[tokens, k]·W[n, k]ᵀ on one device: from the measured ``gemm`` grid
        around (k, n) (:class:`moeplan.gemms.GemmCurves`) when the profile has one, else the
        roofline with one launch; 0 at 0 tokens."""
        m = np.asarray(tokens, dtype=np.float64)
        if self._gemms is not None:
            t = self._gemms.time(m, k, n)
        else:
            nbytes = k * n * self.model.weight_bytes + m * (k + n) * self.opt.act_bytes
            t = self.dense_time(2.0 * m * k * n, nbytes, 1)
        return np.where(m > 0, t, 0.0)

    def gemms_time(self, tokens: np.ndarray | float, gemms: list[Gemm]) -> np.ndarray:
        """Sum of :meth:`gemm_time` over ``gemms`` at ``tokens`` tokens each."""
        return sum((self.gemm_time(tokens, g.k, g.n) for g in gemms), np.zeros_like(np.asarray(tokens, dtype=np.float64)))

    def swiglu_time(self, tokens: np.ndarray, ffn: int, shards: int, name: str) -> np.ndarray:
        """A SwiGLU FFN of width ``ffn`` split ``shards`` ways from the measured GEMM grid, plus
        the activation's bytes (silu and mul: 2 launches)."""
        act = self.dense_time(0.0, 3.0 * tokens * (ffn / shards) * self.opt.act_bytes, 2)
        return self.gemms_time(tokens, swiglu_gemms(name, self.model.hidden_size, ffn, shards)) + act

    def expert_width_share(self, tokens_per_expert: float, ways: int) -> float:
        """Share of a full-width routed expert's kernel time that one 1/``ways``-wide slice of it
        (ETP) takes at ``tokens_per_expert`` tokens: the ratio of the two GEMMs' measured times at
        both widths when the profile has a ``gemm`` grid, else 1/``ways``."""
        if ways <= 1:
            return 1.0
        if self._gemms is None:
            return 1.0 / ways
        m, n = self.model, max(tokens_per_expert, 1.0)
        full = float(self.gemms_time(n, swiglu_gemms("expert", m.hidden_size, m.expert_ffn, 1)))
        return float(self.gemms_time(n, swiglu_gemms("expert", m.hidden_size, m.expert_ffn, ways))) / full

    def router_gemm_time(self, tokens: float | np.ndarray) -> np.ndarray:
        """The router's logits GEMM (hidden → experts) alone, at ``tokens`` tokens on one device."""
        m = self.model
        if self._gemms is not None:
            return self.gemm_time(tokens, m.hidden_size, m.num_experts)
        return self.dense_time(2.0 * m.hidden_size * m.num_experts * np.asarray(tokens, dtype=np.float64),
                               m.router_params() * m.weight_bytes)

    def shared_expert_time(self, tokens: np.ndarray | float, shards: int = 1) -> np.ndarray:
        """Shared expert(s) of one MoE layer at ``tokens`` tokens on one device, split ``shards``
        ways (TP)."""
        m = self.model
        if not m.shared_ffn:
            return np.zeros_like(np.asarray(tokens, dtype=np.float64))
        n = np.asarray(tokens, dtype=np.float64)
        if self._gemms is not None:
            return np.where(n > 0, self.swiglu_time(n, m.shared_ffn, shards, "shared"), 0.0)
        flops = 6.0 * m.hidden_size * m.shared_ffn * n
        nbytes = m.shared_params() * m.weight_bytes + n * 2 * m.hidden_size * self.opt.act_bytes
        return np.where(n > 0, self.dense_time(flops, nbytes, 3), 0.0) / shards

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
        tokens (prefill: the sequence so far; decode: the KV cache). The core (scores, softmax,
        values) from the measured curve when the profile has one for this model's attention shape;
        the projections from the measured ``gemm`` grid when the profile has one (a measured core
        without a grid leaves them out, as before); else the roofline of both together."""
        m = self.model
        if self._gemms is not None:
            return self.attention_core_time(tokens, context, phase) + float(self.gemms_time(tokens, attention_gemms(m, 1)))
        core = self._measured_attention_core(tokens, context, phase)
        if core is not None:
            return core
        score_flops, kv_bytes = self._attention_core_work(tokens, context, phase)
        proj_flops = 2.0 * m.attention.params(m.hidden_size) * tokens
        nbytes = m.attention.params(m.hidden_size) * m.weight_bytes + kv_bytes
        return float(self.dense_time(proj_flops + score_flops, nbytes, 6))

    def attention_core_time(self, tokens: float, context: float, phase: str) -> float:
        """One layer's attention without its projections (scores, softmax, values: what the
        profiler's attention curves time through SDPA): the measured curve, else the roofline
        of the score FLOPs and the KV-cache bytes."""
        core = self._measured_attention_core(tokens, context, phase)
        if core is not None:
            return core
        score_flops, kv_bytes = self._attention_core_work(tokens, context, phase)
        return float(self.dense_time(score_flops, kv_bytes, 4))

    def attention_train_core_time(self, tokens: float, context: float) -> float | None:
        """Forward + backward of one layer's attention core in training (causal, ``tokens``
        queries each attending to ``context`` tokens) from the profile's measured
        ``attention_train`` curve of this model's attention shape; None without one."""
        return self._measured_attention_core(tokens, context, "train")

    def _measured_attention_core(self, tokens: float, context: float, phase: str) -> float | None:
        """Seconds of the attention core in ``phase`` (prefill, decode or train) from the profile's
        measured ``attention_<phase>`` curve of this model's attention shape (per sequence at
        ``context``, scaled to ``tokens``), else, for prefill and decode, from its imported per-GPU
        attention tables (:class:`moeplan.attention_tables.AttentionTables`, all heads on one GPU,
        KV cache in the weights' dtype); None without either."""
        kind = f"attention_{phase}"
        curve = self.hw.find_curve(kind, signature=attention_signature(self.model))
        if curve is None:
            shape = AttentionShape.of(self.model, 1, self.model.weight_bytes)
            if (phase == "train" or self.attention_tables is None or not self.attention_tables.has(phase, shape)
                    or context <= 0):
                return None
            return self.attention_tables.core_time(phase, shape, tokens, context)
        seqs = float(curve.key.get("batch", 1))
        per_sequence = context if phase != "decode" else 1.0
        return float(curve(max(context, 1.0))) * max(tokens / per_sequence, 1e-9) / seqs

    def _attention_core_work(self, tokens: float, context: float, phase: str) -> tuple[float, float]:
        """(score FLOPs, KV-cache bytes read) of one layer's attention core on one device."""
        m = self.model
        a = m.attention
        score_flops = 2.0 * a.num_heads * (a.qk_head_dim + a.v_dim) * tokens * context * (0.5 if phase == "prefill" else 1.0)
        kv_bytes = a.kv_cache_elems_per_token() * m.weight_bytes * context * (tokens if phase == "decode" else 1.0)
        return score_flops, kv_bytes

    def dense_ffn_time(self, tokens: float, shards: int = 1) -> float:
        """A dense (non-MoE) layer's FFN on one device, split ``shards`` ways (TP)."""
        m = self.model
        if self._gemms is not None:
            return float(self.swiglu_time(np.asarray(float(tokens)), m.dense_ffn, shards, "dense"))
        return float(self.dense_time(6.0 * m.hidden_size * m.dense_ffn * tokens,
                                     m.dense_ffn_params() * m.weight_bytes, 3)) / shards

    def head_time(self, tokens: float | np.ndarray, shards: int = 1) -> np.ndarray:
        """The LM head on one device: ``tokens`` rows through ``vocab × hidden`` weights split
        ``shards`` ways (TP)."""
        m = self.model
        if self._gemms is not None:
            return self.gemm_time(tokens, m.hidden_size, max(m.vocab_size // shards, 1))
        return self.dense_time(2.0 * m.hidden_size * m.vocab_size * np.asarray(tokens, dtype=np.float64) / shards,
                               m.vocab_size * m.hidden_size * m.weight_bytes / shards, 1)

    def norms_time(self, tokens: float) -> float:
        """The model's RMSNorms on one device (two per layer and the final one): memory-bound."""
        m = self.model
        return (2 * m.num_layers + 1) * float(self.dense_time(0.0, 4.0 * tokens * m.hidden_size * self.opt.act_bytes, 1))

    def host_copy_time(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` from pinned host memory to one device: the profile's
        measured ``host_copy`` curve (h2d, pinned) when it has one, else bytes / the datasheet
        H2D bandwidth."""
        curve = self.hw.find_curve("host_copy", direction="h2d", memory="pinned")
        if curve is not None:
            return float(curve(nbytes))
        return nbytes / self.hw.device.h2d_bandwidth.value

    def kv_capacity_tokens(self, weights: MemoryReport, kv_bytes_per_token: float | None = None) -> float:
        """KV-cache tokens one device holds once its weights and workspace (``weights``, without
        a KV cache) are in: :data:`SERVE_MEMORY_FRACTION` of HBM minus the rest, over the bytes
        one token's cache takes on it (default: the whole model's, unsharded)."""
        per_token = kv_bytes_per_token or self.model.kv_cache_bytes_per_token()
        free = SERVE_MEMORY_FRACTION * weights.capacity - (weights.peak - weights.kv_cache)
        return max(free, 0.0) / per_token

    def step_cost(self, tokens: float, context: float, phase: str, moe_layers: list[LayerCost],
                  include_head: bool = True) -> StepCost:
        """One forward step on each device: ``tokens`` new tokens per device attending to
        ``context`` tokens, the MoE layers priced by :meth:`moe_layer` (one LayerCost per MoE
        layer, with or without leading batch dimensions; its parts are averaged over them)."""
        m = self.model
        routing = experts = shared = dispatch = combine = 0.0
        for lc in moe_layers:
            work = lc.work
            slowest = work.argmax(axis=-1)[..., None]
            w_max = np.take_along_axis(work, slowest, axis=-1)[..., 0]
            c_max = lc.combine.max(axis=-1)
            experts += float(np.mean(np.take_along_axis(lc.compute, slowest, axis=-1)))
            shared += float(np.mean(np.take_along_axis(lc.shared, slowest, axis=-1)))
            routing += float(np.mean(np.take_along_axis(lc.routing, slowest, axis=-1)))
            combine += float(np.mean(c_max))
            dispatch += float(np.mean(lc.time - w_max - c_max))
        step = StepCost(attention=m.num_layers * self.attention_time(tokens, context, phase),
                        dense=len(m.dense_layers) * self.dense_ffn_time(tokens), routing=routing, experts=experts,
                        shared_experts=shared, dispatch=dispatch, combine=combine,
                        head=float(self.head_time(tokens)) if include_head else 0.0, norms=self.norms_time(tokens))
        correction = self.step_correction(phase)
        if correction is None:
            return step
        device = step.total - step.dispatch - step.combine
        corrected = max(correction.scale * device + correction.offset_per_layer_s * m.num_layers, 0.0)
        return replace(step, overheads=corrected - device)

    def forward_time(self, tokens: float, context: float, phase: str, expert_tokens: np.ndarray,
                     include_head: bool = True) -> StepCost:
        """One forward step of the whole model on ONE device holding every expert (the single-GPU
        case): ``tokens`` new tokens attending to ``context`` tokens; ``expert_tokens[moe_layer,
        expert]`` token-choices per expert."""
        counts = np.asarray(expert_tokens, dtype=np.float64)
        layers = [self.moe_layer(np.full((1, 1), counts[layer].sum()), counts[layer][None, :],
                                 home_tokens=np.full(1, float(tokens))) for layer in range(counts.shape[0])]
        return self.step_cost(tokens, context, phase, layers, include_head)

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


class PricedProblem:
    """Base of a planning problem priced by the caller's :class:`CostModel` (held in ``cost``):
    the model and the hardware are the cost model's, never a second copy."""

    cost: CostModel

    @property
    def model(self) -> ModelSpec:
        return self.cost.model

    @property
    def hardware(self) -> HardwareProfile:
        return self.cost.hw


def attention_signature(model: ModelSpec) -> str:
    """A key naming an attention shape, shared by the profiler's curves and the cost model."""
    a = model.attention
    if a.kind == "mla":
        return f"mla-h{model.hidden_size}-n{a.num_heads}-kv{a.kv_lora_rank}-r{a.qk_rope_head_dim}-v{a.v_head_dim}"
    return f"gqa-h{model.hidden_size}-n{a.num_heads}-kv{a.num_kv_heads}-d{a.head_dim}"
