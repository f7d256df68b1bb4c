"""Expert placement: which logical expert sits in each physical slot of each device, per MoE layer,
and how tokens split among replicas.

Every solver takes a :class:`PlacementProblem` and :class:`SolverOptions` and returns a
:class:`SolveResult` (placement, objective, proved lower bound, gap, wall seconds, notes)::

    problem = PlacementProblem.build(cost, TraceStats.of(trace), 9)   # cost: a CostModel on 32 devices
    result = solve(problem, "ilp", SolverOptions(time_limit=60))

Solvers: ``contiguous`` and ``round_robin`` (runtime defaults), ``lpt`` (greedy), ``eplb``
(DeepSeek's EPLB), ``exflow`` (inter-layer affinity) and ``ilp`` (MoETuner-style, CP-SAT or PuLP +
HiGHS), ``even`` (equal-split dispatch, robust across workloads, :mod:`.even`). :mod:`.incremental` re-places within a budget of expert moves; :mod:`.metrics` measures a
placement on a trace.
"""
from __future__ import annotations

from collections.abc import Callable

from moeplan.errors import InputError

from .baselines import solve_contiguous, solve_lpt, solve_round_robin
from .eplb import rebalance_experts, solve_eplb
from .even import solve_even
from .exflow import solve_exflow
from .ilp import solve_ilp
from .options import SolverOptions
from .problem import PlacementProblem, lower_bound, objective
from .result import SolveResult

SOLVERS: dict[str, Callable[[PlacementProblem, SolverOptions], SolveResult]] = {
    "contiguous": solve_contiguous, "round_robin": solve_round_robin, "lpt": solve_lpt, "eplb": solve_eplb,
    "exflow": solve_exflow, "ilp": solve_ilp, "even": solve_even,
}


def solve(problem: PlacementProblem, solver: str = "ilp", options: SolverOptions | None = None) -> SolveResult:
    """Run the named placement solver."""
    if solver not in SOLVERS:
        raise InputError(f"unknown placement solver '{solver}'", field="solver",
                         fix=f"use one of: {', '.join(SOLVERS)}")
    return SOLVERS[solver](problem, (options or SolverOptions()).validate())


__all__ = ["SOLVERS", "PlacementProblem", "SolveResult", "SolverOptions", "lower_bound", "objective",
           "rebalance_experts", "solve"]
