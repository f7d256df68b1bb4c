"""plan_scaling: one elastic scaling step, planned end to end, next to the two baselines.

:func:`plan_scaling` runs the assignment (:mod:`.assign`), builds the move schedule
(:mod:`.schedule`) and prices the step and the baselines (:mod:`.costs`). :func:`tradeoff`
repeats it over balance targets: bytes moved against balance after the step.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from moeplan.solvers.placement.metrics import balancedness, layer_balancedness

from moeplan.cost import CostModel, CostOptions
from moeplan.errors import InputError
from moeplan.hardware import HardwareRef
from moeplan.model import ModelSpec
from moeplan.plan import Placement, Plan

from .assign import Assignment, assign
from .costs import Baseline, TransferCosts, replica_baseline, restart_baseline
from .problem import ScalingProblem
from .schedule import MoveSchedule, build_schedule, check_memory

DEFAULT_TRADEOFF_TARGETS = (1.0, 1.02, 1.05, 1.1, 1.2, 1.5, math.inf)


@dataclass
class ScalingStep:
    """A planned scaling step.

    Attributes:
        problem: what was asked.
        placement: the new placement over N′ devices (equal shares among replicas).
        assignment: how it was found (per-layer kept replicas, bound, cap).
        schedule: the moves, rounds, memory peaks and predicted times.
        balance_before, balance_after: Σ max / Σ mean device load (trace load) of the old
            placement on N devices and the new one on N′.
        worst_layer_after: the largest per-layer max / mean after the step.
        restart, new_replica: the baselines.
        notes: what the reader should know (provenance, unreachable targets, bounds).
    """

    problem: ScalingProblem
    placement: Placement
    assignment: Assignment
    schedule: MoveSchedule
    balance_before: float
    balance_after: float
    worst_layer_after: float
    restart: Baseline
    new_replica: Baseline
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.schedule.seconds

    @property
    def target_met(self) -> bool:
        return self.worst_layer_after <= self.problem.balance_target * (1 + 1e-9)

    def summary(self) -> dict[str, Any]:
        """The step's figures (bytes, seconds, balance, memory) and the baselines'."""
        p, s, a = self.problem, self.schedule, self.assignment
        return {
            "from_devices": p.old_devices, "to_devices": p.new_devices, "direction": p.direction,
            "slots_per_device": {"before": p.old_slots_per_device, "after": p.slots_per_device},
            "balance_target": p.balance_target, "balance_before": self.balance_before,
            "balance_after": self.balance_after, "worst_layer_balance_after": self.worst_layer_after,
            "target_met": self.target_met,
            "transfers": len(s.transfers), "transfers_lower_bound": a.transfers_bound,
            "local_copies": len(s.local_copies), "rounds": s.rounds,
            "expert_bytes_moved": s.expert_bytes_moved, "bring_up_bytes": s.bring_up_bytes,
            "bytes_moved": s.bytes_moved,
            "seconds": s.seconds, "bring_up_seconds": s.bring_up_seconds,
            "transfer_seconds": float(s.round_seconds.sum()), "switch_seconds": s.switch_seconds,
            "peak_extra_slots_max": int(s.extra_units.max()), "peak_slots_max": int(s.peak_units.max()),
            "capacity_slots": int(s.capacity_units.min()), "downtime_s": 0.0,
            "restart": self.restart.to_dict(), "new_replica": self.new_replica.to_dict(),
            "solver_seconds": a.seconds, "notes": list(self.notes),
        }

    def to_plan(self, model: ModelSpec, hardware: HardwareRef, devices_per_node: int,
                cost_options: CostOptions) -> Plan:
        """The new Plan: placement over N′ devices, the ordered moves and the predictions.
        ``devices_per_node`` is the new cluster's (N′ must fill its nodes)."""
        summary = self.summary()
        solver = {"name": "elastic", "seconds": self.assignment.seconds,
                  "objective": len(self.schedule.transfers), "bound": self.assignment.transfers_bound,
                  "notes": list(self.assignment.notes),
                  "methods": sorted({lay.method for lay in self.assignment.layers})}
        placement = Placement.from_slots(self.placement.slot_expert, self.placement.num_experts, devices_per_node)
        return Plan(model, hardware, devices_per_node, self.problem.new_devices // devices_per_node, placement,
                    moves=self.schedule.moves(), cost_options=cost_options, solver=solver,
                    predicted={"scaling": summary},
                    notes=f"elastic scaling {self.problem.old_devices} → {self.problem.new_devices} devices")


def plan_scaling(problem: ScalingProblem, costs: TransferCosts, old_placement: Placement | None = None,
                 method: str = "auto", balance_target: float | None = None) -> ScalingStep:
    """Plan the step of ``problem`` (see the module docstring); InputError when a device's peak
    memory would exceed its capacity. ``old_placement`` gives the old replica shares for the
    balance before (default: equal shares)."""
    step = _plan(problem, costs, old_placement, method, balance_target)
    check_memory(step.schedule)
    return step


