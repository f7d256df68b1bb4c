"""Load-balanced ILP placement (MoETuner-style), decomposed by layer.

The objective (see :mod:`.problem`) couples consecutive layers through the tokens that move
between them, which makes the whole model bilinear in the token shares and far too large for
DeepSeek-V3 (58 layers × 256 experts × 32–256 devices). So the ILP works layer by layer with the
neighbours fixed, where the model is linear and exact (:func:`.layer.layer_model`):

    minimise    compute · Lmax + Σ_{e,d} unit_cost[e, d] · y[e, d]
    subject to  Σ_d y[e, d] = load[e]             every token-choice is served
                y[e, d] ≤ load[e] · x[e, d]        only by a replica
                Σ_d x[e, d] ≥ 1                    every expert has a replica
                Σ_e x[e, d] ≤ slots                 device slots (spare slots get replicas after)
                Σ_e y[e, d] ≤ Lmax ≤ cap            the busiest device (cap: balance_cap × mean,
                                                    or the warm start's max if that is higher)
                x binary, y integer (loads in units of 1/1000 of the mean device load)

over candidate (expert, device) pairs: all of them when experts × devices ≤ ``full_pairs``,
otherwise each expert's devices in the current placement plus its ``candidates`` cheapest
devices. It starts from the best heuristic (exflow, LPT, EPLB), which is handed to the solver as
a hint (CP-SAT ``AddHint``; HiGHS starting solution through PuLP), sweeps the layers
``sweeps`` times, and keeps a layer's new placement only when it lowers the layer's exact cost.
The proved bound of the whole problem is :func:`.problem.lower_bound` (the layer subproblems'
bounds hold only with their neighbours fixed and are reported per layer); with one layer and
the full pair set, integer loads and integral costs the MILP is the whole problem and its bound
is used.
"""
from __future__ import annotations

import time

import numpy as np

from moeplan.plan import Placement

from . import milp
from .baselines import solve_lpt
from .eplb import solve_eplb
from .even import solve_even_ilp
from .exflow import solve_exflow
from .layer import (balance_shares, layer_device_share, layer_model, layer_objective, neighbour_affinity,
                    unit_costs)
from .options import SolverOptions
from .problem import PlacementProblem, lower_bound
from .result import SolveResult, finish

UNITS_PER_DEVICE = 1000   # integer load resolution: 1/1000 of the mean device load
COST_SCALE = 1000         # integer objective: 1000 per unit of max load


