"""Placement under equal-split dispatch (``even``, ``sglang-static``), robust across workloads.

When the runtime splits an expert's tokens equally among its replicas (:mod:`moeplan.dispatch`),
a replica of expert e carries ``load[e] / replicas[e]`` and the only freedom is which slots hold
which experts. With several workloads ``w`` (recorded load files, or a trace cut into windows;
each scaled to the fitted load's total), the layer objective is

    compute · agg_w max_d Σ_{e on d} load_w[e] / replicas[e]  +  Σ_{e on d} unit_cost[e, d] · load[e] / replicas[e]

with ``agg`` the mean over workloads (``robust="mean"``, expected Σ max device load) or the
worst (``"worst"``), and ``unit_cost`` the inter-layer traffic with the neighbours fixed
(:func:`.layer.unit_costs`; zero when planning from loads alone).

**Extrapolated workloads.** A workload the plan will serve differs from the fitted ones' mean by
more than they do themselves (the mean was fitted on them; a held-out workload often lies
outside their hull, e.g. a decode workload against mostly prefill ones). With ``W ≥ 3``
workloads the objective's workloads are the fitted ones plus, for each, its deviation from their
mean amplified: ``max(0, mean + (1 + α)·(load_w − mean))``, renormalised to the same total
(:func:`extrapolated`). ``α`` is an option, or (default) chosen by leave-one-out *within* the
fitted workloads (:func:`choose_extrapolation`: plan on all but one, score the left-out one,
for α in ``EXTRAPOLATIONS`` on every ``SELECT_STRIDE``-th layer, balance terms only), so it is
never tuned on the traffic the plan is judged on.

Per layer:

1. **Replicas** (:func:`robust_counts`): every expert once, each extra slot to the expert whose
   worst-workload load per replica is highest; under ``sglang-static`` replica counts are kept
   to divisors of the device count, where SGLang's rule realises exactly the equal split.
2. **Packing**, heaviest replica first, onto the device of least traffic cost among those whose
   load stays within (1 + slack) × mean in every workload (else the least loaded one); replicas
   of one expert on distinct devices.
3. **Swaps** of two replicas between devices: first those that lower the balance term (or keep it
   and lower the sum of squared device loads, weighted ``SQUARES_WEIGHT``: the way off a plateau
   where several devices share the max), then
   those that lower the whole layer objective while every workload's max/mean stays within
   ``balance_cap`` (or where it already was), trying the replicas with the most traffic to save;
   at most ``MAX_SWAPS`` per layer.

Further sweeps repeat 3 with both neighbours fixed.

:func:`solve_even_ilp` then re-solves each layer as a MILP with the replica counts fixed (one
binary per candidate (expert, device) pair: its devices in the heuristic's placement plus its
``candidates`` cheapest; OR-Tools CP-SAT or PuLP + HiGHS, the heuristic as the hint):

    minimise    COST_SCALE · Σ_w M_w + W · Σ cost[e, d] · x[e, d]    ("mean": W workloads)
                COST_SCALE · M + Σ cost[e, d] · x[e, d]              ("worst")
    subject to  Σ_d x[e, d] = replicas[e],  Σ_e x[e, d] = slots,
                Σ_e units_w[e] · x[e, d] ≤ M_w           (every workload w, device d)

(loads per replica in units of 1/1000 of the mean device load; "worst" has one M for all
workloads). A layer's solution is kept only when it lowers
the layer's exact objective. The proved bound of the whole problem is
:func:`.problem.lower_bound` (equal split is a special case of the weighted split it bounds);
each layer's MILP gap is reported.
"""
from __future__ import annotations

import time

import numpy as np

from moeplan.plan import Placement

from . import milp
from .layer import neighbour_affinity, unit_costs
from .options import SolverOptions
from .problem import PlacementProblem, lower_bound
from .result import SolveResult, finish

EXTRAPOLATIONS = (0.0, 0.5, 1.0)   # α candidates of choose_extrapolation
SELECT_STRIDE = 6                  # choose_extrapolation scores every 6th layer
MAX_SWAPS = 400
SQUARES_WEIGHT = 1e-3   # balance swaps: weight of the sum of squared device loads beside the max
TRAFFIC_SOURCES = 32   # replicas tried per traffic swap (those with the most traffic to save)
UNITS_PER_DEVICE = 1000
COST_SCALE = 1000


