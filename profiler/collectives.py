"""Collectives over ``torch.distributed``: NCCL on NVIDIA GPUs, HCCL on Ascend NPUs, gloo on CPU.

Measured ops (x = nccl-tests' "size": bytes per rank, see :func:`bus_factor`):
- ``all_to_all``: every rank sends x/n bytes to every rank (x in, x out);
- ``all_to_all_skewed``: every rank sends x bytes split Zipf(1.0) over the destinations, the same
  hot destination for all (expert dispatch with a popular expert); the busiest rank receives
  ``hot_share``·n·x bytes;
- ``all_gather``: x/n in, x out; ``reduce_scatter``: x in, x/n out; ``all_reduce``: x in place;
- ``send_recv``: one rank sends x bytes to another, measured for every pair of the scope.

Scopes: ``intra_node`` (the ranks of one node, all nodes at once) and ``inter_node`` (the ranks of
the same local index on every node, all local indices at once) when the job spans nodes. The node
layout comes from LOCAL_WORLD_SIZE (torchrun sets it) or else the ranks' host names.
Each timed repeat starts after a barrier of all ranks; a repeat's time is the slowest rank's.
"""
from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch
import torch.distributed as dist

from moeplan.profiler.device import Accelerator
from moeplan.profiler.raw import Measurement
from moeplan.profiler.timing import Effort, Op, measure

OPS = ("all_to_all", "all_to_all_skewed", "all_gather", "reduce_scatter", "all_reduce", "send_recv")
SKEW = 1.0                      # Zipf exponent of the skewed all-to-all's destination shares
GROUP_TIMEOUT = datetime.timedelta(minutes=30)   # rank 0 measures compute while the others wait
# newer torch names them *_single and deprecates the *_tensor names (same arguments); take what exists
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def bus_factor(op: str, ranks: int) -> float:
    """nccl-tests' bus-bandwidth factor: busbw = algbw × factor, algbw = size / time.
    all_reduce 2(n−1)/n; all_gather, reduce_scatter, all_to_all (n−1)/n; send_recv 1."""
    n = ranks
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all", "all_to_all_skewed"):
        return (n - 1) / n
    if op == "send_recv":
        return 1.0
    raise ValueError(f"unknown collective {op!r}")


@dataclass(frozen=True)
class Topology:
    """Which rank sits on which node: ranks r of node k are k·per_node … (k+1)·per_node − 1."""

    world: int
    per_node: int

    @property
    def nodes(self) -> int:
        return self.world // self.per_node

    def intra_groups(self) -> list[list[int]]:
        return [list(range(k * self.per_node, (k + 1) * self.per_node)) for k in range(self.nodes)]

    def inter_groups(self) -> list[list[int]]:
        return [[k * self.per_node + i for k in range(self.nodes)] for i in range(self.per_node)]

    def scopes(self) -> list[tuple[str, int]]:
        """(scope, ranks per group) for each scope with at least two ranks per group."""
        out = []
        if self.per_node > 1:
            out.append(("intra_node", self.per_node))
        if self.nodes > 1:
            out.append(("inter_node", self.nodes))
        return out

    def pairs(self, scope: str) -> list[list[tuple[int, int]]]:
        """Point-to-point rounds of a scope: each round is a list of (src, dst) rank pairs run at
        once (one pair of local indices on every node, or one pair of nodes on every local index)."""
        if scope == "intra_node":
            return [[(k * self.per_node + a, k * self.per_node + b) for k in range(self.nodes)]
                    for a, b in combinations(range(self.per_node), 2)]
        return [[(a * self.per_node + i, b * self.per_node + i) for i in range(self.per_node)]
                for a, b in combinations(range(self.nodes), 2)]

    @classmethod
    def detect(cls, world: int, hosts: list[str]) -> Topology:
        """From LOCAL_WORLD_SIZE when set (torchrun), else from the ranks' host names (contiguous)."""
        env = os.environ.get("LOCAL_WORLD_SIZE")
        per = int(env) if env else hosts.count(hosts[0])
        if per < 1 or world % per:
            per = world
        return cls(world, per)


