"""One linear model, several back ends: OR-Tools CP-SAT, PuLP with HiGHS, and HiGHS as an LP.

:class:`LinearModel` holds variables (bounds, integrality, objective coefficient) and sparse rows
``lo ≤ Σ coef · var ≤ hi``. The same object is handed to :func:`solve_cpsat` (every variable
integer, every coefficient an integer, as CP-SAT requires) or to :func:`solve_pulp` (PuLP's
``HiGHS`` solver through highspy, with the warm start passed to HiGHS as its starting solution),
so both back ends solve exactly the same model and agree on the optimum. :func:`solve_lp` solves
the continuous relaxation with HiGHS directly (used when the integer part is fixed).

The back ends are imported when a model is solved, not with this module: a host without them
(the GPU machine) still plans with the heuristics and runs the CLI.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from moeplan.errors import InputError

MILP_BACKENDS = ("cpsat", "pulp")


@dataclass
class LinearModel:
    """Variables and sparse linear rows (see the module docstring)."""

    lower: list[np.ndarray] = field(default_factory=list)
    upper: list[np.ndarray] = field(default_factory=list)
    integer: list[np.ndarray] = field(default_factory=list)
    cost: list[np.ndarray] = field(default_factory=list)
    row_lo: list[np.ndarray] = field(default_factory=list)
    row_hi: list[np.ndarray] = field(default_factory=list)
    coo: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    num_vars: int = 0
    num_rows: int = 0

    def add_vars(self, n: int, lower: float | np.ndarray, upper: float | np.ndarray, integer: bool,
                 cost: float | np.ndarray = 0.0) -> np.ndarray:
        """Add ``n`` variables; returns their indices."""
        self.lower.append(np.broadcast_to(np.asarray(lower, dtype=np.float64), (n,)).copy())
        self.upper.append(np.broadcast_to(np.asarray(upper, dtype=np.float64), (n,)).copy())
        self.integer.append(np.full(n, integer))
        self.cost.append(np.broadcast_to(np.asarray(cost, dtype=np.float64), (n,)).copy())
        idx = np.arange(self.num_vars, self.num_vars + n)
        self.num_vars += n
        return idx

    def add_rows(self, rows: np.ndarray, cols: np.ndarray, coefs: np.ndarray | float, n_rows: int,
                 lo: float | np.ndarray, hi: float | np.ndarray) -> None:
        """Add ``n_rows`` rows; entry i puts ``coefs[i]`` on variable ``cols[i]`` in local row ``rows[i]``."""
        r = np.asarray(rows, dtype=np.int64) + self.num_rows
        c = np.asarray(cols, dtype=np.int64)
        v = np.broadcast_to(np.asarray(coefs, dtype=np.float64), r.shape).copy()
        self.coo.append((r, c, v))
        self.row_lo.append(np.broadcast_to(np.asarray(lo, dtype=np.float64), (n_rows,)).copy())
        self.row_hi.append(np.broadcast_to(np.asarray(hi, dtype=np.float64), (n_rows,)).copy())
        self.num_rows += n_rows

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(lower, upper, integer, cost, row_lo, row_hi, rows, cols, coefs) as flat arrays."""
        def cat(parts: list[np.ndarray], dt: type = np.float64) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dt)

        rows = cat([c[0] for c in self.coo], np.int64)
        cols = cat([c[1] for c in self.coo], np.int64)
        vals = cat([c[2] for c in self.coo])
        return (cat(self.lower), cat(self.upper), cat(self.integer, bool), cat(self.cost), cat(self.row_lo),
                cat(self.row_hi), rows, cols, vals)

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows in CSR form: (start [rows+1], cols, coefs)."""
        *_, rows, cols, vals = self.arrays()
        order = np.argsort(rows, kind="stable")
        start = np.searchsorted(rows[order], np.arange(self.num_rows + 1))
        return start, cols[order], vals[order]


@dataclass
class MilpSolution:
    """Variable values, objective, proved bound, status ("optimal", "feasible", "infeasible",
    "unknown") and wall seconds."""

    values: np.ndarray | None
    objective: float
    bound: float
    status: str
    seconds: float


def solve(model: LinearModel, backend: str, time_limit: float, gap: float, hint: np.ndarray | None = None,
          workers: int = 2) -> MilpSolution:
    """Solve ``model`` with ``backend`` ("cpsat" or "pulp")."""
    if backend == "cpsat":
        return solve_cpsat(model, time_limit, gap, hint, workers)
    if backend == "pulp":
        return solve_pulp(model, time_limit, gap, hint, workers)
    raise InputError(f"unknown MILP back end '{backend}'", field="milp", fix=f"use one of: {', '.join(MILP_BACKENDS)}")


def _as_int(values: np.ndarray, what: str) -> list[int]:
    r = np.rint(values)
    if not np.allclose(values[np.isfinite(values)], r[np.isfinite(values)]):
        raise ValueError(f"CP-SAT needs integer {what}")
    return [int(v) for v in r]


def solve_cpsat(model: LinearModel, time_limit: float, gap: float, hint: np.ndarray | None = None,
                workers: int = 2) -> MilpSolution:
    """Solve with OR-Tools CP-SAT (all variables integer, integer coefficients)."""
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    lower, upper, _, cost, row_lo, row_hi, *_ = model.arrays()
    start, cols, vals = model.csr()
    m = cp_model.CpModel()
    lo_i, up_i = _as_int(lower, "bounds"), _as_int(upper, "bounds")
    xs = [m.new_int_var(lo_i[i], up_i[i], "") for i in range(model.num_vars)]
    coefs = _as_int(vals, "coefficients")
    big = cp_model.INT_MAX // 4
    for r in range(model.num_rows):
        a, b = start[r], start[r + 1]
        expr = cp_model.LinearExpr.weighted_sum([xs[c] for c in cols[a:b]], coefs[a:b])
        lo = -big if not np.isfinite(row_lo[r]) else int(round(row_lo[r]))
        hi = big if not np.isfinite(row_hi[r]) else int(round(row_hi[r]))
        m.add_linear_constraint(expr, lo, hi)
    nz = np.flatnonzero(cost)
    m.minimize(cp_model.LinearExpr.weighted_sum([xs[i] for i in nz], _as_int(cost[nz], "objective")))
    if hint is not None:
        for var, value in zip(xs, _as_int(np.asarray(hint, dtype=np.float64), "hint")):
            m.add_hint(var, value)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(float(time_limit), 0.01)
    solver.parameters.relative_gap_limit = float(gap)
    solver.parameters.num_workers = max(int(workers), 1)
    status = solver.solve(m)
    name = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible",
            cp_model.INFEASIBLE: "infeasible"}.get(status, "unknown")
    if name in ("optimal", "feasible"):
        values = np.array([solver.value(v) for v in xs], dtype=np.float64)
        return MilpSolution(values, float(solver.objective_value), float(solver.best_objective_bound), name,
                            time.perf_counter() - t0)
    return MilpSolution(None, float("nan"), float("nan"), name, time.perf_counter() - t0)


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 (HiGHS prints a banner from C++ when a solver is created)."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


@cache
def _highs_with_start() -> type:
    """PuLP's HiGHS back end, handing HiGHS a starting solution (PuLP's own HiGHS class has no
    warm start) and keeping HiGHS's banner off stdout. A class built on first use, so that PuLP
    is imported only when a model is solved with it."""
    import highspy
    import pulp

    class HighsWithStart(pulp.HiGHS):  # type: ignore[misc, name-defined]
        def __init__(self, start: dict[str, float] | None, **kwargs: object) -> None:
            super().__init__(**kwargs)
            self.start = start

        def createAndConfigureSolver(self, lp: Any) -> None:
            with _quiet_stdout():
                super().createAndConfigureSolver(lp)

        def callSolver(self, lp: Any) -> None:
            if self.start:
                # HiGHS's columns follow lp.variables() (PuLP 3 also numbers them var.index; PuLP 4 does not)
                values = [self.start.get(var.name, 0.0) for var in lp.variables()]
                sol = highspy.HighsSolution()
                sol.col_value = values
                sol.value_valid = True
                lp.solverModel.setSolution(sol)
            lp.solverModel.run()

    return HighsWithStart


def _expression(pulp: Any, terms: list[tuple[Any, float]]) -> Any:
    """Σ coefficient × variable: ``LpAffineExpression.from_list`` in PuLP 4, the constructor in PuLP 3."""
    if hasattr(pulp.LpAffineExpression, "from_list"):
        return pulp.LpAffineExpression.from_list(terms)
    return pulp.LpAffineExpression(terms)


def solve_pulp(model: LinearModel, time_limit: float, gap: float, hint: np.ndarray | None = None,
               workers: int = 2) -> MilpSolution:
    """Solve with PuLP and HiGHS (highspy)."""
    import highspy
    import pulp

    t0 = time.perf_counter()
    lower, upper, integer, cost, row_lo, row_hi, *_ = model.arrays()
    start, cols, vals = model.csr()
    names = [f"v{i:07d}" for i in range(model.num_vars)]
    # Written for PuLP 3 (Python ≤ 3.11) and PuLP 4 (what pip resolves on ≥ 3.12, a Rust core whose
    # LpVariable/LpConstraint/LpAffineExpression constructors are internal): variables come from
    # LpProblem.add_variable and constraints from addConstraint in both.
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    xs = [prob.add_variable(names[i], lowBound=lower[i], upBound=upper[i],
                            cat=pulp.LpInteger if integer[i] else pulp.LpContinuous) for i in range(model.num_vars)]
    nz = np.flatnonzero(cost)
    prob.setObjective(_expression(pulp, [(xs[i], float(cost[i])) for i in nz]))
    for r in range(model.num_rows):
        a, b = start[r], start[r + 1]
        expr = _expression(pulp, [(xs[c], float(v)) for c, v in zip(cols[a:b], vals[a:b])])
        lo, hi = row_lo[r], row_hi[r]
        if np.isfinite(lo) and np.isfinite(hi) and lo == hi:
            prob.addConstraint(expr == float(lo), name=f"r{r}e")
            continue
        if np.isfinite(lo):
            prob.addConstraint(expr >= float(lo), name=f"r{r}l")
        if np.isfinite(hi):
            prob.addConstraint(expr <= float(hi), name=f"r{r}u")
    start_values = None if hint is None else {names[i]: float(v) for i, v in enumerate(hint)}
    solver = _highs_with_start()(start_values, msg=False, timeLimit=max(float(time_limit), 0.01), gapRel=float(gap),
                             threads=max(int(workers), 1))
    prob.solve(solver)
    info = prob.solverModel.getInfo()
    status = prob.solverModel.getModelStatus()
    if info.primal_solution_status != 2:  # kSolutionStatusFeasible
        name = "infeasible" if status == highspy.HighsModelStatus.kInfeasible else "unknown"
        return MilpSolution(None, float("nan"), float("nan"), name, time.perf_counter() - t0)
    values = np.array([x.varValue for x in xs], dtype=np.float64)
    bound = float(info.mip_dual_bound) if integer.any() else float(info.objective_function_value)
    name = "optimal" if status == highspy.HighsModelStatus.kOptimal else "feasible"
    return MilpSolution(values, float(info.objective_function_value), bound, name, time.perf_counter() - t0)


def solve_lp(model: LinearModel) -> MilpSolution:
    """The continuous relaxation of ``model``, solved by HiGHS (dual simplex)."""
    import highspy

    t0 = time.perf_counter()
    lower, upper, _, cost, row_lo, row_hi, rows, cols, vals = model.arrays()
    order = np.lexsort((rows, cols))
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = model.num_vars, model.num_rows
    inf = highspy.kHighsInf
    lp.col_cost_ = cost
    lp.col_lower_ = np.where(np.isfinite(lower), lower, -inf)
    lp.col_upper_ = np.where(np.isfinite(upper), upper, inf)
    lp.row_lower_ = np.where(np.isfinite(row_lo), row_lo, -inf)
    lp.row_upper_ = np.where(np.isfinite(row_hi), row_hi, inf)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.searchsorted(cols[order], np.arange(model.num_vars + 1)).astype(np.int32)
    lp.a_matrix_.index_ = rows[order].astype(np.int32)
    lp.a_matrix_.value_ = vals[order]
    with _quiet_stdout():
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.passModel(lp)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return MilpSolution(None, float("nan"), float("nan"), "infeasible", time.perf_counter() - t0)
    obj = float(h.getInfo().objective_function_value)
    return MilpSolution(np.asarray(h.getSolution().col_value), obj, obj, "optimal", time.perf_counter() - t0)
