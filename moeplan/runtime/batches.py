"""Batches the runtime serves: deterministic inputs and, when trace-driven, the routing.

Batch ``b`` of a run with ``tokens_per_rank`` tokens on each of ``world`` ranks covers global
tokens ``b·B … (b+1)·B − 1`` (B = tokens_per_rank · world); rank r holds the r-th contiguous
shard. Its activations are random (seeded by the run's seed and the batch id, so every rank
and every re-run sees the same ones); with a :class:`~moeplan.trace.RoutingTrace` the batch also
takes those tokens' expert choices (wrapping around the trace's end) and gate weights (the
trace's, else 1/k each).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeplan.errors import InputError
from moeplan.runtime.weights import INPUT, seeded_generator
from moeplan.trace import RoutingTrace


@dataclass
class Batch:
    """One rank's shard of a batch.

    Attributes:
        id: the batch id (the ledger's key).
        x: activations [tokens, hidden].
        token_index: global token indices [tokens] (int64; the replica hash's key).
        expert_ids: trace routing [tokens, layers, k] (int64), or None for the model's router.
        gates: gate weights [tokens, layers, k] (float32), or None for the router's.
    """

    id: int
    x: torch.Tensor
    token_index: torch.Tensor
    expert_ids: torch.Tensor | None
    gates: torch.Tensor | None


class BatchSource:
    """Makes batch ``id`` for one rank (see the module docstring)."""

    def __init__(self, hidden: int, tokens_per_rank: int, rank: int, world: int, seed: int,
                 device: torch.device, dtype: torch.dtype, trace: RoutingTrace | None = None) -> None:
        if tokens_per_rank < 1:
            raise InputError(f"tokens per rank must be ≥ 1, got {tokens_per_rank}", field="tokens")
        self.hidden = hidden
        self.tokens_per_rank = tokens_per_rank
        self.rank = rank
        self.world = world
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.trace = trace

    @property
    def global_tokens(self) -> int:
        return self.tokens_per_rank * self.world

    def batch(self, batch_id: int) -> Batch:
        n, b = self.tokens_per_rank, self.global_tokens
        gen = seeded_generator(self.seed, INPUT, batch_id, self.device)
        x = torch.randn(b, self.hidden, generator=gen, device=self.device, dtype=torch.float32)
        x = x[self.rank * n:(self.rank + 1) * n].to(self.dtype)
        first = batch_id * b + self.rank * n
        index = np.arange(first, first + n, dtype=np.int64)
        ids = gates = None
        if self.trace is not None:
            rows = index % self.trace.num_tokens
            ids = torch.from_numpy(self.trace.expert_ids[rows].astype(np.int64)).to(self.device)
            if self.trace.gate_weights is not None:
                g = torch.from_numpy(self.trace.gate_weights[rows].astype(np.float32))
            else:
                g = torch.full(ids.shape, 1.0 / self.trace.top_k)
            gates = g.to(self.device)
        return Batch(batch_id, x, torch.from_numpy(index).to(self.device), ids, gates)
