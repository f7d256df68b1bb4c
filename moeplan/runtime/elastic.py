"""Live elastic scaling: standby ranks join or leave the serving set while batches flow.

The process group is started at the largest size. At any moment an *active set* of ranks serves:
they hold the token shards of each batch (data-parallel attention: batch ``b``'s global tokens are
split evenly over the active ranks in their order) and the experts, placed by a
:class:`~moeplan.plan.Placement` over the active set (its device ``i`` is the ``i``-th active
rank). Standby ranks hold no experts and receive no tokens; the active ranks' all-to-alls run on
a process subgroup of exactly the active ranks (:class:`ActiveComm`; every subgroup a run needs is
created up front, as process-group creation is collective).

A scaling step follows the planner's schedule (:mod:`moeplan.solvers.elastic`): device ``i`` of
the step's union index space is the ``i``-th rank of the old active set, then the joining ranks in
order; leaving ranks are the last of the old set. :class:`ElasticMigration` reuses
:class:`~moeplan.runtime.migration.LiveMigration`'s machinery unchanged — ``rounds_per_batch`` rounds of the
schedule between two batches, point-to-point transfers on the full group, staging,
checksums, an all-ranks status flag, commit or roll back everywhere — and replaces only how moves
are found (from the schedule, across the two active sets) and what commit builds (the new active
set's slot stacks, which rebinds every staying rank's stack to the new subgroup; a joining rank
builds its stack there, its non-expert weights — routers, shared experts — materialised locally,
its routed experts the ones it received).

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from moeplan.solvers.elastic import MoveSchedule, ScalingProblem, TransferCosts, plan_scaling

from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile
from moeplan.io import write_json
from moeplan.model import ModelSpec
from moeplan.plan import Placement, Plan
from moeplan.runtime.batches import BatchSource
from moeplan.runtime.comm import Comm
from moeplan.runtime.ledger import BatchLedger, LedgerError
from moeplan.runtime.migration import LiveMigration, Move
from moeplan.runtime.stack import MoEStack, check_placement, default_dtype
from moeplan.runtime.timing import synchronize
from moeplan.runtime.weights import LocalExperts
from moeplan.stats import TraceStats
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
    rolled back — is skipped): ``placement`` over ``to_active``, ``schedule`` the planner's moves (union index space: the old
    active ranks, then the joining ones); ``rounds_per_batch`` schedule rounds run between two
    batches. ``fault_at_chunk``: test hook (LiveMigration's ``fault_at_step``)."""

    after: int
    from_active: tuple[int, ...]
    to_active: tuple[int, ...]
    placement: Placement
    schedule: MoveSchedule
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


