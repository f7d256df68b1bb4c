"""The new placement of a scaling step: balanced within a cap, moving the fewest experts.

Per MoE layer, with ``N′`` devices of ``S′`` slots:

1. **Replicas.** EPLB's rule on the new slot count (every expert once, each extra slot to the
   expert with the highest load per replica, at most one replica per device). The rule is greedy,
   so the counts for fewer slots are a prefix of those for more: scaling rarely changes them much.
   Replicas split their expert's tokens equally (as the runtimes do), so each replica weighs
   ``load / replicas``.
2. **Cap.** A device may carry at most ``cap = max(target × mean, LPT)`` token-choices, where LPT
   is the max device load of a from-scratch LPT packing of the same replicas: the target when it
   is reachable, else never worse than a full rebalance.
3. **Keep, then fill.** A replica *kept* on a surviving device that already holds the expert costs
   nothing; every other replica is one expert transfer. Greedy: the heaviest experts first keep
   their old holders (least loaded first) while slots and the cap allow; the remaining replicas go
   heaviest first to the least loaded device with a free slot that does not hold the expert.
4. **Local search.** Pairwise swaps of replicas between devices: first to bring every device
   under the cap at the least extra transfers, then any swap that saves a transfer and keeps both
   devices under the cap, until none is left.

``method="cpsat"`` instead solves each layer exactly with OR-Tools CP-SAT (maximise kept replicas
subject to slots, one replica per device and the cap; loads rounded up, so the cap is never
exceeded), warm-started from the greedy; ``"auto"`` uses CP-SAT when experts × devices ≤
:data:`EXACT_PAIRS`. :func:`kept_upper_bound` proves how many replicas any placement with these
replica counts can keep (a max-flow that ignores the cap), so the result carries its gap.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from moeplan.solvers.placement.replication import pack_lpt, replica_counts

from moeplan.errors import InputError

from .problem import ScalingProblem

METHODS = ("auto", "greedy", "cpsat")
EXACT_PAIRS = 2048          # experts × devices up to which "auto" solves a layer with CP-SAT
CPSAT_SECONDS = 5.0         # per layer
SCALE = 1_000_000           # CP-SAT load units per cap
EPS = 1e-9


@dataclass
class LayerAssignment:
    """One layer's new placement. ``slots`` [N′, S′] experts (kept experts stay in their old
    slot where it still exists); ``kept`` replicas left in place; ``kept_bound`` the most any
    placement with these replica counts can keep; ``cap`` the load cap; ``max_load`` the
    resulting max device load; ``optimal`` CP-SAT proved the kept count optimal under the cap."""

    slots: np.ndarray
    kept: int
    kept_bound: int
    cap: float
    max_load: float
    mean_load: float
    optimal: bool
    method: str


@dataclass
class Assignment:
    """All layers' new placement: ``slot_expert`` [layers, N′, S′] and per-layer records."""

    slot_expert: np.ndarray
    layers: list[LayerAssignment]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def transfers(self) -> int:
        """Replicas that must be copied from another device."""
        return int(sum(lay.slots.size - lay.kept for lay in self.layers))

    @property
    def transfers_bound(self) -> int:
        """A proved lower bound on the transfers of any placement with these replica counts."""
        return int(sum(lay.slots.size - lay.kept_bound for lay in self.layers))


