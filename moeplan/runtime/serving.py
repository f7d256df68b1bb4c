"""The serving loop: process batch i, record it in the ledger, then advance a live re-placement
by one step before batch i+1. Batches keep flowing through the whole migration."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moeplan.moves import Move
from moeplan.plan import Placement
from moeplan.runtime.batches import BatchSource
from moeplan.runtime.ledger import BatchLedger
from moeplan.runtime.migration import LiveMigration
from moeplan.runtime.stack import MoEStack
from moeplan.runtime.timing import Clock


@dataclass
class Migrate:
    """A re-placement to ``to`` started after the batch at position ``after`` of the loop, by the
    plan's ``moves`` (empty: the diff of the placements)."""

    to: Placement
    after: int = 0
    experts_per_step: int = 4
    fault_at_step: int | None = None
    moves: tuple[Move, ...] = ()


@dataclass
class ServeResult:
    """ledger: batches served; layer_seconds: per batch, per layer seconds (when timed);
    outputs: batch id → this rank's output on the CPU (when kept); migration: the re-placement."""

    ledger: BatchLedger
    layer_seconds: list[list[float]] = field(default_factory=list)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    migration: LiveMigration | None = None


def serve(stack: MoEStack, source: BatchSource, batch_ids: Sequence[int], migrate: Migrate | None = None,
          keep_outputs: bool = False, timed: bool = False) -> ServeResult:
    """Serve ``batch_ids`` in order, running ``migrate`` between batches (see the module docstring)."""
    result = ServeResult(BatchLedger())
    clock = Clock(stack.device) if timed else None
    for position, batch_id in enumerate(batch_ids):
        out, seconds = stack.forward(source.batch(batch_id), clock)
        result.ledger.record(batch_id, stack.version)
        if timed:
            result.layer_seconds.append(seconds)
        if keep_outputs:
            result.outputs[batch_id] = out.detach().to("cpu", torch.float32)
        if migrate is not None and position == migrate.after:
            result.migration = LiveMigration.of_stack(stack, migrate.to, migrate.experts_per_step, migrate.moves,
                                                      migrate.fault_at_step)
        if result.migration is not None:
            result.migration.step()
    return result
