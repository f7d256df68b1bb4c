"""Replication: how many replicas each expert gets, and packing replicas into device slots.

* :func:`replica_counts`: EPLB's rule — every expert once, each extra slot to the expert with the
  highest load per replica — with at most one replica per device.
* :class:`SlotPacker`: places replicas (items) into devices with ``slots`` each, never two replicas
  of one expert on one device (SGLang loads one of them only), heaviest first to the least loaded
  device (LPT) or wherever a caller's score says.

The token split among replicas is :func:`.layer.balance_shares` (an LP: water-filling the device
loads, optionally trading a little balance for traffic).
"""
from __future__ import annotations

import numpy as np

from moeplan.errors import InputError


def replica_counts(load: np.ndarray, total_slots: int, max_per_expert: int) -> np.ndarray:
    """[experts] replicas per expert filling ``total_slots`` (EPLB's rule, at most ``max_per_expert``)."""
    e = load.shape[0]
    if total_slots < e:
        raise InputError(f"too few slots: {total_slots} < {e} experts", field="slots")
    if total_slots > e * max_per_expert:
        raise InputError(f"{total_slots} slots exceed {e} experts × {max_per_expert} devices: a device would "
                         "hold two replicas of one expert", field="slots", fix="use fewer slots per device")
    counts = np.ones(e, dtype=np.int64)
    ld = np.asarray(load, dtype=np.float64)
    for _ in range(total_slots - e):
        per = np.where(counts < max_per_expert, ld / counts, -1.0)
        counts[int(per.argmax())] += 1
    return counts


class SlotPacker:
    """Devices with ``slots`` slots each, filled one replica at a time (see the module docstring)."""

    def __init__(self, num_experts: int, devices: int, slots: int) -> None:
        self.devices, self.slots = devices, slots
        self.load = np.zeros(devices)
        self.free = np.full(devices, slots, dtype=np.int64)
        self.holds = np.zeros((num_experts, devices), dtype=bool)
        self.content: list[list[int]] = [[] for _ in range(devices)]
        self.weight: list[list[float]] = [[] for _ in range(devices)]

    def allowed(self, expert: int) -> np.ndarray:
        """[devices] devices with a free slot that do not hold ``expert`` yet."""
        return (self.free > 0) & ~self.holds[expert]

    def put(self, expert: int, weight: float, device: int) -> None:
        self.content[device].append(expert)
        self.weight[device].append(weight)
        self.load[device] += weight
        self.free[device] -= 1
        self.holds[expert, device] = True

    def put_least_loaded(self, expert: int, weight: float) -> int:
        """LPT step: the least loaded allowed device (lowest index on ties)."""
        ok = self.allowed(expert)
        if not ok.any():
            return self.put_by_swap(expert, weight)
        device = int(np.where(ok, self.load, np.inf).argmin())
        self.put(expert, weight, device)
        return device

    def put_by_swap(self, expert: int, weight: float) -> int:
        """Every device with a free slot holds ``expert`` already: move a replica of another expert
        from a device without ``expert`` into a free slot, and put ``expert`` in its place."""
        for free_dev in np.flatnonzero(self.free > 0):
            for dev in np.flatnonzero(~self.holds[expert]):
                for i, other in enumerate(self.content[dev]):
                    if not self.holds[other, free_dev]:
                        w = self.weight[dev].pop(i)
                        self.content[dev].pop(i)
                        self.load[dev] -= w
                        self.free[dev] += 1
                        self.holds[other, dev] = False
                        self.put(other, w, int(free_dev))
                        self.put(expert, weight, int(dev))
                        return int(dev)
        raise InputError("cannot place every replica on a different device", field="slots",
                         fix="use fewer slots per device")

    def slot_expert(self) -> np.ndarray:
        """[devices, slots] experts, each device's slots in expert order."""
        if (self.free != 0).any():
            raise RuntimeError("slots left empty")
        return np.array([sorted(c) for c in self.content], dtype=np.int32)


def pack_lpt(per_replica: np.ndarray, replicas: np.ndarray, devices: int, slots: int,
             packer: SlotPacker | None = None) -> np.ndarray:
    """Pack ``replicas[e]`` replicas of each expert, each carrying ``per_replica[e]`` tokens,
    heaviest first, each onto the least loaded device with room; ``packer`` may hold replicas
    already. Returns [devices, slots]."""
    pk = packer or SlotPacker(per_replica.shape[0], devices, slots)
    experts = np.repeat(np.arange(per_replica.shape[0]), replicas)
    weights = per_replica[experts]
    for i in np.argsort(-weights, kind="stable"):
        pk.put_least_loaded(int(experts[i]), float(weights[i]))
    return pk.slot_expert()
