"""DeepSeek EPLB tensors: the three arrays ``rebalance_experts`` returns, for a plan's placement.

Reference: ``eplb.py`` of deepseek-ai/EPLB at commit ``d52c72d5b2f2fb4c41afbf8eb21366820239913d``
(SGLang's ``eplb_algorithms/deepseek.py`` and vLLM's ``eplb/policy/default.py`` are copies).

* ``phy2log`` int64 [layers, P]: logical expert of each physical expert; physical ids are
  rank-major (GPU ``g`` owns ``g·P/G … (g+1)·P/G − 1``; ``P % G == 0``).
* ``log2phy`` int64 [layers, E, M]: the physical ids of each logical expert, padded with −1;
  ``M = logcnt.max()`` over all layers (EPLB's ``maxlogcnt``).
* ``logcnt`` int64 [layers, E]: replicas of each logical expert (≥ 1).

Replica order: EPLB lists an expert's replicas by the order it created them (``phyrank``); a
Plan does not record that order, so ``log2phy`` lists them by ascending physical id (the order of
SGLang's ``logical_to_all_physical_map``). EPLB consumers pick a replica by an index below
``logcnt`` and treat every replica alike, so the order changes no routing guarantee.

Layer axis: **MoE layers only** (as vLLM's EPLB state and the load matrix EPLB is given), in the
model's order; ``layer_ids`` [layers] records the decoder-layer index of each row. SGLang's
``--init-expert-location`` instead wants every decoder layer (see :mod:`moeplan.export.sglang`).

Files: ``.json`` with keys ``phy2log``, ``log2phy``, ``logcnt``, ``layer_ids``, ``num_gpus`` and
optionally ``note``; ``.pt`` = ``torch.save`` of a dict of int64 tensors with the same keys
(``num_gpus`` a 0-d tensor). torch is imported only to write or read ``.pt``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeplan.dispatch import check_export
from moeplan.errors import InputError
from moeplan.export.common import Export, require_placement
from moeplan.io import atomic_open, write_text
from moeplan.plan import Placement, Plan

KEYS = ("phy2log", "log2phy", "logcnt", "layer_ids", "num_gpus", "note")


@dataclass(frozen=True)
class EplbTensors:
    """EPLB's placement tensors (see the module docstring for shapes and order)."""

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray
    layer_ids: np.ndarray
    num_gpus: int

    @property
    def num_experts(self) -> int:
        return int(self.logcnt.shape[1])

    @classmethod
    def from_phy2log(cls, phy2log: np.ndarray, num_experts: int, num_gpus: int,
                     layer_ids: np.ndarray) -> "EplbTensors":
        """Derive ``logcnt`` and ``log2phy`` (replicas by ascending physical id) from ``phy2log``."""
        p2l = np.asarray(phy2log, dtype=np.int64)
        rows, width = p2l.shape
        logcnt = np.stack([np.bincount(row, minlength=num_experts) for row in p2l]).astype(np.int64)
        log2phy = np.full((rows, num_experts, int(logcnt.max())), -1, dtype=np.int64)
        for layer in range(rows):
            order = np.argsort(p2l[layer], kind="stable")
            experts = p2l[layer, order]
            first = np.concatenate(([0], np.cumsum(logcnt[layer])[:-1]))
            log2phy[layer, experts, np.arange(width) - first[experts]] = order
        return cls(p2l, log2phy, logcnt, np.asarray(layer_ids, dtype=np.int64), int(num_gpus))

    @classmethod
    def from_placement(cls, placement: Placement, layer_ids: tuple[int, ...]) -> "EplbTensors":
        return cls.from_phy2log(placement.phy2log(), placement.num_experts, placement.num_devices,
                                np.asarray(layer_ids))

    def to_placement(self, devices_per_node: int) -> Placement:
        """The placement with equal token shares among replicas (EPLB's own assumption)."""
        rows, width = self.phy2log.shape
        slots = self.phy2log.reshape(rows, self.num_gpus, width // self.num_gpus)
        return Placement.from_slots(slots, self.num_experts, devices_per_node)

    def to_json(self, note: str = "") -> dict[str, Any]:
        d: dict[str, Any] = {"phy2log": self.phy2log.tolist(), "log2phy": self.log2phy.tolist(),
                             "logcnt": self.logcnt.tolist(), "layer_ids": self.layer_ids.tolist(),
                             "num_gpus": self.num_gpus}
        if note:
            d["note"] = note
        return d

    def to_torch(self) -> dict[str, Any]:
        """The ``.pt`` payload: int64 tensors only (loadable with ``weights_only=True``)."""
        import torch
        return {"phy2log": torch.from_numpy(self.phy2log), "log2phy": torch.from_numpy(self.log2phy),
                "logcnt": torch.from_numpy(self.logcnt), "layer_ids": torch.from_numpy(self.layer_ids),
                "num_gpus": torch.tensor(self.num_gpus, dtype=torch.int64)}

    @classmethod
    def from_dict(cls, data: Any, num_experts: int, source: str, num_gpus: int | None = None) -> "EplbTensors":
        """Read and check tensors loaded from JSON (lists) or ``.pt`` (numpy-converted arrays).

        ``num_gpus`` (from the caller's options) must agree with the file's ``num_gpus`` if both exist.
        """
        if not isinstance(data, dict):
            raise InputError(f"expected a mapping of EPLB tensors, got {type(data).__name__}", source=source)
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise InputError(f"unknown key {unknown[0]!r}", source=source, field=str(unknown[0]),
                             fix=f"EPLB tensor files hold only {', '.join(KEYS)}")
        if "phy2log" not in data:
            raise InputError("missing", source=source, field="phy2log", fix="add the [layers, physical] map")
        phy2log = int_array(data["phy2log"], 2, source, "phy2log")
        rows, width = phy2log.shape
        gpus = _gpus(data.get("num_gpus"), num_gpus, source)
        if width % gpus:
            raise InputError(f"{width} physical experts do not divide over {gpus} GPUs", source=source,
                             field="phy2log", fix="give --gpus equal to the EP size")
        check_phy2log(phy2log, num_experts, source, "phy2log")
        layer_ids = (int_array(data["layer_ids"], 1, source, "layer_ids") if data.get("layer_ids") is not None
                     else np.arange(rows, dtype=np.int64))
        if layer_ids.shape != (rows,):
            raise InputError(f"has {layer_ids.size} entries for {rows} rows", source=source, field="layer_ids")
        tensors = cls.from_phy2log(phy2log, num_experts, gpus, layer_ids)
        if data.get("logcnt") is not None:
            logcnt = int_array(data["logcnt"], 2, source, "logcnt")
            if logcnt.shape != tensors.logcnt.shape or not np.array_equal(logcnt, tensors.logcnt):
                raise InputError("disagrees with the replica counts of phy2log", source=source, field="logcnt")
        if data.get("log2phy") is not None:
            _check_log2phy(int_array(data["log2phy"], 3, source, "log2phy"), tensors, source)
        return tensors


def check_phy2log(phy2log: np.ndarray, num_experts: int, source: str, field: str) -> None:
    """Values in ``0..E−1`` and every logical expert present in every row."""
    if phy2log.min() < 0 or phy2log.max() >= num_experts:
        row, col = np.argwhere((phy2log < 0) | (phy2log >= num_experts))[0]
        raise InputError(f"row {row}, physical {col}: logical id {phy2log[row, col]} outside 0..{num_experts - 1}",
                         source=source, field=field, fix="check --model (its expert count)")
    for row, values in enumerate(phy2log):
        counts = np.bincount(values, minlength=num_experts)
        if (counts == 0).any():
            raise InputError(f"logical expert {int(np.argmax(counts == 0))} has no physical slot in row {row}",
                             source=source, field=field, fix="every logical expert needs at least one slot")


def _check_log2phy(log2phy: np.ndarray, tensors: EplbTensors, source: str) -> None:
    def bad(message: str) -> InputError:
        return InputError(message, source=source, field="log2phy",
                          fix="log2phy[l, e, :logcnt[l, e]] lists the physical ids of e, then -1")

    rows, e = tensors.logcnt.shape
    if log2phy.shape[:2] != (rows, e) or log2phy.shape[2] < tensors.log2phy.shape[2]:
        raise bad(f"shape {log2phy.shape} does not fit [{rows}, {e}, ≥{tensors.log2phy.shape[2]}]")
    valid = log2phy != -1
    if not np.array_equal(valid.sum(axis=2), tensors.logcnt) or (valid[..., 1:] & ~valid[..., :-1]).any():
        raise bad("the non-padded entries do not match logcnt (each row: logcnt ids, then -1)")
    width = tensors.phy2log.shape[1]
    for layer in range(rows):
        ids = log2phy[layer][valid[layer]]
        if ids.min() < 0 or ids.max() >= width or not (np.bincount(ids, minlength=width) == 1).all():
            raise bad(f"layer row {layer}: entries are not each physical id exactly once")
        experts = np.repeat(np.arange(e), tensors.logcnt[layer])
        if not np.array_equal(tensors.phy2log[layer, log2phy[layer][valid[layer]]], experts):
            raise bad(f"layer row {layer}: an entry names a physical expert that phy2log gives to another expert")


def _gpus(in_file: Any, given: int | None, source: str) -> int:
    value = given
    if in_file is not None:
        arr = np.asarray(in_file)
        if arr.ndim != 0 or arr.dtype.kind not in "iu" or int(arr) < 1:
            raise InputError(f"expected a positive integer, got {in_file!r}", source=source, field="num_gpus")
        if given is not None and int(arr) != given:
            raise InputError(f"the file says {int(arr)} GPUs, the options {given}", source=source, field="num_gpus",
                             fix="drop --gpus or make it match")
        value = int(arr)
    if value is None:
        raise InputError("the EP size is unknown", source=source, field="num_gpus", fix="give --gpus")
    return value


def int_array(value: Any, ndim: int, source: str, field: str) -> np.ndarray:
    """An int64 array of ``ndim`` dimensions from nested lists or an array; InputError naming ``field``."""
    try:
        arr = np.asarray(value)
    except ValueError:
        raise InputError("rows of unequal length", source=source, field=field) from None
    if arr.ndim != ndim or arr.size == 0:
        raise InputError(f"expected a non-empty {ndim}-d array, got shape {arr.shape}", source=source, field=field)
    if arr.dtype.kind not in "iu":
        raise InputError(f"expected integers, got {arr.dtype}", source=source, field=field)
    return arr.astype(np.int64)


def export_eplb(plan: Plan, out: Path) -> Export:
    """Write ``eplb.json`` (and ``eplb.pt`` when torch is installed).

    ``out`` is a folder, or a ``.json``/``.pt`` path whose stem names both files.
    """
    placement = require_placement(plan, "eplb")
    check_export(plan, "eplb")
    tensors = EplbTensors.from_placement(placement, plan.model.moe_layers)
    base = out.with_suffix("") if out.suffix in (".json", ".pt") else out / "eplb"
    json_path = base.with_name(base.name + ".json")
    write_text(json_path, json.dumps(tensors.to_json(), separators=(",", ":")) + "\n")
    files = [json_path]
    notes = [f"{placement.num_layers} rows = the MoE layers {plan.model.moe_layers[0]}…{plan.model.moe_layers[-1]} "
             f"(layer_ids); {placement.num_physical} physical experts over {placement.num_devices} GPUs, rank-major",
             "log2phy lists each expert's replicas by ascending physical id (a plan keeps no EPLB replica rank)"]
    try:
        import torch
    except ImportError:
        notes.append("torch is not installed: wrote JSON only (no .pt)")
        return Export(files=files, notes=notes)
    pt_path = base.with_name(base.name + ".pt")
    with atomic_open(pt_path, "wb") as handle:
        torch.save(tensors.to_torch(), handle)
    files.append(pt_path)
    return Export(files=files, notes=notes)
