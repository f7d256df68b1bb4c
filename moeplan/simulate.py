"""Trace-driven simulator: replay a RoutingTrace through a placement, batch by batch, with the
cost model.

A batch holds ``tokens_per_device × devices`` consecutive tokens of the trace; token ``i`` of a
batch lives on device ``i // tokens_per_device`` (data-parallel attention, as in wide-EP
serving). For every batch and MoE layer the simulator builds, vectorised:

* ``counts[batch, home device, expert]``: token-choices per expert from each device (one
  ``np.bincount`` over the whole trace);
* the dispatch matrix ``counts @ share`` (``share[expert, device]`` from the plan's replica
  shares) and the tokens each physical slot computes;
* with ``exflow``, the dispatch starts from the device of each token's previous-layer top-1
  expert and the combine ends at this layer's top-1 device (from top-1 → choice pair counts).

Then :meth:`moeplan.cost.CostModel.moe_layer` prices every batch of a layer at once and
:meth:`moeplan.cost.CostModel.step_cost` composes the end-to-end step (attention, dense layers,
norms and the head per device on top of the MoE layers): ``SimResult.step`` is that
:class:`~moeplan.cost.StepCost`, and ``step_total`` per batch averages to its total.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeplan.cost import CostModel, StepCost
from moeplan.errors import InputError, check_memory
from moeplan.plan import Placement
from moeplan.trace import RoutingTrace

CHUNK_TOKENS = 1 << 17


@dataclass(frozen=True)
class Workload:
    """What one step processes. phase: prefill or decode; tokens_per_device: tokens each device
    holds per step (prefill: sequence chunk; decode: concurrent sequences); context: tokens
    attended to (prefill: sequence length; decode: KV-cache length)."""

    phase: str = "prefill"
    tokens_per_device: int = 4096
    context: int = 4096

    def validate(self) -> "Workload":
        if self.phase not in ("prefill", "decode"):
            raise InputError(f"phase must be prefill or decode, got {self.phase!r}", field="phase")
        if self.tokens_per_device < 1 or self.context < 1:
            raise InputError("tokens per device and context must be ≥ 1", field="tokens_per_device")
        return self


@dataclass
class SimResult:
    """Simulation output. Per-layer arrays are means over batches (seconds); ``step_moe`` and
    ``step_total`` are per batch; ``step`` is the step by part (means over batches); loads are
    token-choices; crossings count token-choices."""

    layers: dict[str, np.ndarray]
    step_moe: np.ndarray
    step: StepCost
    device_load: np.ndarray
    device_compute: np.ndarray
    cross_device_tokens: float
    cross_node_tokens: float
    total_choices: float
    batches: int
    tokens: int
    notes: list[str] = field(default_factory=list)

    @property
    def step_total(self) -> np.ndarray:
        """[batches] seconds of each batch's whole step: its MoE layers plus the per-device parts."""
        return self.step_moe + (self.step.total - self.step.moe)

    def summary(self) -> dict[str, float]:
        step = float(np.mean(self.step_total))
        tok_per_step = self.tokens / max(self.batches, 1)
        return {
            "batches": self.batches, "tokens": self.tokens,
            "step_seconds": step, "moe_seconds": float(np.mean(self.step_moe)),
            "attention_seconds": self.step.attention, "dense_seconds": self.step.dense,
            "head_seconds": self.step.head, "norms_seconds": self.step.norms,
            "tokens_per_second": tok_per_step / step if step > 0 else float("nan"),
            "dispatch_seconds": float(self.layers["dispatch"].sum()), "compute_seconds": float(self.layers["compute"].sum()),
            "combine_seconds": float(self.layers["combine"].sum()),
            "straggler_wait_seconds": float(self.layers["straggler_wait"].sum()),
            "balancedness": float(self.device_load.max() / self.device_load.mean()) if self.device_load.mean() else 1.0,
            "cross_device_fraction": self.cross_device_tokens / self.total_choices if self.total_choices else 0.0,
            "cross_node_fraction": self.cross_node_tokens / self.total_choices if self.total_choices else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "step_s": self.step.to_dict(), "per_layer": {k: v.tolist() for k, v in self.layers.items()},
                "step_moe_seconds": self.step_moe.tolist(), "device_load": self.device_load.tolist(),
                "device_compute_seconds": self.device_compute.tolist(), "notes": self.notes}


