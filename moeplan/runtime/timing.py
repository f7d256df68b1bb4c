"""Trustworthy timing: device events on CUDA (perf_counter on CPU), warm-up, median of repeats
with min and max kept, and a synchronisation before any number is read.

:func:`measure` times ``fn(i)`` for repeat ``i`` (so callers rotate fresh inputs by ``i``);
:class:`Clock` stamps points inside one run (per-layer times of a stack).

Device time: with ``device_time=True`` the device is kept busy just before each repeat
(:func:`queue_ahead`) for longer than the host takes to enqueue the repeat, so the start event,
the work and the stop event wait in the queue and the events time the device's work alone — what
a CUDA-graph replay of the same kernels costs (vLLM's and SGLang's decode) — not the host's
launch latency, which moves with host load. The profiler times its points the same way
(:mod:`moeplan.profiler.timing`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moeplan.profiler.timing import busy_wait_seconds


@dataclass(frozen=True)
class Timing:
    """Seconds over ``repeats`` timed runs: median, min, max."""

    median: float
    min: float
    max: float
    repeats: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Timing":
        a = np.asarray(samples, dtype=np.float64)
        return cls(float(np.median(a)), float(a.min()), float(a.max()), int(a.size))

    def to_dict(self) -> dict[str, float | int]:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "repeats": self.repeats}


class Clock:
    """Time stamps on ``device``: CUDA events recorded on the current stream, or perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def stamp(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def intervals(self, stamps: Sequence[Any]) -> list[float]:
        """Seconds between consecutive stamps (waits for the device to reach the last one)."""
        if self.cuda:
            stamps[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(stamps[:-1], stamps[1:])]
        return [b - a for a, b in zip(stamps[:-1], stamps[1:])]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SLEEP_CYCLES_PER_S = 2.0e9     # torch.cuda._sleep counts clock cycles; Hopper's boost clock is ≤ 2 GHz


def queue_ahead(device: torch.device, seconds: float) -> None:
    """Keep a CUDA device busy for at least ``seconds`` (``torch.cuda._sleep`` of that many cycles
    at a ≤ 2 GHz clock); nothing elsewhere, where every op is synchronous anyway."""
    if device.type == "cuda":
        torch.cuda._sleep(int(math.ceil(seconds * SLEEP_CYCLES_PER_S)))


def measure(fn: Callable[[int], Any], device: torch.device, warmup: int, repeats: int,
            device_time: bool = False) -> Timing:
    """Run ``fn(i)`` ``warmup`` times untimed, then ``repeats`` times, each between two stamps;
    with ``device_time`` each repeat is queued behind a busy wait (module docstring)."""
    if repeats < 1:
        raise ValueError("repeats must be ≥ 1")
    for i in range(warmup):
        fn(i)
    synchronize(device)
    wait_s = 0.0
    if device_time and device.type == "cuda":
        wait_s = busy_wait_seconds(lambda s: queue_ahead(device, s), lambda: fn(max(warmup - 1, 0)),  # not repeat 0's
                                   lambda: synchronize(device))
    clock = Clock(device)
    pairs = []
    for i in range(repeats):
        if wait_s:
            queue_ahead(device, wait_s)
        start = clock.stamp()
        fn(warmup + i)
        pairs.append((start, clock.stamp()))
    synchronize(device)
    return Timing.of([clock.intervals([a, b])[0] for a, b in pairs])
