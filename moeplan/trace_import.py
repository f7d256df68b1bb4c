"""Routing traffic recorded elsewhere → a :class:`moeplan.trace.RoutingTrace`.

Formats (``IMPORT_FORMATS``; ``auto`` picks one by suffix):

* ``npz`` (``.npz``): a moeplan trace, or plain arrays: ``expert_ids`` [tokens, layers, top_k]
  (integers), optional ``gate_weights`` of the same shape, optional ``layer_ids`` [layers]
  (the model-layer index of each slice of the layer axis).
* ``sglang-pass`` (``.pt``): SGLang's expert-distribution recorder dumps in ``per_token`` mode,
  one file per rank (``torch.save`` of ``{"records": [...], "last_physical_to_logical_map":
  [layers, physical]}``; each record holds ``forward_pass_id``, ``rank`` and
  ``topk_ids_of_layer`` [model layers, tokens, top_k] of physical expert ids). Written by
  sglang @ main, ``python/sglang/srt/eplb/expert_distribution.py``::
  ``_DetailSinglePassGatherer.collect`` and ``_DumpAccumulator.dump``. Physical ids are mapped to
  logical ones with the recorded map; records are merged in forward-pass order, ranks in rank
  order within a pass (data-parallel ranks each hold their own tokens); a pass that several
  ranks recorded identically (tensor-parallel ranks see the same tokens) is kept once.
  Reading ``.pt`` needs torch (``pip install torch``); planning does not.
* ``csv`` / ``parquet``: one row per token and layer, columns ``token``, ``layer``,
  ``expert_0`` … ``expert_{k-1}`` and optionally ``weight_0`` … ``weight_{k-1}``.

Layer ids are mapped to the model's MoE layers: an axis (or a set of ``layer`` values) that
covers every model layer keeps the MoE layers and drops the dense ones; one of exactly
``num_moe_layers`` entries is read as MoE layers in order. Anything else is refused with the
file and field named.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeplan.errors import InputError
from moeplan.io import read_npz
from moeplan.model import ModelSpec
from moeplan.trace import FORMAT, RoutingTrace

IMPORT_FORMATS = ("auto", "npz", "sglang-pass", "csv", "parquet")
SUFFIX_FORMATS = {".npz": "npz", ".pt": "sglang-pass", ".pth": "sglang-pass", ".csv": "csv",
                  ".parquet": "parquet", ".pq": "parquet"}
_RANK_SUFFIX = re.compile(r"_(\d+)\.pth?$")


@dataclass(frozen=True)
class RecordedChoices:
    """What one file holds before mapping to the model: ``expert_ids`` [tokens, layers, top_k]
    (int64), optional ``gate_weights`` (float32, same shape) and ``layer_ids`` [layers], the
    model-layer index of each slice, or None when the file does not say."""

    expert_ids: np.ndarray
    gate_weights: np.ndarray | None
    layer_ids: tuple[int, ...] | None
    source: str


def detect_format(path: Path) -> str:
    """The import format a file's suffix implies."""
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"cannot tell the format from the suffix '{path.suffix}'", source=str(path),
                         fix=f"pass --format ({', '.join(IMPORT_FORMATS[1:])})")
    return fmt


def import_trace(paths: Sequence[Path], fmt: str, model: ModelSpec) -> RoutingTrace:
    """Read ``paths`` (all of one format; several files are merged) into a trace for ``model``."""
    if not paths:
        raise InputError("no file given", field="FILE", fix="name at least one file")
    if fmt not in IMPORT_FORMATS:
        raise InputError(f"unknown format {fmt!r}", field="format", fix=f"use one of {', '.join(IMPORT_FORMATS)}")
    formats = {detect_format(p) if fmt == "auto" else fmt for p in paths}
    if len(formats) > 1:
        raise InputError(f"files of several formats ({', '.join(sorted(formats))})", field="FILE",
                         fix="import one format at a time")
    chosen = formats.pop()
    if chosen == "sglang-pass":
        parts = [_sglang_choices(paths)]
    else:
        reader = {"npz": _npz_choices, "csv": _csv_choices, "parquet": _parquet_choices}[chosen]
        parts = [reader(p) for p in paths]
    mapped = [_to_moe_layers(part, model) for part in parts]
    ids = np.concatenate([m[0] for m in mapped], axis=0)
    gates = None if any(m[1] is None for m in mapped) else np.concatenate([m[1] for m in mapped], axis=0)
    if ids.shape[2] != model.top_k:
        raise InputError(f"top-{ids.shape[2]} choices per token, the model {model.name} routes top-{model.top_k}",
                         source=parts[0].source, field="expert_ids", fix="give the model the traffic came from")
    trace = RoutingTrace(ids.astype(np.int16), model.num_experts, model.name,
                         None if gates is None else gates.astype(np.float16),
                         {"source": "imported", "format": chosen, "files": [str(p) for p in paths]})
    return trace.validate(parts[0].source if len(parts) == 1 else ", ".join(str(p) for p in paths))


