"""SolveResult: a placement and the proof of its quality, as every placement solver returns it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from moeplan.plan import Placement

from .problem import PlacementProblem, lower_bound, objective


@dataclass
class SolveResult:
    """What a placement solver returns.

    Attributes:
        placement: the placement found.
        objective: its objective (seconds per step, see :mod:`.problem`).
        bound: a proved lower bound on the optimal objective of the whole problem (seconds per
            step); 0 when the solver proves nothing better than the trivial bound.
        seconds: wall time of the solve.
        solver: the solver's name.
        notes: how it was solved (e.g. "decomposed by layer"), one sentence each.
        extra: solver-specific figures (per-layer gaps, hops, bytes saved, warm start, ...).
    """

    placement: Placement
    objective: float
    bound: float
    seconds: float
    solver: str
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """Relative gap (objective − bound) / objective; 0 when proved optimal."""
        if self.objective <= 0:
            return 0.0
        return max(self.objective - self.bound, 0.0) / self.objective

    def report(self) -> dict[str, Any]:
        """The solver record a Plan carries."""
        return {"name": self.solver, "objective": self.objective, "bound": self.bound, "gap": self.gap,
                "seconds": self.seconds, "notes": list(self.notes), **self.extra}


def finish(problem: PlacementProblem, placement: Placement, solver: str, started: float, notes: list[str],
           extra: dict[str, Any] | None = None, bound: float | None = None) -> SolveResult:
    """A SolveResult for ``placement``: its objective, the problem's proved lower bound (or a
    better one the solver proved), and the wall time since ``started`` (perf_counter seconds)."""
    value = objective(problem, placement).total
    lb = lower_bound(problem) if bound is None else bound
    return SolveResult(placement, value, min(lb, value), time.perf_counter() - started, solver, notes,
                       dict(extra or {}))
