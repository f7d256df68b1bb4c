"""MemoryBudget: what a device has left for the expert cache once everything else is placed.

From :meth:`moeplan.cost.CostModel.memory` with no expert slots: the non-expert weights
(attention, dense layers, shared experts, routers, embeddings, head), the KV cache of the
step's sequences and the activations of one step. The rest of the usable memory — by default
the device's memory × the serving fraction (vLLM's default ``--gpu-memory-utilization`` 0.9),
or a total the user gives — holds the expert cache slots and the staging slots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moeplan.cost import SERVE_MEMORY_FRACTION, CostModel
from moeplan.errors import InputError
from moeplan.solvers.cache.steps import StepShape

GIB = float(2**30)


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes on the device: ``capacity`` usable in all, ``non_expert`` weights, ``kv_cache``,
    ``activations``; ``expert_bytes`` one routed expert; ``all_experts`` every routed expert."""

    capacity: float
    non_expert: float
    kv_cache: float
    activations: float
    expert_bytes: float
    all_experts: float

    @property
    def left(self) -> float:
        """Bytes left for expert cache and staging slots."""
        return self.capacity - self.non_expert - self.kv_cache - self.activations

    def slots(self, stage_slots: int) -> int:
        """Expert cache slots that fit beside ``stage_slots`` staging slots."""
        return max(int(self.left // self.expert_bytes) - stage_slots, 0)

    def cache_bytes(self, sizes: np.ndarray | list[int], stage_slots: int) -> float:
        return (int(np.sum(sizes)) + stage_slots) * self.expert_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"capacity_bytes": self.capacity, "non_expert_bytes": self.non_expert, "kv_cache_bytes": self.kv_cache,
                "activation_bytes": self.activations, "left_bytes": self.left, "expert_bytes": self.expert_bytes,
                "all_experts_bytes": self.all_experts}


def memory_budget(cost: CostModel, shape: StepShape, context: int, memory_bytes: float | None = None) -> MemoryBudget:
    """The budget for ``shape``'s steps with ``context`` tokens of KV cache per sequence (decode:
    batch × context; prefill: one sequence of ``context`` tokens), within ``memory_bytes`` in all
    (default: the device's memory × SERVE_MEMORY_FRACTION)."""
    m = cost.model
    kv_tokens = shape.batch * context if shape.phase == "decode" else context
    report = cost.memory(0, 1, kv_tokens_per_device=kv_tokens, batch_tokens_per_device=shape.batch)
    capacity = memory_bytes if memory_bytes is not None else report.capacity * SERVE_MEMORY_FRACTION
    budget = MemoryBudget(capacity, report.non_expert_weights, report.kv_cache, report.activations,
                          m.expert_bytes(), m.num_moe_layers * m.num_experts * m.expert_bytes())
    if budget.left < 0:
        raise InputError(
            f"nothing is left for experts: non-expert weights {budget.non_expert / GIB:.2f} + KV cache "
            f"{budget.kv_cache / GIB:.2f} + activations {budget.activations / GIB:.2f} GiB exceed "
            f"{capacity / GIB:.2f} GiB", field="budget", fix="give more memory, a smaller batch or a shorter context")
    return budget
