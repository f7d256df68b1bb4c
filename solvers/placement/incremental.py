"""Incremental re-placement: improve the current placement for new traffic (or a new device
count) within a budget of expert moves, and the trade-off curve of moves against balance.

A move copies one layer's weights of one expert (``expert_bytes``) into a slot of another device,
replacing what the slot held. The token shares follow the problem's dispatch model
(:mod:`moeplan.dispatch`), so every move is scored by the balance the runtime realises: under
``weighted`` they change for free (routing, not weights) and every layer's shares are re-solved by
the share LP (:func:`.layer.balance_shares`) after each move; under ``even`` and ``sglang-static``
each replica gets ``1 / replicas`` of its expert's tokens (what ``sglang-static`` realises exactly
where an expert's replicas sit on distinct devices and their count divides the device count;
callers score the result with :func:`moeplan.dispatch.realise`).

1. **Reshape** (device count or slots per device changed): devices ``0..min(D, D')-1`` keep their
   slots (the most needed ones when slots shrink: sole replicas first, then by load per replica);
   new slots start empty.
2. **Mandatory moves**: every expert left without a replica (its devices are gone) is copied into
   an empty slot or over a redundant replica; remaining empty slots get replicas of the experts
   with the highest load per replica. These come first and must fit the budget.
3. **Greedy improvement**: each layer proposes its best move — a replica of one of the busiest
   device's hottest experts written over a redundant replica on one of the least loaded devices,
   or a swap (two moves) of a hot expert on the busiest device with a cold one on the least loaded
   device — scored by the drop of the layer's objective (its neighbours fixed) per byte; the best
   proposal over all layers is applied, until the budget or the gains run out.

The budget counts slot writes (a swap is two). The result's moves are what a runtime executes:
:func:`moeplan.moves.diff_moves` from the current placement to the result, every source read from
the current placement (a slot written twice, or written back, moves once or not at all, so the
bytes that travel never exceed the writes budgeted).
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeplan.dispatch import even_share
from moeplan.errors import InputError
from moeplan.moves import Move, diff_moves
from moeplan.plan import Placement

from .layer import balance_shares, layer_device_share, layer_objective, neighbour_affinity, unit_costs
from .metrics import balancedness
from .options import SolverOptions
from .problem import PlacementProblem, objective

HOT_EXPERTS = 2       # experts of the busiest device tried per proposal
TARGET_DEVICES = 3    # least loaded devices tried per proposal


@dataclass
class IncrementalResult:
    """The re-placement, its moves and the moves-vs-balance curve (one point per applied proposal,
    the first after the mandatory moves). ``objective_before`` is None when the cluster changed
    (the current placement has no objective on the new cluster)."""

    placement: Placement
    moves: tuple[Move, ...]
    bytes_moved: float
    objective_before: float | None
    objective_after: float
    balancedness_before: float
    balancedness_after: float
    curve: list[dict[str, float]]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {"name": "incremental", "objective": self.objective_after, "objective_before": self.objective_before,
                "balancedness_before": self.balancedness_before, "balancedness_after": self.balancedness_after,
                "moves": len(self.moves), "bytes_moved": self.bytes_moved, "seconds": self.seconds,
                "notes": list(self.notes)}


class _State:
    """Slots, shares and per-layer objective of the placement being edited."""

    def __init__(self, problem: PlacementProblem, slot_expert: np.ndarray, options: SolverOptions) -> None:
        self.p, self.options = problem, options
        self.slot_expert = slot_expert            # [L, D, S], -1 = empty
        self.replica_share = np.zeros(slot_expert.shape)
        self.shares: list[np.ndarray | None] = [None] * problem.num_layers
        self.writes = 0                           # slots written so far (what the budget counts)

    def resolve(self, layer: int) -> None:
        """Re-solve the layer's token shares (all its slots must be filled)."""
        se = self.slot_expert[layer]
        self.replica_share[layer] = self.layer_shares(layer, se)
        self.shares[layer] = layer_device_share(se, self.replica_share[layer], self.p.num_experts)

    def layer_shares(self, layer: int, slot_expert: np.ndarray) -> np.ndarray:
        """[devices, slots] token shares of one layer's slots under the problem's dispatch model."""
        p = self.p
        if p.dispatch != "weighted":
            return even_share(slot_expert[None], p.num_experts)[0]
        return balance_shares(slot_expert, p.load[layer], self.unit_cost(layer), p.weights.compute,
                              self.options.balance_cap)

    def unit_cost(self, layer: int) -> np.ndarray:
        a_in, a_out = neighbour_affinity(self.p, layer, self.shares)
        return unit_costs(self.p, layer, a_in, a_out)

    def layer_cost(self, layer: int, slot_expert: np.ndarray) -> float:
        p = self.p
        rs = self.layer_shares(layer, slot_expert)
        return layer_objective(p.weights.compute, p.load[layer], layer_device_share(slot_expert, rs, p.num_experts),
                               self.unit_cost(layer)) * p.weights.step_scale

    def write(self, layer: int, writes: list[tuple[int, int, int]]) -> None:
        """Put experts into slots, (device, slot, expert) each (a swap writes two)."""
        for device, slot, expert in writes:
            self.slot_expert[layer, device, slot] = expert
        self.writes += len(writes)


