"""PlacementProblem: everything a placement solver needs, as plain arrays.

A problem is the traffic of a fitted trace (per-layer expert load, layer-to-layer token flows and
within-layer co-activation), the cluster shape (devices, devices per node, physical slots per
device) and the objective's weights, which come from the cost model:

    objective (seconds per step) = Σ_layers compute · max_device load
                                 + Σ_layer pairs Σ_{d'≠d} flow[d', d] · link(d', d) / devices

``load`` is token-choices per device in one step, ``flow[d', d]`` the token-rows that leave an
expert on device d' at layer l for an expert on device d at layer l+1 (context-coherent
execution: a token continues from where its last experts ran, so each of its k rows at layer
l+1 comes from there), ``link`` the seconds one token-row takes over an intra-node or an
inter-node link. Where a token is between layers is the flow model:

* ``"top1"`` (default, as the simulator's ExFlow mode): where its top-1 expert ran (the k outputs
  are combined there), so i sends j one row for every token whose top-1 at l is i and that
  chooses j at l+1;
* ``"spread"``: over the devices of its k experts, 1/k each, so expert i at l sends expert j at
  l+1 ``transition_counts[i, j] / k`` rows (``TraceStats.transition_counts``). Dividing the traffic by the device count turns the cluster's total into the
per-device time of a balanced all-to-all. Trace counts are scaled to one step of
``tokens_per_device`` tokens per device.

Routing among replicas follows :class:`moeplan.plan.Placement`: a token-choice of expert e is
served on device d with probability ``expert_device_share[e, d]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplan.cost import CostModel
from moeplan.errors import InputError, check_memory as check_free_memory
from moeplan.plan import DISPATCH_MODELS, Placement
from moeplan.stats import TraceStats

from .replication import replica_counts

DEFAULT_TOKENS_PER_DEVICE = 4096
FLOW_MODELS = ("top1", "spread")


@dataclass(frozen=True)
class ObjectiveWeights:
    """Seconds per token-choice: ``compute`` of expert FFN work on one device, ``intra_node`` and
    ``inter_node`` to move one token-row between two devices; ``step_scale`` turns trace counts
    into one step's counts (step tokens / trace tokens)."""

    compute: float
    intra_node: float
    inter_node: float
    step_scale: float

    def link_matrix(self, devices: int, devices_per_node: int) -> np.ndarray:
        """[devices, devices] seconds per token moved from row to column (0 on the diagonal)."""
        node = np.arange(devices) // devices_per_node
        same_node = node[:, None] == node[None, :]
        w = np.where(same_node, self.intra_node, self.inter_node)
        np.fill_diagonal(w, 0.0)
        return w


