"""Read what runtimes run today back into moeplan: placements as a Plan, recorded loads as a load matrix.

* SGLang expert-location files (what ``--init-expert-location`` takes: inline JSON, ``.json``,
  or ``.pt`` holding ``{"physical_to_logical_map": [num_hidden_layers, E+R]}``): rows of the
  model's MoE layers become the placement; dense-layer rows are checked as SGLang checks them and
  then dropped.
* EPLB tensors (``.json`` / ``.pt``, :mod:`moeplan.export.eplb`): one row per MoE layer.
* SGLang expert-distribution recorder dumps (``stat`` mode, ``expert_distribution_recorder_*.pt``
  from ``/dump_expert_distribution_record``): ``logical_count`` int [steps, num_hidden_layers, E]
  (or [num_hidden_layers, E]); summed over steps and restricted to MoE layers it is the
  ``[moe_layers, E]`` token-choice load that :class:`moeplan.stats.TraceStats` also computes.

The model comes from the caller (to map SGLang's all-layer rows to MoE layers and to know E), and
so does the cluster: physical experts split evenly over the EP size ``devices``, ``devices_per_node``
per node. Replica token shares are not in these files; the imported placement shares an expert's
tokens equally among its replicas.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeplan.errors import InputError
from moeplan.export.eplb import EplbTensors, int_array
from moeplan.export.sglang import MAP_KEY, check_location_map
from moeplan.hardware import HardwareProfile
from moeplan.io import read_json
from moeplan.model import ModelSpec
from moeplan.plan import Placement, Plan

DUMP_KEY = "logical_count"


@dataclass(frozen=True)
class RecordedLoad:
    """Expert load recorded by a runtime.

    Attributes:
        load: int64 [moe_layers, experts]: token-choices routed to each expert, summed over steps.
        layer_ids: the decoder-layer index of each row.
        steps: forward passes the recorder buffered (1 for a 2-d dump).
        source: the file it came from.
    """

    load: np.ndarray
    layer_ids: tuple[int, ...]
    steps: int
    source: str

    def to_json(self, model: ModelSpec) -> dict[str, Any]:
        return {"format": "moeplan-load", "model": model.name, "num_experts": model.num_experts,
                "layer_ids": list(self.layer_ids), "steps": self.steps, "source": self.source,
                "load": self.load.tolist()}


def read_mapping(ref: str) -> tuple[dict[str, Any], str]:
    """Load a dict the way SGLang reads ``--init-expert-location``: ``.pt``, ``.json``, else inline JSON.

    Returns the dict (tensors as numpy arrays) and a short name of where it came from.
    """
    if ref.endswith(".pt"):
        return _load_pt(Path(ref)), ref
    if ref.endswith(".json"):
        data, source = read_json(ref), ref
    else:
        try:
            data, source = json.loads(ref), "inline JSON"
        except json.JSONDecodeError as exc:
            raise InputError(f"neither a .json/.pt path nor inline JSON ({exc.msg})", source=ref[:60],
                             fix="give a path ending in .json or .pt, or a JSON object") from None
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object, got {type(data).__name__}", source=source)
    return data, source


def _load_pt(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError("file not found", source=str(path), fix="check the path")
    try:
        import torch
    except ImportError:
        raise InputError("reading a .pt file needs torch", source=str(path),
                         fix="install torch, or convert the file to JSON") from None
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
        raise InputError(f"not a loadable torch file ({type(exc).__name__}: {exc})", source=str(path),
                         fix="give a file written by torch.save of a dict of tensors") from None
    if not isinstance(data, dict):
        raise InputError(f"expected a dict, got {type(data).__name__}", source=str(path))
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}


def _cluster(hardware: HardwareProfile, devices: int | None) -> HardwareProfile:
    return hardware.with_cluster(devices=devices) if devices is not None else hardware


def _plan(model: ModelSpec, hardware: HardwareProfile, placement: Placement, fmt: str, source: str) -> Plan:
    plan = Plan(model=model, hardware=hardware.ref(), devices_per_node=hardware.devices_per_node,
                nodes=hardware.nodes, placement=placement, solver={"name": f"import:{fmt}", "source": source},
                notes=f"imported from {fmt} ({source}); replicas share their expert's tokens equally")
    return plan.validate(source)


def import_sglang_location(ref: str, model: ModelSpec, hardware: HardwareProfile,
                           devices: int | None = None) -> Plan:
    """A Plan from an SGLang ``--init-expert-location`` value (path or inline JSON)."""
    data, source = read_mapping(ref)
    if MAP_KEY not in data:
        hint = ("this holds loads: use --format sglang-dump" if DUMP_KEY in data
                else f"SGLang's mapping file holds only '{MAP_KEY}'")
        raise InputError(f"no '{MAP_KEY}' (keys: {', '.join(map(str, data)) or 'none'})", source=source,
                         field=MAP_KEY, fix=hint)
    extra = sorted(str(k) for k in data if k != MAP_KEY)
    if extra:
        raise InputError(f"unknown key {extra[0]!r}: SGLang passes every key to init_by_mapping and fails on it",
                         source=source, field=extra[0], fix=f"keep only '{MAP_KEY}'")
    phy2log = int_array(data[MAP_KEY], 2, source, MAP_KEY)
    cluster = _cluster(hardware, devices)
    ep = cluster.num_devices
    check_location_map(phy2log, model, ep, source)
    moe_rows = phy2log[list(model.moe_layers)]
    slots = moe_rows.reshape(model.num_moe_layers, ep, moe_rows.shape[1] // ep)
    placement = Placement.from_slots(slots, model.num_experts, cluster.devices_per_node)
    return _plan(model, cluster, placement, "sglang", source)


def import_eplb(path: str, model: ModelSpec, hardware: HardwareProfile, devices: int | None = None) -> Plan:
    """A Plan from EPLB tensors (``.json`` or ``.pt``), one row per MoE layer."""
    if not path.endswith((".json", ".pt")):
        raise InputError("EPLB tensors come as .json or .pt", source=path, fix="give a .json or .pt file")
    data, source = read_mapping(path)
    tensors = EplbTensors.from_dict(data, model.num_experts, source, devices)
    rows = tensors.phy2log.shape[0]
    if rows != model.num_moe_layers:
        raise InputError(f"has {rows} rows, {model.name} has {model.num_moe_layers} MoE layers", source=source,
                         field="phy2log", fix="check --model (EPLB rows are MoE layers only)")
    if "layer_ids" in data and tuple(tensors.layer_ids.tolist()) != model.moe_layers:
        raise InputError(f"names layers {tensors.layer_ids.tolist()[:4]}…, {model.name}'s MoE layers are "
                         f"{list(model.moe_layers[:4])}…", source=source, field="layer_ids", fix="check --model")
    cluster = _cluster(hardware, tensors.num_gpus)
    return _plan(model, cluster, tensors.to_placement(cluster.devices_per_node), "eplb", source)


def import_sglang_dump(path: str, model: ModelSpec) -> RecordedLoad:
    """The MoE-layer load of an SGLang expert-distribution dump (``stat``/``stat_approx`` mode)."""
    data, source = read_mapping(path)
    if "records" in data:
        raise InputError("a per_pass/per_token dump (records), not a stat dump", source=source, field="records",
                         fix="record with --expert-distribution-recorder-mode stat")
    if DUMP_KEY not in data:
        raise InputError("missing", source=source, field=DUMP_KEY,
                         fix="give a dump of SGLang's expert distribution recorder in stat mode")
    try:
        counts = np.asarray(data[DUMP_KEY])
    except ValueError:
        raise InputError("rows of unequal length", source=source, field=DUMP_KEY) from None
    if counts.ndim == 2:
        counts = counts[None]
    if counts.ndim != 3 or counts.shape[0] < 1 or counts.shape[1:] != (model.num_layers, model.num_experts):
        raise InputError(f"shape {counts.shape}; expected [steps, {model.num_layers}, {model.num_experts}] "
                         f"(all decoder layers × experts of {model.name})", source=source, field=DUMP_KEY,
                         fix="check --model")
    if counts.dtype.kind not in "iuf" or not np.all(np.isfinite(counts)) or counts.min() < 0:
        raise InputError("counts must be finite numbers ≥ 0", source=source, field=DUMP_KEY)
    dense = list(model.dense_layers)
    if dense and counts[:, dense].any():
        layer = dense[int(np.argmax(counts[:, dense].sum(axis=(0, 2)) > 0))]
        raise InputError(f"dense layer {layer} has expert counts", source=source, field=DUMP_KEY,
                         fix=f"check --model: {model.name}'s MoE layers are {model.moe_layers[0]}…")
    load = np.rint(counts[:, list(model.moe_layers)].sum(axis=0)).astype(np.int64)
    return RecordedLoad(load=load, layer_ids=model.moe_layers, steps=int(counts.shape[0]), source=source)