def _round_split(total: np.ndarray, parts: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Integers per part (``parts`` fractional, grouped by ``owner``) that sum to ``total[owner]``
    per owner (largest remainders get the leftover units)."""
    base = np.floor(parts)
    left = total - np.bincount(owner, weights=base, minlength=total.shape[0])
    frac = parts - base
    order = np.lexsort((-frac, owner))
    rank = np.empty_like(order)
    starts = np.searchsorted(owner[order], np.arange(total.shape[0]))
    rank[order] = np.arange(order.shape[0]) - starts[owner[order]]
    return base + (rank < left[owner])


class LayerSolve:
    """One layer's MILP with its neighbours fixed (module docstring)."""

    def __init__(self, problem: PlacementProblem, layer: int, shares: list[np.ndarray], options: SolverOptions) -> None:
        self.problem, self.layer, self.options = problem, layer, options
        self.load = problem.load[layer]
        a_in, a_out = neighbour_affinity(problem, layer, shares)
        self.unit_cost = unit_costs(problem, layer, a_in, a_out)
        self.current = shares[layer]

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Candidate (expert, device) pairs."""
        p, o = self.problem, self.options
        e, d = p.num_experts, p.num_devices
        if e * d <= o.full_pairs:
            return np.repeat(np.arange(e), d), np.tile(np.arange(d), e)
        jitter = ((np.arange(d)[None, :] + 7 * np.arange(e)[:, None]) % d) * 1e-15
        cheapest = np.argsort(self.unit_cost + jitter * (1 + np.abs(self.unit_cost).max()), axis=1)[:, :o.candidates]
        mask = self.current > 0
        mask[np.arange(e)[:, None], cheapest] = True
        return np.nonzero(mask)

    def run(self, time_limit: float) -> tuple[np.ndarray, np.ndarray, dict[str, float]] | None:
        """Solve; returns (slot_expert, replica_share, record) when the layer's cost went down."""
        p, o = self.problem, self.options
        d, s = p.num_devices, p.slots_per_device
        w = p.weights.compute
        total = float(self.load.sum())
        unit = max(total / (d * UNITS_PER_DEVICE), 1.0) if np.allclose(self.load, np.round(self.load)) else \
            total / (d * UNITS_PER_DEVICE)
        units = np.round(self.load / unit)
        pe, pd = self.pairs()
        cost = COST_SCALE * self.unit_cost[pe, pd] / w
        cost_int = np.round(cost)
        hint_y = _round_split(units, units[pe] * self.current[pe, pd], pe)
        hint_lmax = float(np.bincount(pd, weights=hint_y, minlength=d).max())
        cap = np.floor(o.balance_cap * units.sum() / d) if o.balance_cap else units.sum()
        model, ix, iy, il = layer_model(units, pe, pd, cost_int, d, s, COST_SCALE, max(cap, hint_lmax), integer=True)
        hint = np.zeros(model.num_vars)
        hint[ix] = self.current[pe, pd] > 0
        hint[iy] = hint_y
        hint[il] = hint_lmax
        sol = milp.solve(model, o.milp, time_limit, o.gap, hint, o.workers)
        exact = (unit == 1.0 and np.allclose(cost, cost_int) and pe.shape[0] == p.num_experts * d
                 and np.allclose(self.load, units))
        record = {"layer": self.layer, "status": sol.status, "seconds": sol.seconds, "pairs": int(pe.shape[0]),
                  "gap": (sol.objective - sol.bound) / sol.objective if sol.values is not None and sol.objective > 0
                  else 0.0,
                  "bound_seconds": sol.bound * unit * w / COST_SCALE * p.weights.step_scale
                  if sol.values is not None else 0.0, "exact": bool(exact)}
        if sol.values is None:
            return None
        held = sol.values[ix] > 0.5
        slot_expert = self._fill(pe[held], pd[held])
        replica_share = balance_shares(slot_expert, self.load, self.unit_cost, w, o.balance_cap)
        new = layer_objective(w, self.load, layer_device_share(slot_expert, replica_share, p.num_experts),
                              self.unit_cost)
        old = layer_objective(w, self.load, self.current, self.unit_cost)
        record["improvement"] = (old - new) * p.weights.step_scale
        if new >= old * (1 - 1e-9):
            return None
        return slot_expert, replica_share, record

    def _fill(self, pair_expert: np.ndarray, pair_device: np.ndarray) -> np.ndarray:
        """[devices, slots] from the chosen pairs; spare slots get replicas of the experts with the
        highest load per replica that the device does not hold."""
        p = self.problem
        d, s = p.num_devices, p.slots_per_device
        counts = np.bincount(pair_expert, minlength=p.num_experts).astype(np.float64)
        rows = []
        for dev in range(d):
            mine = list(pair_expert[pair_device == dev])
            held = np.zeros(p.num_experts, dtype=bool)
            held[mine] = True
            while len(mine) < s:
                e = int(np.where(held, -1.0, self.load / counts).argmax())
                mine.append(e)
                held[e] = True
                counts[e] += 1
            rows.append(sorted(mine))
        return np.array(rows, dtype=np.int32)


def solve_ilp(problem: PlacementProblem, options: SolverOptions) -> SolveResult:
    """The layer-decomposed ILP (module docstring); under equal-split dispatch, :func:`.even.solve_even_ilp`."""
    if problem.dispatch != "weighted":
        return solve_even_ilp(problem, options)
    t0 = time.perf_counter()
    deadline = t0 + options.time_limit
    warm = min((solver(problem, options) for solver in (solve_exflow, solve_lpt, solve_eplb)),
               key=lambda r: r.objective)
    nl, e = problem.num_layers, problem.num_experts
    slot_expert = warm.placement.slot_expert.copy()
    replica_share = warm.placement.replica_share.copy()
    shares = [layer_device_share(slot_expert[layer], replica_share[layer], e) for layer in range(nl)]
    records: list[dict[str, float]] = []
    solves = nl * options.sweeps
    stopped = False
    for done in range(solves):
        layer = done % nl
        budget = (deadline - time.perf_counter()) / (solves - done)
        if budget < 0.05:
            stopped = True
            break
        result = LayerSolve(problem, layer, shares, options)
        out = result.run(budget)
        if out is not None:
            slot_expert[layer], replica_share[layer], record = out
            shares[layer] = layer_device_share(slot_expert[layer], replica_share[layer], e)
            record["accepted"] = True
            records.append(record)
        else:
            records.append({"layer": layer, "accepted": False})
    placement = Placement(slot_expert, replica_share, e, problem.devices_per_node)
    bound = lower_bound(problem)
    if nl == 1 and records and records[0].get("exact") and records[0].get("status") in ("optimal", "feasible"):
        bound = max(bound, float(records[0]["bound_seconds"]))
    gaps = [r["gap"] for r in records if "gap" in r]
    backend = "OR-Tools CP-SAT" if options.milp == "cpsat" else "PuLP + HiGHS"
    notes = [f"{backend}; warm start: {warm.solver} (objective {warm.objective:.6g} s)",
             "decomposed by layer: each layer solved with its neighbours fixed, "
             f"{options.sweeps} sweep(s); the bound is the whole problem's proved bound" if nl > 1 else
             "one layer: the MILP is the whole problem"]
    if stopped:
        notes.append(f"time limit reached after {len(records)} of {solves} layer solves")
    if problem.num_experts * problem.num_devices > options.full_pairs:
        notes.append(f"each expert limited to its current devices and its {options.candidates} cheapest ones")
    extra = {"warm_start": warm.solver, "warm_objective": warm.objective,
             "layer_solves": len(records), "layers_improved": sum(1 for r in records if r.get("accepted")),
             "subproblem_gap_max": max(gaps) if gaps else 0.0,
             "subproblem_gap_mean": float(np.mean(gaps)) if gaps else 0.0, "milp": options.milp}
    return finish(problem, placement, "ilp", t0, notes, extra, bound)
