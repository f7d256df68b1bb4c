"""Live re-placement: apply a new Plan's placement while batches keep flowing.

:func:`plan_moves` diffs the old and new placements: a slot whose expert is unchanged stays; a
slot whose expert the same rank already holds is filled by a local copy; every other slot needs
a transfer from a rank holding that expert (the holder with the fewest sends so far). Only
those experts travel.

:class:`LiveMigration` runs the transfers a few experts per step (``torch.distributed``
point-to-point ``batch_isend_irecv``), one step between two batches. Received weights go to a
staging area, checked against the sender's exact checksum; the old weights keep serving and
are never touched before commit (copy before delete). After every step all ranks all-reduce a
status flag: on any failure every rank rolls back (drops the staging area and keeps serving the
old placement); after the last step every rank commits at once (builds the new slot stacks,
installs them with the new routing tables, frees the old weights).

``fault_at_step`` is a test hook: at that step each rank that received an expert corrupts one
value of it before the check, as a failed transfer would.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from moeplan.errors import InputError
from moeplan.plan import Placement
from moeplan.runtime.stack import MoEStack, check_placement
from moeplan.runtime.timing import synchronize
from moeplan.runtime.weights import LocalExperts, tensor_checksum


@dataclass(frozen=True)
class Move:
    """Expert ``expert`` of MoE layer ``layer`` into slot ``dst_slot`` of rank ``dst``, from slot
    ``src_slot`` of rank ``src`` (src == dst: a local copy, no transfer)."""

    layer: int
    expert: int
    src: int
    src_slot: int
    dst: int
    dst_slot: int


def plan_moves(old: Placement, new: Placement, layers: list[int]) -> list[Move]:
    """The moves that turn ``old`` into ``new`` on ``layers`` (see the module docstring)."""
    moves: list[Move] = []
    sends = np.zeros(old.num_devices, dtype=np.int64)
    for layer in layers:
        before, after = old.slot_expert[layer], new.slot_expert[layer]
        for dst in range(new.num_devices):
            for slot, expert in enumerate(after[dst]):
                if slot < before.shape[1] and before[dst, slot] == expert:
                    continue
                own = np.flatnonzero(before[dst] == expert)
                if own.size:
                    moves.append(Move(layer, int(expert), dst, int(own[0]), dst, slot))
                    continue
                holders = np.argwhere(before == expert)
                src, src_slot = holders[int(np.argmin(sends[holders[:, 0]]))]
                sends[src] += 1
                moves.append(Move(layer, int(expert), int(src), int(src_slot), dst, slot))
    return moves


@dataclass
class MigrationReport:
    """What a live re-placement did, seen from one rank. Bytes and seconds are this rank's."""

    state: str
    moves: int
    transfers: int
    local_copies: int
    steps: int
    steps_done: int
    bytes_sent: int
    bytes_received: int
    transfer_seconds: float
    failure: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LiveMigration:
    """Moves ``stack`` to placement ``new``, ``experts_per_step`` transfers per :meth:`step`."""

    def __init__(self, stack: MoEStack, new: Placement, experts_per_step: int = 4,
                 fault_at_step: int | None = None) -> None:
        check_placement(stack.model, new, stack.comm.world, source="new plan")
        if experts_per_step < 1:
            raise InputError(f"experts per step must be ≥ 1, got {experts_per_step}", field="experts_per_step")
        self.stack = stack
        self.new = new
        self.moves = plan_moves(stack.placement, new, stack.layers)
        transfers = [m for m in self.moves if m.src != m.dst]
        self.chunks = [transfers[i:i + experts_per_step] for i in range(0, len(transfers), experts_per_step)]
        self.fault_at_step = fault_at_step
        self.staged: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.state = "running"
        self.steps_done = 0
        self.failure = ""
        self.bytes_sent = self.bytes_received = 0
        self.transfer_seconds = 0.0

    def step(self) -> str:
        """Run the next chunk of transfers, agree on success with every rank, then commit after
        the last chunk or roll back on a failure. Returns the state: running, committed or
        rolled_back."""
        if self.state != "running":
            return self.state
        if self.steps_done < len(self.chunks):
            failure = self._transfer(self.chunks[self.steps_done])
            if self.stack.comm.any_flag(bool(failure)):
                self.failure = failure or "another rank failed"
                self.staged.clear()
                self.state = "rolled_back"
                return self.state
            self.steps_done += 1
        if self.steps_done == len(self.chunks):
            self._commit()
        return self.state

    def _transfer(self, chunk: list[Move]) -> str:
        """Exchange one chunk; stage what arrives here. Returns "" or what failed on this rank."""
        comm, stack = self.stack.comm, self.stack
        h, f = stack.model.hidden_size, stack.model.expert_ffn
        sends: list[tuple[torch.Tensor, int]] = []
        recvs: list[tuple[torch.Tensor, int]] = []
        arriving: list[tuple[Move, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for m in chunk:
            if m.src == comm.rank:
                ex = stack.experts[m.layer]
                w13, w2 = ex.w13[m.src_slot], ex.w2[m.src_slot]
                sends += [(w13, m.dst), (w2, m.dst), (_checksum(w13, w2), m.dst)]
                self.bytes_sent += ex.nbytes_per_expert
            if m.dst == comm.rank:
                w13 = torch.empty(2 * f, h, dtype=stack.dtype, device=stack.device)
                w2 = torch.empty(h, f, dtype=stack.dtype, device=stack.device)
                check = torch.empty(4, dtype=torch.int64, device=stack.device)
                recvs += [(w13, m.src), (w2, m.src), (check, m.src)]
                arriving.append((m, w13, w2, check))
        t0 = time.perf_counter()
        try:
            comm.p2p(sends, recvs)
            synchronize(stack.device)
        except RuntimeError as exc:
            return f"transfer failed: {exc}"
        self.transfer_seconds += time.perf_counter() - t0
        if self.fault_at_step == self.steps_done and arriving:
            arriving[0][1].view(-1)[0] += 1
        for m, w13, w2, check in arriving:
            if not torch.equal(_checksum(w13, w2), check):
                return f"checksum mismatch: layer {m.layer} expert {m.expert} from rank {m.src}"
            self.staged[(m.layer, m.dst_slot)] = (w13, w2)
            self.bytes_received += (w13.numel() + w2.numel()) * w13.element_size()
        return ""

    def _commit(self) -> None:
        stack, rank = self.stack, self.stack.comm.rank
        local = {(m.layer, m.dst_slot): m.src_slot for m in self.moves if m.src == m.dst == rank}
        experts: dict[int, LocalExperts] = {}
        for layer in stack.layers:
            old = stack.experts[layer]
            slots = [int(e) for e in self.new.slot_expert[layer, rank]]
            w13 = torch.empty((len(slots), *old.w13.shape[1:]), dtype=old.w13.dtype, device=old.w13.device)
            w2 = torch.empty((len(slots), *old.w2.shape[1:]), dtype=old.w2.dtype, device=old.w2.device)
            for s in range(len(slots)):
                if (layer, s) in self.staged:
                    a, b = self.staged[(layer, s)]
                else:
                    src = local.get((layer, s), s)
                    a, b = old.w13[src], old.w2[src]
                w13[s].copy_(a)
                w2[s].copy_(b)
            experts[layer] = LocalExperts(slots, w13, w2)
        stack.install(self.new, experts)
        self.staged.clear()
        self.state = "committed"

    def report(self) -> MigrationReport:
        transfers = sum(len(c) for c in self.chunks)
        return MigrationReport(self.state, len(self.moves), transfers, len(self.moves) - transfers, len(self.chunks),
                               self.steps_done, self.bytes_sent, self.bytes_received, self.transfer_seconds,
                               self.failure)


def _checksum(w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return torch.cat([tensor_checksum(w13), tensor_checksum(w2)])
