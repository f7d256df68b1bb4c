"""How the profiler times one operation, the same way for every figure:

1. **Fresh data, rotated**: ``op.make()`` builds an input set of random data (never zeros) on the
   device; enough sets are built that together they exceed the device's last-level cache several
   times over (:func:`rotation_sets`), and repeat ``i`` uses set ``i mod n``, so no repeat finds its
   inputs in the cache.
2. **Warm-up**: every set runs at least once untimed (module load, handle creation, clocks up);
   the warm-up's wall-clock time per run sets how many repeats fit the time budget.
3. **Device timers**: each repeat sits between two device events (perf_counter on the CPU);
   one synchronisation at the end reads them all. An op marked ``queue_ahead`` (the dense GEMM
   grid, the expert kernels, routing and attention) has the device kept busy just before each
   repeat (:meth:`Accelerator.queue_ahead`) for twice as long as the host took to enqueue one run
   (:func:`queue_ahead_seconds`, measured after the warm-up), so its events
   time the device's work, not the host's launch latency: a GEMM of a few µs is otherwise timed at
   the ~20–35 µs the host takes to launch it, a floor that moves with host load, and a loop over
   experts at decode at the host's launch rate. That is what a CUDA-graph replay of the same
   kernels costs (decode in vLLM and SGLang); an eager run pays the host's launches on top.
4. **Every rank in step**: with a :class:`Sync` (collectives), the ranks agree on the number of
   warm-ups and repeats and meet at a barrier before each timed repeat; each repeat's time is the
   slowest rank's.
5. **Median over repeats**, with min and max kept.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from moeplan.profiler.device import Accelerator

MIN_QUEUE_AHEAD_S = 100e-6     # the shortest busy wait: longer than enqueueing two events and one kernel
QUEUE_AHEAD_MARGIN = 2.0       # the busy wait lasts this many times the host's measured enqueue time
CACHE_FLUSH_FACTOR = 3     # rotated input sets together exceed the last-level cache this many times
MEMORY_SHARE = 0.25        # rotation never takes more than this share of free memory


def queue_ahead_seconds(enqueue_s: float) -> float:
    """How long to keep the device busy before a repeat whose host enqueue took ``enqueue_s`` seconds."""
    return max(MIN_QUEUE_AHEAD_S, QUEUE_AHEAD_MARGIN * enqueue_s)


def busy_wait_seconds(busy: Callable[[float], None], run: Callable[[], Any], synchronize: Callable[[], None]) -> float:
    """How long to keep the device busy before each timed repeat: :func:`queue_ahead_seconds` of the
    host's time to enqueue ``run()`` while the device is held busy (``busy(seconds)``), measured once;
    the device is synchronised afterwards."""
    busy(MIN_QUEUE_AHEAD_S)
    t0 = time.perf_counter()
    run()
    enqueue_s = time.perf_counter() - t0
    synchronize()
    return queue_ahead_seconds(enqueue_s)


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed repeat; median, min and max over them."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def min(self) -> float:
        return float(min(self.samples))

    @property
    def max(self) -> float:
        return float(max(self.samples))

    @property
    def repeats(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class Effort:
    """Time budget per measured point: at least ``warmup`` untimed runs, then enough repeats to
    fill ``target_s`` seconds, within [min_reps, max_reps]; at most ``max_sets`` rotated input sets."""

    warmup: int
    min_reps: int
    max_reps: int
    target_s: float
    max_sets: int

    def repeats_for(self, seconds_per_run: float) -> int:
        if seconds_per_run <= 0:
            return self.max_reps
        return int(min(self.max_reps, max(self.min_reps, math.ceil(self.target_s / seconds_per_run))))


@dataclass
class Op:
    """One timed operation. ``make()`` returns a fresh input set (random data on the device);
    ``run(inputs)`` does the work once; ``set_bytes``: bytes of one input set; ``work``: what one run
    does (``flops``, ``bytes`` moved) for rates; ``impl``: which implementation runs (``make`` may
    refine it once it sees the real inputs, e.g. the attention kernel torch picks); ``queue_ahead``:
    time it as device work (module docstring, step 3)."""

    make: Callable[[], Any]
    run: Callable[[Any], Any]
    set_bytes: int
    work: dict[str, float] = field(default_factory=dict)
    impl: str = ""
    queue_ahead: bool = False


class Sync(Protocol):
    """What timing needs from a process group (see :class:`moeplan.profiler.collectives.Comm`)."""

    def barrier(self) -> None: ...

    def agree_max(self, value: float) -> float: ...

    def slowest(self, samples: list[float]) -> list[float]: ...


def rotation_sets(set_bytes: int, cache_bytes: int, free_bytes: int, max_sets: int) -> int:
    """How many input sets to rotate: enough to exceed the cache CACHE_FLUSH_FACTOR times, at most
    ``max_sets``, and never more than MEMORY_SHARE of the free memory (at least one)."""
    want = math.ceil(CACHE_FLUSH_FACTOR * cache_bytes / max(set_bytes, 1))
    fit = int(MEMORY_SHARE * free_bytes // max(set_bytes, 1))
    return max(1, min(want, max_sets, fit))


def measure(acc: Accelerator, op: Op, effort: Effort, sync: Sync | None = None) -> Timing:
    """Time ``op`` on ``acc`` (see the module docstring); with ``sync``, all ranks in step."""
    n_sets = rotation_sets(op.set_bytes, acc.cache_bytes(), acc.free_bytes(), effort.max_sets)
    sets = [op.make() for _ in range(n_sets)]
    warm = max(effort.warmup, n_sets)
    if sync is not None:
        warm = int(sync.agree_max(warm))
    acc.synchronize()
    t0 = time.perf_counter()
    for i in range(warm):
        if sync is not None:
            sync.barrier()
        op.run(sets[i % n_sets])
    acc.synchronize()
    per_run = (time.perf_counter() - t0) / warm
    wait_s = 0.0
    if op.queue_ahead:
        wait_s = busy_wait_seconds(acc.queue_ahead, lambda: op.run(sets[-1]), acc.synchronize)  # not repeat 0's set
    reps = effort.repeats_for(per_run + wait_s)
    if sync is not None:
        reps = int(sync.agree_max(reps))
    timer = acc.timer()
    for i in range(reps):
        if sync is not None:
            sync.barrier()
        if op.queue_ahead:
            acc.queue_ahead(wait_s)
        timer.start()
        op.run(sets[i % n_sets])
        timer.stop()
    acc.synchronize()
    samples = [max(s, 1e-9) for s in timer.seconds()]
    if sync is not None:
        samples = sync.slowest(samples)
    del sets
    return Timing(tuple(samples))
