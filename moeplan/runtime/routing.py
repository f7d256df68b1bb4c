"""Replica routing: which physical slot serves each of a token's top-k choices.

An expert with several replicas splits its tokens by the plan's ``replica_share``: every
(token, layer, choice) gets a 32-bit hash of its global token index, and the replica whose
share interval [cumulative share before it, cumulative share through it) holds
``hash / 2³²`` serves it. The hash and the interval bounds are integers, so every rank and
every device type picks the same replica: runs are reproducible and a replay on one GPU
routes exactly as the distributed runtime does.
"""
from __future__ import annotations

import numpy as np
import torch

from moeplan.plan import Placement

SPAN = 2**32
_MASK = SPAN - 1
_WEYL = 2654435769          # ⌊2³²/φ⌋
_MIX = 0x45D9F3B            # a well-mixing odd multiplier for 32-bit integer hashing


def token_hash(token_index: torch.Tensor, layer: int, top_k: int) -> torch.Tensor:
    """[tokens, top_k] int64 hashes in 0..2³²-1 of (global token index, layer, choice)."""
    j = torch.arange(top_k, device=token_index.device, dtype=torch.int64)
    x = (token_index.to(torch.int64)[:, None] * _WEYL + layer * 40503 + j[None, :] * 2246822519) & _MASK
    for _ in range(2):
        x = ((x ^ (x >> 16)) * _MIX) & _MASK
    return x ^ (x >> 16)


class ReplicaRouter:
    """Routing tables of one placement, as tensors on ``device``.

    For every layer: ``device_of[E, R]``, ``slot_of[E, R]`` (the replicas of each expert in
    device-major order, padded by repeating the last one) and ``bound[E, R]`` (the upper end of
    each replica's hash interval; the last real replica and the padding end at 2³²).
    """

    def __init__(self, placement: Placement, device: torch.device) -> None:
        self.placement = placement
        self.device_of: list[torch.Tensor] = []
        self.slot_of: list[torch.Tensor] = []
        self.bound: list[torch.Tensor] = []
        e = placement.num_experts
        r = int(placement.replica_counts().max())
        for layer in range(placement.num_layers):
            dev = np.zeros((e, r), dtype=np.int64)
            slot = np.zeros((e, r), dtype=np.int64)
            bound = np.full((e, r), SPAN, dtype=np.int64)
            for expert in range(e):
                d_idx, s_idx = np.nonzero(placement.slot_expert[layer] == expert)
                shares = placement.replica_share[layer, d_idx, s_idx]
                cum = np.rint(np.cumsum(shares) / shares.sum() * SPAN).astype(np.int64)
                n = len(d_idx)
                dev[expert, :n], dev[expert, n:] = d_idx, d_idx[-1]
                slot[expert, :n], slot[expert, n:] = s_idx, s_idx[-1]
                bound[expert, :n - 1] = cum[:n - 1]
            self.device_of.append(torch.from_numpy(dev).to(device))
            self.slot_of.append(torch.from_numpy(slot).to(device))
            self.bound.append(torch.from_numpy(bound).to(device))

    def route(self, layer: int, expert_ids: torch.Tensor,
              token_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(device [tokens, k], slot [tokens, k]) serving each choice of ``expert_ids`` [tokens, k]."""
        ids = expert_ids.to(torch.int64)
        h = token_hash(token_index, layer, ids.shape[1])
        replica = (h[..., None] >= self.bound[layer][ids]).sum(-1, keepdim=True)
        dev = torch.gather(self.device_of[layer][ids], -1, replica).squeeze(-1)
        slot = torch.gather(self.slot_of[layer][ids], -1, replica).squeeze(-1)
        return dev, slot

    def slot_tokens(self, expert_ids: np.ndarray, token_index: np.ndarray) -> np.ndarray:
        """Token-choices served by every slot: [layers, devices, slots] from ``expert_ids``
        [tokens, layers, k] of tokens with global indices ``token_index`` [tokens]."""
        p = self.placement
        d, s = p.num_devices, p.slots_per_device
        ids = torch.from_numpy(np.ascontiguousarray(expert_ids, dtype=np.int64))
        idx = torch.from_numpy(np.asarray(token_index, dtype=np.int64))
        out = np.zeros((p.num_layers, d, s), dtype=np.int64)
        for layer in range(p.num_layers):
            dev, slot = self.route(layer, ids[:, layer].to(self.bound[layer].device), idx.to(self.bound[layer].device))
            out[layer] = torch.bincount((dev * s + slot).reshape(-1), minlength=d * s).cpu().numpy().reshape(d, s)
        return out