def _to_moe_layers(part: RecordedChoices, model: ModelSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """Keep the model's MoE layers of ``part`` in order; drop dense layers."""
    n = part.expert_ids.shape[1]
    if part.layer_ids is not None:
        index = {layer: i for i, layer in enumerate(part.layer_ids)}
        missing = [layer for layer in model.moe_layers if layer not in index]
        if missing and sorted(part.layer_ids) == list(range(model.num_moe_layers)):
            keep = list(range(model.num_moe_layers))
        elif missing:
            raise InputError(f"no traffic for MoE layer(s) {_ranges(missing)} of {model.name} "
                             f"(MoE layers {_ranges(list(model.moe_layers))})", source=part.source, field="layer",
                             fix="give every MoE layer, as model-layer ids or as MoE-layer indices 0..n-1")
        else:
            keep = [index[layer] for layer in model.moe_layers]
    elif n == model.num_layers:
        keep = list(model.moe_layers)
    elif n == model.num_moe_layers:
        keep = list(range(n))
    else:
        raise InputError(f"{n} layers, the model {model.name} has {model.num_layers} layers of which "
                         f"{model.num_moe_layers} are MoE", source=part.source, field="expert_ids",
                         fix="give every layer or every MoE layer (or add 'layer_ids')")
    gates = None if part.gate_weights is None else part.gate_weights[:, keep, :]
    return part.expert_ids[:, keep, :], gates


def _ranges(values: list[int]) -> str:
    out: list[str] = []
    for v in sorted(values):
        if out and out[-1].split("..")[-1] == str(v - 1):
            out[-1] = f"{out[-1].split('..')[0]}..{v}"
        else:
            out.append(str(v))
    return ", ".join(out)


def _integer_array(value: Any, source: str, field: str, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"expected a {ndim}-d integer array, got {arr.dtype} of shape {arr.shape}", source=source,
                         field=field)
    if arr.size == 0:
        raise InputError(f"empty (shape {arr.shape})", source=source, field=field)
    return arr.astype(np.int64, copy=False)


def _float_array(value: Any, shape: tuple[int, ...], source: str, field: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)):
        raise InputError(f"expected finite floats of shape {shape}, got {arr.dtype} of shape {arr.shape}",
                         source=source, field=field)
    return arr.astype(np.float32, copy=False)


def _npz_choices(path: Path) -> RecordedChoices:
    src = str(path)
    data = read_npz(path)
    if "meta" in data:
        if FORMAT not in str(data["meta"]):
            raise InputError("a 'meta' record of an unknown format", source=src, field="meta",
                             fix="drop 'meta' to import plain arrays")
        trace = RoutingTrace.load(path)
        return RecordedChoices(trace.expert_ids.astype(np.int64), None if trace.gate_weights is None else
                               trace.gate_weights.astype(np.float32), None, src)
    if "expert_ids" not in data:
        raise InputError(f"no 'expert_ids' array (found {', '.join(sorted(data)) or 'nothing'})", source=src,
                         field="expert_ids", fix="store the choices as expert_ids [tokens, layers, top_k]")
    ids = _integer_array(data["expert_ids"], src, "expert_ids", 3)
    gates = _float_array(data["gate_weights"], ids.shape, src, "gate_weights") if "gate_weights" in data else None
    layer_ids = None
    if "layer_ids" in data:
        layers = _integer_array(data["layer_ids"], src, "layer_ids", 1)
        if layers.size != ids.shape[1] or np.unique(layers).size != layers.size:
            raise InputError(f"{layers.size} distinct-or-not ids for {ids.shape[1]} layers; need one distinct id "
                             "per slice of the layer axis", source=src, field="layer_ids")
        layer_ids = tuple(int(v) for v in layers)
    return RecordedChoices(ids, gates, layer_ids, src)


