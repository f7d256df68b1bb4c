"""CacheConfig: the ``cache`` section of a Plan — per-layer expert-cache sizes and how to run them.

Written by ``moeplan plan cache``, read by ``moeplan run --offload`` and the dashboard::

    {"sizes": [per MoE layer], "policy": "lru|lfu|belady|prefetch", "prefetch": bool,
     "budget_bytes": bytes left for cache + staging, "stage_slots": int, "phase": "decode|prefill",
     "batch": int, "sequence_tokens": int, "context": int, "fit_fraction": float,
     "prefetch_width": [per MoE layer], "prefetch_min_probability": [per MoE layer]}

``phase``, ``batch`` and ``sequence_tokens`` are the steps it was planned for
(:class:`~moeplan.solvers.cache.steps.StepShape`; the policies and phases are defined here, where a plan
is read). ``stage_slots`` experts of staging buffer serve the misses a layer cannot keep (a step that
needs more experts than the layer caches). ``fit_fraction`` is the share of the trace the
predictor is fitted on; the rest is what the plan was judged on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moeplan.errors import InputError
from moeplan.io import Fields
from moeplan.model import ModelSpec

if TYPE_CHECKING:
    from moeplan.solvers.cache.steps import StepShape

POLICIES = ("lru", "lfu", "belady", "prefetch")
PHASES = ("decode", "prefill")


@dataclass(frozen=True)
class CacheConfig:
    """See the module docstring."""

    sizes: tuple[int, ...]
    policy: str
    budget_bytes: float
    stage_slots: int = 2
    phase: str = "decode"
    batch: int = 1
    sequence_tokens: int = 0
    context: int = 4096
    fit_fraction: float = 0.5
    prefetch_width: tuple[int, ...] = ()
    min_probability: tuple[float, ...] = ()

    @property
    def prefetch(self) -> bool:
        return self.policy == "prefetch"

    @property
    def shape(self) -> "StepShape":
        from moeplan.solvers.cache.steps import StepShape
        return StepShape(self.phase, self.batch, self.sequence_tokens).validate()

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "policy": self.policy, "prefetch": self.prefetch,
                "budget_bytes": self.budget_bytes, "stage_slots": self.stage_slots, "phase": self.phase,
                "batch": self.batch, "sequence_tokens": self.sequence_tokens, "context": self.context,
                "fit_fraction": self.fit_fraction, "prefetch_width": list(self.prefetch_width),
                "prefetch_min_probability": list(self.min_probability)}

    @classmethod
    def from_dict(cls, data: Any, model: ModelSpec, source: str) -> "CacheConfig":
        """Read and check a plan's ``cache`` section against its model."""
        f = Fields(data, source, "cache.")
        sizes = f.list("sizes")
        _check_sizes(sizes, model, f)
        e = model.num_experts
        policy = f.str("policy", choices=POLICIES)
        if f.bool("prefetch", policy == "prefetch") != (policy == "prefetch"):
            raise f.fail("prefetch", f"says {f.data['prefetch']} but the policy is {policy}",
                         "prefetch is true exactly for the prefetch policy")
        fraction = f.float("fit_fraction", 0.5)
        if not 0 < fraction < 1:
            raise f.fail("fit_fraction", f"must lie in (0, 1), got {fraction}")
        nl = model.num_moe_layers
        width = f.list("prefetch_width", [])
        if width and (len(width) != nl or any(isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= e
                                              for w in width)):
            raise f.fail("prefetch_width", f"must list {nl} integers in 0..{e}")
        floor = f.numbers("prefetch_min_probability", [])
        if floor and (len(floor) != nl or not all(0 <= x < 1 for x in floor)):
            raise f.fail("prefetch_min_probability", f"must list {nl} probabilities in [0, 1)")
        if policy == "prefetch" and not (width and floor):
            raise f.fail("prefetch_width", "the prefetch policy needs prefetch_width and prefetch_min_probability",
                         "re-plan with 'moeplan plan cache --policy prefetch'")
        return cls(tuple(int(s) for s in sizes), policy, f.float("budget_bytes", positive=True),
                   f.int("stage_slots", 2, minimum=1, maximum=e), f.str("phase", "decode", choices=PHASES),
                   f.int("batch", 1, minimum=1), f.int("sequence_tokens", 0, minimum=0), f.int("context", 4096, minimum=1),
                   fraction, tuple(int(w) for w in width), tuple(floor))

    def check_model(self, model: ModelSpec, source: str) -> None:
        """Raise InputError unless the sizes fit ``model``'s MoE layers and experts."""
        _check_sizes(list(self.sizes), model, Fields({"sizes": list(self.sizes)}, source, "cache."))

    def check_budget(self, model: ModelSpec, source: str) -> None:
        """The plan's own arithmetic: its cache and staging slots fit its ``budget_bytes``."""
        need = (sum(self.sizes) + self.stage_slots) * model.expert_bytes()
        if need > self.budget_bytes:
            raise InputError(
                f"the cache plan does not fit its budget: ({sum(self.sizes)} cached + {self.stage_slots} staging) "
                f"experts × {model.expert_bytes() / 2**20:.1f} MiB = {need / 2**30:.2f} GiB > budget "
                f"{self.budget_bytes / 2**30:.2f} GiB", source=source, field="cache.sizes",
                fix="re-plan with 'moeplan plan cache' or lower the sizes")


def _check_sizes(sizes: list[Any], model: ModelSpec, f: Fields) -> None:
    e = model.num_experts
    if (len(sizes) != model.num_moe_layers
            or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= e for s in sizes)):
        raise f.fail("sizes", f"must list {model.num_moe_layers} integers in 0..{e}")
