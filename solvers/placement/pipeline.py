"""The one trace → placement → Plan pipeline: ``moeplan plan``, ``moeplan plan placement``, ``moeplan
compare`` and the dashboard all go through it, so they share the slot default, the split of the
trace into what the solver fits and what the plan is judged on, and the ``predicted`` schema.

1. :func:`split_for_judging`: the solver fits the first ``1 − judge_fraction`` of the trace; the
   plan is judged on the rest (a plan serves future traffic). ``judge_fraction = 0`` judges on
   the fitted tokens themselves, and the plan says so.
2. :func:`default_slots`: the given physical slot total split over the devices, else the
   memory-aware default (:func:`.problem.default_slots_per_device`).
3. :func:`placement_quality`: one placement on the judged tokens — the metrics of
   :func:`.metrics.evaluate`, the simulated MoE step (:func:`.predict.predict_moe_step`) and the
   peak memory per device — the row ``plan`` and ``compare`` print.
4. :func:`placement_plan`: the Plan: placement (its shares what the problem's dispatch model
   realises, :func:`moeplan.dispatch.realise`), moves, the hardware profile and cost options
   that priced it, the solver's report, and ``predicted`` = the quality row plus the traffic
   report of the problem (:func:`.exflow.traffic_report`) and what it was judged on.
5. :func:`load_plan`: the same from recorded loads alone (no trace): ``predicted`` holds each
   workload's balancedness and, when asked, the leave-one-out figure (plan on all workloads but
   one, judge on that one).

Every balancedness is the one the placement's dispatch model realises; ``realised_balancedness``
gives it under each dispatch model, so an export to a runtime can name what that runtime makes
of the plan.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moeplan.cost import CostModel
from moeplan.dispatch import realise
from moeplan.errors import InputError
from moeplan.moves import Move
from moeplan.loads import Workloads
from moeplan.plan import DISPATCH_MODELS, Placement, Plan
from moeplan.stats import TraceStats
from moeplan.trace import RoutingTrace

from . import solve
from .exflow import traffic_report
from .metrics import balancedness, evaluate
from .predict import predict_moe_step
from .options import SolverOptions
from .problem import PlacementProblem, default_slots_per_device, slots_per_device_of
from .result import SolveResult

JUDGE_FRACTION = 0.3


def objective_explained(problem: PlacementProblem, predicted: dict[str, Any] | None = None) -> str:
    """One line saying what the solver's objective and proved bound are and, given the plan's
    ``predicted`` record, what its predicted MoE time is, so the two figures printed side by side
    are not read as one quantity (they differ in tokens, step size and model)."""
    step_tokens = problem.weights.step_scale * problem.tokens / max(problem.num_devices, 1)
    traffic = ("+ the tokens moved between consecutive MoE layers (context-coherent, "
               f"{problem.flow_model} flow model) priced over the intra-/inter-node links, per GPU"
               if float(problem.flows.sum()) > 0 else "(no inter-layer traffic: recorded loads only)")
    text = (f"objective = the solver's linear model on the {problem.tokens:,} fitted tokens scaled to one step of "
            f"{step_tokens:,.0f} tokens/GPU: Σ over MoE layers of expert compute × the busiest GPU's load {traffic}; "
            f"the proved bound is a lower bound on that objective for any placement")
    if predicted is not None and "moe_seconds_ep" in predicted:
        text += (f". predicted MoE time = the trace-driven simulator (dispatch all-to-all, expert kernels, combine "
                 f"of every MoE layer, fixed latencies included) replaying the judged tokens ({predicted['judged_tokens']:,}: "
                 f"{predicted['judged_on']}) at {predicted['tokens_per_device']:,} tokens/GPU per step. They differ "
                 f"in tokens, step size and model: compare plans on one figure, not the two with each other")
    return text


def split_for_judging(trace: RoutingTrace, judge_fraction: float = JUDGE_FRACTION) -> tuple[RoutingTrace,
                                                                                             RoutingTrace]:
    """(fitted, judged) parts of ``trace``: the first ``1 − judge_fraction`` of its tokens and the
    rest; both the whole trace when ``judge_fraction`` is 0."""
    if not 0 <= judge_fraction < 1:
        raise InputError(f"must lie in [0, 1), got {judge_fraction}", field="judge-fraction")
    if judge_fraction == 0:
        return trace, trace
    return trace.split(1 - judge_fraction)


def default_slots(cost: CostModel, total_slots: int | None, tokens_per_device: int) -> int:
    """Slots per device: ``total_slots`` physical slots split evenly over the devices, or (None)
    the memory-aware default of :func:`.problem.default_slots_per_device`."""
    d, e = cost.hw.num_devices, cost.model.num_experts
    if total_slots is not None:
        return slots_per_device_of(total_slots, d, e)
    return default_slots_per_device(cost, e, d, tokens_per_device)


def placement_quality(cost: CostModel, placement: Placement, judged: RoutingTrace, tokens_per_device: int,
                      stats: TraceStats | None = None) -> dict[str, Any]:
    """The figures of one placement on the ``judged`` tokens (module docstring, step 3).
    ``stats`` may be passed when they are of ``judged``, to save recounting."""
    metrics = evaluate(placement, judged, stats=stats).summary()
    predicted = predict_moe_step(cost, placement, judged, tokens_per_device)
    memory = cost.memory(placement.slots_per_device, placement.num_devices, batch_tokens_per_device=tokens_per_device)
    notes = list(metrics.pop("notes", [])) + list(predicted.pop("notes", []))
    load = (stats or TraceStats.of(judged)).load
    return {**metrics, **predicted, "dispatch": placement.dispatch,
            "realised_balancedness": realised_balancedness(cost, placement, load),
            "memory_peak_bytes": memory.peak, "memory_fits": memory.fits, "notes": notes}


def realised_balancedness(cost: CostModel, placement: Placement, load: np.ndarray) -> dict[str, float]:
    """Balancedness of ``placement``'s slots on ``load`` [layers, experts] under every dispatch model."""
    return {d: balancedness(realise(placement, d, cost.model), load) for d in DISPATCH_MODELS}


