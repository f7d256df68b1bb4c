"""The process group as the runtime uses it: rank, world size, device, and the collectives of
expert parallelism (variable-split all-to-all, a status all-reduce, point-to-point batches).
World size 1 needs no process group: every exchange is the identity."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moeplan.errors import InputError
from moeplan.io import write_json


@dataclass(frozen=True)
class Comm:
    """rank and world of the expert-parallel group; device: this rank's accelerator (or CPU)."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def single(cls, device: torch.device) -> "Comm":
        return cls(0, 1, device)

    @classmethod
    def from_env(cls) -> "Comm":
        """Join the group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
        NCCL on CUDA GPUs, gloo on CPU. Without torchrun's variables: one process, no group."""
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
        if "WORLD_SIZE" not in os.environ:
            return cls.single(device)
        if not dist.is_initialized():
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def backend(self) -> str:
        return dist.get_backend() if self.world > 1 else "none"

    def exchange_counts(self, send_counts: torch.Tensor) -> list[int]:
        """Send ``send_counts[d]`` (rows for rank d) to every rank; return the rows each rank sends here."""
        if self.world == 1:
            return send_counts.tolist()
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts)
        return recv.tolist()

    def all_to_all(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Variable-split all-to-all along dim 0."""
        if self.world == 1:
            return send
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts)
        return recv

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (all-reduce MAX of a status flag)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def p2p(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        """Post all sends (tensor, dst) and receives (buffer, src) as one batch and wait for them.
        Between two ranks, transfers match in the order both list them."""
        ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()

    def close(self) -> None:
        """Leave the process group (after a barrier, so no rank leaves while others still talk)."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def run_ranks(work: Callable[[Comm], dict[str, Any]], output: str | None,
              summary: Callable[[dict[str, Any]], str]) -> int:
    """The body of a ``python -m moeplan.runtime…`` entry point under torchrun: join the group,
    run ``work`` on every rank, leave the group; rank 0 writes the report to ``output`` (JSON)
    and prints ``summary(report)``. Exit status 2 with the message on bad input, else 0."""
    comm = Comm.from_env()
    try:
        report = work(comm)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        comm.close()
    if comm.rank == 0:
        if output:
            write_json(output, report)
        print(summary(report))
    return 0