def _load_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise InputError("reading SGLang .pt dumps needs torch", source=str(path),
                         fix="pip install torch (planning itself does not need it)") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError("file not found", source=str(path), fix="check the path") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
        raise InputError(f"not a readable torch file ({type(exc).__name__}: {str(exc)[:200]})", source=str(path),
                         fix="give the .pt files SGLang's expert-distribution recorder dumped") from None


def _sglang_choices(paths: Sequence[Path]) -> RecordedChoices:
    """Merge per-rank SGLang per-token dumps into one token stream (see the module docstring)."""
    return _records_choices([(path, _records_payload(path, _load_torch(path))) for path in paths])


def _records_payload(path: Path, payload: Any) -> dict:
    """``payload`` when it is a recorder dump with a ``records`` list, else InputError."""
    if not isinstance(payload, dict) or not isinstance(payload.get("records"), list):
        raise InputError("no 'records' list", source=str(path), field="records",
                         fix="give a dump of SGLang's expert-distribution recorder")
    return payload


def _physical_map(payload: dict, src: str) -> np.ndarray | None:
    """The dump's ``last_physical_to_logical_map`` [model layers, physical] as int64, or None."""
    mapping = payload.get("last_physical_to_logical_map")
    return None if mapping is None else _integer_array(mapping.numpy() if hasattr(mapping, "numpy") else mapping,
                                                       src, "last_physical_to_logical_map", 2)


def _records_choices(dumps: Sequence[tuple[Path, dict]]) -> RecordedChoices:
    """:func:`_sglang_choices` on dumps already loaded: (path, payload) per rank file."""
    passes: dict[tuple[int, int], np.ndarray] = {}
    layers = None
    paths = [path for path, _ in dumps]
    for file_index, (path, payload) in enumerate(dumps):
        src = str(path)
        p2l = _physical_map(payload, src)
        name_rank = _RANK_SUFFIX.search(path.name)
        for i, record in enumerate(payload["records"]):
            field = f"records[{i}]"
            if not isinstance(record, dict):
                raise InputError("not a mapping", source=src, field=field)
            if "topk_ids_of_layer" not in record:
                raise InputError("holds expert counts, not per-token choices", source=src, field=field,
                                 fix="record with --expert-distribution-recorder-mode per_token")
            topk = record["topk_ids_of_layer"]
            ids = _integer_array(topk.numpy() if hasattr(topk, "numpy") else topk, src,
                                 f"{field}.topk_ids_of_layer", 3)
            if layers is None:
                layers = ids.shape[0]
            if ids.shape[0] != layers:
                raise InputError(f"{ids.shape[0]} layers, earlier records had {layers}", source=src,
                                 field=f"{field}.topk_ids_of_layer")
            if ids.shape[1] == 0:
                continue
            if p2l is not None:
                if p2l.shape[0] != layers:
                    raise InputError(f"map has {p2l.shape[0]} layers, records {layers}", source=src,
                                     field="last_physical_to_logical_map")
                valid = (ids >= 0) & (ids < p2l.shape[1])
                rows = np.broadcast_to(np.arange(layers)[:, None, None], ids.shape)
                ids = np.where(valid, p2l[rows, np.clip(ids, 0, p2l.shape[1] - 1)], -1)
            rank = int(record.get("rank", int(name_rank.group(1)) if name_rank else file_index))
            key = (int(record.get("forward_pass_id", i)), rank)
            if key in passes:
                raise InputError(f"forward pass {key[0]} of rank {rank} appears twice", source=src, field=field,
                                 fix="give each rank's dump once")
            passes[key] = ids.transpose(1, 0, 2)
    if not passes:
        raise InputError("no tokens recorded", source=", ".join(map(str, paths)), field="records")
    ordered: list[np.ndarray] = []
    last_pass: tuple[int, list[np.ndarray]] | None = None
    for (pass_id, _rank), ids in sorted(passes.items()):
        if last_pass is not None and last_pass[0] == pass_id and any(np.array_equal(ids, seen) for seen in last_pass[1]):
            continue
        if last_pass is None or last_pass[0] != pass_id:
            last_pass = (pass_id, [])
        last_pass[1].append(ids)
        ordered.append(ids)
    return RecordedChoices(np.concatenate(ordered, axis=0), None, None, ", ".join(map(str, paths)))