def assign(problem: ScalingProblem, method: str = "auto", balance_target: float | None = None,
           incumbent: np.ndarray | None = None) -> Assignment:
    """The new placement of every layer (see the module docstring). ``incumbent`` [layers, N′, S′]
    (e.g. the answer for a tighter target) replaces a layer's answer where it keeps more replicas
    in place within this cap."""
    if method not in METHODS:
        raise InputError(f"unknown method '{method}'", field="method", fix=f"use one of: {', '.join(METHODS)}")
    target = problem.balance_target if balance_target is None else balance_target
    t0 = time.perf_counter()
    layers = []
    n, s = problem.new_devices, problem.slots_per_device
    for layer in range(problem.num_layers):
        load = problem.load[layer]
        replicas = replica_counts(load, n * s, n)
        weight = load / replicas
        mean = float(load.sum()) / n
        lpt = pack_lpt(weight, replicas, n, s)
        lpt_max = float(np.bincount(np.repeat(np.arange(n), s), weights=weight[lpt.ravel()], minlength=n).max())
        cap = max(target * mean, lpt_max)
        holds = old_holders(problem, layer)
        x = greedy(weight, replicas, holds, n, s, cap)
        exact = method == "cpsat" or (method == "auto" and problem.num_experts * n <= EXACT_PAIRS)
        optimal = False
        if exact:
            x, optimal = solve_exact(weight, replicas, holds, s, cap, x)
        if incumbent is not None:
            other = np.zeros_like(x)
            other[incumbent[layer].ravel(), np.repeat(np.arange(n), s)] = True
            fits = (other.T.astype(np.float64) @ weight).max() <= cap + EPS
            if fits and (other & holds).sum() > (x & holds).sum() and (other.sum(axis=1) == replicas).all():
                x = other
        loads = x.T.astype(np.float64) @ weight
        layers.append(LayerAssignment(arrange_slots(x, problem.old_slots[layer], s), int((x & holds).sum()),
                                      kept_upper_bound(replicas, holds, s), cap, float(loads.max()), mean, optimal,
                                      "cpsat" if exact else "greedy"))
    slot_expert = np.stack([lay.slots for lay in layers]).astype(np.int32)
    notes = []
    unreachable = [i for i, lay in enumerate(layers) if lay.cap > target * lay.mean_load * (1 + 1e-9)]
    if unreachable:
        notes.append(f"{len(unreachable)} layer(s) cannot reach max/mean {target:g} with equal replica shares "
                     f"(a hot expert's replica outweighs it); held to a from-scratch LPT packing instead")
    return Assignment(slot_expert, layers, time.perf_counter() - t0, notes)


def old_holders(problem: ScalingProblem, layer: int) -> np.ndarray:
    """bool [experts, N′]: surviving devices that hold each expert before the step."""
    holds = np.zeros((problem.num_experts, problem.new_devices), dtype=bool)
    old = problem.old_slots[layer, :problem.survivors]
    holds[old.ravel(), np.repeat(np.arange(old.shape[0]), old.shape[1])] = True
    return holds


def greedy(weight: np.ndarray, replicas: np.ndarray, holds: np.ndarray, devices: int, slots: int,
           cap: float) -> np.ndarray:
    """Keep, fill and local search (module docstring, steps 3–4). Returns bool [experts, devices]."""
    e = weight.shape[0]
    x = np.zeros((e, devices), dtype=bool)
    load = np.zeros(devices)
    free = np.full(devices, slots, dtype=np.int64)
    order = np.argsort(-weight, kind="stable")
    for expert in order:
        for dev in sorted(np.flatnonzero(holds[expert]), key=lambda d: load[d]):
            if x[expert].sum() >= replicas[expert]:
                break
            if free[dev] > 0 and load[dev] + weight[expert] <= cap + EPS:
                x[expert, dev] = True
                load[dev] += weight[expert]
                free[dev] -= 1
    pending = np.repeat(order, (replicas - x.sum(axis=1))[order])
    for expert in pending:
        ok = (free > 0) & ~x[expert]
        if not ok.any():
            _make_room(x, load, free, weight, int(expert))
            ok = (free > 0) & ~x[expert]
        dev = int(np.where(ok, load, np.inf).argmin())
        x[expert, dev] = True
        load[dev] += weight[expert]
        free[dev] -= 1
    _local_search(x, weight, holds, cap)
    return x


def _make_room(x: np.ndarray, load: np.ndarray, free: np.ndarray, weight: np.ndarray, expert: int) -> None:
    """Every device with a free slot holds ``expert`` already: move another expert's replica from
    a device without ``expert`` into a free slot (so that device can take ``expert``)."""
    for free_dev in np.flatnonzero(free > 0):
        for dev in np.flatnonzero(~x[expert]):
            movable = np.flatnonzero(x[:, dev] & ~x[:, free_dev])
            if movable.size:
                other = int(movable[0])
                x[other, dev], x[other, free_dev] = False, True
                load[dev] -= weight[other]
                load[free_dev] += weight[other]
                free[dev] += 1
                free[free_dev] -= 1
                return
    raise InputError("cannot give every replica its own device", field="slots", fix="use fewer slots per device")


