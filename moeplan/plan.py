"""Plan: what moeplan decided, in one versioned JSON file.

A plan names the model and the cluster it was made for and holds any of:

* ``placement`` (:class:`Placement`): for every MoE layer, the logical expert in each physical
  slot of each device (replicas allowed; equal slots per device; devices numbered rank-major,
  node by node) and the share of an expert's tokens each of its replicas serves;
* ``parallel``: the attention and MoE parallel mapping (parallel folding);
* ``cache``: per-layer expert-cache sizes (offloading);
* ``moves``: the ordered expert moves of an elastic scaling step.

The solver's report (objective, bound, gap, wall time) and the cost model's predicted metrics
travel with it. :meth:`Plan.validate` runs before every write and after every read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from moeplan.errors import InputError
from moeplan.io import Fields, guarded_load, read_json, write_json
from moeplan.model import ModelSpec

FORMAT = "moeplan-plan"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Placement:
    """Expert placement over ``devices`` devices with ``slots`` physical slots each.

    Attributes:
        slot_expert: int32 [moe_layers, devices, slots]: logical expert held by each slot.
        replica_share: float64 [moe_layers, devices, slots]: fraction of that expert's tokens the
            slot serves; the shares of one expert's replicas sum to 1.
        num_experts: logical experts per layer.
        devices_per_node: devices in one node (devices are numbered node-major).
    """

    slot_expert: np.ndarray
    replica_share: np.ndarray
    num_experts: int
    devices_per_node: int

    @property
    def num_layers(self) -> int:
        return int(self.slot_expert.shape[0])

    @property
    def num_devices(self) -> int:
        return int(self.slot_expert.shape[1])

    @property
    def slots_per_device(self) -> int:
        return int(self.slot_expert.shape[2])

    @property
    def num_physical(self) -> int:
        return self.num_devices * self.slots_per_device

    @property
    def num_nodes(self) -> int:
        return self.num_devices // self.devices_per_node

    @classmethod
    def from_slots(cls, slot_expert: np.ndarray, num_experts: int, devices_per_node: int,
                   replica_share: np.ndarray | None = None) -> "Placement":
        """Build with equal token shares among each expert's replicas unless shares are given."""
        se = np.asarray(slot_expert, dtype=np.int32)
        if replica_share is None:
            replica_share = np.zeros(se.shape)
            for layer in range(se.shape[0]):
                counts = np.bincount(se[layer].ravel(), minlength=num_experts)
                replica_share[layer] = 1.0 / np.maximum(counts[se[layer]], 1)
        return cls(se, np.asarray(replica_share, dtype=np.float64), num_experts, devices_per_node)

    def replica_counts(self) -> np.ndarray:
        """[layers, experts]: replicas of each expert."""
        nl, e = self.num_layers, self.num_experts
        flat = (self.slot_expert.reshape(nl, -1) + (np.arange(nl) * e)[:, None]).ravel()
        return np.bincount(flat, minlength=nl * e).reshape(nl, e)

    def expert_device_share(self) -> np.ndarray:
        """[layers, experts, devices]: fraction of each expert's tokens served on each device."""
        nl, d, s = self.slot_expert.shape
        out = np.zeros((nl, self.num_experts, d))
        layer_idx = np.repeat(np.arange(nl), d * s)
        dev_idx = np.tile(np.repeat(np.arange(d), s), nl)
        np.add.at(out, (layer_idx, self.slot_expert.ravel(), dev_idx), self.replica_share.ravel())
        return out

    def phy2log(self) -> np.ndarray:
        """[layers, physical]: logical expert of each physical slot, rank-major (EPLB/SGLang order)."""
        return self.slot_expert.reshape(self.num_layers, -1)

    def validate(self, source: str = "plan") -> "Placement":
        se, rs = self.slot_expert, self.replica_share
        if se.ndim != 3 or min(se.shape) < 1:
            raise InputError(f"slot_expert must be [layers, devices, slots], got shape {se.shape}", source=source,
                             field="placement.slot_expert")
        if rs.shape != se.shape:
            raise InputError(f"replica_share shape {rs.shape} differs from slot_expert {se.shape}", source=source,
                             field="placement.replica_share")
        if self.devices_per_node < 1 or self.num_devices % self.devices_per_node:
            raise InputError(f"{self.num_devices} devices do not fill nodes of {self.devices_per_node}",
                             source=source, field="placement.devices_per_node")
        if self.num_physical < self.num_experts:
            raise InputError(f"{self.num_physical} slots per layer cannot hold {self.num_experts} experts",
                             source=source, field="placement.num_experts",
                             fix="every logical expert needs at least one slot")
        if se.min() < 0 or se.max() >= self.num_experts:
            raise InputError(f"slot experts must lie in 0..{self.num_experts - 1}, found {se.min()}..{se.max()}",
                             source=source, field="placement.slot_expert")
        counts = self.replica_counts()
        missing = np.argwhere(counts == 0)
        if missing.size:
            layer, expert = missing[0]
            raise InputError(f"expert {expert} of MoE layer {layer} has no slot ({len(missing)} missing in all)",
                             source=source, field="placement.slot_expert",
                             fix="every logical expert needs at least one physical slot")
        if not np.all(np.isfinite(rs)) or rs.min() < 0:
            raise InputError("replica shares must be finite and ≥ 0", source=source, field="placement.replica_share")
        sums = np.zeros((self.num_layers, self.num_experts))
        for layer in range(self.num_layers):
            np.add.at(sums[layer], se[layer].ravel(), rs[layer].ravel())
        if not np.allclose(sums, 1.0, atol=1e-6):
            layer, expert = np.argwhere(~np.isclose(sums, 1.0, atol=1e-6))[0]
            raise InputError(f"shares of expert {expert} in layer {layer} sum to {sums[layer, expert]:.6f}, not 1",
                             source=source, field="placement.replica_share")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "devices_per_node": self.devices_per_node,
                "devices": self.num_devices, "slots_per_device": self.slots_per_device,
                "slot_expert": self.slot_expert.tolist(),
                "replica_share": np.round(self.replica_share, 9).tolist()}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "Placement":
        f = Fields(data, source, "placement.")
        se = _int_array(f, "slot_expert", 3)
        rs = np.asarray(f.list("replica_share"), dtype=np.float64) if f.has("replica_share") else None
        num_experts = f.int("num_experts", minimum=1)
        if num_experts > se[0].size:
            raise f.fail("num_experts", f"{se[0].size} slots per layer cannot hold {num_experts} experts")
        p = cls.from_slots(se, num_experts, f.int("devices_per_node", minimum=1), rs)
        if f.has("devices") and f.int("devices") != p.num_devices:
            raise f.fail("devices", f"says {f.int('devices')} but slot_expert has {p.num_devices}")
        return p.validate(source)