def allowed_counts(devices: int, dispatch: str) -> np.ndarray:
    """Replica counts a solver may give one expert: 1..devices, divisors of ``devices`` only under
    ``sglang-static`` (module docstring)."""
    counts = np.arange(1, devices + 1)
    return counts[devices % counts == 0] if dispatch == "sglang-static" else counts


def robust_counts(loads: np.ndarray, total_slots: int, allowed: np.ndarray) -> np.ndarray:
    """[experts] replicas filling ``total_slots`` from ``loads`` [workloads, experts] (step 1)."""
    peak = loads.max(axis=0)
    e = peak.shape[0]
    counts = np.ones(e, dtype=np.int64)
    left = total_slots - e
    step_to = {int(a): int(b) for a, b in zip(allowed[:-1], allowed[1:])}
    while left > 0:
        nxt = np.array([step_to.get(int(c), 0) for c in counts])
        fits = (nxt > 0) & (nxt - counts <= left)
        if not fits.any():
            raise RuntimeError("replica counts cannot fill the slots")
        e_best = int(np.where(fits, peak / counts, -1.0).argmax())
        left -= int(nxt[e_best] - counts[e_best])
        counts[e_best] = nxt[e_best]
    return counts


class LayerPacking:
    """One layer's replicas on devices (items = replicas), with per-workload device loads."""

    def __init__(self, loads: np.ndarray, counts: np.ndarray, devices: int, slots: int) -> None:
        self.expert = np.repeat(np.arange(counts.shape[0]), counts)
        self.weight = (loads / counts)[:, self.expert]          # [workloads, items]
        self.devices, self.slots = devices, slots
        self.device = np.full(self.expert.shape[0], -1, dtype=np.int64)
        self.dev_load = np.zeros((loads.shape[0], devices))

    def pack(self, item_cost: np.ndarray, slack: float) -> None:
        """Step 2: ``item_cost`` [items, devices] traffic seconds of each replica on each device."""
        held = np.zeros((self.expert.max() + 1, self.devices), dtype=bool)
        free = np.full(self.devices, self.slots)
        target = self.weight.sum(axis=1, keepdims=True) / self.devices * (1 + slack)
        for i in np.argsort(-self.weight.mean(axis=0), kind="stable"):
            e = self.expert[i]
            ok = (free > 0) & ~held[e]
            within = ok & np.all(self.dev_load + self.weight[:, i:i + 1] <= target, axis=0)
            if within.any():
                d = int(np.where(within, item_cost[i], np.inf).argmin())
            else:
                d = int(np.where(ok, self.dev_load.max(axis=0), np.inf).argmin())
            self.device[i] = d
            self.dev_load[:, d] += self.weight[:, i]
            held[e, d] = True
            free[d] -= 1

    def improve(self, item_cost: np.ndarray, compute: float, robust: str, cap: float | None) -> int:
        """Step 3; returns the swaps made."""
        swaps = 0
        for balance_only in (True, False):
            if not balance_only and not item_cost.any():
                break
            while swaps < MAX_SWAPS and self._best_swap(item_cost, compute, robust, cap, balance_only):
                swaps += 1
        return swaps

    def _best_swap(self, item_cost: np.ndarray, compute: float, robust: str, cap: float | None,
                   balance_only: bool) -> bool:
        n = self.expert.shape[0]
        dev = self.device
        mean = self.dev_load.mean(axis=1)                                          # [w]
        peak = self.dev_load.max(axis=1)
        hot = np.unique(self.dev_load.argmax(axis=1))
        if balance_only:
            src = np.flatnonzero(np.isin(dev, hot))
        else:   # the replicas that could save the most traffic by moving
            potential = item_cost[np.arange(n), dev] - item_cost.min(axis=1)
            src = np.argsort(-potential, kind="stable")[:TRAFFIC_SOURCES]
        a, b = np.meshgrid(src, np.arange(n), indexing="ij")
        a, b = a.ravel(), b.ravel()
        da, db = dev[a], dev[b]
        ok = da != db
        holds = np.zeros((self.expert.max() + 1, self.devices), dtype=bool)
        holds[self.expert, dev] = True
        ok &= ~holds[self.expert[a], db] & ~holds[self.expert[b], da]
        a, b, da, db = a[ok], b[ok], da[ok], db[ok]
        if a.size == 0:
            return False
        delta = self.weight[:, b] - self.weight[:, a]                             # [w, pairs]
        new_a = self.dev_load[:, da] + delta
        new_b = self.dev_load[:, db] - delta
        top = np.sort(self.dev_load, axis=1)[:, ::-1][:, :3]
        order = np.argsort(-self.dev_load, axis=1)[:, :3]
        other = np.where((order[:, 0:1] != da) & (order[:, 0:1] != db), top[:, 0:1],
                         np.where((order[:, 1:2] != da) & (order[:, 1:2] != db), top[:, 1:2], top[:, 2:3]))
        new_peak = np.maximum(other, np.maximum(new_a, new_b))                    # [w, pairs]
        agg = (lambda x: x.mean(axis=0)) if robust == "mean" else (lambda x: x.max(axis=0))
        gain_balance = compute * (agg(peak[:, None]) - agg(new_peak))
        if balance_only:   # the max first; on its plateaus (several devices at the max) the sum of squares
            old_sq = self.dev_load[:, da] ** 2 + self.dev_load[:, db] ** 2
            gain_sq = ((old_sq - new_a ** 2 - new_b ** 2) / np.maximum(mean, 1e-300)[:, None]).mean(axis=0)
            gain = np.where(gain_balance >= 0, gain_balance + SQUARES_WEIGHT * compute * gain_sq, -np.inf)
        else:
            gain_traffic = (item_cost[a, da] + item_cost[b, db]) - (item_cost[a, db] + item_cost[b, da])
            gain = gain_balance + gain_traffic
            limit = np.maximum(peak / mean, cap) if cap is not None else np.inf
            gain = np.where(np.all(new_peak / mean[:, None] <= np.asarray(limit)[..., None] * (1 + 1e-12), axis=0),
                            gain, -np.inf)
        best = int(gain.argmax())
        scale = compute * float(agg(peak)) + 1e-300
        if not gain[best] > 1e-9 * scale:
            return False
        i, j, di, dj = a[best], b[best], da[best], db[best]
        self.dev_load[:, di] += delta[:, best]
        self.dev_load[:, dj] -= delta[:, best]
        dev[i], dev[j] = dj, di
        return True

    def slot_expert(self) -> np.ndarray:
        """[devices, slots] experts, each device's in expert order."""
        rows = [np.sort(self.expert[self.device == d]) for d in range(self.devices)]
        return np.array(rows, dtype=np.int32)