class ElasticMigration(LiveMigration):
    """One scaling step run as a live re-placement (module docstring). LiveMigration's
    constructor is not called (it diffs two placements over one device set); this one sets the
    same attributes from the schedule, so ``step``, ``_transfer`` and ``report`` run unchanged."""

    def __init__(self, holder: ExpertHolder, step: ScaleStep) -> None:
        check_placement(holder.model, step.placement, len(step.to_active), source="scaling step")
        ranks = union_ranks(step.from_active, step.to_active)
        layers = set(holder.layers)
        transfers = [[Move(t.layer, t.expert, ranks[t.src], t.src_slot, ranks[t.dst], t.dst_slot)
                      for t in chunk if t.layer in layers] for chunk in step.schedule.by_round()]
        local = [Move(c.layer, c.expert, ranks[c.device], c.src_slot, ranks[c.device], c.dst_slot)
                 for c in step.schedule.local_copies if c.layer in layers]
        self.stack = holder   # type: ignore[assignment]  (LiveMigration reads comm, model, experts, dtype, device)
        self.new = step.placement
        self.to_active = step.to_active
        if step.rounds_per_batch < 1:
            raise InputError(f"must be ≥ 1, got {step.rounds_per_batch}", field="rounds_per_batch")
        self.moves = [m for chunk in transfers for m in chunk] + local
        rounds = [c for c in transfers if c]
        k = step.rounds_per_batch
        self.chunks = [[m for r in rounds[i:i + k] for m in r] for i in range(0, len(rounds), k)]
        self.fault_at_step = step.fault_at_chunk
        self.staged: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.state = "running"
        self.steps_done = 0
        self.failure = ""
        self.bytes_sent = self.bytes_received = 0
        self.transfer_seconds = 0.0
        self.built: dict[int, LocalExperts] = {}

    def _commit(self) -> None:
        """Build this rank's slot stacks of the new placement (nothing on a rank that is not in
        the new active set); the caller installs them."""
        holder, rank = self.stack, self.stack.comm.rank
        if rank in self.to_active:
            index = self.to_active.index(rank)
            local = {(m.layer, m.dst_slot): m.src_slot for m in self.moves if m.src == m.dst == rank}
            for layer in holder.layers:
                slots = [int(e) for e in self.new.slot_expert[layer, index]]
                h, f = holder.model.hidden_size, holder.model.expert_ffn
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
        self.staged.clear()
        self.state = "committed"


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
    migration: ElasticMigration | None = None
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
            migration = ElasticMigration(holder, step)
        if migration is not None:
            state = migration.step()
            if state != "running":
                result.reports.append(migration.report().to_dict())
            if state == "committed":
                current = migration.to_active
                stack = _rebind(world, model, migration, stack, groups, seed, kernel, dtype)
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


def _rebind(world: Comm, model: ModelSpec, migration: ElasticMigration, stack: MoEStack | None,
            groups: dict[tuple[int, ...], Any], seed: int, kernel: str, dtype: torch.dtype) -> MoEStack | None:
    """After a commit: staying ranks switch their stack to the new subgroup and slot stacks, a
    joining rank builds its stack there, a leaving rank drops its experts."""
    active = migration.to_active
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


