"""Placement under equal-split dispatch (``even``, ``sglang-static``), robust across workloads.

When the runtime splits an expert's tokens equally among its replicas (:mod:`moeplan.dispatch`),
a replica of expert e carries ``load[e] / replicas[e]`` and the only freedom is which slots hold
which experts. With several workloads ``w`` (recorded load files, or a trace cut into windows;
each scaled to the fitted load's total), the layer objective is

    compute · agg_w max_d Σ_{e on d} load_w[e] / replicas[e]  +  Σ_{e on d} unit_cost[e, d] · load[e] / replicas[e]

with ``agg`` the mean over workloads (``robust="mean"``, expected Σ max device load) or the
worst (``"worst"``), and ``unit_cost`` the inter-layer traffic with the neighbours fixed
(:func:`.layer.unit_costs`; zero when planning from loads alone).

Per layer:

1. **Replicas** (:func:`robust_counts`): every expert once, each extra slot to the expert whose
   worst-workload load per replica is highest; under ``sglang-static`` replica counts are kept
   to divisors of the device count, where SGLang's rule realises exactly the equal split.
2. **Packing**, heaviest replica first, onto the device of least traffic cost among those whose
   load stays within (1 + slack) × mean in every workload (else the least loaded one); replicas
   of one expert on distinct devices.
3. **Swaps** of two replicas between devices: first those that lower the balance term, then
   those that lower the whole layer objective while every workload's max/mean stays within
   ``balance_cap`` (or where it already was).

Further sweeps repeat 3 with both neighbours fixed.
"""
from __future__ import annotations

import time

import numpy as np

from moeplan.plan import Placement

from .layer import neighbour_affinity, unit_costs
from .options import SolverOptions
from .problem import PlacementProblem
from .result import SolveResult, finish

MAX_SWAPS = 400


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
        src = np.flatnonzero(np.isin(dev, hot)) if balance_only else np.arange(n)
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
        if balance_only:
            gain = gain_balance
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


def solve_even(problem: PlacementProblem, options: SolverOptions) -> SolveResult:
    """The heuristic of the module docstring, under the problem's dispatch (``even`` unless
    the problem says ``sglang-static``)."""
    t0 = time.perf_counter()
    p = problem
    nl, e, d, s = p.num_layers, p.num_experts, p.num_devices, p.slots_per_device
    dispatch = p.dispatch if p.dispatch != "weighted" else "even"
    loads = workload_loads(p)
    allowed = allowed_counts(d, dispatch)
    compute = p.weights.compute
    traffic = bool(p.flows.any())
    slot_expert = np.zeros((nl, d, s), dtype=np.int32)
    shares: list[np.ndarray | None] = [None] * nl
    swaps = 0
    for sweep in range(options.sweeps if traffic else 1):
        for layer in range(nl):
            counts = robust_counts(loads[:, layer], d * s, allowed)
            pk = LayerPacking(loads[:, layer], counts, d, s)
            if traffic:
                a_in, a_out = neighbour_affinity(p, layer, shares)
                cost_ed = unit_costs(p, layer, a_in, a_out) * p.load[layer][:, None]
                item_cost = cost_ed[pk.expert] / counts[pk.expert][:, None]
            else:
                item_cost = np.zeros((pk.expert.shape[0], d))
            if sweep == 0:
                pk.pack(item_cost, options.slack)
            else:
                _load_layer(pk, slot_expert[layer])
            swaps += pk.improve(item_cost, compute, options.robust, options.balance_cap)
            slot_expert[layer] = pk.slot_expert()
            shares[layer] = _device_share(slot_expert[layer], e)
    placement = Placement.from_slots(slot_expert, e, p.devices_per_node, dispatch=dispatch)
    workloads = 1 if p.workloads is None else p.workloads.shape[0]
    notes = [f"{dispatch} dispatch: replicas share their expert's tokens equally"
             + (" (replica counts divide the device count, where SGLang's static rule is exactly even)"
                if dispatch == "sglang-static" else ""),
             f"robust over {workloads} workload(s): {options.robust} of Σ max device load" if workloads > 1 else
             "one workload"]
    return finish(p, placement, "even", t0, notes, {"swaps": swaps, "dispatch": dispatch, "workloads": workloads,
                                                     "robust": options.robust})


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