def _reshape(current: Placement, problem: PlacementProblem) -> np.ndarray:
    """Step 1: [L, D', S'] slots (−1 empty)."""
    nl, d_old, s_old = current.slot_expert.shape
    d, s, e = problem.num_devices, problem.slots_per_device, problem.num_experts
    out = np.full((nl, d, s), -1, dtype=np.int32)
    keep_dev = min(d, d_old)
    for layer in range(nl):
        kept = current.slot_expert[layer, :keep_dev]
        if s >= s_old:
            out[layer, :keep_dev, :s_old] = kept
            continue
        counts = np.bincount(kept.ravel(), minlength=e)
        value = problem.load[layer] / np.maximum(counts, 1)
        for dev in range(keep_dev):
            row = kept[dev]
            rank = np.lexsort((-value[row], counts[row] > 1))
            out[layer, dev, :s] = row[rank[:s]]
    return out


def _mandatory(state: _State, layer: int) -> None:
    """Step 2 for one layer."""
    p = state.p
    se = state.slot_expert[layer]
    load = p.load[layer]
    counts = np.bincount(se[se >= 0], minlength=p.num_experts)
    for expert in np.argsort(-load, kind="stable"):
        if counts[expert]:
            continue
        empty = np.argwhere(se < 0)
        if empty.size:
            dev, slot = (int(v) for v in empty[0])
        else:
            value = np.where(counts[se] > 1, load[se] / np.maximum(counts[se], 1), np.inf)
            dev, slot = (int(v) for v in np.unravel_index(int(value.argmin()), se.shape))
            if not np.isfinite(value[dev, slot]):
                raise InputError(f"layer {layer}: no slot left for expert {expert}", field="slots")
            counts[se[dev, slot]] -= 1
        state.write(layer, [(dev, slot, int(expert))])
        counts[expert] += 1
    for dev, slot in np.argwhere(se < 0):
        per = np.where((se[dev] == np.arange(p.num_experts)[:, None]).any(axis=1), -1.0, load / np.maximum(counts, 1))
        expert = int(per.argmax())
        state.write(layer, [(int(dev), int(slot), expert)])
        counts[expert] += 1


def _proposals(state: _State, layer: int) -> tuple[float, list[tuple[int, int, int]]]:
    """Step 3: the layer's best move (objective drop per byte) as a list of (device, slot, expert) writes."""
    p = state.p
    se = state.slot_expert[layer]
    load = p.load[layer]
    dev_load = (load[:, None] * state.shares[layer]).sum(axis=0)
    counts = np.bincount(se.ravel(), minlength=p.num_experts)
    top = int(dev_load.argmax())
    base = state.layer_cost(layer, se)
    hot = [int(x) for x in sorted(set(se[top]), key=lambda x: -load[x] * state.shares[layer][x, top])[:HOT_EXPERTS]]
    best: tuple[float, list[tuple[int, int, int]]] = (0.0, [])
    for dst in np.argsort(dev_load, kind="stable")[:TARGET_DEVICES]:
        dst = int(dst)
        redundant = np.flatnonzero(counts[se[dst]] > 1)
        for expert in hot:
            if expert in se[dst]:
                continue
            writes = []
            if redundant.size:
                slot = int(redundant[np.argmin(load[se[dst, redundant]] / counts[se[dst, redundant]])])
                writes.append([(dst, slot, expert)])
            cold = int(np.argmin(load[se[dst]]))
            src_slot = int(np.flatnonzero(se[top] == expert)[0])
            if se[dst, cold] not in se[top]:
                writes.append([(dst, cold, expert), (top, src_slot, int(se[dst, cold]))])
            for w in writes:
                trial = se.copy()
                for dev, slot, ex in w:
                    trial[dev, slot] = ex
                if (np.bincount(trial.ravel(), minlength=p.num_experts) == 0).any():
                    continue
                gain = (base - state.layer_cost(layer, trial)) / (len(w) * p.expert_bytes)
                if gain > best[0]:
                    best = (gain, w)
    return best