class Comm:
    """The profiler's process group: backend, rank, topology, scope groups; a :class:`Sync`."""

    def __init__(self, acc: Accelerator) -> None:
        self.acc = acc
        kwargs: dict[str, Any] = {"backend": acc.backend, "timeout": GROUP_TIMEOUT}
        if acc.kind == "cuda":
            kwargs["device_id"] = acc.device
        if acc.kind == "npu":
            import torch_npu  # noqa: F401  (registers the hccl backend)
        dist.init_process_group(**kwargs)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        hosts: list[Any] = [None] * self.world
        dist.all_gather_object(hosts, socket.gethostname())
        self.hosts = [str(h) for h in hosts]
        self.topology = Topology.detect(self.world, self.hosts)
        self.groups: dict[str, Any] = {}
        for scope, _ in self.topology.scopes():
            ranks = self.topology.intra_groups() if scope == "intra_node" else self.topology.inter_groups()
            if len(ranks) == 1:
                self.groups[scope] = dist.group.WORLD
                continue
            for r in ranks:
                g = dist.new_group(r)
                if self.rank in r:
                    self.groups[scope] = g

    @property
    def tensor_device(self) -> torch.device:
        """Where the backend wants its small control tensors."""
        return torch.device("cpu") if self.acc.is_cpu else self.acc.device

    def barrier(self) -> None:
        dist.barrier()

    def agree_max(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64 if self.acc.kind != "npu" else torch.float32,
                         device=self.tensor_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def slowest(self, samples: list[float]) -> list[float]:
        t = torch.tensor(samples, dtype=torch.float64 if self.acc.kind != "npu" else torch.float32,
                         device=self.tensor_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [float(v) for v in t.tolist()]

    def close(self) -> None:
        dist.barrier()
        dist.destroy_process_group()


def skewed_splits(ranks: int, elems: int) -> list[list[int]]:
    """splits[src][dst] elements for the skewed all-to-all: each row sums to ``elems``, shares
    ∝ 1/(dst+1)^SKEW (destination 0 is the hot one)."""
    w = [1.0 / (d + 1) ** SKEW for d in range(ranks)]
    total = sum(w)
    row = [int(elems * x / total) for x in w]
    row[0] += elems - sum(row)
    return [list(row) for _ in range(ranks)]


def collective_op(acc: Accelerator, comm: Comm, op: str, scope: str, nbytes: int,
                  pairs: list[tuple[int, int]] | None = None) -> Op:
    """The op ``op`` of ``nbytes`` bytes per rank in this rank's group of ``scope``; for send_recv,
    the pairs of this round (this rank sends, receives or idles)."""
    group = comm.groups[scope]
    n = dist.get_world_size(group) if op != "send_recv" else 2
    dtype = torch.float32 if acc.is_cpu else torch.bfloat16
    size = torch.tensor([], dtype=dtype).element_size()
    elems = nbytes // size
    dev = acc.device

    def rand(k: int) -> torch.Tensor:
        return torch.randn(max(k, 1), device=dev, dtype=dtype)

    work = {"bytes": float(elems * size), "bus_factor": bus_factor(op, n)}
    make: Callable[[], Any]
    run: Callable[[Any], Any]
    if op == "all_to_all":
        make = lambda: (rand(elems), rand(elems))
        run = lambda s: dist.all_to_all_single(s[1], s[0], group=group)
        set_bytes = 2 * elems * size
    elif op == "all_to_all_skewed":
        me = dist.get_rank(group)
        splits = skewed_splits(n, elems)
        send = splits[me]
        recv = [splits[s][me] for s in range(n)]
        make = lambda: (rand(sum(send)), rand(sum(recv)))
        run = lambda s: dist.all_to_all_single(s[1], s[0], output_split_sizes=recv, input_split_sizes=send,
                                               group=group)
        set_bytes = (sum(send) + sum(recv)) * size
        work["hot_share"] = splits[0][0] / max(elems, 1)
    elif op == "all_gather":
        make = lambda: (rand(elems // n), rand(elems))
        run = lambda s: ALL_GATHER(s[1], s[0], group=group)
        set_bytes = (elems + elems // n) * size
    elif op == "reduce_scatter":
        make = lambda: (rand(elems), rand(elems // n))
        run = lambda s: REDUCE_SCATTER(s[1], s[0], group=group)
        set_bytes = (elems + elems // n) * size
    elif op == "all_reduce":
        make = lambda: rand(elems)
        run = lambda s: dist.all_reduce(s, group=group)
        set_bytes = elems * size
    elif op == "send_recv":
        role = _role(comm.rank, pairs or [])
        make = lambda: rand(elems if role else 1)
        run = _p2p(role)
        set_bytes = elems * size if role else size
    else:
        raise ValueError(f"unknown collective {op!r}")
    return Op(make=make, run=run, set_bytes=set_bytes, work=work, impl=f"torch.distributed {op} ({acc.backend})")


def _role(rank: int, pairs: list[tuple[int, int]]) -> tuple[str, int] | None:
    for src, dst in pairs:
        if rank == src:
            return ("send", dst)
        if rank == dst:
            return ("recv", src)
    return None


def _p2p(role: tuple[str, int] | None) -> Callable[[torch.Tensor], Any]:
    if role is None:
        return lambda t: None
    kind, peer = role
    if kind == "send":
        return lambda t: dist.send(t, dst=peer)
    return lambda t: dist.recv(t, src=peer)


def aligned_sizes(sizes: tuple[int, ...], ranks: int, elem: int) -> list[int]:
    """Sizes rounded down to a multiple of ranks × 16 elements (so every split is whole), deduplicated."""
    step = ranks * 16 * elem
    return sorted({max(step, s // step * step) for s in sizes})


def collective_points(comm: Comm, sizes: tuple[int, ...]) -> Iterator[tuple[str, str, int, list[tuple[int, int]] | None]]:
    """Every (scope, op, bytes, pairs) point in the order all ranks run them."""
    elem = 4 if comm.acc.is_cpu else 2
    for scope, ranks in comm.topology.scopes():
        for op in OPS:
            if op == "send_recv":
                for pairs in comm.topology.pairs(scope):
                    for nbytes in aligned_sizes(sizes, 1, elem):
                        yield scope, op, nbytes, pairs
                continue
            for nbytes in aligned_sizes(sizes, ranks, elem):
                yield scope, op, nbytes, None


def measure_collective(acc: Accelerator, comm: Comm, effort: Effort, scope: str, op: str, nbytes: int,
                       pairs: list[tuple[int, int]] | None) -> Measurement:
    """Time one point on every rank (all in step); the slowest rank's repeats."""
    ranks = 2 if op == "send_recv" else dict(comm.topology.scopes())[scope]
    built = collective_op(acc, comm, op, scope, nbytes, pairs=pairs)
    timing = measure(acc, built, effort, sync=comm)
    key: dict[str, Any] = {"op": op, "scope": scope, "ranks": ranks}
    params: dict[str, Any] = {**key, "backend": acc.backend}
    if op == "all_to_all_skewed":
        key["skew"] = f"zipf-{SKEW:g}"
    if pairs is not None:
        params["pairs"] = [list(p) for p in pairs]
    return Measurement("collective", key, params, float(built.work["bytes"]), timing.samples, built.work, built.impl)
