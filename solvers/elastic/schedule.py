"""The move schedule of a scaling step: what is copied where, in which round, and what it costs.

Protocol (copy before delete, one switch):

1. **Bring-up.** Each joining device receives the replicated non-expert weights from a serving
   device (one on its own node when there is one).
2. **Rounds of expert copies.** Every replica of the new placement that no surviving device
   holds is copied from a device that holds the expert now (preferring one on the destination's
   node, then the one with the fewest sends). Copies land in free memory next to the weights that
   keep serving, and are checked. In one round each device sends at most one expert and receives
   at most one, so the rounds are an edge colouring of the sender → receiver multigraph; König's
   theorem gives one with as many rounds as the busiest device's transfers, which
   :func:`colour_rounds` builds. On a scale-down the experts that only leaving devices hold are
   copied first (their rounds come before all others).
3. **Switch.** All devices agree (an all-reduce of a status flag) and switch routing to the new
   placement at once; then the replaced slots are freed and leaving devices are released.

Until the switch the old placement serves every token, so every expert is served at every
moment. A slot whose expert the same device already holds in another slot is a local copy (no
transfer). Each device's peak memory is its old slots plus the copies it receives (slots in
flight); a plan whose peak exceeds a device's capacity is rejected with the numbers.

Predicted step time = bring-up + Σ rounds (each as long as its slowest transfer) + switch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from moeplan.errors import InputError
from moeplan.moves import Move

from .costs import TransferCosts, p2p_seconds
from .problem import ScalingProblem

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class MoveSchedule:
    """A scaling step's moves (see the module docstring), each a :class:`~moeplan.moves.Move`
    in the union index space of :mod:`.problem`.

    Attributes:
        transfers: expert copies, ordered by round (``evacuation``: no surviving device held the expert).
        local_copies: slot changes inside one device.
        bring_up: non-expert weights to joining devices.
        rounds: number of transfer rounds.
        round_seconds: float [rounds] predicted seconds of each round.
        bring_up_seconds, switch_seconds: predicted seconds of those phases.
        expert_bytes: bytes of one transfer.
        old_units, new_units, peak_units: int [union devices] expert slots held before, after and
            at the peak (old slots + copies in flight).
        capacity_units: int [union devices] the most each device can hold.
    """

    transfers: tuple[Move, ...]
    local_copies: tuple[Move, ...]
    bring_up: tuple[Move, ...]
    rounds: int
    round_seconds: np.ndarray
    bring_up_seconds: float
    switch_seconds: float
    expert_bytes: float
    old_units: np.ndarray
    new_units: np.ndarray
    peak_units: np.ndarray
    capacity_units: np.ndarray

    @property
    def seconds(self) -> float:
        """Predicted seconds from the decision to the switch."""
        return self.bring_up_seconds + float(self.round_seconds.sum()) + self.switch_seconds

    @property
    def expert_bytes_moved(self) -> float:
        return len(self.transfers) * self.expert_bytes

    @property
    def bring_up_bytes(self) -> float:
        return float(sum(b.nbytes for b in self.bring_up))

    @property
    def bytes_moved(self) -> float:
        """Every byte sent between devices."""
        return self.expert_bytes_moved + self.bring_up_bytes

    @property
    def extra_units(self) -> np.ndarray:
        """[union devices] slots held at the peak beyond the larger of before and after."""
        return self.peak_units - np.maximum(self.old_units, self.new_units)

    def link_bound(self, costs: TransferCosts) -> float:
        """A lower bound on the transfer phase: the busiest device's sends or receives back to back."""
        if not self.transfers:
            return 0.0
        src = np.array([t.src for t in self.transfers])
        dst = np.array([t.dst for t in self.transfers])
        sec = p2p_seconds(costs, self.expert_bytes, src, dst)
        n = int(max(src.max(), dst.max())) + 1
        return float(max(np.bincount(src, sec, n).max(), np.bincount(dst, sec, n).max()))

    def moves(self) -> tuple[Move, ...]:
        """The ordered moves as a Plan carries them: bring-ups, transfers by round, then local copies
        (after the last round)."""
        last = self.rounds
        return self.bring_up + self.transfers + tuple(replace(c, round=last) for c in self.local_copies)

    def timeline(self) -> pd.DataFrame:
        """One row per phase (bring-up, each round, switch): start and end seconds, transfers and
        bytes, for plots of a step."""
        import pandas as pd

        rows = [{"phase": "bring-up", "start_s": 0.0, "end_s": self.bring_up_seconds, "transfers": len(self.bring_up),
                 "bytes": self.bring_up_bytes}]
        t = self.bring_up_seconds
        per_round = np.bincount([x.round for x in self.transfers], minlength=self.rounds)
        for r in range(self.rounds):
            rows.append({"phase": f"round {r}", "start_s": t, "end_s": t + float(self.round_seconds[r]),
                         "transfers": int(per_round[r]), "bytes": float(per_round[r] * self.expert_bytes)})
            t += float(self.round_seconds[r])
        rows.append({"phase": "switch", "start_s": t, "end_s": t + self.switch_seconds, "transfers": 0, "bytes": 0.0})
        return pd.DataFrame(rows)

    def by_round(self) -> list[list[Move]]:
        """The transfers of each round."""
        out: list[list[Move]] = [[] for _ in range(self.rounds)]
        for t in self.transfers:
            out[t.round].append(t)
        return out


