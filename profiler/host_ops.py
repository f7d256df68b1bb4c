"""Host-link copies: host→device (h2d) and device→host (d2h), from or into pinned (page-locked)
or pageable host memory. The random data is made on the device and copied into the host buffers
before timing; a pinned copy is issued non-blocking and ends at the device event after it."""
from __future__ import annotations

import torch

from moeplan.profiler.device import Accelerator
from moeplan.profiler.timing import Op

DIRECTIONS = ("h2d", "d2h")
MEMORIES = ("pinned", "pageable")


def host_copy_op(acc: Accelerator, nbytes: int, direction: str, memory: str) -> Op:
    """Copy ``nbytes`` bytes over the host link in ``direction`` from/into ``memory`` host memory."""
    if direction not in DIRECTIONS or memory not in MEMORIES:
        raise ValueError(f"host copy needs direction in {DIRECTIONS} and memory in {MEMORIES}")
    if acc.is_cpu:
        raise ValueError("host copies need an accelerator: the CPU has no host link")
    elems = max(nbytes // 2, 1)
    pinned = memory == "pinned"

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        dev = torch.randn(elems, device=acc.device, dtype=torch.bfloat16)
        host = torch.empty(elems, dtype=torch.bfloat16, pin_memory=pinned)
        host.copy_(dev)
        acc.synchronize()
        return (host, dev) if direction == "h2d" else (dev, host)

    def run(s: tuple[torch.Tensor, torch.Tensor]) -> None:
        s[1].copy_(s[0], non_blocking=pinned)
    return Op(make=make, run=run, set_bytes=2 * elems, work={"bytes": 2.0 * elems},
              impl=f"Tensor.copy_ {direction} {memory}{' non_blocking' if pinned else ''}")
