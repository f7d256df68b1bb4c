"""Single-device stack timing: world size 1, every expert local, the full MoE layer stack
(routing, permutation, experts, gated combine, shared expert) timed layer by layer with device
events over repeated forward passes (warm-up, median, fresh activations rotated between passes,
the same trace routing in each)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from moeplan.model import ModelSpec
from moeplan.plan import Placement
from moeplan.runtime.batches import BatchSource
from moeplan.runtime.comm import Comm
from moeplan.runtime.footprint import free_device_bytes, stack_footprint
from moeplan.runtime.replay import ROTATE, replay_slot_tokens, trace_window
from moeplan.runtime.stack import MoEStack, check_layers
from moeplan.runtime.timing import Clock, Timing, synchronize
from moeplan.runtime.weights import INPUT, seeded_generator
from moeplan.trace import RoutingTrace


def local_placement(model: ModelSpec) -> Placement:
    """Every expert of every MoE layer on one device, slot i holding expert i."""
    e = model.num_experts
    return Placement.from_slots(np.tile(np.arange(e), (model.num_moe_layers, 1))[:, None, :], e, 1)


@dataclass
class StackTiming:
    """Per-layer seconds of the local stack: ``per_layer[i]`` for MoE layer ``layers[i]``;
    ``slot_tokens`` [layers, 1, experts] the token-choices each expert served."""

    layers: list[int]
    tokens: int
    per_layer: list[Timing]
    slot_tokens: np.ndarray
    kernel: str
    impl: str
    device: str
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "tokens": self.tokens, "kernel": self.kernel, "impl": self.impl,
                "device": self.device, "dtype": self.dtype, "per_layer": [t.to_dict() for t in self.per_layer],
                "total_median_s": float(sum(t.median for t in self.per_layer))}


def time_local_stack(model: ModelSpec, trace: RoutingTrace, tokens: int, layers: Sequence[int] | None,
                     kernel: str, device: torch.device, dtype: torch.dtype, warmup: int = 3, repeats: int = 10,
                     seed: int = 0) -> StackTiming:
    """Time the world-size-1 stack on the first ``tokens`` tokens of ``trace``; InputError before
    any allocation when its estimated memory (:func:`~moeplan.runtime.footprint.stack_footprint`)
    exceeds what the device has free."""
    chosen = check_layers(layers, model.num_moe_layers)
    ids, index = trace_window(trace, tokens)
    stack_footprint(model, chosen, tokens, dtype.itemsize).check(free_device_bytes(device))
    placement = local_placement(model)
    stack = MoEStack(model, placement, Comm.single(device), kernel, seed, chosen, dtype=dtype)
    first = BatchSource(model.hidden_size, tokens, 0, 1, seed, device, dtype, trace).batch(0)
    batches = [first]
    for i in range(1, ROTATE):
        gen = seeded_generator(seed, INPUT, -i, device)
        x = torch.randn(tokens, model.hidden_size, generator=gen, device=device, dtype=torch.float32).to(dtype)
        batches.append(replace(first, id=i, x=x))
    with torch.inference_mode():
        for i in range(warmup):
            stack.forward(batches[i % ROTATE])
        synchronize(device)
        clock = Clock(device)
        samples = [stack.forward(batches[i % ROTATE], clock)[1] for i in range(repeats)]
    per_layer = [Timing.of([s[i] for s in samples]) for i in range(len(chosen))]
    return StackTiming(chosen, tokens, per_layer, replay_slot_tokens(placement, ids, index)[chosen], kernel,
                       stack.kernel.impl, str(device), str(dtype).replace("torch.", ""))