def import_records_load(paths: Sequence[Path], model: ModelSpec) -> tuple[np.ndarray, int]:
    """The MoE-layer load of one workload's SGLang ``per_token``/``per_pass`` dumps (one ``.pt`` per
    rank): int64 [moe_layers, experts] token-choices and the forward passes recorded.

    ``per_token`` records (``topk_ids_of_layer``) go through the trace reader above (same merge,
    same tensor-parallel de-duplication) and are counted per layer. ``per_pass`` records hold only
    ``global_physical_count`` [model layers, physical] (sglang ``expert_distribution.py``::
    ``_LayerBasedGpuSinglePassGatherer.collect``); they are mapped to logical experts through the
    dump's ``last_physical_to_logical_map`` as sglang's
    ``_convert_global_physical_count_to_logical_count`` does (scatter-add, ids < 0 dropped) and
    summed over records, as its ``stat`` accumulator sums ranks. Dense layers must hold no counts.
    """
    return records_load([(Path(p), _load_torch(Path(p))) for p in paths], model)


def records_load(dumps: Sequence[tuple[Path, Any]], model: ModelSpec) -> tuple[np.ndarray, int]:
    """:func:`import_records_load` on dumps already loaded: (path, payload) per rank file."""
    dumps = [(path, _records_payload(path, payload)) for path, payload in dumps]
    paths = [path for path, _ in dumps]
    records = [r for _, payload in dumps for r in payload["records"]]
    if not records:
        raise InputError("no records", source=", ".join(map(str, paths)), field="records")
    if all(isinstance(r, dict) and "topk_ids_of_layer" in r for r in records):
        ids, _ = _to_moe_layers(_records_choices(dumps), model)
        e = model.num_experts
        if ids.max() >= e:
            raise InputError(f"expert id {int(ids.max())} ≥ {e} experts", source=str(paths[0]),
                             field="topk_ids_of_layer", fix="check --model")
        rows = ids.transpose(1, 0, 2).reshape(ids.shape[1], -1)
        load = np.stack([np.bincount(row[row >= 0], minlength=e) for row in rows])
        return load.astype(np.int64), len({int(r.get("forward_pass_id", i)) for i, r in enumerate(records)})
    total: np.ndarray | None = None
    for path, payload in dumps:
        src = str(path)
        p2l = _physical_map(payload, src)
        for i, record in enumerate(payload["records"]):
            field = f"records[{i}].global_physical_count"
            if not isinstance(record, dict) or "global_physical_count" not in record:
                raise InputError("neither topk_ids_of_layer nor global_physical_count", source=src,
                                 field=f"records[{i}]", fix="give a per_pass or per_token recorder dump")
            value = record["global_physical_count"]
            count = _integer_array(value.numpy() if hasattr(value, "numpy") else value, src, field, 2)
            logical = _logical_count(count, p2l, model.num_experts, src, field)
            total = logical if total is None else _add_counts(total, logical, src, field)
    assert total is not None
    return _moe_rows(total, model, str(paths[0])), len({int(r.get("forward_pass_id", i))
                                                         for i, r in enumerate(records)})


def _logical_count(count: np.ndarray, p2l: np.ndarray | None, num_experts: int, src: str, field: str) -> np.ndarray:
    """[layers, physical] counts → [layers, experts] through ``p2l`` (identity without a map)."""
    if count.min() < 0:
        raise InputError("counts must be ≥ 0", source=src, field=field)
    if p2l is None:
        if count.shape[1] != num_experts:
            raise InputError(f"{count.shape[1]} physical experts and no last_physical_to_logical_map", source=src,
                             field=field, fix="give the dump as SGLang wrote it (with its map)")
        return count
    if p2l.shape != count.shape:
        raise InputError(f"shape {count.shape}, the map's {p2l.shape}", source=src, field=field)
    if p2l.max() >= num_experts:
        raise InputError(f"maps to expert {int(p2l.max())} ≥ {num_experts} experts", source=src,
                         field="last_physical_to_logical_map", fix="check --model")
    out = np.zeros((count.shape[0], num_experts), dtype=np.int64)
    valid = p2l >= 0
    rows = np.broadcast_to(np.arange(count.shape[0])[:, None], count.shape)
    np.add.at(out, (rows[valid], p2l[valid]), count[valid])
    return out


def _add_counts(total: np.ndarray, more: np.ndarray, src: str, field: str) -> np.ndarray:
    if more.shape != total.shape:
        raise InputError(f"shape {more.shape}, earlier records {total.shape}", source=src, field=field)
    return total + more


