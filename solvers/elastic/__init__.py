"""Elastic scaling: re-plan an expert placement for more or fewer devices, move the fewest bytes,
keep serving throughout — and simulate autoscaling with it.

Planning a step::

    # cost: the caller's CostModel of the model on the hardware
    problem = ScalingProblem.build(cost, plan.placement, TraceStats.of(trace).load, 40)
    step = plan_scaling(problem, TransferCosts.of(cost))
    step.placement, step.schedule.moves(), step.summary()   # new placement, ordered moves, figures

* :mod:`.problem` — the step as arrays (devices keep their index; joining ones are appended,
  leaving ones are the last);
* :mod:`.assign` — the new placement: balanced within a cap, fewest experts moved (greedy + local
  search, or CP-SAT per layer for small cases), with a proved bound on the moves;
* :mod:`.schedule` — copy-before-delete schedule: bring-up, rounds of P2P copies (König edge
  colouring), one switch; peak memory per device; predicted seconds;
* :mod:`.costs` — P2P / H2D / restart costs from the hardware profile, and the two baselines
  (restart at the new size; a whole new replica);
* :mod:`.step` — :func:`plan_scaling`, the bytes-vs-balance :func:`tradeoff` and the chain of
  scaling plans the elastic runtime executes (:func:`scaling_plans`);
* :mod:`.traffic`, :mod:`.latency`, :mod:`.autoscale` — bursty arrival traces, latency vs
  (devices, load) from the cost model, and autoscaling policies simulated against static
  provisioning, restarts and whole-replica scaling.
"""
from __future__ import annotations

from .assign import Assignment, assign
from .costs import Baseline, TransferCosts
from .problem import ScalingProblem
from .schedule import MoveSchedule, build_schedule, check_memory
from .step import ScalingStep, TradeoffRow, plan_scaling, scaling_plans, tradeoff

__all__ = ["Assignment", "Baseline", "MoveSchedule", "ScalingProblem", "ScalingStep", "TradeoffRow",
           "TransferCosts", "assign", "build_schedule", "check_memory", "plan_scaling", "scaling_plans", "tradeoff"]