def _local_search(x: np.ndarray, weight: np.ndarray, holds: np.ndarray, cap: float) -> None:
    """Swaps of two replicas between devices (module docstring, step 4), in place."""
    e, d = x.shape
    for _ in range(4 * e * d):
        load = x.T.astype(np.float64) @ weight
        if load.max() > cap + EPS:
            if not _swap_down(x, weight, holds, load):
                break
        elif not _swap_saving(x, weight, holds, load, cap):
            break


def _swap_candidates(x: np.ndarray, holds: np.ndarray, d1: int,
                     experts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every trade of a replica of one of ``experts`` on ``d1`` with a replica (expert b on
    device d2) elsewhere that keeps one replica per device: (a, b, d2, change in transfers)."""
    d2s, bs = np.nonzero(x.T)
    a = np.repeat(experts, d2s.size)
    d2s, bs = np.tile(d2s, experts.size), np.tile(bs, experts.size)
    ok = (d2s != d1) & ~x[a, d2s] & ~x[bs, d1]
    a, d2s, bs = a[ok], d2s[ok], bs[ok]
    delta = ((~holds[a, d2s]).astype(np.int64) + (~holds[bs, d1]).astype(np.int64)
             - (~holds[a, d1]).astype(np.int64) - (~holds[bs, d2s]).astype(np.int64))
    return a, bs, d2s, delta


def _trade(x: np.ndarray, a: int, d1: int, b: int, d2: int) -> None:
    x[a, d1], x[b, d2], x[a, d2], x[b, d1] = False, False, True, True


def _swap_down(x: np.ndarray, weight: np.ndarray, holds: np.ndarray, load: np.ndarray) -> bool:
    """Lower the most loaded device by one swap, at the fewest extra transfers. False if no swap helps."""
    d1 = int(load.argmax())
    a, bs, d2s, delta = _swap_candidates(x, holds, d1, np.flatnonzero(x[:, d1]))
    diff = weight[a] - weight[bs]
    new_max = np.maximum(load[d1] - diff, load[d2s] + diff)
    good = np.flatnonzero((diff > EPS) & (new_max < load[d1] - EPS))
    if not good.size:
        return False
    i = good[np.lexsort((new_max[good], delta[good]))[0]]
    _trade(x, int(a[i]), d1, int(bs[i]), int(d2s[i]))
    return True


def _swap_saving(x: np.ndarray, weight: np.ndarray, holds: np.ndarray, load: np.ndarray, cap: float) -> bool:
    """Apply one swap that saves a transfer and keeps both devices under the cap. False if none."""
    moved_e, moved_d = np.nonzero(x & ~holds)
    for d1 in np.unique(moved_d):
        a, bs, d2s, delta = _swap_candidates(x, holds, int(d1), moved_e[moved_d == d1])
        diff = weight[a] - weight[bs]
        good = np.flatnonzero((delta < 0) & (load[d1] - diff <= cap + EPS) & (load[d2s] + diff <= cap + EPS))
        if good.size:
            i = good[np.argmin(delta[good])]
            _trade(x, int(a[i]), int(d1), int(bs[i]), int(d2s[i]))
            return True
    return False


def solve_exact(weight: np.ndarray, replicas: np.ndarray, holds: np.ndarray, slots: int, cap: float,
                start: np.ndarray) -> tuple[np.ndarray, bool]:
    """CP-SAT: maximise kept replicas under slots, one replica per device and the cap (loads
    rounded up). Returns the best placement found (``start`` if CP-SAT finds none better) and
    whether it is proved optimal."""
    from ortools.sat.python import cp_model

    e, d = holds.shape
    units = np.ceil(weight / cap * SCALE - 1e-6).astype(np.int64)
    m = cp_model.CpModel()
    x = [[m.new_bool_var(f"x{i}_{j}") for j in range(d)] for i in range(e)]
    for i in range(e):
        m.add(sum(x[i]) == int(replicas[i]))
    for j in range(d):
        col = [x[i][j] for i in range(e)]
        m.add(sum(col) == slots)
        m.add(cp_model.LinearExpr.weighted_sum(col, units.tolist()) <= SCALE)
    m.maximize(sum(x[i][j] for i, j in zip(*np.nonzero(holds))))
    start_units = (start.T.astype(np.int64) @ units).max()
    if start_units <= SCALE:
        for i in range(e):
            for j in range(d):
                m.add_hint(x[i][j], bool(start[i, j]))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = CPSAT_SECONDS
    solver.parameters.num_workers = 1
    status = solver.solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return start, False
    found = np.array([[solver.value(x[i][j]) for j in range(d)] for i in range(e)], dtype=bool)
    if (found & holds).sum() < (start & holds).sum() and start_units <= SCALE:
        return start, False
    return found, status == cp_model.OPTIMAL


def kept_upper_bound(replicas: np.ndarray, holds: np.ndarray, slots: int) -> int:
    """The most replicas any placement with these counts can keep in place: a maximum b-matching
    of experts (at most ``replicas`` each) to the devices that hold them (at most ``slots`` each),
    by augmenting paths from a greedy start."""
    e, d = holds.shape
    match = np.zeros((e, d), dtype=bool)
    left = replicas.astype(np.int64).copy()
    room = np.full(d, slots, dtype=np.int64)
    for i, j in zip(*np.nonzero(holds)):
        if left[i] > 0 and room[j] > 0:
            match[i, j] = True
            left[i] -= 1
            room[j] -= 1
    adjacency = [np.flatnonzero(holds[i]).tolist() for i in range(e)]
    while (path := _augmenting_path(adjacency, match, left, room)) is not None:
        start, end, flips = path
        for i, j in flips:
            match[i, j] = not match[i, j]
        left[start] -= 1
        room[end] -= 1
    return int(match.sum())


def _augmenting_path(adjacency: list[list[int]], match: np.ndarray, left: np.ndarray,
                     room: np.ndarray) -> tuple[int, int, list[tuple[int, int]]] | None:
    """A shortest path expert → device → (matched) expert → … → device, from an expert with
    replicas left to a device with room, alternating unmatched and matched pairs: (start expert,
    end device, the pairs to flip), or None."""
    reached_from: dict[int, int] = {}          # device → the expert that reached it
    entered_via: dict[int, int | None] = {}    # expert → the device whose matched pair reached it
    frontier = [int(i) for i in np.flatnonzero(left > 0)]
    for i in frontier:
        entered_via[i] = None
    while frontier:
        nxt = []
        for i in frontier:
            for j in adjacency[i]:
                if j in reached_from or match[i, j]:
                    continue
                reached_from[j] = i
                if room[j] > 0:
                    flips = []
                    dev: int | None = j
                    while dev is not None:
                        expert = reached_from[dev]
                        flips.append((expert, dev))
                        dev = entered_via[expert]
                        if dev is not None:
                            flips.append((expert, dev))
                    return flips[-1][0], j, flips
                for k in np.flatnonzero(match[:, j]).tolist():
                    if k not in entered_via:
                        entered_via[k] = j
                        nxt.append(k)
        frontier = nxt
    return None


def arrange_slots(x: np.ndarray, old: np.ndarray, slots: int) -> np.ndarray:
    """[devices, slots] from bool [experts, devices]: a kept expert stays in its old slot index
    when that slot still exists, the others fill the free slots in expert order."""
    d = x.shape[1]
    out = np.full((d, slots), -1, dtype=np.int64)
    for dev in range(d):
        experts = set(np.flatnonzero(x[:, dev]).tolist())
        if dev < old.shape[0]:
            for s, expert in enumerate(old[dev][:slots]):
                if expert in experts and out[dev, s] < 0:
                    out[dev, s] = expert
                    experts.discard(int(expert))
        free = np.flatnonzero(out[dev] < 0)
        out[dev, free] = sorted(experts)
    return out