@dataclass(frozen=True)
class PlacementProblem:
    """A placement instance (see the module docstring).

    Attributes:
        load: float [layers, experts] token-choices per expert in the fitted trace.
        flows: float [layers-1, experts, experts] tokens from expert i at layer l to expert j at
            layer l+1 (transition counts / top_k, so each row of a token carries one token).
        coactivation: float [layers, experts, experts] tokens choosing both i and j (0 diagonal).
        num_devices, devices_per_node, slots_per_device: the cluster and its slots.
        top_k: experts per token per layer.
        tokens: tokens in the fitted trace.
        weights: the objective's weights.
        expert_bytes: bytes of one expert's weights in one layer (for moves).
        n_group: expert groups (contiguous id blocks) of grouped routing; 1 when ungrouped.
        row_bytes: bytes of one token's activation row (hidden × activation bytes).
        flow_model: how ``flows`` were counted, "top1" or "spread" (module docstring).
        name: a label for reports.
        dispatch: how the runtime splits an expert's tokens among its replicas
            (:data:`moeplan.plan.DISPATCH_MODELS`, :mod:`moeplan.dispatch`); solvers that set
            token shares do so only under ``weighted``.
        workloads: float [workloads, layers, experts] the separate workloads ``load`` averages
            (recorded load files, or windows of a trace), for robust placement; None for one.
    """

    load: np.ndarray
    flows: np.ndarray
    coactivation: np.ndarray
    num_devices: int
    devices_per_node: int
    slots_per_device: int
    top_k: int
    tokens: int
    weights: ObjectiveWeights
    expert_bytes: float = 0.0
    n_group: int = 1
    row_bytes: float = 0.0
    flow_model: str = "top1"
    name: str = ""
    dispatch: str = "weighted"
    workloads: np.ndarray | None = None

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    @property
    def num_nodes(self) -> int:
        return self.num_devices // self.devices_per_node

    @property
    def num_physical(self) -> int:
        return self.num_devices * self.slots_per_device

    @property
    def node_of(self) -> np.ndarray:
        """[devices]: node of each device."""
        return np.arange(self.num_devices) // self.devices_per_node

    def link_matrix(self) -> np.ndarray:
        return self.weights.link_matrix(self.num_devices, self.devices_per_node)

    def validate(self) -> "PlacementProblem":
        check_cluster(self.num_experts, self.num_devices, self.devices_per_node, self.slots_per_device)
        nl, e = self.load.shape
        if self.flows.shape != (max(nl - 1, 0), e, e):
            raise InputError(f"flows must be [{nl - 1}, {e}, {e}], got {self.flows.shape}", field="flows")
        if self.coactivation.shape != (nl, e, e):
            raise InputError(f"coactivation must be [{nl}, {e}, {e}], got {self.coactivation.shape}",
                             field="coactivation")
        if not np.all(np.isfinite(self.load)) or self.load.min() < 0:
            raise InputError("expert loads must be finite and ≥ 0", field="load")
        if self.dispatch not in DISPATCH_MODELS:
            raise InputError(f"unknown dispatch model {self.dispatch!r}", field="dispatch",
                             fix=f"use one of: {', '.join(DISPATCH_MODELS)}")
        if self.workloads is not None and self.workloads.shape[1:] != self.load.shape:
            raise InputError(f"workloads must be [n, {nl}, {e}], got {self.workloads.shape}", field="load")
        return self

    @classmethod
    def from_arrays(cls, load: np.ndarray, num_devices: int, slots_per_device: int, devices_per_node: int | None = None,
                    flows: np.ndarray | None = None, coactivation: np.ndarray | None = None, top_k: int = 1,
                    weights: ObjectiveWeights | None = None, expert_bytes: float = 1.0, n_group: int = 1,
                    name: str = "") -> "PlacementProblem":
        """A problem from raw arrays (hand-made cases and tests); missing traffic is zero and the
        default weights count one token-choice of compute as 1, an intra-node hop as 0.1 and an
        inter-node hop as 1 (per device)."""
        ld = np.asarray(load, dtype=np.float64)
        if ld.ndim == 1:
            ld = ld[None, :]
        nl, e = ld.shape
        per = devices_per_node or num_devices
        return cls(
            load=ld,
            flows=np.zeros((max(nl - 1, 0), e, e)) if flows is None else np.asarray(flows, dtype=np.float64),
            coactivation=np.zeros((nl, e, e)) if coactivation is None else np.asarray(coactivation, dtype=np.float64),
            num_devices=num_devices, devices_per_node=per, slots_per_device=slots_per_device, top_k=top_k,
            tokens=max(int(round(ld[0].sum() / max(top_k, 1))), 1),
            weights=weights or ObjectiveWeights(1.0, 0.1, 1.0, 1.0), expert_bytes=expert_bytes, n_group=n_group,
            name=name,
        ).validate()

    @classmethod
    def build(cls, cost: CostModel, stats: TraceStats, slots_per_device: int,
              tokens_per_device: int = DEFAULT_TOKENS_PER_DEVICE, flow_model: str = "top1") -> "PlacementProblem":
        """A problem for ``cost.model`` on ``cost.hw`` (its cluster shape: use ``with_cluster``
        first) with the traffic of ``stats``, priced with ``cost``'s options; checks that the
        slots fit in device memory."""
        if flow_model not in FLOW_MODELS:
            raise InputError(f"unknown flow model '{flow_model}'", field="flows",
                             fix=f"use one of: {', '.join(FLOW_MODELS)}")
        model, hardware = cost.model, cost.hw
        trace = stats.trace
        trace.check_model(model.num_experts, model.num_moe_layers, model.top_k)
        d, per = hardware.num_devices, hardware.devices_per_node
        check_cluster(model.num_experts, d, per, slots_per_device)
        check_memory(cost, slots_per_device, d, tokens_per_device)
        k = model.top_k
        nl = trace.num_layers
        check_free_memory(device_pair_bytes(d, nl), f"placing over {d:,} devices ([layers, devices, devices] "
                          "traffic between them)", "plan for fewer devices (--gpus)")
        coact = np.stack([stats.coactivation(layer).astype(np.float64) for layer in range(nl)])
        flows = (stats.all_transition_counts.astype(np.float64) / k if flow_model == "spread"
                 else top1_transition_counts(trace.expert_ids, model.num_experts))
        return cls(
            load=stats.load.astype(np.float64), flows=flows, coactivation=coact, num_devices=d, devices_per_node=per,
            slots_per_device=slots_per_device, top_k=k, tokens=trace.num_tokens,
            weights=objective_weights(cost, d, slots_per_device, tokens_per_device, trace.num_tokens),
            expert_bytes=model.expert_bytes(), n_group=model.n_group,
            row_bytes=model.hidden_size * cost.opt.act_bytes, flow_model=flow_model, name=model.name,
        ).validate()

    @classmethod
    def from_loads(cls, cost: CostModel, loads: np.ndarray, slots_per_device: int,
                   tokens_per_device: int = DEFAULT_TOKENS_PER_DEVICE, dispatch: str = "even") -> "PlacementProblem":
        """A problem from recorded loads alone, float [workloads, layers, experts] token-choices
        (no inter-layer traffic: flows and co-activation are zero); ``load`` is their mean with
        each scaled to the same total, ``workloads`` the separate ones."""
        model, hardware = cost.model, cost.hw
        w = np.asarray(loads, dtype=np.float64)
        d, per = hardware.num_devices, hardware.devices_per_node
        check_cluster(model.num_experts, d, per, slots_per_device)
        check_memory(cost, slots_per_device, d, tokens_per_device)
        totals = w.sum(axis=(1, 2), keepdims=True)
        load = (w / np.maximum(totals, 1e-300) * float(totals.mean())).mean(axis=0)
        nl, e = load.shape
        tokens = max(int(round(load.sum() / nl / model.top_k)), 1)
        return cls(
            load=load, flows=np.zeros((max(nl - 1, 0), e, e)), coactivation=np.zeros((nl, e, e)), num_devices=d,
            devices_per_node=per, slots_per_device=slots_per_device, top_k=model.top_k, tokens=tokens,
            weights=objective_weights(cost, d, slots_per_device, tokens_per_device, tokens),
            expert_bytes=model.expert_bytes(), n_group=model.n_group,
            row_bytes=model.hidden_size * cost.opt.act_bytes, name=model.name, dispatch=dispatch,
            workloads=w if w.shape[0] > 1 else None,
        ).validate()