def workload_loads(problem: PlacementProblem) -> np.ndarray:
    """[workloads, layers, experts] each workload's load scaled to the fitted load's per-layer total."""
    w = problem.load[None] if problem.workloads is None else problem.workloads
    totals = w.sum(axis=2, keepdims=True)
    return w * np.divide(problem.load.sum(axis=1)[None, :, None], totals, out=np.zeros_like(totals),
                         where=totals > 0)


def extrapolated(loads: np.ndarray, alpha: float) -> np.ndarray:
    """[workloads (× 2 when α > 0 and workloads ≥ 3), layers, experts]: ``loads`` [workloads, layers,
    experts] and each one's deviation from their mean amplified by 1 + α (module docstring)."""
    if alpha == 0 or loads.shape[0] < 3:
        return loads
    mean = loads.mean(axis=0, keepdims=True)
    ext = np.maximum(mean + (1 + alpha) * (loads - mean), 0.0)
    totals = ext.sum(axis=2, keepdims=True)
    ext *= np.divide(loads.sum(axis=2, keepdims=True), totals, out=np.zeros_like(totals), where=totals > 0)
    return np.concatenate([loads, ext])


def balance_layer(loads: np.ndarray, devices: int, slots: int, allowed: np.ndarray, robust: str,
                  slack: float) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-3 of one layer on balance alone: ([devices, slots] experts, [experts] replicas) for
    ``loads`` [workloads, experts]."""
    counts = robust_counts(loads, devices * slots, allowed)
    pk = LayerPacking(loads, counts, devices, slots)
    no_cost = np.zeros((pk.expert.shape[0], devices))
    pk.pack(no_cost, slack)
    pk.improve(no_cost, 1.0, robust, None)
    return pk.slot_expert(), counts


def choose_extrapolation(loads: np.ndarray, devices: int, slots: int, dispatch: str, robust: str,
                         slack: float) -> tuple[float, dict[str, float]]:
    """(α, {α: leave-one-out balancedness}) for ``loads`` [workloads, layers, experts]: for each α
    of ``EXTRAPOLATIONS``, plan on all workloads but one (:func:`balance_layer` on every
    ``SELECT_STRIDE``-th layer of :func:`extrapolated` loads) and score the one left out (Σ max
    / Σ mean device load, equal split); the α of the lowest mean (the smallest on a tie). 0
    with fewer than 4 workloads (each inner plan needs 3 to extrapolate)."""
    w = loads.shape[0]
    if w < 4:
        return 0.0, {}
    allowed = allowed_counts(devices, dispatch)
    layers = range(0, loads.shape[1], SELECT_STRIDE)
    scores: dict[str, float] = {}
    for alpha in EXTRAPOLATIONS:
        held = []
        for k in range(w):
            fit = extrapolated(np.delete(loads, k, axis=0), alpha)
            peak = mean = 0.0
            for layer in layers:
                slot_expert, counts = balance_layer(fit[:, layer], devices, slots, allowed, robust, slack)
                per_device = (loads[k, layer] / counts)[slot_expert].sum(axis=1)
                peak, mean = peak + per_device.max(), mean + per_device.mean()
            held.append(peak / max(mean, 1e-300))
        scores[f"{alpha:g}"] = float(np.mean(held))
    best = min(EXTRAPOLATIONS, key=lambda a: (round(scores[f"{a:g}"], 12), a))
    return float(best), scores


def robust_loads(problem: PlacementProblem, options: SolverOptions, dispatch: str) -> tuple[np.ndarray, dict]:
    """The objective's workloads [workloads', layers, experts] (:func:`workload_loads`,
    :func:`extrapolated` by ``options.extrapolate`` or, when None, by :func:`choose_extrapolation`)
    and what was chosen, for the report."""
    loads = workload_loads(problem)
    alpha, scores = ((options.extrapolate, {}) if options.extrapolate is not None else
                     choose_extrapolation(loads, problem.num_devices, problem.slots_per_device, dispatch,
                                          options.robust, options.slack))
    report = {"extrapolate": alpha, "extrapolate_chosen_by": "option" if options.extrapolate is not None
              else "leave-one-out within the fitted workloads"}
    if scores:
        report["extrapolate_scores"] = scores
    return extrapolated(loads, alpha), report


def _heuristic(problem: PlacementProblem, options: SolverOptions, dispatch: str,
               loads: np.ndarray) -> tuple[np.ndarray, int]:
    """Steps 1-3 over all layers for the objective's workloads ``loads`` [workloads, layers,
    experts]: ([layers, devices, slots] experts, swaps made)."""
    p = problem
    nl, e, d, s = p.num_layers, p.num_experts, p.num_devices, p.slots_per_device
    allowed = allowed_counts(d, dispatch)
    traffic = bool(p.flows.any())
    slot_expert = np.zeros((nl, d, s), dtype=np.int32)
    shares: list[np.ndarray | None] = [None] * nl
    swaps = 0
    for sweep in range(options.sweeps if traffic else 1):
        for layer in range(nl):
            counts = robust_counts(loads[:, layer], d * s, allowed)
            pk = LayerPacking(loads[:, layer], counts, d, s)
            item_cost = _item_cost(p, layer, shares, pk.expert, counts)
            if sweep == 0:
                pk.pack(item_cost, options.slack)
            else:
                _load_layer(pk, slot_expert[layer])
            swaps += pk.improve(item_cost, p.weights.compute, options.robust, options.balance_cap)
            slot_expert[layer] = pk.slot_expert()
            shares[layer] = _device_share(slot_expert[layer], e)
    return slot_expert, swaps


def _item_cost(problem: PlacementProblem, layer: int, shares: list[np.ndarray | None], item_expert: np.ndarray,
               counts: np.ndarray) -> np.ndarray:
    """[items, devices] traffic seconds of each replica on each device, neighbours fixed (zeros
    without a trace)."""
    if not problem.flows.any():
        return np.zeros((item_expert.shape[0], problem.num_devices))
    a_in, a_out = neighbour_affinity(problem, layer, shares)
    cost_ed = unit_costs(problem, layer, a_in, a_out) * problem.load[layer][:, None]
    return cost_ed[item_expert] / counts[item_expert][:, None]


def _dispatch_of(problem: PlacementProblem) -> str:
    return problem.dispatch if problem.dispatch != "weighted" else "even"


def _notes(problem: PlacementProblem, options: SolverOptions, dispatch: str, chosen: dict) -> list[str]:
    workloads = 1 if problem.workloads is None else problem.workloads.shape[0]
    extra = ([f"objective also over each workload's deviation from their mean × {1 + chosen['extrapolate']:g} "
              f"(α = {chosen['extrapolate']:g}, {chosen['extrapolate_chosen_by']})"]
             if workloads >= 3 and chosen["extrapolate"] > 0 else [])
    return extra + [f"{dispatch} dispatch: replicas share their expert's tokens equally"
            + (" (replica counts divide the device count, where SGLang's static rule is exactly even)"
               if dispatch == "sglang-static" else ""),
            f"robust over {workloads} workloads: {options.robust} of the max device load per layer" if workloads > 1
            else "one workload"]


def solve_even(problem: PlacementProblem, options: SolverOptions) -> SolveResult:
    """The heuristic of the module docstring, under the problem's dispatch (``even`` unless
    the problem says ``sglang-static``)."""
    t0 = time.perf_counter()
    dispatch = _dispatch_of(problem)
    loads, chosen = robust_loads(problem, options, dispatch)
    slot_expert, swaps = _heuristic(problem, options, dispatch, loads)
    placement = Placement.from_slots(slot_expert, problem.num_experts, problem.devices_per_node, dispatch=dispatch)
    return finish(problem, placement, "even", t0, _notes(problem, options, dispatch, chosen),
                  {"swaps": swaps, "dispatch": dispatch, "robust": options.robust, **chosen})


def solve_even_ilp(problem: PlacementProblem, options: SolverOptions) -> SolveResult:
    """The heuristic, then each layer's MILP with the replica counts fixed (module docstring)."""
    t0 = time.perf_counter()
    deadline = t0 + options.time_limit
    p = problem
    nl, e, d, s = p.num_layers, p.num_experts, p.num_devices, p.slots_per_device
    dispatch = _dispatch_of(p)
    loads, chosen = robust_loads(p, options, dispatch)
    slot_expert, swaps = _heuristic(p, options, dispatch, loads)
    warm = Placement.from_slots(slot_expert, e, p.devices_per_node, dispatch=dispatch)
    allowed = allowed_counts(d, dispatch)
    shares: list[np.ndarray | None] = [_device_share(slot_expert[layer], e) for layer in range(nl)]
    records: list[dict[str, float]] = []
    for layer in range(nl):
        budget = (deadline - time.perf_counter()) / (nl - layer)
        if budget < 0.05:
            break
        counts = robust_counts(loads[:, layer], d * s, allowed)
        experts = np.arange(e)
        item_cost = _item_cost(p, layer, shares, experts, counts)
        record = _layer_milp(p, options, loads[:, layer], counts, item_cost, slot_expert[layer], budget)
        records.append(record)
        if "slots" in record:
            slot_expert[layer] = record.pop("slots")
            shares[layer] = _device_share(slot_expert[layer], e)
    placement = Placement.from_slots(slot_expert, e, p.devices_per_node, dispatch=dispatch)
    gaps = [r["gap"] for r in records if "gap" in r]
    backend = "OR-Tools CP-SAT" if options.milp == "cpsat" else "PuLP + HiGHS"
    notes = _notes(p, options, dispatch, chosen) + [
        f"{backend}: each layer re-solved with its replica counts fixed, warm start the equal-split heuristic",
        "the bound is the whole problem's proved bound"]
    if len(records) < nl:
        notes.append(f"time limit reached after {len(records)} of {nl} layer solves")
    from .problem import objective
    extra = {"warm_start": "even", "warm_objective": objective(p, warm).total, "swaps": swaps, "dispatch": dispatch,
             "robust": options.robust, **chosen, "layer_solves": len(records),
             "layers_improved": sum(1 for r in records if r.get("accepted")),
             "subproblem_gap_max": max(gaps) if gaps else 0.0,
             "subproblem_gap_mean": float(np.mean(gaps)) if gaps else 0.0, "milp": options.milp}
    return finish(p, placement, "ilp", t0, notes, extra, lower_bound(p))