# ---- planning a run's steps (every rank gets rank 0's plan) ------------------------------------------
def default_slots(num_experts: int, devices: int) -> int:
    """Every expert once, plus one redundant slot per device when the experts fill the devices exactly."""
    base = -(-num_experts // devices)
    return base + (1 if num_experts % devices == 0 and base < num_experts else 0)


def plan_steps(world: Comm, model: ModelSpec, start: Placement, load: np.ndarray, counts: Sequence[int],
               every: int, hardware: HardwareProfile, rounds_per_batch: int = 1, balance: float = 1.05,
               fault_at_chunk: dict[int, int] | None = None) -> list[ScaleStep]:
    """Plan the steps through active-set sizes ``counts`` (the first is the start): step i starts
    after batch position ``every × (i+1) − 1`` (or once the previous one ended), active set = the
    first ``counts[i+1]`` ranks. Planned on rank 0 (the planner is pure numpy) and shared with
    every rank; ``fault_at_chunk[i]`` corrupts a transfer of step i (test hook)."""
    steps: list[ScaleStep] = []
    if world.rank == 0:
        costs = TransferCosts.of(model, hardware)
        current = start
        for i, (n, m) in enumerate(zip(counts[:-1], counts[1:])):
            problem = ScalingProblem.from_arrays(load, current.slot_expert, m, default_slots(model.num_experts, m),
                                                 devices_per_node=hardware.devices_per_node,
                                                 expert_bytes=model.expert_bytes(), balance_target=balance)
            step = plan_scaling(problem, costs, current)
            steps.append(ScaleStep(every * (i + 1) - 1, tuple(range(n)), tuple(range(m)), step.placement,
                                   step.schedule, rounds_per_batch, (fault_at_chunk or {}).get(i)))
            current = step.placement
    shared: list[Any] = [steps]
    if world.world > 1:
        dist.broadcast_object_list(shared, src=0)
    return shared[0]


def run_elastic(world: Comm, model: ModelSpec, placement: Placement, trace: RoutingTrace, counts: Sequence[int],
                batches: int, global_tokens: int, every: int, rounds_per_batch: int = 1, seed: int = 0,
                kernel: str = "grouped", hardware: str = "h100-sxm",
                fault_at_chunk: dict[int, int] | None = None) -> dict[str, Any]:
    """Serve ``batches`` batches while scaling through active-set sizes ``counts``, then serve
    them again on the starting set without scaling and compare: the report (same on every rank)
    has the ledger check, whether every batch's output equals the unscaled run's, per-batch
    seconds and the steps' migration reports."""
    if counts[0] != placement.num_devices or max(counts) > world.world or min(counts) < 1:
        raise InputError(f"active-set sizes {list(counts)} must start at the placement's {placement.num_devices} "
                         f"devices and stay within 1..{world.world} ranks", field="counts")
    start = tuple(range(counts[0]))
    steps = plan_steps(world, model, placement, TraceStats.of(trace).load, counts, every,
                       HardwareProfile.resolve(hardware), rounds_per_batch, fault_at_chunk=fault_at_chunk)
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
        "counts": list(counts), "batches": batches, "global_tokens": global_tokens, "every": every,
        "epochs": [list(e) for e in scaled.epochs], "ledger_checked": True,
        "served": {str(r): len(rows) for r, rows in enumerate(ledgers)},
        "outputs_equal": all(d == 0.0 for d in diffs), "outputs_max_abs_diff": max(diffs), "batch_max_abs_diff": diffs,
        "batch_seconds": seconds.tolist(), "batch_active": scaled.batch_active,
        "batch_epoch": [epoch_of[b] for b in ids],
        "steps": [{"after": s.after, "to_active": list(s.to_active), "transfers": len(s.schedule.transfers),
                   "rounds": s.schedule.rounds, "local_copies": len(s.schedule.local_copies)} for s in steps],
        "migrations": world.gather_objects(scaled.reports),
        "weight_mismatches": mismatches,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moeplan.runtime.elastic",
                                description="Live elastic scaling under torchrun (start at the largest size).")
    p.add_argument("--plan", required=True, help="Plan JSON whose placement spans the first active-set size.")
    p.add_argument("--trace", required=True, help="Routing trace (.npz): the load the steps balance and the routing.")
    p.add_argument("--counts", required=True, help="Active-set sizes, e.g. 6,8,6 (the first = the plan's devices).")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--tokens", type=int, default=1536, help="Global tokens per batch (divisible by every size).")
    p.add_argument("--every", type=int, default=4, help="Batches between scaling steps.")
    p.add_argument("--rounds-per-batch", type=int, default=1, help="Schedule rounds run between two batches.")
    p.add_argument("--kernel", choices=("grouped", "loop"), default="grouped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", help="JSON report (written by rank 0).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    world = Comm.from_env()
    try:
        plan = Plan.load(args.plan)
        if plan.placement is None:
            raise InputError("the plan has no placement", source=args.plan, field="placement")
        trace = RoutingTrace.load(args.trace)
        trace.check_model(plan.model.num_experts, plan.model.num_moe_layers, plan.model.top_k, args.trace)
        counts = [int(c) for c in args.counts.split(",") if c.strip()]
        report = run_elastic(world, plan.model, plan.placement, trace, counts, args.batches, args.tokens, args.every,
                             args.rounds_per_batch, args.seed, args.kernel, plan.hardware if plan.hardware in HardwareProfile.bundled()
                             else "h100-sxm")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        world.close()
    if world.rank == 0:
        if args.output:
            write_json(args.output, report)
        print(f"{report['world']} ranks ({report['backend']}): sizes {report['counts']}, {report['batches']} batches, "
              f"every batch served once by its epoch's active set; outputs vs the unscaled run: max |diff| "
              f"{report['outputs_max_abs_diff']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