def home_counts(ids: np.ndarray, devices: int, tokens_per_device: int, num_experts: int) -> np.ndarray:
    """[batches, devices, layers, experts] token-choices, token i of a batch homed on device
    i // tokens_per_device. A trailing partial batch is dropped unless it is the only one."""
    t, nl, _ = ids.shape
    per_batch = devices * tokens_per_device
    batches = t // per_batch
    if batches == 0:
        per_batch, batches = t, 1
    out = np.zeros(batches * devices * nl * num_experts, dtype=np.int64)
    layer_off = (np.arange(nl, dtype=np.int64) * num_experts)[None, :, None]
    for start in range(0, batches * per_batch, CHUNK_TOKENS):
        stop = min(start + CHUNK_TOKENS, batches * per_batch)
        tok = np.arange(start, stop, dtype=np.int64)
        row = (tok // per_batch) * devices + (tok % per_batch) * devices // per_batch
        flat = (row[:, None, None] * (nl * num_experts) + layer_off + ids[start:stop]).ravel()
        out += np.bincount(flat, minlength=out.size)
    return out.reshape(batches, devices, nl, num_experts)


def _pair_counts(first: np.ndarray, choices: np.ndarray, batch_of: np.ndarray, batches: int, e: int) -> np.ndarray:
    """[batches, experts, experts]: (first[t], choices[t, k]) pairs per batch."""
    k = choices.shape[1]
    flat = ((batch_of[:, None] * e + first[:, None]) * e + choices).ravel()
    del k
    return np.bincount(flat, minlength=batches * e * e).reshape(batches, e, e)


PAIR_ARRAYS = 4   # [batches, devices, devices] float64 arrays alive per layer: dispatch, combine, the cost's two


def simulate(cost: CostModel, placement: Placement, trace: RoutingTrace,
             workload: Workload | None = None) -> SimResult:
    """Replay ``trace`` through ``placement`` with ``cost`` (its model, hardware and options; see
    the module docstring)."""
    work = (workload or Workload()).validate()
    model, hardware, opts = cost.model, cost.hw, cost.opt
    trace.check_model(model.num_experts, model.num_moe_layers, model.top_k)
    if placement.num_devices != hardware.num_devices:
        raise InputError(f"placement spans {placement.num_devices} devices, the hardware {hardware.num_devices}",
                         field="gpus", fix="pass --gpus matching the plan")
    d, e, nl = placement.num_devices, model.num_experts, model.num_moe_layers
    counts = home_counts(trace.expert_ids, d, work.tokens_per_device, e)
    batches = counts.shape[0]
    check_memory(PAIR_ARRAYS * batches * d * d * 8, f"simulating {d:,} devices ([batches, devices, devices] "
                 "traffic per layer)", "simulate fewer devices (--gpus) or more tokens per device")
    used_tokens = min(trace.num_tokens, batches * d * work.tokens_per_device) if batches > 1 or \
        trace.num_tokens >= d * work.tokens_per_device else trace.num_tokens
    share = placement.expert_device_share()  # [L, E, D]
    per_layer = {k: np.zeros(nl) for k in ("dispatch", "compute", "combine", "straggler_wait", "total")}
    step_moe = np.zeros(batches)
    layer_costs = []
    device_load = np.zeros(d)
    device_compute = np.zeros(d)
    cross_dev = cross_node = total = 0.0
    ids = trace.expert_ids[:used_tokens]
    per_batch = max(used_tokens // batches, 1)
    batch_of = np.minimum(np.arange(used_tokens) // per_batch, batches - 1)
    row_bytes = model.hidden_size * opts.act_bytes
    for layer in range(nl):
        c = counts[:, :, layer, :].astype(np.float64)           # [B, D, E]
        s = share[layer]                                       # [E, D]
        load = c.sum(axis=1)                                   # [B, E]
        slot_tokens = load[:, placement.slot_expert[layer]] * placement.replica_share[layer]  # [B, D, S]
        if opts.exflow and layer > 0:
            prev_first = ids[:, layer - 1, 0].astype(np.int64)
            pairs = _pair_counts(prev_first, ids[:, layer, :].astype(np.int64), batch_of, batches, e)
            dispatch = np.einsum("ex,bef,fy->bxy", share[layer - 1], pairs, s, optimize=True)
        else:
            dispatch = c @ s                                   # [B, D, D]
        combine = None
        if opts.exflow and layer < nl - 1:
            first = ids[:, layer, 0].astype(np.int64)
            pairs = _pair_counts(first, ids[:, layer, :].astype(np.int64), batch_of, batches, e)
            combine = np.einsum("bae,ex,ay->bxy", pairs, s, s, optimize=True)
        home = c.sum(axis=2) / model.top_k
        lc = cost.moe_layer(dispatch, slot_tokens, combine, home)
        layer_costs.append(lc)
        bd = lc.breakdown()
        for key in per_layer:
            per_layer[key][layer] = bd[key]
        step_moe += lc.time
        device_load += slot_tokens.sum(axis=(0, 2))
        device_compute += lc.work.sum(axis=0)
        cross_dev += float(lc.cross_device_bytes.sum()) / row_bytes
        cross_node += float(lc.cross_node_bytes.sum()) / row_bytes
        total += float(c.sum())
    step = cost.step_cost(work.tokens_per_device, work.context, work.phase, layer_costs)
    notes = []
    if not cost.compute_measured:
        notes.append(f"expert compute is roofline from datasheet figures ({hardware.name} has no measured "
                     f"{opts.kernel} curve for {model.hidden_size}×{model.expert_ffn} experts): unmeasured")
    if not hardware.links_measured:
        notes.append("all-to-all uses datasheet link bandwidth (no measured collective curves): unmeasured")
    return SimResult(per_layer, step_moe, step, device_load, device_compute / batches,
                     cross_dev, cross_node, total, batches, used_tokens, notes)