def _layer_milp(problem: PlacementProblem, options: SolverOptions, loads: np.ndarray, counts: np.ndarray,
                cost_ed: np.ndarray, current: np.ndarray, time_limit: float) -> dict:
    """One layer's MILP (module docstring); the record gets ``slots`` when the layer improved."""
    p = problem
    e, d, s = p.num_experts, p.num_devices, p.slots_per_device
    w = loads.shape[0]
    held = np.zeros((e, d), dtype=bool)
    held[current.ravel(), np.repeat(np.arange(d), s)] = True
    if e * d <= options.full_pairs:
        mask = np.ones((e, d), dtype=bool)
    else:
        jitter = ((np.arange(d)[None, :] + 7 * np.arange(e)[:, None]) % d) * 1e-12 * (1 + np.abs(cost_ed).max())
        cheapest = np.argsort(cost_ed + jitter, axis=1)[:, :options.candidates]
        mask = held.copy()
        mask[np.arange(e)[:, None], cheapest] = True
    pe, pd = np.nonzero(mask)
    unit = loads.sum(axis=1).mean() / (d * UNITS_PER_DEVICE)
    per_replica = np.round(loads / counts / max(unit, 1e-300))                  # [w, e]
    compute = p.weights.compute
    scale = COST_SCALE / max(compute * unit, 1e-300)
    pair_cost = np.round(cost_ed[pe, pd] * scale * (w if options.robust == "mean" else 1))
    m = milp.LinearModel()
    ix = m.add_vars(pe.shape[0], 0, 1, True, cost=pair_cost)
    n_max = w if options.robust == "mean" else 1
    im = m.add_vars(n_max, 0, float(per_replica.sum(axis=1).max()), True, cost=COST_SCALE)
    m.add_rows(pe, ix, 1.0, e, counts.astype(np.float64), counts.astype(np.float64))
    m.add_rows(pd, ix, 1.0, d, float(s), float(s))
    for k in range(w):
        m.add_rows(np.concatenate([pd, np.arange(d)]), np.concatenate([ix, np.full(d, im[k % n_max])]),
                   np.concatenate([per_replica[k, pe], -np.ones(d)]), d, -np.inf, 0.0)
    hint = np.zeros(m.num_vars)
    hint[ix] = held[pe, pd]
    hint_loads = np.zeros((w, d))
    np.add.at(hint_loads.T, np.repeat(np.arange(d), s), per_replica[:, current.ravel()].T)
    hint[im] = hint_loads.max(axis=1) if n_max == w else hint_loads.max()
    sol = milp.solve(m, options.milp, time_limit, options.gap, hint, options.workers)
    record: dict = {"status": sol.status, "seconds": sol.seconds, "pairs": int(pe.shape[0])}
    if sol.values is None:
        return record
    record["gap"] = (sol.objective - sol.bound) / sol.objective if sol.objective > 0 else 0.0
    chosen = sol.values[ix] > 0.5
    if np.bincount(pd[chosen], minlength=d).tolist() != [s] * d:
        return record
    new = np.array([np.sort(pe[chosen & (pd == dev)]) for dev in range(d)], dtype=np.int32)
    old_value = float(hint @ np.asarray(np.concatenate(m.cost)))
    if float(sol.values @ np.asarray(np.concatenate(m.cost))) < old_value * (1 - 1e-9):
        record["slots"] = new
        record["accepted"] = True
    return record


def _load_layer(pk: LayerPacking, slots: np.ndarray) -> None:
    """Put ``pk``'s items where ``slots`` [devices, slots] has them (same replica counts)."""
    d = np.repeat(np.arange(slots.shape[0]), slots.shape[1])
    order = np.argsort(slots.ravel(), kind="stable")
    pk.device[:] = d[order]
    pk.dev_load[:] = 0
    np.add.at(pk.dev_load.T, pk.device, pk.weight.T)


def _device_share(slot_expert: np.ndarray, num_experts: int) -> np.ndarray:
    """[experts, devices] equal-split share of one layer's slots."""
    d, s = slot_expert.shape
    counts = np.bincount(slot_expert.ravel(), minlength=num_experts)
    out = np.zeros((num_experts, d))
    np.add.at(out, (slot_expert.ravel(), np.repeat(np.arange(d), s)), 1.0 / counts[slot_expert.ravel()])
    return out