def _moe_rows(count: np.ndarray, model: ModelSpec, src: str) -> np.ndarray:
    """[model layers or MoE layers, experts] → the MoE rows; dense rows must be empty."""
    if count.shape[0] == model.num_moe_layers:
        return count
    if count.shape[0] != model.num_layers:
        raise InputError(f"{count.shape[0]} layers, the model {model.name} has {model.num_layers} layers of which "
                         f"{model.num_moe_layers} are MoE", source=src, field="global_physical_count",
                         fix="check --model")
    dense = list(model.dense_layers)
    if dense and count[dense].any():
        layer = dense[int(np.argmax(count[dense].sum(axis=1) > 0))]
        raise InputError(f"dense layer {layer} has expert counts", source=src, field="global_physical_count",
                         fix="check --model")
    return count[list(model.moe_layers)]


def _table_choices(columns: dict[str, np.ndarray], source: str) -> RecordedChoices:
    """One row per (token, layer) → arrays; every token must have every layer once."""
    for name in ("token", "layer", "expert_0"):
        if name not in columns:
            raise InputError(f"no '{name}' column (found {', '.join(columns) or 'none'})", source=source, field=name,
                             fix="columns: token, layer, expert_0 … expert_{k-1}[, weight_0 …]")
    k = 0
    while f"expert_{k}" in columns:
        k += 1
    token = _integer_array(columns["token"], source, "token", 1)
    layer = _integer_array(columns["layer"], source, "layer", 1)
    experts = np.stack([_integer_array(columns[f"expert_{j}"], source, f"expert_{j}", 1) for j in range(k)], axis=1)
    has_weights = "weight_0" in columns
    weights = (np.stack([_float_array(columns[f"weight_{j}"], token.shape, source, f"weight_{j}")
                         for j in range(k)], axis=1) if has_weights else None)
    tokens, t_index = np.unique(token, return_inverse=True)
    layer_values, l_index = np.unique(layer, return_inverse=True)
    if token.size != tokens.size * layer_values.size:
        raise InputError(f"{token.size} rows for {tokens.size} tokens × {layer_values.size} layers", source=source,
                         field="layer", fix="give one row per token and layer")
    cell = t_index * layer_values.size + l_index
    if np.unique(cell).size != cell.size:
        raise InputError("a (token, layer) pair appears twice", source=source, field="token")
    ids = np.empty((tokens.size * layer_values.size, k), dtype=np.int64)
    ids[cell] = experts
    gates = None
    if weights is not None:
        gates = np.empty((tokens.size * layer_values.size, k), dtype=np.float32)
        gates[cell] = weights
        gates = gates.reshape(tokens.size, layer_values.size, k)
    return RecordedChoices(ids.reshape(tokens.size, layer_values.size, k), gates,
                           tuple(int(v) for v in layer_values), source)


def _csv_choices(path: Path) -> RecordedChoices:
    src = str(path)
    if not path.is_file():
        raise InputError("file not found" if not path.exists() else "is a folder, expected a file", source=src)
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if len(set(header)) != len(header):
            raise InputError("repeated column names", source=src, field="header")
        rows = list(reader)
    body: dict[str, list[str]] = {name: [] for name in header}
    for n, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise InputError(f"line {n} has {len(row)} values for {len(header)} columns", source=src, field=f"line {n}")
        for name, value in zip(header, row):
            body[name].append(value.strip())
    columns: dict[str, np.ndarray] = {}
    for name, values in body.items():
        kind = np.float64 if name.startswith("weight_") else np.int64
        try:
            columns[name] = np.array(values, dtype=kind)
        except (ValueError, OverflowError):
            bad = next(v for v in values if not _parses(v, kind))
            raise InputError(f"{bad!r} is not {'a number' if kind is np.float64 else 'an integer'}", source=src,
                             field=name) from None
    return _table_choices(columns, src)


def _parses(value: str, kind: type) -> bool:
    try:
        kind(value)
        return True
    except (ValueError, OverflowError):
        return False


def _parquet_choices(path: Path) -> RecordedChoices:
    src = str(path)
    if not path.is_file():
        raise InputError("file not found" if not path.exists() else "is a folder, expected a file", source=src)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading Parquet needs pyarrow", source=src, fix="pip install pyarrow, or export CSV") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise InputError(f"not a readable Parquet file ({type(exc).__name__}: {str(exc)[:200]})",
                         source=src) from None
    return _table_choices({name: table.column(name).to_numpy() for name in table.column_names}, src)
