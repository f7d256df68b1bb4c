"""The expert-parallel MoE layer stack on one rank.

Each layer: ``h ← h + moe(rms_norm(h))``. The MoE block routes each token's top-k choices
(from the trace, or from the layer's random-weight gate: top-k of a softmax, renormalised) to
the replica the :class:`~moeplan.runtime.routing.ReplicaRouter` picks, and then

1. sorts the token-choices by (device, slot), exchanges split sizes, dispatches rows and slot
   ids with variable-split all-to-alls;
2. runs the local experts over the received rows sorted by slot (loop or grouped kernel); on one
   rank with ``torch._grouped_mm`` the layer has no host synchronisation at all (group ends are
   found on the device), so decode steps queue up on the GPU instead of waiting for the host at
   every layer; across ranks the split sizes of the all-to-all still need one per layer;
3. sends the results back (all-to-all with the reverse splits), puts them in choice order and
   sums ``gate_j · y_j`` over j = 0 … k−1 in that fixed order, in float32;
4. adds the shared expert (replicated on every rank) when the model has one.

The stack owns the rank's expert weights; :meth:`MoEStack.install` swaps in a new placement
and its weights at once (used by a live re-placement's commit). Compute dtype: bf16 on GPU,
float32 on CPU.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moeplan.errors import InputError
from moeplan.model import ModelSpec
from moeplan.plan import Placement
from moeplan.runtime.batches import Batch
from moeplan.runtime.comm import Comm
from moeplan.runtime.kernels import ExpertKernel
from moeplan.runtime.routing import ReplicaRouter
from moeplan.runtime.timing import Clock
from moeplan.runtime.weights import SHARED, LocalExperts, materialise_expert, materialise_router


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def rms_norm(h: torch.Tensor) -> torch.Tensor:
    """Row-wise RMS normalisation (no learned scale), computed in float32."""
    f = h.float()
    return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)


def check_placement(model: ModelSpec, placement: Placement, devices: int | None = None,
                    source: str = "plan") -> None:
    """Raise InputError unless ``placement`` fits ``model`` (and spans ``devices`` devices)."""
    if placement.num_layers != model.num_moe_layers or placement.num_experts != model.num_experts:
        raise InputError(f"placement covers {placement.num_layers} layers × {placement.num_experts} experts, the "
                         f"model {model.num_moe_layers} × {model.num_experts}", source=source, field="placement")
    if devices is not None and placement.num_devices != devices:
        raise InputError(f"placement spans {placement.num_devices} devices but {devices} ranks run it",
                         source=source, field="placement.devices",
                         fix=f"launch {placement.num_devices} ranks (torchrun --nproc-per-node)")


def check_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """The MoE-layer indices to run (default all); InputError when one is out of range."""
    chosen = list(range(num_layers)) if layers is None else [int(x) for x in layers]
    if not chosen or min(chosen) < 0 or max(chosen) >= num_layers:
        raise InputError(f"layers must lie in 0..{num_layers - 1}, got {chosen}", field="layers")
    return chosen


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """Comma-separated MoE-layer indices ("0,3,5"); all layers when empty."""
    if not text:
        return check_layers(None, num_layers)
    try:
        chosen = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}", field="layers") from None
    return check_layers(chosen, num_layers)


class MoEStack:
    """MoE layers ``layers`` (MoE-layer indices; default all) of ``model`` on this rank, placed by
    ``placement`` over ``comm.world`` ranks."""

    def __init__(self, model: ModelSpec, placement: Placement, comm: Comm, kernel: str = "grouped", seed: int = 0,
                 layers: Sequence[int] | None = None, shared_expert: bool = True,
                 dtype: torch.dtype | None = None) -> None:
        check_placement(model, placement, comm.world)
        self.model = model
        self.comm = comm
        self.seed = seed
        self.device = comm.device
        self.dtype = dtype or default_dtype(comm.device)
        self.layers = check_layers(layers, model.num_moe_layers)
        self.kernel = ExpertKernel(kernel, self.device, self.dtype, model.hidden_size, model.expert_ffn)
        h, dt, dev = model.hidden_size, self.dtype, self.device
        self.routers = {i: materialise_router(seed, i, h, model.num_experts, dt, dev) for i in self.layers}
        self.shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if shared_expert and model.shared_ffn:
            self.shared = {i: materialise_expert(seed, i, SHARED, h, model.shared_ffn, dt, dev) for i in self.layers}
        self.version = 0
        self.placement = placement
        self.router = ReplicaRouter(placement, dev)
        self.experts = {i: self.materialise_local(placement, i) for i in self.layers}

    def materialise_local(self, placement: Placement, layer: int) -> LocalExperts:
        """This rank's slots of ``layer`` under ``placement``, from the deterministic weights."""
        slots = [int(e) for e in placement.slot_expert[layer, self.comm.rank]]
        return LocalExperts.materialise(self.seed, layer, slots, self.model.hidden_size, self.model.expert_ffn,
                                        self.dtype, self.device)

    def install(self, placement: Placement, experts: dict[int, LocalExperts]) -> None:
        """Switch to ``placement`` with these local weights (all layers at once)."""
        self.router = ReplicaRouter(placement, self.device)
        self.placement = placement
        self.experts = experts
        self.version += 1

    def weight_mismatches(self) -> list[tuple[int, int]]:
        """(layer, slot) pairs whose weights differ from their expert's deterministic weights."""
        bad = []
        for layer in self.layers:
            ref = self.materialise_local(self.placement, layer)
            ex = self.experts[layer]
            for s in range(len(ex.slot_expert)):
                if ex.slot_expert[s] != ref.slot_expert[s] or not (
                        torch.equal(ex.w13[s], ref.w13[s]) and torch.equal(ex.w2[s], ref.w2[s])):
                    bad.append((layer, s))
        return bad

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, batch: Batch, clock: Clock | None = None) -> tuple[torch.Tensor, list[float]]:
        """The stack's output for this rank's tokens, and per-layer seconds when ``clock`` is given."""
        h = batch.x.to(self.dtype)
        stamps = [clock.stamp()] if clock else []
        for layer in self.layers:
            normed = rms_norm(h)
            if batch.expert_ids is not None and batch.gates is not None:
                ids, gates = batch.expert_ids[:, layer], batch.gates[:, layer]
            else:
                ids, gates = self.gate(layer, normed)
            h = h + self.moe_layer(layer, normed, ids, gates, batch.token_index).to(self.dtype)
            if clock:
                stamps.append(clock.stamp())
        return h, (clock.intervals(stamps) if clock else [])

    def gate(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's router: top-k of softmax(h · W_gateᵀ), weights renormalised to sum to 1."""
        probs = torch.softmax((h @ self.routers[layer].T).float(), dim=-1)
        weights, ids = torch.topk(probs, self.model.top_k, dim=-1)
        return ids, weights / weights.sum(-1, keepdim=True)

    def moe_layer(self, layer: int, h: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                  token_index: torch.Tensor) -> torch.Tensor:
        """One MoE block over this rank's tokens ``h`` [n, hidden]; float32 [n, hidden]."""
        n, k = expert_ids.shape
        slots = self.placement.slots_per_device
        dev, slot = self.router.route(layer, expert_ids, token_index)
        order = torch.argsort((dev * slots + slot).reshape(-1), stable=True)
        if self.comm.world == 1:
            send_counts = recv_counts = []          # every choice stays here: no split sizes, no host wait
            x_recv, slot_recv = h[order // k], slot.reshape(-1)[order]
        else:
            send_counts_t = torch.bincount(dev.reshape(-1), minlength=self.comm.world)
            recv_counts = self.comm.exchange_counts(send_counts_t)
            send_counts = send_counts_t.tolist()
            x_recv = self.comm.all_to_all(h[order // k], send_counts, recv_counts)
            slot_recv = self.comm.all_to_all(slot.reshape(-1)[order], send_counts, recv_counts)
        by_slot = torch.argsort(slot_recv, stable=True)
        ex = self.experts[layer]
        y_sorted = self.kernel(x_recv[by_slot], self.kernel.sorted_groups(slot_recv[by_slot], slots), ex.w13, ex.w2)
        y_recv = torch.empty_like(y_sorted)
        y_recv[by_slot] = y_sorted
        y_back = self.comm.all_to_all(y_recv, recv_counts, send_counts)
        per_choice = torch.empty_like(y_back)
        per_choice[order] = y_back
        per_choice = per_choice.view(n, k, -1)
        out = gates[:, 0:1].float() * per_choice[:, 0].float()
        for j in range(1, k):
            out = out + gates[:, j:j + 1].float() * per_choice[:, j].float()
        if layer in self.shared:
            w13, w2 = self.shared[layer]
            sh = h @ w13.T
            half = w13.shape[0] // 2
            out = out + (F.silu(sh[:, :half]) * sh[:, half:]) @ w2.T
        return out