def top1_transition_counts(expert_ids: np.ndarray, num_experts: int, chunk: int = 1 << 17) -> np.ndarray:
    """[layers-1, experts, experts] float: tokens whose top-1 expert at layer l is i and that
    choose j at layer l+1 (any of their top-k)."""
    t, nl, _ = expert_ids.shape
    e = num_experts
    out = np.zeros((max(nl - 1, 0), e * e))
    for layer in range(nl - 1):
        for start in range(0, t, chunk):
            src = expert_ids[start:start + chunk, layer, 0].astype(np.int64)
            dst = expert_ids[start:start + chunk, layer + 1, :].astype(np.int64)
            out[layer] += np.bincount((src[:, None] * e + dst).ravel(), minlength=e * e)
    return out.reshape(-1, e, e)


def check_cluster(num_experts: int, devices: int, devices_per_node: int, slots_per_device: int) -> None:
    """Raise InputError unless the cluster can hold every expert in equal slots per device."""
    if devices < 1 or devices_per_node < 1 or devices % devices_per_node:
        raise InputError(f"{devices} devices do not fill nodes of {devices_per_node}", field="gpus",
                         fix="choose a device count that is a multiple of the devices per node, or set --nodes")
    if slots_per_device < 1:
        raise InputError(f"each device needs at least one expert slot, got {slots_per_device}", field="slots")
    if devices * slots_per_device < num_experts:
        raise InputError(f"too few slots: {devices} devices × {slots_per_device} slots = "
                         f"{devices * slots_per_device} < {num_experts} experts", field="slots",
                         fix=f"use at least {-(-num_experts // devices) * devices} slots or more devices")
    if slots_per_device > num_experts:
        raise InputError(f"{slots_per_device} slots per device exceed the {num_experts} experts: a device would "
                         "hold two replicas of one expert", field="slots", fix="use fewer slots per device")


