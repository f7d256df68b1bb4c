"""How a routing trace becomes the runtime's steps, and what each step asks of the expert cache.

A *step* is one forward pass: every MoE layer runs once over the step's tokens, so at each
layer it activates the union of those tokens' top-k experts.

* **decode** (``batch`` = B sequences): the trace is cut into requests of ``sequence_tokens``
  consecutive tokens (default: B requests, i.e. the whole trace split into B streams); B
  requests decode together, one token each per step, until they finish; then the next B.
  Consecutive tokens of a request are consecutive trace tokens, so the trace's temporal
  locality reaches the cache. ``order`` (a permutation of the requests, e.g. from
  :mod:`.regroup`) says which requests are batched together.
* **prefill** (``batch`` = C tokens per chunk): step t is the chunk of tokens t·C … (t+1)·C − 1.

Tokens that do not fill a last request, batch or chunk are left out.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from moeplan.errors import InputError

from moeplan.cache_config import PHASES
CHUNK_ELEMENTS = 1 << 20   # [steps, layers, experts] elements handled at once (cache-sized chunks run faster)


@dataclass(frozen=True)
class StepShape:
    """The step structure (see the module docstring). phase: decode or prefill; batch: sequences
    per decode step or tokens per prefill chunk; sequence_tokens: tokens per decode request
    (0: the trace split into ``batch`` streams)."""

    phase: str = "decode"
    batch: int = 1
    sequence_tokens: int = 0

    def validate(self) -> "StepShape":
        if self.phase not in PHASES:
            raise InputError(f"phase must be decode or prefill, got {self.phase!r}", field="phase")
        if self.batch < 1:
            raise InputError(f"batch must be ≥ 1, got {self.batch}", field="batch")
        if self.sequence_tokens < 0:
            raise InputError(f"sequence tokens must be ≥ 0, got {self.sequence_tokens}", field="sequence_tokens")
        return self

    def request_tokens(self, num_tokens: int) -> int:
        """Tokens per decode request for a trace of ``num_tokens`` tokens."""
        return self.sequence_tokens or num_tokens // self.batch

    def num_requests(self, num_tokens: int) -> int:
        """Decode requests the trace holds."""
        n = self.request_tokens(num_tokens)
        return num_tokens // n if n else 0

    def token_index(self, num_tokens: int, order: np.ndarray | None = None) -> np.ndarray:
        """[steps, batch] int64: the trace tokens of every step (``order``: decode request order)."""
        self.validate()
        b = self.batch
        if self.phase == "prefill":
            steps = num_tokens // b
            if steps < 1:
                raise InputError(f"the trace has {num_tokens} tokens, fewer than one chunk of {b}", field="batch",
                                 fix="use a smaller chunk or a longer trace")
            return np.arange(steps * b, dtype=np.int64).reshape(steps, b)
        n = self.request_tokens(num_tokens)
        requests = self.num_requests(num_tokens)
        if n < 1 or requests < b:
            raise InputError(f"the trace has {num_tokens} tokens: too few for {b} sequences of "
                             f"{max(n, 1)} tokens", field="batch", fix="use a smaller batch or a longer trace")
        order = np.arange(requests) if order is None else np.asarray(order, dtype=np.int64)
        if sorted(order.tolist()) != list(range(requests)):
            raise InputError(f"request order must be a permutation of 0..{requests - 1}", field="order")
        groups = requests // b
        batches = order[: groups * b].reshape(groups, b)
        index = batches[:, None, :] * n + np.arange(n, dtype=np.int64)[None, :, None]
        return index.reshape(groups * n, b)


def step_counts(expert_ids: np.ndarray, index: np.ndarray, num_experts: int) -> np.ndarray:
    """[steps, layers, experts] int32: token-choices each step sends to each expert, for the
    steps ``index`` [steps, batch] of trace tokens; ``expert_ids`` [tokens, layers, k]."""
    ids = expert_ids[index].astype(np.int64)          # [steps, batch, layers, k]
    n, _, nl, _ = ids.shape
    base = (np.arange(n, dtype=np.int64)[:, None, None, None] * nl
            + np.arange(nl, dtype=np.int64)[None, None, :, None]) * num_experts
    flat = (base + ids).ravel()
    return np.bincount(flat, minlength=n * nl * num_experts).reshape(n, nl, num_experts).astype(np.int32)


def chunk_steps(num_layers: int, num_experts: int, lanes: int | None = None) -> int:
    """Steps per chunk so that a [steps, lanes, experts] array stays near CHUNK_ELEMENTS."""
    return max(16, CHUNK_ELEMENTS // (max(lanes or num_layers, 1) * num_experts))


def iter_counts(expert_ids: np.ndarray, index: np.ndarray, num_experts: int,
                chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first step, :func:`step_counts` of the next ``chunk`` steps), in step order."""
    for start in range(0, index.shape[0], chunk):
        yield start, step_counts(expert_ids, index[start:start + chunk], num_experts)