def replace_incremental(problem: PlacementProblem, current: Placement, budget_bytes: float,
                        options: SolverOptions | None = None) -> IncrementalResult:
    """Re-place ``current`` for ``problem``'s traffic and cluster within ``budget_bytes`` of moves
    (module docstring). The curve runs until the budget or the gains run out."""
    t0 = time.perf_counter()
    opts = (options or SolverOptions()).validate()
    p = problem
    if current.num_layers != p.num_layers or current.num_experts != p.num_experts:
        raise InputError(f"current placement has {current.num_layers} layers × {current.num_experts} experts, the "
                         f"problem {p.num_layers} × {p.num_experts}", field="current")
    if budget_bytes < 0:
        raise InputError(f"move budget must be ≥ 0 bytes, got {budget_bytes}", field="move-budget")
    reshaped = current.num_devices != p.num_devices or current.slots_per_device != p.slots_per_device
    slot_expert = _reshape(current, p) if reshaped else current.slot_expert.copy()
    state = _State(p, slot_expert, opts)
    for layer in range(p.num_layers):
        _mandatory(state, layer)
    mandatory_bytes = state.writes * p.expert_bytes
    if mandatory_bytes > budget_bytes:
        raise InputError(f"the new cluster needs {state.writes} expert moves ({mandatory_bytes / 2**30:.2f} GiB) "
                         f"before any improvement, over the budget of {budget_bytes / 2**30:.2f} GiB",
                         field="move-budget", fix=f"allow at least {mandatory_bytes / 2**30:.2f} GiB")
    for layer in range(p.num_layers):
        state.resolve(layer)
    served = current if p.dispatch == "weighted" else Placement(
        current.slot_expert, even_share(current.slot_expert, p.num_experts), p.num_experts, current.devices_per_node,
        p.dispatch)
    before = None if reshaped else objective(p, served).total
    before_bal = balancedness(served, p.load)

    def snapshot() -> Placement:
        return Placement(state.slot_expert.copy(), state.replica_share.copy(), p.num_experts, p.devices_per_node,
                         p.dispatch)

    start = snapshot()
    curve = [{"moves": state.writes, "bytes": state.writes * p.expert_bytes,
              "balancedness": balancedness(start, p.load), "objective": objective(p, start).total}]
    heap = [(-g, layer, w) for layer in range(p.num_layers) for g, w in [_proposals(state, layer)] if w]
    heapq.heapify(heap)
    spent = mandatory_bytes
    while heap:
        _, layer, writes = heapq.heappop(heap)
        cost = len(writes) * p.expert_bytes
        if spent + cost > budget_bytes:
            continue
        state.write(layer, writes)
        spent += cost
        for touched in (layer - 1, layer, layer + 1):
            if 0 <= touched < p.num_layers:
                state.resolve(touched)
        placement = snapshot()
        curve.append({"moves": state.writes, "bytes": spent, "balancedness": balancedness(placement, p.load),
                      "objective": objective(p, placement).total})
        heap = [h for h in heap if abs(h[1] - layer) > 1]
        for touched in (layer - 1, layer, layer + 1):
            if 0 <= touched < p.num_layers:
                gain, w = _proposals(state, touched)
                if w:
                    heap.append((-gain, touched, w))
        heapq.heapify(heap)
    final = snapshot()
    moves = diff_moves(current, final, p.expert_bytes)
    moved = sum(m.nbytes for m in moves)
    notes = [f"{state.writes} slot writes budgeted ({spent / 2**30:.2f} GiB of a {budget_bytes / 2**30:.2f} GiB "
             f"budget): {sum(m.is_transfer for m in moves)} transfers ({moved / 2**30:.2f} GiB) and "
             f"{sum(not m.is_transfer for m in moves)} local copies"]
    if reshaped:
        notes.append(f"cluster changed from {current.num_devices}×{current.slots_per_device} to "
                     f"{p.num_devices}×{p.slots_per_device} slots: {int(mandatory_bytes // max(p.expert_bytes, 1))} "
                     "moves were needed before any improvement")
    return IncrementalResult(final, moves, moved, before, objective(p, final).total, before_bal,
                             balancedness(final, p.load), curve, time.perf_counter() - t0, notes)


def tradeoff_curve(problem: PlacementProblem, current: Placement, max_bytes: float,
                   options: SolverOptions | None = None) -> list[dict[str, float]]:
    """Moves vs balance: (moves, bytes, balancedness, objective) after each greedy move up to
    ``max_bytes``; a budget's re-placement is the prefix that fits it."""
    return replace_incremental(problem, current, max_bytes, options).curve
