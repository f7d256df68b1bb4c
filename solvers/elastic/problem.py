"""ScalingProblem: one elastic scaling step as plain arrays.

The cluster goes from ``N`` to ``N′`` devices. Devices keep their index: on a scale-up the
``N′ − N`` joining devices are appended (indices N … N′−1); on a scale-down the last ``N − N′``
devices leave (whole nodes when the difference is a multiple of the node size). Index ``i`` means
the same device before and after, so the *union* index space ``0 … max(N, N′)−1`` names every
device the step touches, and device ``i`` sits on physical node ``i // devices_per_node``.

What a step must respect:

* every logical expert of every MoE layer is served at every moment (copy before delete);
* after the step every device has ``slots_per_device`` slots per layer, every expert at least one
  replica and at most one per device, and each layer's max device load is at most
  ``balance_target`` × its mean (on the trace's load), or — where a hot expert makes that
  impossible — no worse than a from-scratch LPT packing of the same replicas;
* a device never holds more expert slots at once than ``capacity_units`` (all layers together;
  one unit = one expert of one layer = ``expert_bytes`` bytes).

Units: bytes, token-choices (load), expert units.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from moeplan.solvers.placement.problem import default_slots_per_device

from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.plan import Placement

DEFAULT_BALANCE_TARGET = 1.05
DEFAULT_TOKENS_PER_DEVICE = 4096


@dataclass(frozen=True)
class ScalingProblem:
    """One scaling step (see the module docstring).

    Attributes:
        load: float [layers, experts] token-choices per expert on the fitted trace.
        old_slots: int [layers, N, S] the current placement's slot experts.
        new_devices: N′, the device count after the step.
        slots_per_device: S′, slots per device per layer after the step.
        devices_per_node: physical devices per node (which transfers cross nodes).
        expert_bytes: bytes of one expert of one layer.
        non_expert_bytes: bytes every device replicates (attention, shared experts, embeddings,
            norms, routers); a joining device receives them before it serves.
        capacity_units: int [max(N, N′)] expert units each device can hold at once.
        balance_target: max / mean device load each layer should stay within after the step.
        name: a label for reports.
    """

    load: np.ndarray
    old_slots: np.ndarray
    new_devices: int
    slots_per_device: int
    devices_per_node: int
    expert_bytes: float
    non_expert_bytes: float
    capacity_units: np.ndarray
    balance_target: float = DEFAULT_BALANCE_TARGET
    name: str = ""

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    @property
    def old_devices(self) -> int:
        return int(self.old_slots.shape[1])

    @property
    def old_slots_per_device(self) -> int:
        return int(self.old_slots.shape[2])

    @property
    def union_devices(self) -> int:
        """Devices the step touches: max(N, N′)."""
        return max(self.old_devices, self.new_devices)

    @property
    def survivors(self) -> int:
        """Devices active before and after: min(N, N′)."""
        return min(self.old_devices, self.new_devices)

    @property
    def direction(self) -> str:
        n, m = self.old_devices, self.new_devices
        return "up" if m > n else "down" if m < n else "rebalance"

    def node_of(self, device: int | np.ndarray) -> np.ndarray:
        """Physical node of a device (union index)."""
        return np.asarray(device) // self.devices_per_node

    def validate(self) -> ScalingProblem:
        nl, e = self.load.shape
        if self.old_slots.ndim != 3 or self.old_slots.shape[0] != nl:
            raise InputError(f"the current placement must be [{nl} layers, devices, slots], got "
                             f"{self.old_slots.shape}", field="placement")
        if self.old_slots.min() < 0 or self.old_slots.max() >= e:
            raise InputError(f"slot experts must lie in 0..{e - 1}", field="placement.slot_expert")
        if self.new_devices < 1:
            raise InputError(f"the target device count must be ≥ 1, got {self.new_devices}", field="to")
        if self.slots_per_device < 1 or self.new_devices * self.slots_per_device < e:
            raise InputError(f"{self.new_devices} devices × {self.slots_per_device} slots cannot hold {e} experts",
                             field="slots", fix=f"use at least {-(-e // self.new_devices)} slots per device")
        if self.slots_per_device > e:
            raise InputError(f"{self.slots_per_device} slots per device exceed the {e} experts: a device would "
                             "hold two replicas of one expert", field="slots", fix="use fewer slots per device")
        if not np.all(np.isfinite(self.load)) or self.load.min() < 0:
            raise InputError("expert loads must be finite and ≥ 0", field="trace")
        if self.balance_target < 1:
            raise InputError(f"the balance target is max/mean device load, ≥ 1; got {self.balance_target}",
                             field="balance", fix="use e.g. 1.05")
        if self.capacity_units.shape != (self.union_devices,):
            raise InputError(f"capacity must list {self.union_devices} devices", field="capacity")
        if self.devices_per_node < 1:
            raise InputError("devices per node must be ≥ 1", field="devices_per_node")
        return self

    @classmethod
    def from_arrays(cls, load: np.ndarray, old_slots: np.ndarray, new_devices: int, slots_per_device: int,
                    capacity_units: int | np.ndarray | None = None, devices_per_node: int | None = None,
                    expert_bytes: float = 1.0, non_expert_bytes: float = 0.0,
                    balance_target: float = DEFAULT_BALANCE_TARGET, name: str = "") -> ScalingProblem:
        """A problem from raw arrays (hand-made cases): ``load`` [layers, experts] or [experts],
        ``old_slots`` [layers, N, S] or [N, S]; capacity defaults to unlimited; devices per
        node to one node holding everything."""
        ld = np.asarray(load, dtype=np.float64)
        ld = ld[None, :] if ld.ndim == 1 else ld
        old = np.asarray(old_slots, dtype=np.int64)
        old = old[None] if old.ndim == 2 else old
        union = max(old.shape[1], new_devices)
        cap = np.iinfo(np.int64).max // 4 if capacity_units is None else capacity_units
        return cls(ld, old, int(new_devices), int(slots_per_device), devices_per_node or union,
                   float(expert_bytes), float(non_expert_bytes),
                   np.broadcast_to(np.asarray(cap, dtype=np.int64), (union,)).copy(), float(balance_target),
                   name).validate()

    @classmethod
    def build(cls, cost: CostModel, placement: Placement, load: np.ndarray,
              new_devices: int, slots_per_device: int | None = None,
              balance_target: float = DEFAULT_BALANCE_TARGET, tokens_per_device: int = DEFAULT_TOKENS_PER_DEVICE,
              kv_tokens_per_device: float = 0.0) -> ScalingProblem:
        """The step from ``placement`` to ``new_devices`` devices of ``cost``'s hardware (a profile
        whose ``devices_per_node`` is the physical node size). Slots per device default to the
        runtime-style rule (every expert once, plus one redundant slot per device when the experts
        fill the devices exactly), reduced to what fits. A device's capacity is its memory less the
        non-expert weights, ``tokens_per_device`` tokens of activations and ``kv_tokens_per_device``
        tokens of KV cache, in expert units."""
        model, devices_per_node = cost.model, cost.hw.devices_per_node
        if placement.num_layers != model.num_moe_layers or placement.num_experts != model.num_experts:
            raise InputError(f"the plan's placement covers {placement.num_layers} layers × {placement.num_experts} "
                             f"experts, the model {model.num_moe_layers} × {model.num_experts}", field="placement")
        if new_devices < 1:
            raise InputError(f"the target device count must be ≥ 1, got {new_devices}", field="to")
        cost = cost.with_cluster(new_devices)
        slots = slots_per_device or default_slots_per_device(cost, model.num_experts, new_devices, tokens_per_device)
        base = cost.memory(0, 1, kv_tokens_per_device=kv_tokens_per_device, batch_tokens_per_device=tokens_per_device)
        room = base.capacity - base.peak
        units = int(room // model.expert_bytes()) if room > 0 else 0
        union = max(placement.num_devices, new_devices)
        return cls(np.asarray(load, dtype=np.float64), placement.slot_expert.astype(np.int64), int(new_devices),
                   int(slots), devices_per_node, model.expert_bytes(),
                   float(model.non_expert_params() * model.weight_bytes), np.full(union, units, dtype=np.int64),
                   float(balance_target), model.name).validate()