def _int_array(f: Fields, key: str, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(f.list(key))
    except ValueError:
        raise f.fail(key, "rows of unequal length") from None
    if arr.ndim != ndim or arr.size == 0:
        raise f.fail(key, f"expected a non-empty {ndim}-d array, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise f.fail(key, f"expected integers, got {arr.dtype}")
    limits = np.iinfo(np.int32)
    if arr.min() < limits.min or arr.max() > limits.max:
        raise f.fail(key, f"values {arr.min()}..{arr.max()} do not fit a 32-bit integer")
    return arr.astype(np.int32)


@dataclass(frozen=True)
class Plan:
    """A deployment plan (see the module docstring).

    Attributes:
        model: the ModelSpec it was made for (embedded, so a plan is self-contained).
        hardware: the hardware profile's name.
        devices_per_node, nodes: the cluster shape.
        placement: expert placement, if any.
        parallel: parallel mapping {attention: {tp, cp, dp, pp}, moe: {etp, ep, edp, pp}, ...}, if any.
        cache: {"sizes": [per MoE layer], "policy": ...}, if any.
        moves: ordered moves [{layer, expert, src, dst, slot, bytes}], if any.
        solver: {name, objective, bound, gap, seconds, ...}.
        predicted: cost-model metrics at planning time.
        notes: free text for users.
    """

    model: ModelSpec
    hardware: str
    devices_per_node: int
    nodes: int
    placement: Placement | None = None
    parallel: dict[str, Any] | None = None
    cache: dict[str, Any] | None = None
    moves: list[dict[str, Any]] | None = None
    solver: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def num_devices(self) -> int:
        return self.devices_per_node * self.nodes

    def with_(self, **changes: Any) -> "Plan":
        return replace(self, **changes)

    def validate(self, source: str = "plan") -> "Plan":
        if self.devices_per_node < 1 or self.nodes < 1:
            raise InputError("cluster sizes must be ≥ 1", source=source, field="cluster")
        p = self.placement
        if p is not None:
            p.validate(source)
            if p.num_layers != self.model.num_moe_layers:
                raise InputError(f"placement has {p.num_layers} layers, the model {self.model.num_moe_layers} MoE layers",
                                 source=source, field="placement.slot_expert")
            if p.num_experts != self.model.num_experts:
                raise InputError(f"placement has {p.num_experts} experts, the model {self.model.num_experts}",
                                 source=source, field="placement.num_experts")
            if p.num_devices != self.num_devices or p.devices_per_node != self.devices_per_node:
                raise InputError(f"placement spans {p.num_devices} devices ({p.devices_per_node} per node), the "
                                 f"cluster {self.num_devices} ({self.devices_per_node} per node)", source=source,
                                 field="placement.devices")
        if self.cache is not None:
            sizes = self.cache.get("sizes")
            if (not isinstance(sizes, list) or len(sizes) != self.model.num_moe_layers
                    or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= self.model.num_experts
                           for s in sizes)):
                raise InputError(f"cache.sizes must list {self.model.num_moe_layers} integers in "
                                 f"0..{self.model.num_experts}", source=source, field="cache.sizes")
        return self

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "model": self.model.to_dict(),
            "hardware": self.hardware, "cluster": {"devices_per_node": self.devices_per_node, "nodes": self.nodes},
        }
        if self.placement is not None:
            d["placement"] = self.placement.to_dict()
        for key in ("parallel", "cache", "moves"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        d["solver"] = self.solver
        d["predicted"] = self.predicted
        if self.notes:
            d["notes"] = self.notes
        return d

    def save(self, path: str | os.PathLike[str]) -> None:
        self.validate(str(path))
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "Plan":
        def build() -> Plan:
            f = Fields(data, source)
            if f.str("format", "") != FORMAT:
                raise f.fail("format", f"not a moeplan plan (format {f.data.get('format')!r})",
                             f"plans carry \"format\": \"{FORMAT}\"")
            version = f.int("schema_version", minimum=1)
            if version > SCHEMA_VERSION:
                raise f.fail("schema_version", f"written by a newer moeplan (schema {version})", "upgrade moeplan")
            cl = f.sub("cluster")
            plan = cls(
                model=ModelSpec.from_dict(f.raw("model"), source=f"{source}: model"),
                hardware=f.str("hardware"), devices_per_node=cl.int("devices_per_node", minimum=1),
                nodes=cl.int("nodes", minimum=1),
                placement=Placement.from_dict(f.raw("placement"), source) if f.has("placement") else None,
                parallel=f.raw("parallel", None), cache=f.raw("cache", None), moves=f.raw("moves", None),
                solver=f.raw("solver", {}), predicted=f.raw("predicted", {}), notes=f.str("notes", ""),
            )
            return plan.validate(source)
        return guarded_load(build, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Plan":
        return cls.from_dict(read_json(path), str(path))


def contiguous_placement(num_layers: int, num_experts: int, devices: int, devices_per_node: int,
                         slots_per_device: int | None = None) -> Placement:
    """What runtimes do by default (SGLang's "trivial" location): physical slot p, numbered
    rank-major, holds logical expert p mod E in every layer, so expert e sits on device e // S
    and any extra slots repeat experts 0, 1, … from the start."""
    slots = slots_per_device or -(-num_experts // devices)
    physical = slots * devices
    if physical < num_experts:
        raise InputError(f"{devices} devices × {slots} slots = {physical} < {num_experts} experts", field="slots",
                         fix="use more slots per device or more devices")
    order = np.arange(physical) % num_experts
    slot_expert = np.broadcast_to(order.reshape(devices, slots), (num_layers, devices, slots)).copy()
    return Placement.from_slots(slot_expert, num_experts, devices_per_node)
