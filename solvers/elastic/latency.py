"""Decode latency vs (devices, load), priced once with the cost model so autoscaling runs fast.

For each device count ``N`` the experts are placed by LPT on the trace's load (the runtime-style
slot count) and every device runs data-parallel attention over its own sequences (wide expert
parallelism, as DeepSeek-V3 is served). One decode step with ``B`` sequences per device costs

    attention (B queries over ``context`` tokens of KV) × layers + dense FFN layers
    + Σ MoE layers [dispatch all-to-all + expert compute + combine] (the cost model's moe_layer,
      with each expert's expected share of the B·N·k token-choices and its replicas' shares)
    + norms + the output head

(the cost model's :class:`~moeplan.cost.StepCost` of that step) for a grid of ``B``. The table then answers: at ``N`` devices, how many
output tokens per second fit under a time-per-output-token SLO (:meth:`LatencyTable.capacity`),
the most they can serve at all (batch limited by KV-cache memory), and the step time at a
given demand (:meth:`LatencyTable.tpot`). Units: seconds, tokens, tokens per second.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from moeplan.solvers.placement.baselines import solve_lpt
from moeplan.solvers.placement.options import SolverOptions
from moeplan.solvers.placement.problem import PlacementProblem, default_slots_per_device

from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.plan import Placement

BATCH_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class LatencyTable:
    """Decode step seconds per (device count, sequences per device).

    Attributes:
        devices: the device counts, ascending.
        batch: float [B] sequences per device per step.
        step_seconds: float [len(devices), B] seconds of one decode step.
        max_batch: float [len(devices)] the most sequences a device holds (KV-cache memory).
        context: KV-cache tokens per sequence.
        placements: the LPT placement used at each device count.
    """

    devices: tuple[int, ...]
    batch: np.ndarray
    step_seconds: np.ndarray
    max_batch: np.ndarray
    context: int
    placements: tuple[Placement, ...]

    def row(self, devices: int) -> int:
        if devices not in self.devices:
            raise InputError(f"no latency row for {devices} devices", field="devices",
                             fix=f"use one of {list(self.devices)}")
        return self.devices.index(devices)

    def _curve(self, devices: int) -> tuple[np.ndarray, np.ndarray]:
        """(throughput tokens/s, step seconds) at the batches the KV memory allows."""
        i = self.row(devices)
        ok = self.batch <= self.max_batch[i]
        b, t = self.batch[ok], self.step_seconds[i, ok]
        return b * devices / t, t

    def capacity(self, devices: int, slo: float | None = None) -> float:
        """Output tokens per second at ``devices`` devices with every step within ``slo`` seconds
        (the most the KV memory allows when ``slo`` is None); 0 when even one sequence misses it."""
        tput, t = self._curve(devices)
        ok = np.ones(t.shape, dtype=bool) if slo is None else t <= slo
        return float(tput[ok].max()) if ok.any() else 0.0

    def tpot(self, devices: int, demand: float) -> float:
        """Seconds per decode step when ``devices`` devices serve ``demand`` output tokens per
        second (interpolated between batches); inf beyond what they can serve."""
        tput, t = self._curve(devices)
        if demand > tput.max():
            return float("inf")
        return float(np.interp(demand, tput, t))


def decode_step_seconds(cost: CostModel, placement: Placement, load: np.ndarray, batch: np.ndarray,
                        context: int) -> np.ndarray:
    """[B] seconds of one decode step (:meth:`CostModel.step_cost`) with ``batch[b]`` sequences on
    each device, routed in proportion to ``load`` (module docstring)."""
    m = cost.model
    n, k = placement.num_devices, m.top_k
    share = load / np.maximum(load.sum(axis=1, keepdims=True), 1e-300)             # [L, E]
    device_share = placement.expert_device_share()                                   # [L, E, N]
    to_device = np.einsum("le,len->ln", share, device_share)                         # [L, N]
    slot_frac = np.take_along_axis(share, placement.slot_expert.reshape(placement.num_layers, -1), axis=1)
    slot_frac = slot_frac.reshape(placement.slot_expert.shape) * placement.replica_share  # [L, N, S]
    out = np.zeros(len(batch))
    for i, b in enumerate(np.asarray(batch, dtype=np.float64)):
        layers = [cost.moe_layer(np.broadcast_to(b * k * to_device[layer][None, :], (n, n)),
                                 b * n * k * slot_frac[layer]) for layer in range(placement.num_layers)]
        out[i] = cost.step_cost(float(b), context, "decode", layers).total
    return out


def latency_table(cost: CostModel, load: np.ndarray, devices: tuple[int, ...],
                  context: int = 4096, batch: tuple[int, ...] = BATCH_GRID) -> LatencyTable:
    """Price the decode step at every device count in ``devices`` (module docstring)."""
    if context < 1:
        raise InputError(f"must be ≥ 1, got {context}", field="context")
    counts = tuple(sorted(set(int(d) for d in devices)))
    grid = np.asarray(batch, dtype=np.float64)
    rows, limits, placements = [], [], []
    model = cost.model
    for n in counts:
        sized = cost.with_cluster(n)
        slots = default_slots_per_device(sized, model.num_experts, n, 1)
        problem = PlacementProblem.from_arrays(load, n, slots, sized.hw.devices_per_node)
        placement = solve_lpt(problem, SolverOptions()).placement
        rows.append(decode_step_seconds(sized, placement, load, grid, context))
        limits.append(sized.kv_capacity_tokens(sized.memory(slots, n)) / context)
        placements.append(placement)
    return LatencyTable(counts, grid, np.stack(rows), np.asarray(limits), context, tuple(placements))
