"""Expert moves through host memory: device → pinned host buffer → device, timed per expert
(device events on CUDA, perf_counter on CPU), and checked bit for bit after the round trip."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moeplan.model import ModelSpec
from moeplan.runtime.timing import Timing, measure
from moeplan.runtime.weights import materialise_expert


@dataclass
class HostMoveTiming:
    """Per expert: device→host, host→device and the whole move (both in turn), in seconds;
    ``expert_bytes`` bytes each; ``intact`` every round trip returned identical weights."""

    layer: int
    experts: list[int]
    expert_bytes: int
    d2h: list[Timing]
    h2d: list[Timing]
    move: list[Timing]
    intact: bool
    device: str
    pinned: bool

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "experts": self.experts, "expert_bytes": self.expert_bytes,
                "d2h": [t.to_dict() for t in self.d2h], "h2d": [t.to_dict() for t in self.h2d],
                "move": [t.to_dict() for t in self.move], "intact": self.intact, "device": self.device,
                "pinned": self.pinned}


def time_host_moves(model: ModelSpec, layer: int, experts: Sequence[int], device: torch.device, dtype: torch.dtype,
                    warmup: int = 2, repeats: int = 5, seed: int = 0) -> HostMoveTiming:
    """Move each of ``experts`` of MoE layer ``layer`` out to host memory and back."""
    pinned = device.type == "cuda"
    d2h, h2d, move = [], [], []
    intact = True
    nbytes = 0
    for e in experts:
        w = list(materialise_expert(seed, layer, e, model.hidden_size, model.expert_ffn, dtype, device))
        host = [torch.empty(t.shape, dtype=dtype, pin_memory=pinned) for t in w]
        back = [torch.empty_like(t) for t in w]
        nbytes = sum(t.numel() * t.element_size() for t in w)
        d2h.append(_time_copies([(host, w)], pinned, device, warmup, repeats))
        h2d.append(_time_copies([(back, host)], pinned, device, warmup, repeats))
        move.append(_time_copies([(host, w), (back, host)], pinned, device, warmup, repeats))
        intact = intact and all(torch.equal(b, t) for b, t in zip(back, w))
    return HostMoveTiming(layer, list(experts), nbytes, d2h, h2d, move, intact, str(device), pinned)


def _time_copies(steps: list[tuple[list[torch.Tensor], list[torch.Tensor]]], non_blocking: bool,
                 device: torch.device, warmup: int, repeats: int) -> Timing:
    """Time copying each (destinations, sources) step in turn."""
    def run(_: int) -> None:
        for dst, src in steps:
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=non_blocking)
    return measure(run, device, warmup, repeats)