def placement_plan(problem: PlacementProblem, cost: CostModel, placement: Placement, report: dict[str, Any],
                   judged: RoutingTrace, tokens_per_device: int, moves: Sequence[Move] = (),
                   judged_on: str = "held-out tokens", stats: TraceStats | None = None) -> Plan:
    """The Plan of a solved ``problem`` (module docstring, step 4). ``report`` is the solver's
    record; ``judged_on`` says what ``judged`` is, for the plan's ``predicted.judged_on``."""
    hw = cost.hw
    if problem.dispatch != "weighted":
        placement = realise(placement, problem.dispatch, cost.model)
    quality = placement_quality(cost, placement, judged, tokens_per_device, stats)
    predicted = {**quality, **traffic_report(problem, placement), "judged_on": judged_on,
                 "judged_tokens": judged.num_tokens}
    solver = {**report, "flows": problem.flow_model, "slots_per_device": problem.slots_per_device}
    return Plan(model=cost.model, hardware=hw.ref(), devices_per_node=hw.devices_per_node, nodes=hw.nodes,
                placement=placement, moves=tuple(moves), cost_options=cost.opt, solver=solver,
                predicted=predicted).validate()


def plan_from_loads(cost: CostModel, workloads: Workloads, slots_per_device: int, tokens_per_device: int,
                    dispatch: str, solver: str, options: SolverOptions,
                    leave_one_out: bool = False) -> tuple[PlacementProblem, Plan, SolveResult]:
    """Solve from recorded ``workloads`` alone: (the problem, the Plan of :func:`load_plan`, the
    solve) for ``moeplan plan placement --load`` and the dashboard; with ``leave_one_out``, also
    plan on all workloads but each one and judge on it, under ``dispatch``."""
    def solved(w: Workloads) -> tuple[PlacementProblem, SolveResult]:
        problem = PlacementProblem.from_loads(cost, w.loads, slots_per_device, tokens_per_device, dispatch)
        return problem, solve(problem, solver, options)

    problem, result = solved(workloads)
    held: dict[str, float] | None = None
    if leave_one_out:
        if workloads.count < 2:
            raise InputError("leave-one-out needs at least two load files", field="leave-one-out")
        held = {}
        for i, name in enumerate(workloads.names):
            _, r = solved(workloads.without(i))
            placed = realise(r.placement, dispatch, cost.model) if dispatch != "weighted" else r.placement
            held[name] = balancedness(placed, workloads.loads[i])
    return problem, load_plan(problem, cost, result.placement, result.report(), workloads, held), result


def load_plan(problem: PlacementProblem, cost: CostModel, placement: Placement, report: dict[str, Any],
              workloads: Workloads, leave_one_out: dict[str, float] | None = None) -> Plan:
    """The Plan of a ``problem`` solved from recorded ``workloads`` (module docstring, step 5);
    ``leave_one_out`` maps each workload's name to its held-out balancedness."""
    if problem.dispatch != "weighted":
        placement = realise(placement, problem.dispatch, cost.model)
    per = {name: balancedness(placement, load) for name, load in zip(workloads.names, workloads.loads)}
    predicted: dict[str, Any] = {
        "dispatch": placement.dispatch, "balancedness": float(np.mean(list(per.values()))),
        "worst_workload_balancedness": max(per.values()), "workload_balancedness": per,
        "realised_balancedness": realised_balancedness(cost, placement, workloads.pooled()),
        "judged_on": f"the {workloads.count} fitted workload(s)", "workloads": list(workloads.names)}
    if leave_one_out is not None:
        predicted["leave_one_out_balancedness"] = leave_one_out
        predicted["leave_one_out_mean"] = float(np.mean(list(leave_one_out.values())))
    solver = {**report, "slots_per_device": problem.slots_per_device}
    hw = cost.hw
    return Plan(model=cost.model, hardware=hw.ref(), devices_per_node=hw.devices_per_node, nodes=hw.nodes,
                placement=placement, cost_options=cost.opt, solver=solver, predicted=predicted).validate()