def slots_per_device_of(total_slots: int, devices: int, num_experts: int) -> int:
    """Slots per device for ``total_slots`` physical slots; InputError unless they divide evenly
    among the devices and hold every expert."""
    if total_slots < num_experts:
        raise InputError(f"too few slots: {total_slots} physical slots < {num_experts} experts", field="slots",
                         fix=f"use at least {-(-num_experts // devices) * devices} slots")
    if total_slots % devices:
        lo = total_slots // devices * devices
        raise InputError(f"{total_slots} slots do not divide evenly among {devices} devices", field="slots",
                         fix=f"use a multiple of {devices}, e.g. {max(lo, -(-num_experts // devices) * devices)} "
                             f"or {lo + devices}")
    return total_slots // devices


def check_memory(cost: CostModel, slots_per_device: int, devices: int, tokens_per_device: int) -> None:
    """Raise InputError when ``slots_per_device`` experts per MoE layer do not fit in device memory."""
    report = cost.memory(slots_per_device, devices, batch_tokens_per_device=tokens_per_device)
    if not report.fits:
        m = cost.model
        each = m.num_moe_layers * m.expert_bytes()
        room = report.capacity - (report.peak - float(report.expert_weights.max()))
        fit = max(int(room // each), 0)
        need = -(-m.num_experts // devices)
        what = (f"the experts cannot fit: {devices} devices hold at most {fit} expert slots each, and "
                f"{m.num_experts} experts need {need}") if fit < need else \
            f"{slots_per_device} slots per device do not fit in memory (at most {fit})"
        raise InputError(what, field="slots", fix="use more devices, fewer slots or lower-precision weights")


def default_slots_per_device(cost: CostModel, num_experts: int, devices: int, tokens_per_device: int) -> int:
    """The runtime-style default: every expert once plus one redundant slot per device when the
    experts fill the devices exactly (DeepSeek-V3 on 32 GPUs: 9 slots, 288 physical), reduced to
    what fits in memory."""
    base = -(-num_experts // devices)
    want = base + (1 if num_experts % devices == 0 else 0)
    for slots in range(want, base - 1, -1):
        if cost.memory(slots, devices, batch_tokens_per_device=tokens_per_device).fits:
            return slots
    check_memory(cost, base, devices, tokens_per_device)
    return base


def device_pair_bytes(devices: int, layers: int) -> int:
    """Peak bytes of the per-device-pair arrays a placement is built and judged with: the
    [layers-1, devices, devices] float64 token flows between consecutive layers (and one
    temporary as large), plus the few [devices, devices] traffic matrices of the objective weights."""
    return (2 * max(layers - 1, 1) + 8) * devices * devices * 8


def objective_weights(cost: CostModel, devices: int, slots_per_device: int, tokens_per_device: int,
                      trace_tokens: int) -> ObjectiveWeights:
    """Seconds per token-choice from the cost model at ``tokens_per_device`` tokens per device:
    expert compute (the device kernel at an even load, per token-choice) and the per-device time
    of an all-to-all that sends the same rows inside a node or across nodes."""
    m = cost.model
    per = cost.hw.devices_per_node
    choices = float(tokens_per_device * m.top_k)
    compute = float(cost.device_compute(np.full(slots_per_device, choices / slots_per_device))) / choices

    def per_token(mask: np.ndarray) -> float:
        peers = mask.sum(axis=1, keepdims=True)
        traffic = np.where(mask, choices * m.hidden_size * cost.opt.act_bytes / np.maximum(peers, 1), 0.0)
        return float(cost.alltoall_time(traffic).max()) / choices

    node = np.arange(devices) // per
    same = node[:, None] == node[None, :]
    off = ~np.eye(devices, dtype=bool)
    intra = per_token(same & off) if per > 1 else 0.0
    inter = per_token(~same) if devices > per else 0.0
    if intra == 0.0:
        intra = inter
    if inter == 0.0:
        inter = intra
    return ObjectiveWeights(compute, intra, inter, tokens_per_device * devices / max(trace_tokens, 1))


def layer_flows(problem: PlacementProblem, share: np.ndarray) -> np.ndarray:
    """[layers-1, devices, devices] tokens moving from device to device between consecutive layers
    (``share`` = Placement.expert_device_share())."""
    return np.matmul(np.matmul(share[:-1].transpose(0, 2, 1), problem.flows), share[1:])


@dataclass(frozen=True)
class ObjectiveParts:
    """The objective of a placement, in seconds per step: ``compute`` (Σ max device load) and
    ``traffic`` (inter-layer token moves), and the same per layer."""

    compute: float
    traffic: float
    compute_per_layer: np.ndarray
    traffic_per_layer: np.ndarray

    @property
    def total(self) -> float:
        return self.compute + self.traffic


def objective(problem: PlacementProblem, placement: Placement) -> ObjectiveParts:
    """Evaluate the objective (module docstring) for ``placement``."""
    w = problem.weights
    share = placement.expert_device_share()
    comp = w.compute * np.einsum("le,led->ld", problem.load, share).max(axis=1) * w.step_scale
    if problem.num_layers > 1:
        traffic = (layer_flows(problem, share) * problem.link_matrix()[None]).sum(axis=(1, 2))
        traffic = traffic * w.step_scale / problem.num_devices
    else:
        traffic = np.zeros(0)
    return ObjectiveParts(float(comp.sum()), float(traffic.sum()), comp, traffic)


def lower_bound(problem: PlacementProblem) -> float:
    """A proved lower bound on the objective of any placement (seconds per step).

    Compute: per layer, no device can carry less than the mean load, nor less than load / replicas
    of the expert whose share per replica stays highest when the replicas go where they lower that
    most (EPLB's rule is optimal for it). Traffic: a device holds ``slots`` experts, so at most the
    ``slots`` largest flows out of each expert (or into it) stay on one device, and at most the
    ``slots × devices_per_node`` largest stay in one node; the rest crosses devices and nodes.
    """
    w = problem.weights
    d, s, per = problem.num_devices, problem.slots_per_device, problem.devices_per_node
    compute = 0.0
    for load in problem.load:
        counts = replica_counts(load, d * s, d)
        compute += max(float(load.sum()) / d, float((load / counts).max()))
    traffic = 0.0
    for flows in problem.flows:
        total = float(flows.sum())
        cross_dev = total - min(_top_sum(flows, s), _top_sum(flows.T, s))
        cross_node = total - min(_top_sum(flows, s * per), _top_sum(flows.T, s * per))
        cross_dev, cross_node = max(cross_dev, 0.0), max(cross_node, 0.0)
        if w.inter_node >= w.intra_node:
            traffic += w.intra_node * cross_dev + (w.inter_node - w.intra_node) * cross_node
        else:
            traffic += w.inter_node * cross_dev
    return w.step_scale * (w.compute * compute + traffic / d)


def _top_sum(matrix: np.ndarray, k: int) -> float:
    """Σ over rows of each row's ``k`` largest entries."""
    n = matrix.shape[1]
    if k >= n:
        return float(matrix.sum())
    return float(np.partition(matrix, n - k, axis=1)[:, n - k:].sum())