def build_schedule(problem: ScalingProblem, new_slots: np.ndarray, costs: TransferCosts) -> MoveSchedule:
    """The schedule that turns ``problem.old_slots`` into ``new_slots`` [layers, N′, S′] (its
    memory is checked by :func:`check_memory`)."""
    old = problem.old_slots
    n_old, n_new, union = problem.old_devices, problem.new_devices, problem.union_devices
    per = costs.devices_per_node
    sends = np.zeros(union, dtype=np.int64)
    pending: list[tuple[int, int, int, int, int, int, bool]] = []
    local: list[Move] = []
    for layer in range(problem.num_layers):
        before, after = old[layer], new_slots[layer]
        survivor_holds = np.zeros(problem.num_experts, dtype=bool)
        survivor_holds[before[:problem.survivors].ravel()] = True
        for dst in range(n_new):
            for slot, expert in enumerate(after[dst]):
                if dst < n_old:
                    if slot < before.shape[1] and before[dst, slot] == expert:
                        continue
                    own = np.flatnonzero(before[dst] == expert)
                    if own.size:
                        local.append(Move.of_expert(layer, expert, dst, own[0], dst, slot))
                        continue
                holders = np.argwhere(before == expert)
                same_node = holders[:, 0] // per == dst // per
                leaving = holders[:, 0] >= n_new
                key = np.lexsort((holders[:, 0], ~leaving, sends[holders[:, 0]], ~same_node))
                src, src_slot = holders[key[0]]
                sends[src] += 1
                pending.append((layer, int(expert), int(src), int(src_slot), dst, slot,
                                not survivor_holds[expert]))
    evac = [p for p in pending if p[6]]
    rest = [p for p in pending if not p[6]]
    colours_evac = colour_rounds([p[2] for p in evac], [p[4] for p in evac], union)
    colours_rest = colour_rounds([p[2] for p in rest], [p[4] for p in rest], union)
    offset = int(colours_evac.max()) + 1 if colours_evac.size else 0
    nbytes = problem.expert_bytes
    transfers = [Move.of_expert(*p[:6], nbytes, int(c), True) for p, c in zip(evac, colours_evac)]
    transfers += [Move.of_expert(*p[:6], nbytes, offset + int(c), False) for p, c in zip(rest, colours_rest)]
    transfers.sort(key=lambda t: (t.round, t.layer, t.dst, t.dst_slot))
    rounds = offset + (int(colours_rest.max()) + 1 if colours_rest.size else 0)
    round_seconds = np.zeros(rounds)
    if transfers:
        sec = p2p_seconds(costs, problem.expert_bytes, np.array([t.src for t in transfers]),
                          np.array([t.dst for t in transfers]))
        np.maximum.at(round_seconds, np.array([t.round for t in transfers]), sec)
    bring_up, bring_up_seconds = _bring_up(problem, costs)
    nl = problem.num_layers
    old_units = np.where(np.arange(union) < n_old, nl * problem.old_slots_per_device, 0)
    new_units = np.where(np.arange(union) < n_new, nl * problem.slots_per_device, 0)
    incoming = np.bincount([t.dst for t in transfers], minlength=union)
    return MoveSchedule(tuple(transfers), tuple(local), bring_up, rounds, round_seconds, bring_up_seconds,
                        costs.switch(union), problem.expert_bytes, old_units, new_units, old_units + incoming,
                        problem.capacity_units)


