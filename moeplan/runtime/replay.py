"""Per-device replay: a Plan's expert compute, device by device, on the one device at hand.

For a batch of ``tokens_per_device × devices`` trace tokens, the replica router gives the
token-choices of every slot of every device (exactly as the distributed runtime would route
them). Then, for each chosen MoE layer and each device of the plan in turn, this device
materialises that device's experts and times the expert kernel over that many tokens with fresh
random activations (warm-up, median of repeats, inputs rotated between repeats), as device work
(:func:`moeplan.runtime.timing.measure` with ``device_time``: what a CUDA-graph replay of the
layer costs, without the host's launch latency, as the profiler times its points). The result is
the measured expert compute of every device and of the straggler, to set beside the cost
model's :meth:`~moeplan.cost.CostModel.device_compute` on the same slot token counts.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moeplan.errors import InputError
from moeplan.model import ModelSpec
from moeplan.plan import Placement
from moeplan.runtime.footprint import free_device_bytes, replay_footprint
from moeplan.runtime.kernels import ExpertKernel
from moeplan.runtime.routing import ReplicaRouter
from moeplan.runtime.stack import check_layers, check_placement
from moeplan.runtime.timing import Timing, measure
from moeplan.runtime.weights import INPUT, LocalExperts, seeded_generator
from moeplan.trace import RoutingTrace

ROTATE = 3  # distinct random input buffers cycled over the repeats


def trace_window(trace: RoutingTrace, tokens: int, source: str = "trace") -> tuple[np.ndarray, np.ndarray]:
    """The first ``tokens`` tokens of ``trace``: (expert_ids [tokens, layers, k], global indices)."""
    if trace.num_tokens < tokens:
        raise InputError(f"trace has {trace.num_tokens:,} tokens, the batch needs {tokens:,}", source=source,
                         field="expert_ids", fix="synthesise a longer trace or lower --tokens-per-device")
    return trace.expert_ids[:tokens], np.arange(tokens, dtype=np.int64)


@dataclass
class DeviceReplay:
    """Measured expert compute per (layer, device) of a plan.

    Attributes:
        layers: MoE-layer indices replayed.
        slot_tokens: [layers, devices, slots] token-choices per slot.
        times: [layers][devices] Timing (seconds; a device with no tokens gets 0).
        kernel, impl: the kernel asked for and the implementation that ran.
        device, dtype: where and in what precision it ran.
    """

    layers: list[int]
    slot_tokens: np.ndarray
    times: list[list[Timing]]
    kernel: str
    impl: str
    device: str
    dtype: str

    def medians(self) -> np.ndarray:
        """[layers, devices] median seconds."""
        return np.array([[t.median for t in row] for row in self.times])

    def straggler(self) -> np.ndarray:
        """[layers] the slowest device's median seconds."""
        return self.medians().max(axis=1)

    def straggler_ratio(self) -> np.ndarray:
        """[layers] slowest / mean device time."""
        m = self.medians()
        return m.max(axis=1) / np.maximum(m.mean(axis=1), 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "kernel": self.kernel, "impl": self.impl, "device": self.device,
                "dtype": self.dtype, "slot_tokens": self.slot_tokens.tolist(),
                "times": [[t.to_dict() for t in row] for row in self.times],
                "straggler_s": self.straggler().tolist(), "straggler_ratio": self.straggler_ratio().tolist()}


def replay_slot_tokens(placement: Placement, expert_ids: np.ndarray, token_index: np.ndarray) -> np.ndarray:
    """[layers, devices, slots] token-choices per slot when ``placement`` serves these tokens."""
    return ReplicaRouter(placement, torch.device("cpu")).slot_tokens(expert_ids, token_index)


def replay_devices(model: ModelSpec, placement: Placement, slot_tokens: np.ndarray, layers: Sequence[int],
                   kernel: str, device: torch.device, dtype: torch.dtype, warmup: int = 3, repeats: int = 10,
                   seed: int = 0, advance: Callable[[int], None] | None = None) -> DeviceReplay:
    """Time every device's experts of each of ``layers`` over its slot token counts
    (``slot_tokens`` [all MoE layers, devices, slots]), one device after another; InputError
    before any allocation when the estimated memory exceeds what the device has free.
    ``advance(1)`` is called after each (layer, device) replayed (a progress bar's)."""
    check_placement(model, placement)
    layers = check_layers(layers, placement.num_layers)
    max_rows = int(slot_tokens[layers].sum(axis=2).max())
    replay_footprint(model, placement.slots_per_device, max_rows, dtype.itemsize).check(free_device_bytes(device))
    h, f = model.hidden_size, model.expert_ffn
    run = ExpertKernel(kernel, device, dtype, h, f)
    times: list[list[Timing]] = []
    for layer in layers:
        row = []
        for d in range(placement.num_devices):
            counts = [int(c) for c in slot_tokens[layer, d]]
            if sum(counts) == 0:
                row.append(Timing(0.0, 0.0, 0.0, 0))
            else:
                slots = [int(e) for e in placement.slot_expert[layer, d]]
                row.append(_time_device(run, LocalExperts.materialise(seed, layer, slots, h, f, dtype, device),
                                        counts, seeded_generator(seed, INPUT, layer * placement.num_devices + d, device),
                                        dtype, device, warmup, repeats))
            if advance is not None:
                advance(1)
        times.append(row)
    return DeviceReplay(layers, slot_tokens[layers], times, kernel, run.impl, str(device),
                        str(dtype).replace("torch.", ""))


def _time_device(run: ExpertKernel, experts: LocalExperts, counts: list[int], gen: torch.Generator,
                 dtype: torch.dtype, device: torch.device, warmup: int, repeats: int) -> Timing:
    """Time one device's experts over ``counts`` tokens per slot, cycling ROTATE random inputs
    (the grouping is prepared before the clock starts: the timed region is the expert compute)."""
    groups = run.groups(counts)
    inputs = [torch.randn(groups.rows, experts.w13.shape[-1], generator=gen, device=device,
                          dtype=torch.float32).to(dtype) for _ in range(ROTATE)]
    return measure(lambda i: run(inputs[i % ROTATE], groups, experts.w13, experts.w2), device, warmup, repeats,
                   device_time=True)
