"""Recorded expert loads as planning input: one file per workload.

Each file is either an SGLang expert-distribution recorder dump in ``stat`` mode (``.json`` or
``.pt``, ``{"logical_count": [layers, experts]}`` or ``[steps, layers, experts]``; read by
:func:`moeplan.export.importers.import_sglang_dump`: dense-layer rows must be empty and are
dropped) or a moeplan load file (``moeplan import --format sglang-dump`` writes it:
``{"format": "moeplan-load", "layer_ids": [...], "load": [moe_layers, experts]}``, its layer ids
checked against the model's MoE layers), or SGLang's ``per_pass``/``per_token`` ``.pt`` dumps
(``{"records": [...]}`` with ``global_physical_count`` or ``topk_ids_of_layer``; read by
:func:`moeplan.trace_import.import_records_load`, the ``moeplan trace import`` reader). Several
files are several workloads; a directory is one workload made of every ``.pt`` in it (SGLang
writes one per rank).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeplan.errors import InputError
from moeplan.export.importers import RecordedLoad, import_sglang_dump, read_mapping
from moeplan.model import ModelSpec
from moeplan.trace_import import import_records_load, records_load

LOAD_FORMAT = "moeplan-load"


@dataclass(frozen=True)
class Workloads:
    """Token-choice loads of several workloads.

    Attributes:
        loads: float64 [workloads, moe_layers, experts] token-choices per expert.
        names: one label per workload (its file name).
    """

    loads: np.ndarray
    names: tuple[str, ...]

    @property
    def count(self) -> int:
        return int(self.loads.shape[0])

    def pooled(self) -> np.ndarray:
        """[moe_layers, experts] the workloads' mean load, each scaled to the same total first."""
        totals = self.loads.sum(axis=(1, 2), keepdims=True)
        scaled = self.loads / np.maximum(totals, 1e-300) * float(totals.mean())
        return scaled.mean(axis=0)

    def without(self, index: int) -> "Workloads":
        """All workloads but the ``index``-th (leave-one-out)."""
        keep = [i for i in range(self.count) if i != index]
        return Workloads(self.loads[keep], tuple(self.names[i] for i in keep))


def read_load(path: str, model: ModelSpec) -> RecordedLoad:
    """One load file or rank-dump directory (module docstring) as the model's ``[moe_layers, experts]`` load."""
    if Path(path).is_dir():
        load, passes = import_records_load(_rank_dumps(Path(path)), model)
        return RecordedLoad(load=load, layer_ids=model.moe_layers, steps=passes, source=path)
    data, source = read_mapping(path)
    if "records" in data:
        load, passes = records_load([(Path(path), data)], model)
        return RecordedLoad(load=load, layer_ids=model.moe_layers, steps=passes, source=source)
    if data.get("format") != LOAD_FORMAT:
        return import_sglang_dump(path, model)
    if data.get("num_experts", model.num_experts) != model.num_experts:
        raise InputError(f"has {data['num_experts']} experts, {model.name} {model.num_experts}", source=source,
                         field="num_experts", fix="check --model")
    layer_ids = tuple(int(i) for i in data.get("layer_ids", model.moe_layers))
    if layer_ids != model.moe_layers:
        raise InputError(f"names layers {list(layer_ids[:4])}…, {model.name}'s MoE layers are "
                         f"{list(model.moe_layers[:4])}…", source=source, field="layer_ids", fix="check --model")
    try:
        load = np.asarray(data.get("load"), dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("not a numeric [layers, experts] array", source=source, field="load") from None
    if load.shape != (model.num_moe_layers, model.num_experts):
        raise InputError(f"shape {load.shape}; expected [{model.num_moe_layers}, {model.num_experts}]", source=source,
                         field="load", fix="check --model")
    if not np.all(np.isfinite(load)) or load.min() < 0:
        raise InputError("counts must be finite numbers ≥ 0", source=source, field="load")
    return RecordedLoad(load=load, layer_ids=layer_ids, steps=int(data.get("steps", 1)), source=source)


def _rank_dumps(directory: Path) -> list[Path]:
    """Every ``.pt`` dump in ``directory`` (one per rank), InputError when there is none."""
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".pt", ".pth"))
    if not files:
        raise InputError("directory without .pt dumps", source=str(directory), fix="give a load file or a dump directory")
    return files


def read_loads(paths: Sequence[str | Path], model: ModelSpec) -> Workloads:
    """Every file as one workload; InputError for a file without any token-choice."""
    loads = []
    for path in paths:
        rec = read_load(str(path), model)
        if rec.load.sum() <= 0:
            raise InputError("holds no token-choices", source=rec.source, field="logical_count")
        if np.any(rec.load.sum(axis=1) <= 0):
            layer = model.moe_layers[int(np.argmax(rec.load.sum(axis=1) <= 0))]
            raise InputError(f"MoE layer {layer} has no token-choices", source=rec.source, field="logical_count",
                             fix="record more steps, or check --model")
        loads.append(rec.load.astype(np.float64))
    return Workloads(np.stack(loads), tuple(Path(p).name for p in paths))
