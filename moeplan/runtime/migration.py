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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moeplan.errors import InputError
from moeplan.moves import Move, check_moves, diff_moves
from moeplan.plan import Placement
from moeplan.runtime.stack import MoEStack, check_placement
from moeplan.runtime.timing import synchronize
from moeplan.runtime.weights import LocalExperts, tensor_checksum


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
    """Moves the experts of ``holder`` (a :class:`MoEStack`, or any object with its ``comm``,
    ``model``, ``layers``, ``experts``, ``dtype`` and ``device``) to placement ``new`` by ``moves``
    (global ranks; sources read from the running placement), one chunk of transfers per
    :meth:`step`. ``new_rank``: this rank's device index in ``new`` (None: it holds nothing
    after the commit). On commit the new slot stacks are built into ``built``; with ``install``
    they are installed into the holder at once."""

    def __init__(self, holder: Any, new: Placement, moves: Sequence[Move], chunks: list[list[Move]],
                 new_rank: int | None, install: bool = True, fault_at_step: int | None = None) -> None:
        self.stack = holder
        self.new = new
        self.moves = list(moves)
        self.chunks = chunks
        self.new_rank = new_rank
        self.install = install
        self.fault_at_step = fault_at_step
        self.staged: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.built: dict[int, LocalExperts] = {}
        self.state = "running"
        self.steps_done = 0
        self.failure = ""
        self.bytes_sent = self.bytes_received = 0
        self.transfer_seconds = 0.0

    @classmethod
    def of_stack(cls, stack: MoEStack, new: Placement, experts_per_step: int = 4, moves: Sequence[Move] = (),
                 fault_at_step: int | None = None) -> "LiveMigration":
        """Re-place ``stack`` (all ranks serve before and after) by ``moves`` — the plan's, or the
        diff of the two placements when it has none — ``experts_per_step`` transfers per step."""
        check_placement(stack.model, new, stack.comm.world, source="new plan")
        if experts_per_step < 1:
            raise InputError(f"experts per step must be ≥ 1, got {experts_per_step}", field="experts_per_step")
        layers = set(stack.layers)
        if moves:
            check_moves(stack.placement, new, moves, "new plan")
        else:
            moves = diff_moves(stack.placement, new, stack.model.expert_bytes(), stack.layers)
        mine = [m for m in moves if m.kind != "bring_up" and m.layer in layers]
        transfers = [m for m in mine if m.is_transfer]
        chunks = [transfers[i:i + experts_per_step] for i in range(0, len(transfers), experts_per_step)]
        return cls(stack, new, mine, chunks, stack.comm.rank, True, fault_at_step)

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
        """Build this rank's slot stacks of the new placement from the staged transfers, local
        copies and unchanged slots; install them when asked."""
        holder, rank = self.stack, self.stack.comm.rank
        if self.new_rank is not None:
            local = {(m.layer, m.dst_slot): m.src_slot for m in self.moves if m.src == m.dst == rank}
            h, f = holder.model.hidden_size, holder.model.expert_ffn
            for layer in holder.layers:
                slots = [int(e) for e in self.new.slot_expert[layer, self.new_rank]]
                w13 = torch.empty(len(slots), 2 * f, h, dtype=holder.dtype, device=holder.device)
                w2 = torch.empty(len(slots), h, f, dtype=holder.dtype, device=holder.device)
                for s in range(len(slots)):
                    if (layer, s) in self.staged:
                        a, b = self.staged[(layer, s)]
                    else:
                        old = holder.experts[layer]
                        src = local.get((layer, s), s)
                        a, b = old.w13[src], old.w2[src]
                    w13[s].copy_(a)
                    w2[s].copy_(b)
                self.built[layer] = LocalExperts(slots, w13, w2)
        if self.install:
            holder.install(self.new, self.built)
        self.staged.clear()
        self.state = "committed"

    def report(self) -> MigrationReport:
        transfers = sum(len(c) for c in self.chunks)
        return MigrationReport(self.state, len(self.moves), transfers, len(self.moves) - transfers, len(self.chunks),
                               self.steps_done, self.bytes_sent, self.bytes_received, self.transfer_seconds,
                               self.failure)


def _checksum(w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return torch.cat([tensor_checksum(w13), tensor_checksum(w2)])