def _plan(problem: ScalingProblem, costs: TransferCosts, old_placement: Placement | None, method: str,
          balance_target: float | None, incumbent: np.ndarray | None = None) -> ScalingStep:
    target = problem.balance_target if balance_target is None else balance_target
    result = assign(problem, method, target, incumbent)
    e = problem.num_experts
    new = Placement.from_slots(result.slot_expert, e, problem.new_devices)
    old = old_placement or Placement.from_slots(problem.old_slots.astype(np.int32), e, problem.old_devices)
    schedule = build_schedule(problem, result.slot_expert, costs)
    nl, expert_bytes, non_expert = problem.num_layers, problem.expert_bytes, problem.non_expert_bytes
    restart = restart_baseline(costs, non_expert, expert_bytes, nl, problem.new_devices, problem.slots_per_device)
    replica = replica_baseline(costs, non_expert, expert_bytes, nl, problem.old_devices,
                               problem.old_slots_per_device)
    notes = list(result.notes) + costs.provenance()
    if result.transfers_bound < result.transfers:
        notes.append(f"{result.transfers} transfers; no placement with these replica counts needs fewer than "
                     f"{result.transfers_bound} (the rest buy balance)")
    return ScalingStep(problem, new, result, schedule, balancedness(old, problem.load),
                       balancedness(new, problem.load), float(layer_balancedness(new, problem.load).max()),
                       restart, replica, notes)


@dataclass(frozen=True)
class TradeoffRow:
    """One balance target: what the step moves and the balance it reaches."""

    target: float
    balance_after: float
    worst_layer_after: float
    transfers: int
    bytes_moved: float
    seconds: float
    peak_extra_slots: int
    fits: bool

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"target": self.target, "balance_after": self.balance_after,
                "worst_layer_balance_after": self.worst_layer_after, "transfers": self.transfers,
                "bytes_moved": self.bytes_moved, "seconds": self.seconds, "peak_extra_slots": self.peak_extra_slots,
                "fits_in_memory": self.fits}


def tradeoff(problem: ScalingProblem, costs: TransferCosts, targets: tuple[float, ...] = DEFAULT_TRADEOFF_TARGETS,
             method: str = "greedy") -> list[TradeoffRow]:
    """Bytes moved vs balance after the step, one row per balance target (``inf``: move only what
    the new device count forces); a row whose peak exceeds device memory says so. Targets are
    solved tightest first, each answer offered to the next (a tighter cap's placement meets a
    looser one), so transfers never grow as the target loosens."""
    rows: dict[float, TradeoffRow] = {}
    incumbent = None
    for target in sorted(set(targets)):
        step = _plan(problem, costs, None, method, target, incumbent)
        incumbent = step.placement.slot_expert
        s = step.schedule
        rows[target] = TradeoffRow(target, step.balance_after, step.worst_layer_after, len(s.transfers),
                                   s.bytes_moved, s.seconds, int(s.extra_units.max()),
                                   bool(np.all(s.peak_units <= s.capacity_units)))
    return [rows[t] for t in targets]


def runtime_slots(num_experts: int, devices: int) -> int:
    """The runtime's slot rule: every expert once, plus one redundant slot per device when the
    experts fill the devices exactly."""
    base = -(-num_experts // devices)
    return base + (1 if num_experts % devices == 0 and base < num_experts else 0)


def scaling_plans(cost: CostModel, start: Placement, load: np.ndarray, counts: Sequence[int],
                  balance_target: float = 1.05) -> list[Plan]:
    """The chain of scaling plans through device counts ``counts`` (the first is ``start``'s),
    each from the previous step's placement with :func:`runtime_slots` slots per device: what
    ``python -m moeplan.runtime.elastic`` executes, one plan per step."""
    if not counts or counts[0] != start.num_devices:
        raise InputError(f"device counts {list(counts)} must start at the placement's {start.num_devices}",
                         field="counts")
    model, hw = cost.model, cost.hw
    costs = TransferCosts.of(cost)
    plans: list[Plan] = []
    current = start
    for m in counts[1:]:
        problem = ScalingProblem.from_arrays(load, current.slot_expert, m, runtime_slots(model.num_experts, m),
                                             devices_per_node=hw.devices_per_node, expert_bytes=model.expert_bytes(),
                                             balance_target=balance_target)
        step = plan_scaling(problem, costs, current)
        plans.append(step.to_plan(model, hw.ref(), hw.with_cluster(devices=m).devices_per_node, cost.opt))
        current = plans[-1].placement
    return plans
