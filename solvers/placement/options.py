"""SolverOptions: the knobs of every placement solver, in one place (each solver reads its own)."""
from __future__ import annotations

from dataclasses import dataclass

from moeplan.errors import InputError

from .milp import MILP_BACKENDS

ROBUST_MODES = ("mean", "worst")


@dataclass(frozen=True)
class SolverOptions:
    """Options of the placement solvers.

    Attributes:
        time_limit: seconds for the whole ILP run: the warm start (exflow, LPT, EPLB) always
            completes, and the layer MILPs share what is left of the limit.
        gap: relative gap at which a MILP stops.
        milp: MILP back end, "cpsat" (OR-Tools CP-SAT) or "pulp" (PuLP with HiGHS).
        sweeps: passes over the layers (exflow and ILP re-place each layer with its neighbours fixed).
        passes: local-search passes per layer and sweep (exflow).
        slack: exflow packs replicas up to (1 + slack) × the mean device load before the token
            split evens the loads out.
        coactivation: weight of a pair of experts one token chose together (same layer), next to
            one token moving between layers, in exflow's affinity score.
        balance_cap: after placing, hold each layer's max device load to balance_cap × mean (on the
            fitted trace) where the replicas allow; None trades balance against traffic freely.
        candidates: ILP: devices considered per expert besides those of the warm start (all
            devices when experts × devices ≤ full_pairs).
        full_pairs: ILP: the largest experts × devices model built with every pair.
        workers: solver threads.
        robust: with several workloads, minimise the ``"mean"`` or the ``"worst"`` workload's
            max device load per layer (:mod:`.even`).
        extrapolate: with three or more workloads, also fit each one's deviation from their mean
            amplified by 1 + extrapolate (:func:`.even.extrapolated`); None chooses it by
            leave-one-out within the fitted workloads (:func:`.even.choose_extrapolation`).
    """

    time_limit: float = 60.0
    gap: float = 0.01
    milp: str = "cpsat"
    sweeps: int = 2
    passes: int = 2
    slack: float = 0.02
    coactivation: float = 0.5
    balance_cap: float | None = 1.01
    candidates: int = 8
    full_pairs: int = 4096
    workers: int = 2
    robust: str = "mean"
    extrapolate: float | None = None

    def validate(self) -> "SolverOptions":
        if self.time_limit <= 0:
            raise InputError(f"must be > 0 seconds, got {self.time_limit}", field="time-limit")
        if not 0 <= self.gap < 1:
            raise InputError(f"must lie in [0, 1), got {self.gap}", field="gap")
        if self.milp not in MILP_BACKENDS:
            raise InputError(f"unknown MILP back end '{self.milp}'", field="milp",
                             fix=f"use one of: {', '.join(MILP_BACKENDS)}")
        if self.sweeps < 1 or self.passes < 0 or self.candidates < 1 or self.workers < 1:
            raise InputError("sweeps, candidates and workers must be ≥ 1, passes ≥ 0", field="options")
        if self.slack < 0 or self.coactivation < 0:
            raise InputError("slack and coactivation must be ≥ 0", field="options")
        if self.robust not in ROBUST_MODES:
            raise InputError(f"unknown robust mode {self.robust!r}", field="robust",
                             fix=f"use one of: {', '.join(ROBUST_MODES)}")
        if self.extrapolate is not None and not self.extrapolate >= 0:
            raise InputError(f"must be ≥ 0, got {self.extrapolate}", field="extrapolate")
        if self.balance_cap is not None and self.balance_cap < 1:
            raise InputError(f"balance cap must be ≥ 1, got {self.balance_cap}", field="balance-cap")
        return self
