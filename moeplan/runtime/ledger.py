"""The batch ledger: every batch a rank serves is recorded once, with the placement version
that served it, so a run can prove no batch was lost or computed twice (also across ranks)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from moeplan.runtime.comm import Comm


class LedgerError(RuntimeError):
    """A batch was served twice, never, or differently on different ranks."""


class BatchLedger:
    """Batch ids in the order served, each with the placement version that served it."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, int]] = []
        self._seen: set[int] = set()

    def record(self, batch_id: int, version: int) -> None:
        if batch_id in self._seen:
            raise LedgerError(f"batch {batch_id} computed twice")
        self._seen.add(batch_id)
        self.entries.append((batch_id, version))

    @property
    def ids(self) -> list[int]:
        return [b for b, _ in self.entries]

    def check(self, expected: Iterable[int], comm: Comm) -> None:
        """Raise unless exactly ``expected`` were served here, and every rank served the same
        batches with the same placement versions."""
        want = set(expected)
        missing, extra = sorted(want - self._seen), sorted(self._seen - want)
        if missing or extra:
            raise LedgerError(f"rank {comm.rank}: batches lost {missing}, unexpected {extra}")
        others = comm.gather_objects(self.entries)
        for rank, entries in enumerate(others):
            if entries != self.entries:
                raise LedgerError(f"rank {rank} served {entries}, rank {comm.rank} served {self.entries}")

    def to_dict(self) -> dict[str, Any]:
        return {"served": len(self.entries), "entries": [[b, v] for b, v in self.entries]}
