"""Plan: what moeplan decided, in one versioned JSON file — the contract from the solvers to the
exporters and the runtime.

A plan names the model and the cluster it was made for, the hardware profile and cost options
that priced it, and holds any of:

* ``placement`` (:class:`Placement`): for every MoE layer, the logical expert in each physical
  slot of each device (replicas allowed; equal slots per device; devices numbered rank-major,
  node by node), the share of an expert's tokens each of its replicas serves and the dispatch
  model those shares assume;
* ``parallel`` (:class:`~moeplan.parallel.ParallelLayout`): the attention and MoE parallel
  mapping (parallel folding);
* ``cache`` (:class:`~moeplan.cache_config.CacheConfig`): per-layer expert-cache sizes (offloading);
* ``moves`` (:class:`~moeplan.moves.Move`): the ordered moves that reach this placement from the
  previous one (incremental re-placement, elastic scaling), which the runtime executes.

``hardware`` is a :class:`~moeplan.hardware.HardwareRef` (name, file, content digest, measured):
:meth:`Plan.hardware_profile` returns that very profile or says why it cannot, so a plan is
never re-priced with another profile by accident. The solver's report and the cost model's
predicted metrics travel with it. :meth:`Plan.validate` runs before every write and after every
read. Schema 1 plans (hardware by name, untyped sections) load converted, with a note.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from moeplan.cache_config import CacheConfig
from moeplan.cost import CostOptions
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile, HardwareRef
from moeplan.io import Fields, guarded_load, read_json, write_json
from moeplan.model import ModelSpec
from moeplan.moves import Move
from moeplan.parallel import ParallelLayout

FORMAT = "moeplan-plan"
SCHEMA_VERSION = 2
DISPATCH_MODELS = ("weighted", "even", "sglang-static")
"""How a runtime splits an expert's tokens over its replicas: ``weighted`` by the plan's
replica shares, ``even`` equally, ``sglang-static`` by SGLang's static dispatch rule
(:mod:`moeplan.dispatch`)."""


@dataclass(frozen=True)
class Placement:
    """Expert placement over ``devices`` devices with ``slots`` physical slots each.

    Attributes:
        slot_expert: int32 [moe_layers, devices, slots]: logical expert held by each slot.
        replica_share: float64 [moe_layers, devices, slots]: fraction of that expert's tokens the
            slot serves; the shares of one expert's replicas sum to 1.
        num_experts: logical experts per layer.
        devices_per_node: devices in one node (devices are numbered node-major).
        dispatch: the dispatch model the shares assume (one of :data:`DISPATCH_MODELS`).
    """

    slot_expert: np.ndarray
    replica_share: np.ndarray
    num_experts: int
    devices_per_node: int
    dispatch: str = "weighted"

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
                   replica_share: np.ndarray | None = None, dispatch: str = "weighted") -> "Placement":
        """Build with equal token shares among each expert's replicas unless shares are given."""
        se = np.asarray(slot_expert, dtype=np.int32)
        if replica_share is None:
            replica_share = np.zeros(se.shape)
            for layer in range(se.shape[0]):
                counts = np.bincount(se[layer].ravel(), minlength=num_experts)
                replica_share[layer] = 1.0 / np.maximum(counts[se[layer]], 1)
        return cls(se, np.asarray(replica_share, dtype=np.float64), num_experts, devices_per_node, dispatch)

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
        if self.dispatch not in DISPATCH_MODELS:
            raise InputError(f"unknown dispatch model {self.dispatch!r}", source=source, field="placement.dispatch",
                             fix=f"use one of: {', '.join(DISPATCH_MODELS)}")
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
        return {"num_experts": self.num_experts, "devices_per_node": self.devices_per_node, "dispatch": self.dispatch,
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
        p = cls.from_slots(se, num_experts, f.int("devices_per_node", minimum=1), rs,
                           f.str("dispatch", "weighted", choices=DISPATCH_MODELS))
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
        hardware: the hardware profile that priced it.
        devices_per_node, nodes: the cluster shape.
        placement: expert placement, if any.
        parallel: the parallel layout, if any.
        cache: the expert-cache configuration, if any.
        moves: ordered moves reaching ``placement`` from the previous placement (may be empty).
        cost_options: how the cost model priced the runtime (kernel, overlap, ExFlow, …).
        solver: the solver's report {name, objective, bound, gap, seconds, ...}.
        predicted: cost-model metrics at planning time.
        notes: free text for users (a converted schema-1 plan says so here).
    """

    model: ModelSpec
    hardware: HardwareRef
    devices_per_node: int
    nodes: int
    placement: Placement | None = None
    parallel: ParallelLayout | None = None
    cache: CacheConfig | None = None
    moves: tuple[Move, ...] = ()
    cost_options: CostOptions = field(default_factory=CostOptions)
    solver: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def num_devices(self) -> int:
        return self.devices_per_node * self.nodes

    def with_(self, **changes: Any) -> "Plan":
        return replace(self, **changes)

    def hardware_profile(self, override: str | None = None, source: str = "plan") -> HardwareProfile:
        """The profile that priced this plan, as its file has it (the physical node size);
        ``override`` (a bundled name or a YAML path, the CLI's ``--hardware``) prices the plan
        with another profile on purpose. Nothing falls back silently (:meth:`HardwareRef.load`)."""
        return HardwareProfile.resolve(override) if override else self.hardware.load(source)

    def cluster_hardware(self, override: str | None = None, source: str = "plan") -> HardwareProfile:
        """:meth:`hardware_profile` shaped to this plan's cluster."""
        return self.hardware_profile(override, source).with_cluster(devices=self.num_devices, nodes=self.nodes)

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
            from moeplan.dispatch import shares_match
            if p.dispatch != "weighted" and not shares_match(p, p.dispatch, self.model):
                raise InputError(f"replica shares differ from what {p.dispatch} dispatch realises for these slots",
                                 source=source, field="placement.replica_share",
                                 fix="let moeplan set the shares (moeplan.dispatch.realise), or use dispatch weighted")
        if self.parallel is not None and self.parallel.world != self.num_devices:
            raise InputError(f"tp×cp×dp×pp = {self.parallel.world}, the cluster has {self.num_devices} devices",
                             source=source, field="parallel.attention")
        if self.cache is not None:
            self.cache.check_model(self.model, source)
        if self.moves:
            if p is None:
                raise InputError("moves need the placement they lead to", source=source, field="moves")
            union = max(self.num_devices, 1 + max(m.src for m in self.moves))
            for i, m in enumerate(self.moves):
                m.validate(union, p.slots_per_device, p.num_layers, p.num_experts, source, i)
                if m.dst >= self.num_devices:
                    raise InputError(f"device {m.dst} is not in the plan's {self.num_devices} devices",
                                     source=source, field=f"moves[{i}].dst")
        return self

    def to_dict(self) -> dict[str, Any]:
        o = self.cost_options
        d: dict[str, Any] = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "model": self.model.to_dict(),
            "hardware": self.hardware.to_dict(),
            "cluster": {"devices_per_node": self.devices_per_node, "nodes": self.nodes},
            "cost_options": {"kernel": o.kernel, "overlap": o.overlap, "exflow": o.exflow, "act_bytes": o.act_bytes,
                             "overlap_chunks": o.overlap_chunks},
        }
        if self.placement is not None:
            d["placement"] = self.placement.to_dict()
        if self.parallel is not None:
            d["parallel"] = self.parallel.to_dict()
        if self.cache is not None:
            d["cache"] = self.cache.to_dict()
        if self.moves:
            d["moves"] = [m.to_dict() for m in self.moves]
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
            model = ModelSpec.from_dict(f.raw("model"), source=f"{source}: model")
            cl = f.sub("cluster")
            notes = [f.str("notes", "")] if f.has("notes") else []
            if version == 1:
                hardware, moves, converted = _v1_hardware_and_moves(f, source)
                notes.append(converted)
            else:
                hardware = HardwareRef.from_dict(f.raw("hardware"), source)
                moves = tuple(Move.from_dict(m, source, i) for i, m in enumerate(f.list("moves", [])))
            plan = cls(
                model=model, hardware=hardware, devices_per_node=cl.int("devices_per_node", minimum=1),
                nodes=cl.int("nodes", minimum=1),
                placement=Placement.from_dict(f.raw("placement"), source) if f.has("placement") else None,
                parallel=ParallelLayout.from_dict(f.raw("parallel"), source) if f.has("parallel") else None,
                cache=CacheConfig.from_dict(f.raw("cache"), model, source) if f.has("cache") else None,
                moves=moves, cost_options=_cost_options(f.sub("cost_options", {})),
                solver=f.raw("solver", {}), predicted=f.raw("predicted", {}), notes="\n".join(notes),
            )
            return plan.validate(source)
        return guarded_load(build, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Plan":
        return cls.from_dict(read_json(path), str(path))


def _cost_options(f: Fields) -> CostOptions:
    defaults = CostOptions()
    try:
        return CostOptions(f.str("kernel", defaults.kernel), f.bool("overlap", defaults.overlap),
                           f.bool("exflow", defaults.exflow), f.float("act_bytes", defaults.act_bytes, positive=True),
                           f.int("overlap_chunks", defaults.overlap_chunks, minimum=1)).validate()
    except InputError as exc:
        raise InputError(str(exc.args[0]), source=f.source, field=f"cost_options.{exc.field or 'kernel'}") from None


def _v1_hardware_and_moves(f: Fields, source: str) -> tuple[HardwareRef, tuple[Move, ...], str]:
    """Schema 1 named the profile alone and kept moves as dicts of two shapes: the elastic
    scheduler's (with ``kind`` and source slots) convert; the incremental solver's (no source
    slot) cannot be executed and are dropped."""
    name = f.str("hardware")
    note = (f"converted from plan schema 1, which named its hardware profile '{name}' only: it is read as the "
            f"bundled profile of that name unless you pass --hardware PATH")
    hardware = HardwareRef(name, name, "", False)
    raw = f.list("moves", [])
    if raw and all(isinstance(m, dict) and "kind" in m for m in raw):
        return hardware, tuple(Move.from_dict(m, source, i) for i, m in enumerate(raw)), note
    if raw:
        note += f"; its {len(raw)} incremental moves carry no source slots and were dropped (re-plan to execute them)"
    return hardware, (), note


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
