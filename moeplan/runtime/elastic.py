"""Live elastic scaling: standby ranks join or leave the serving set while batches flow.

The process group is started at the largest size. At any moment an *active set* of ranks serves:
they hold the token shards of each batch (data-parallel attention: batch ``b``'s global tokens are
split evenly over the active ranks in their order) and the experts, placed by a
:class:`~moeplan.plan.Placement` over the active set (its device ``i`` is the ``i``-th active
rank). Standby ranks hold no experts and receive no tokens; the active ranks' all-to-alls run on
a process subgroup of exactly the active ranks (:class:`ActiveComm`; every subgroup a run needs is
created up front, as process-group creation is collective).

A scaling step executes a scaling plan's moves (``moeplan plan scale``, or
:func:`moeplan.solvers.elastic.scaling_plans`; the runtime plans nothing): device ``i`` of the
step's union index space is the ``i``-th rank of the old active set, then the joining ranks in
order; leaving ranks are the last of the old set. :func:`elastic_migration` builds a
:class:`~moeplan.runtime.migration.LiveMigration` with those moves mapped to global ranks —
``rounds_per_batch`` move rounds between two batches, point-to-point transfers on the full
group, staging, checksums, an all-ranks status flag, commit or roll back everywhere — whose
commit builds the new active set's slot stacks; the loop then rebinds every staying rank's stack
to the new subgroup, and a joining rank builds its stack there (non-expert weights — routers,
shared experts — materialised locally, routed experts the ones it received).

:func:`run_elastic` serves a list of batches through a sequence of scaling steps, records every
batch in a :class:`~moeplan.runtime.ledger.BatchLedger` with the *epoch* (committed steps so far)
that served it and its wall seconds, and :func:`check_elastic_ledgers` proves that every batch was
served exactly once, by exactly the active set of its epoch.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moeplan.errors import InputError
from moeplan.model import ModelSpec
from moeplan.moves import Move, check_moves
from moeplan.plan import Placement, Plan
from moeplan.runtime.batches import BatchSource
from moeplan.runtime.comm import Comm, run_ranks
from moeplan.runtime.ledger import BatchLedger, LedgerError
from moeplan.runtime.migration import LiveMigration
from moeplan.runtime.stack import MoEStack, check_placement, default_dtype
from moeplan.runtime.timing import synchronize
from moeplan.runtime.weights import LocalExperts
from moeplan.trace import RoutingTrace


@dataclass(frozen=True)
class ActiveComm(Comm):
    """The expert-parallel group of the active ranks: ``rank``/``world`` within the active set,
    collectives on the subgroup ``group`` of global ranks ``ranks``."""

    group: Any = None
    ranks: tuple[int, ...] = ()

    def exchange_counts(self, send_counts: torch.Tensor) -> list[int]:
        if self.world == 1:
            return send_counts.tolist()
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts, group=self.group)
        return recv.tolist()

    def all_to_all(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        if self.world == 1:
            return send
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                               group=self.group)
        return recv

    def any_flag(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


def active_groups(world: Comm, active_sets: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], Any]:
    """A process subgroup for each distinct active set, created on every rank in the same order."""
    groups: dict[tuple[int, ...], Any] = {}
    for ranks in active_sets:
        if ranks not in groups:
            groups[ranks] = dist.new_group(list(ranks)) if world.world > 1 else None
    return groups


@dataclass
class ExpertHolder:
    """What :class:`~moeplan.runtime.migration.LiveMigration` reads of a stack, for any rank:
    the full group's ``comm`` (transfers use global ranks), this rank's current experts (none on a
    standby rank), and the model, layers, dtype and device."""

    comm: Comm
    model: ModelSpec
    layers: list[int]
    experts: dict[int, LocalExperts]
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class ScaleStep:
    """Scale from the active set ``from_active`` to ``to_active`` (global ranks) after the batch at
    position ``after`` (a step whose ``from_active`` is not the active set then — an earlier step
    rolled back — is skipped): ``placement`` over ``to_active``, ``moves`` the scaling plan's
    moves (union index space: the old active ranks, then the joining ones); ``rounds_per_batch``
    move rounds run between two batches. ``fault_at_chunk``: test hook (LiveMigration's
    ``fault_at_step``)."""

    after: int
    from_active: tuple[int, ...]
    to_active: tuple[int, ...]
    placement: Placement
    moves: tuple[Move, ...]
    rounds_per_batch: int = 1
    fault_at_chunk: int | None = None


def union_ranks(old: tuple[int, ...], new: tuple[int, ...]) -> tuple[int, ...]:
    """Global rank of each device of a step's union index space; InputError unless ``new`` keeps
    the first min(N, N′) old ranks in order (joining ranks appended, leaving ranks the last)."""
    keep = min(len(old), len(new))
    if tuple(new[:keep]) != tuple(old[:keep]) or len(set(new)) != len(new):
        raise InputError(f"active set {list(new)} must keep {list(old[:keep])} in order, then add new ranks",
                         field="active", fix="append joining ranks; leave from the end")
    return tuple(old) + tuple(r for r in new[keep:] if r not in old)


def elastic_migration(holder: ExpertHolder, step: ScaleStep) -> LiveMigration:
    """One scaling step run as a live re-placement (module docstring): the plan's moves mapped
    from the step's union index space to global ranks, ``rounds_per_batch`` rounds per chunk,
    nothing installed on commit (the caller rebinds the stacks to the new active set)."""
    check_placement(holder.model, step.placement, len(step.to_active), source="scaling step")
    if step.rounds_per_batch < 1:
        raise InputError(f"must be ≥ 1, got {step.rounds_per_batch}", field="rounds_per_batch")
    ranks = union_ranks(step.from_active, step.to_active)
    layers = set(holder.layers)
    moves = [replace(m, src=ranks[m.src], dst=ranks[m.dst]) for m in step.moves
             if m.kind != "bring_up" and m.layer in layers]
    transfers = [m for m in moves if m.is_transfer]
    rounds = sorted({m.round for m in transfers})
    k = step.rounds_per_batch
    chunks = [[m for m in transfers if m.round in rounds[i:i + k]] for i in range(0, len(rounds), k)]
    rank = holder.comm.rank
    new_rank = step.to_active.index(rank) if rank in step.to_active else None
    return LiveMigration(holder, step.placement, moves, chunks, new_rank, install=False,
                         fault_at_step=step.fault_at_chunk)


@dataclass
class ElasticResult:
    """One rank's record of an elastic run.

    Attributes:
        ledger: batches this rank served, each with its epoch.
        epochs: the active set of each epoch (epoch 0 = the start).
        outputs: batch id → (position in the active set, this rank's output rows on the CPU).
        batch_seconds: wall seconds of each loop iteration (serving the batch, when active, plus
            the scaling round that followed it), in batch order.
        batch_active: active ranks while each batch was served.
        reports: each scaling step's MigrationReport (as dicts).
        stack: this rank's stack at the end (None when it ended on standby).
    """

    ledger: BatchLedger
    epochs: list[tuple[int, ...]]
    stack: MoEStack | None = None
    outputs: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)
    batch_seconds: list[float] = field(default_factory=list)
    batch_active: list[int] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)


def serve_elastic(world: Comm, model: ModelSpec, placement: Placement, active: tuple[int, ...],
                  batch_ids: Sequence[int], global_tokens: int, steps: Sequence[ScaleStep], seed: int = 0,
                  kernel: str = "grouped", trace: RoutingTrace | None = None) -> ElasticResult:
    """Serve ``batch_ids`` starting on ``active`` with ``placement``, running ``steps`` (module
    docstring). Every rank of ``world`` calls it with the same arguments."""
    sets = [tuple(active)] + [tuple(s.to_active) for s in steps]
    for ranks in sets:
        if global_tokens % len(ranks):
            raise InputError(f"{global_tokens} tokens per batch do not split over {len(ranks)} active ranks",
                             field="tokens", fix="use a multiple of every active-set size")
        if not set(ranks) <= set(range(world.world)):
            raise InputError(f"active set {list(ranks)} names ranks outside 0..{world.world - 1}", field="active")
    groups = active_groups(world, sets)
    dtype = default_dtype(world.device)
    current = tuple(active)
    stack = _make_stack(world, model, placement, current, groups, seed, kernel, dtype)
    result = ElasticResult(BatchLedger(), [current])
    pending = sorted(steps, key=lambda s: s.after)
    migration: LiveMigration | None = None
    to_active = current
    for position, batch_id in enumerate(batch_ids):
        t0 = time.perf_counter()
        if stack is not None:
            index = current.index(world.rank)
            source = BatchSource(model.hidden_size, global_tokens // len(current), index, len(current), seed,
                                 world.device, dtype, trace)
            out, _ = stack.forward(source.batch(batch_id))
            result.ledger.record(batch_id, len(result.epochs) - 1)
            result.outputs[batch_id] = (index, out.detach().to("cpu", torch.float32))
        result.batch_active.append(len(current))
        while migration is None and pending and pending[0].after <= position:
            step = pending.pop(0)
            if step.from_active != current:
                result.reports.append({"state": "skipped", "failure": f"starts from {list(step.from_active)}, "
                                                                      f"active is {list(current)}"})
                continue
            experts = stack.experts if stack is not None else {}
            holder = ExpertHolder(world, model, list(range(model.num_moe_layers)), experts, dtype, world.device)
            migration, to_active = elastic_migration(holder, step), step.to_active
        if migration is not None:
            state = migration.step()
            if state != "running":
                result.reports.append(migration.report().to_dict())
            if state == "committed":
                current = to_active
                stack = _rebind(world, model, to_active, migration, stack, groups, seed, kernel, dtype)
                result.epochs.append(current)
            if state != "running":
                migration = None
        synchronize(world.device)
        result.batch_seconds.append(time.perf_counter() - t0)
    result.stack = stack
    return result


def _active_comm(world: Comm, ranks: tuple[int, ...], groups: dict[tuple[int, ...], Any]) -> ActiveComm:
    return ActiveComm(ranks.index(world.rank), len(ranks), world.device, groups[ranks], ranks)


def _make_stack(world: Comm, model: ModelSpec, placement: Placement, active: tuple[int, ...],
                groups: dict[tuple[int, ...], Any], seed: int, kernel: str, dtype: torch.dtype) -> MoEStack | None:
    if world.rank not in active:
        return None
    return MoEStack(model, placement, _active_comm(world, active, groups), kernel, seed, dtype=dtype)


def _rebind(world: Comm, model: ModelSpec, active: tuple[int, ...], migration: LiveMigration,
            stack: MoEStack | None, groups: dict[tuple[int, ...], Any], seed: int, kernel: str,
            dtype: torch.dtype) -> MoEStack | None:
    """After a commit: staying ranks switch their stack to the new subgroup (``active``) and slot
    stacks, a joining rank builds its stack there, a leaving rank drops its experts."""
    if world.rank not in active:
        return None
    if stack is None:
        stack = MoEStack(model, migration.new, _active_comm(world, active, groups), kernel, seed, dtype=dtype)
    stack.comm = _active_comm(world, active, groups)
    stack.install(migration.new, migration.built)
    return stack


def check_elastic_ledgers(entries: Sequence[Sequence[tuple[int, int]]], epochs: Sequence[tuple[int, ...]],
                          expected: Sequence[int]) -> None:
    """Raise LedgerError unless every expected batch was served exactly once by every rank of
    its epoch's active set and by no other rank, and nothing else was served. ``entries[r]``:
    rank r's ledger entries (batch id, epoch)."""
    served: dict[int, dict[int, int]] = {}
    for rank, rows in enumerate(entries):
        for batch_id, epoch in rows:
            if batch_id in served.get(rank, {}):
                raise LedgerError(f"rank {rank} served batch {batch_id} twice")
            served.setdefault(rank, {})[batch_id] = epoch
    for batch_id in expected:
        by = {rank: rows[batch_id] for rank, rows in served.items() if batch_id in rows}
        epoch_seen = set(by.values())
        if not by:
            raise LedgerError(f"batch {batch_id} was lost: no rank served it")
        if len(epoch_seen) != 1:
            raise LedgerError(f"batch {batch_id} served in epochs {sorted(epoch_seen)} by different ranks")
        epoch = epoch_seen.pop()
        if set(by) != set(epochs[epoch]):
            raise LedgerError(f"batch {batch_id} (epoch {epoch}) served by ranks {sorted(by)}, its active set is "
                              f"{list(epochs[epoch])}")
    extra = sorted({b for rows in served.values() for b in rows} - set(expected))
    if extra:
        raise LedgerError(f"unexpected batches served: {extra}")


def global_outputs(per_rank: Sequence[dict[int, tuple[int, torch.Tensor]]]) -> dict[int, torch.Tensor]:
    """Each batch's whole output: the active ranks' rows concatenated in active-set order."""
    pieces: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for outputs in per_rank:
        for batch_id, (index, rows) in outputs.items():
            pieces.setdefault(batch_id, []).append((index, rows))
    return {b: torch.cat([rows for _, rows in sorted(p, key=lambda x: x[0])]) for b, p in pieces.items()}


# ---- the steps of a run, from scaling plans -------------------------------------------------------
def plan_steps(start: Placement, plans: Sequence[Plan], every: int, rounds_per_batch: int = 1,
               fault_at_chunk: dict[int, int] | None = None, source: str = "plans") -> list[ScaleStep]:
    """One ScaleStep per scaling plan (``moeplan plan scale`` output, each from the previous
    plan's placement): step i starts after batch position ``every × (i+1) − 1`` (or once the
    previous one ended) and scales the first N ranks to the plan's N′, executing its moves
    (checked against the placement it starts from). ``fault_at_chunk[i]`` corrupts a transfer of
    step i (test hook)."""
    steps: list[ScaleStep] = []
    current = start
    for i, plan in enumerate(plans):
        if plan.placement is None:
            raise InputError("a scaling plan has no placement", source=f"{source}[{i}]", field="placement")
        check_moves(current, plan.placement, plan.moves, f"{source}[{i}]")
        steps.append(ScaleStep(every * (i + 1) - 1, tuple(range(current.num_devices)),
                               tuple(range(plan.num_devices)), plan.placement, plan.moves, rounds_per_batch,
                               (fault_at_chunk or {}).get(i)))
        current = plan.placement
    return steps


def run_elastic(world: Comm, model: ModelSpec, placement: Placement, trace: RoutingTrace, plans: Sequence[Plan],
                batches: int, global_tokens: int, every: int, rounds_per_batch: int = 1, seed: int = 0,
                kernel: str = "grouped", fault_at_chunk: dict[int, int] | None = None) -> dict[str, Any]:
    """Serve ``batches`` batches while executing the scaling ``plans`` in turn (:func:`plan_steps`),
    then serve them again on the starting set without scaling and compare: the report (same on
    every rank) has the ledger check, whether every batch's output equals the unscaled run's,
    per-batch seconds and the steps' migration reports."""
    counts = [placement.num_devices] + [p.num_devices for p in plans]
    if max(counts) > world.world:
        raise InputError(f"active-set sizes {counts} need {max(counts)} ranks, the group has {world.world}",
                         field="plans", fix="start torchrun with the largest size")
    start = tuple(range(counts[0]))
    steps = plan_steps(placement, plans, every, rounds_per_batch, fault_at_chunk)
    ids = list(range(batches))
    with torch.inference_mode():
        scaled = serve_elastic(world, model, placement, start, ids, global_tokens, steps, seed, kernel, trace)
        unscaled = serve_elastic(world, model, placement, start, ids, global_tokens, [], seed, kernel, trace)
    ledgers = world.gather_objects(scaled.ledger.entries)
    check_elastic_ledgers(ledgers, scaled.epochs, ids)
    outs_scaled = global_outputs(world.gather_objects(scaled.outputs))
    outs_plain = global_outputs(world.gather_objects(unscaled.outputs))
    diffs = [float((outs_scaled[b] - outs_plain[b]).abs().max()) for b in ids]
    seconds = np.max(np.asarray(world.gather_objects(scaled.batch_seconds)), axis=0)
    mismatches = sum(len(x) for x in world.gather_objects(scaled.stack.weight_mismatches() if scaled.stack else []))
    epoch_of = {b: e for rows in ledgers for b, e in rows}
    return {
        "world": world.world, "backend": world.backend, "device": str(world.device), "kernel": kernel,
        "counts": counts, "batches": batches, "global_tokens": global_tokens, "every": every,
        "epochs": [list(e) for e in scaled.epochs], "ledger_checked": True,
        "served": {str(r): len(rows) for r, rows in enumerate(ledgers)},
        "outputs_equal": all(d == 0.0 for d in diffs), "outputs_max_abs_diff": max(diffs), "batch_max_abs_diff": diffs,
        "batch_seconds": seconds.tolist(), "batch_active": scaled.batch_active,
        "batch_epoch": [epoch_of[b] for b in ids],
        "steps": [{"after": s.after, "to_active": list(s.to_active),
                   "transfers": sum(m.is_transfer for m in s.moves),
                   "rounds": len({m.round for m in s.moves if m.is_transfer}),
                   "local_copies": sum(m.kind == "local_copy" for m in s.moves)} for s in steps],
        "migrations": world.gather_objects(scaled.reports),
        "weight_mismatches": mismatches,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moeplan.runtime.elastic",
                                description="Live elastic scaling under torchrun (start at the largest size): "
                                            "execute the moves of scaling plans from 'moeplan plan scale'.")
    p.add_argument("--plan", required=True, help="Plan JSON whose placement the run starts on (the first ranks).")
    p.add_argument("--step", action="append", required=True,
                   help="Scaling plan JSON (repeat, in order), each planned from the previous placement.")
    p.add_argument("--trace", required=True, help="Routing trace (.npz): the tokens' routing.")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--tokens", type=int, default=1536, help="Global tokens per batch (divisible by every size).")
    p.add_argument("--every", type=int, default=4, help="Batches between scaling steps.")
    p.add_argument("--rounds-per-batch", type=int, default=1, help="Move rounds run between two batches.")
    p.add_argument("--kernel", choices=("grouped", "loop"), default="grouped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", help="JSON report (written by rank 0).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_ranks(lambda world: _run_plans(args, world), args.output, _summary)


def _run_plans(args: argparse.Namespace, world: Comm) -> dict[str, Any]:
    plan = Plan.load(args.plan)
    if plan.placement is None:
        raise InputError("the plan has no placement", source=args.plan, field="placement")
    steps = [Plan.load(path) for path in args.step]
    trace = RoutingTrace.load(args.trace)
    trace.check_model(plan.model.num_experts, plan.model.num_moe_layers, plan.model.top_k, args.trace)
    return run_elastic(world, plan.model, plan.placement, trace, steps, args.batches, args.tokens, args.every,
                       args.rounds_per_batch, args.seed, args.kernel)


def _summary(report: dict[str, Any]) -> str:
    return (f"{report['world']} ranks ({report['backend']}): sizes {report['counts']}, {report['batches']} batches, "
            f"every batch served once by its epoch's active set; outputs vs the unscaled run: max |diff| "
            f"{report['outputs_max_abs_diff']:.3g}")


if __name__ == "__main__":
    sys.exit(main())