def _bring_up(problem: ScalingProblem, costs: TransferCosts) -> tuple[tuple[Move, ...], float]:
    """Non-expert weights to each joining device, each from a serving device (same node first,
    then the one with the fewest such sends); seconds = the busiest sender's sends back to back."""
    joining = range(problem.old_devices, problem.new_devices)
    if not len(joining) or problem.non_expert_bytes <= 0:
        return (), 0.0
    per = costs.devices_per_node
    sources = np.arange(problem.old_devices)
    busy = np.zeros(problem.old_devices)
    out = []
    for dst in joining:
        seconds = np.array([costs.p2p(problem.non_expert_bytes, costs.scope(int(s), dst)) for s in sources])
        key = np.lexsort((sources, busy + seconds, sources // per != dst // per))
        src = int(sources[key[0]])
        busy[src] += seconds[src]
        out.append(Move("bring_up", -1, -1, src, -1, dst, -1, problem.non_expert_bytes))
    return tuple(out), float(busy.max())


def check_memory(schedule: MoveSchedule) -> None:
    """InputError naming the first device whose peak exceeds its capacity."""
    over = np.flatnonzero(schedule.peak_units > schedule.capacity_units)
    if over.size:
        d = int(over[0])
        gib = schedule.expert_bytes / 2**30
        raise InputError(
            f"device {d} would hold {schedule.peak_units[d]} expert slots at the peak of the step "
            f"({schedule.old_units[d]} before + {schedule.peak_units[d] - schedule.old_units[d]} in flight, "
            f"{schedule.peak_units[d] * gib:.1f} GiB) but has room for {schedule.capacity_units[d]} "
            f"({len(over)} device(s) over)", field="memory",
            fix="accept a looser balance (a higher --balance moves fewer experts), leave more memory free "
                "(fewer --kv-tokens) or scale in smaller steps")


def colour_rounds(src: list[int], dst: list[int], vertices: int) -> np.ndarray:
    """A proper edge colouring of the bipartite multigraph src → dst (senders on one side,
    receivers on the other) with exactly Δ colours, Δ the largest degree (König): each edge is
    coloured with a colour free at its sender; if that colour is taken at the receiver, the path
    alternating between it and a colour free at the receiver is flipped first. Returns int
    [edges] colours."""
    m = len(src)
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    s = np.asarray(src, dtype=np.int64)
    r = np.asarray(dst, dtype=np.int64)
    delta = int(max(np.bincount(s).max(), np.bincount(r).max()))
    at = np.full((2, vertices, delta), -1, dtype=np.int64)     # side 0: senders, side 1: receivers
    colour = np.full(m, -1, dtype=np.int64)
    for e in range(m):
        u, v = s[e], r[e]
        a = int(np.argmax(at[0, u] < 0))
        b = int(np.argmax(at[1, v] < 0))
        if at[1, v, a] >= 0:
            _flip(at, colour, s, r, v, a, b)
        colour[e] = a
        at[0, u, a] = at[1, v, a] = e
    return colour


def _flip(at: np.ndarray, colour: np.ndarray, s: np.ndarray, r: np.ndarray, v: int, a: int, b: int) -> None:
    """Swap colours a and b along the alternating path that starts at receiver ``v`` with colour a."""
    path = []
    side, vertex, c = 1, v, a
    while at[side, vertex, c] >= 0:
        e = int(at[side, vertex, c])
        path.append(e)
        side, vertex = (0, s[e]) if side == 1 else (1, r[e])
        c = b if c == a else a
    for e in path:
        at[0, s[e], colour[e]] = -1
        at[1, r[e], colour[e]] = -1
    for e in path:
        colour[e] = b if colour[e] == a else a
        at[0, s[e], colour[e]] = e
        at[1, r[e], colour[e]] = e
