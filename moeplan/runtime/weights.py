"""Expert weights: deterministic from (seed, layer, expert), so any rank can materialise any
expert bit for bit (on the same kind of device) and check a moved expert against it.

An expert is a SwiGLU FFN kept in Linear layout: ``w13`` [2·ffn, hidden] (gate rows, then up
rows) and ``w2`` [hidden, ffn]; ``y = w2 · (silu(w_gate·x) ⊙ (w_up·x))``. A device's experts of
one layer are stacked by slot: :class:`LocalExperts` holds ``w13`` [slots, 2·ffn, hidden] and
``w2`` [slots, hidden, ffn].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SHARED = -1   # the "expert id" of a layer's shared expert in the seed
ROUTER = -2   # the "expert id" of a layer's router in the seed
INPUT = -3    # the "layer" of a batch's input activations in the seed


def seeded_generator(seed: int, a: int, b: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` whose stream depends only on (seed, a, b)."""
    state = np.random.SeedSequence([seed, a + 2**20, b + 2**20]).generate_state(1, dtype=np.uint64)[0]
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def random_matrix(rows: int, cols: int, std: float, gen: torch.Generator, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """A [rows, cols] normal matrix with standard deviation ``std`` (drawn in float32, then cast)."""
    m = torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32)
    return m.mul_(std).to(dtype)


def materialise_expert(seed: int, layer: int, expert: int, hidden: int, ffn: int, dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``expert`` of MoE layer ``layer``: (w13 [2·ffn, hidden], w2 [hidden, ffn])."""
    gen = seeded_generator(seed, layer, expert, device)
    w13 = random_matrix(2 * ffn, hidden, hidden ** -0.5, gen, dtype, device)
    w2 = random_matrix(hidden, ffn, ffn ** -0.5, gen, dtype, device)
    return w13, w2


def materialise_router(seed: int, layer: int, hidden: int, num_experts: int, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    """A random linear gate of one MoE layer: [num_experts, hidden]."""
    gen = seeded_generator(seed, layer, ROUTER, device)
    return random_matrix(num_experts, hidden, hidden ** -0.5, gen, dtype, device)


@dataclass
class LocalExperts:
    """One device's experts of one MoE layer, stacked by slot.

    Attributes:
        slot_expert: logical expert of each local slot.
        w13: [slots, 2·ffn, hidden]; w2: [slots, hidden, ffn].
    """

    slot_expert: list[int]
    w13: torch.Tensor
    w2: torch.Tensor

    @classmethod
    def materialise(cls, seed: int, layer: int, slot_expert: list[int], hidden: int, ffn: int,
                    dtype: torch.dtype, device: torch.device) -> "LocalExperts":
        """Build the slots from the deterministic weights of their experts."""
        w13 = torch.empty(len(slot_expert), 2 * ffn, hidden, dtype=dtype, device=device)
        w2 = torch.empty(len(slot_expert), hidden, ffn, dtype=dtype, device=device)
        for s, e in enumerate(slot_expert):
            a, b = materialise_expert(seed, layer, e, hidden, ffn, dtype, device)
            w13[s].copy_(a)
            w2[s].copy_(b)
        return cls(list(slot_expert), w13, w2)

    @property
    def nbytes_per_expert(self) -> int:
        """Bytes of one expert's weights."""
        return (self.w13[0].numel() + self.w2[0].numel()) * self.w13.element_size()


def tensor_checksum(t: torch.Tensor) -> torch.Tensor:
    """Exact, order-independent checksum of a tensor's bits: the int64 sum of its 16- or 32-bit
    words, and the sum of those words times their position modulo a prime (catches swaps).
    Returns an int64 tensor [2] on the tensor's device."""
    flat = t.contiguous().view(-1)
    words = flat.view(torch.int32) if flat.numel() * flat.element_size() % 4 == 0 else flat.view(torch.int16)
    w = words.to(torch.int64)
    pos = torch.arange(w.numel(), device=w.device, dtype=torch.int64) % 65521 + 1
    return torch.stack([w.sum(), (w * pos).sum()])
