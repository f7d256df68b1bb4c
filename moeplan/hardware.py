"""HardwareProfile: what a device and its links can do, with where every number came from.

A profile holds scalar figures (:class:`Quantity`: memory, matmul rate, HBM and host-link
bandwidth, link bandwidth and latency) and measured curves (:class:`Curve`: expert FFN time
vs tokens, attention time vs sequence length, collective time vs bytes, host copy time vs
bytes). Every figure carries a :class:`Provenance`: ``datasheet`` with its reference,
``measured`` with the run that measured it (date, GPU, driver, torch, CUDA, NCCL — kept once
per run under ``runs``), or ``assumed`` with the reason.

Units: bytes, seconds, FLOP/s, bytes/s. Link bandwidth is per device per direction.
"""
from __future__ import annotations

import functools

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from moeplan.errors import InputError
from moeplan.io import Fields, guarded_load, read_yaml, write_yaml

SCHEMA_VERSION = 1
SOURCES = ("datasheet", "measured", "assumed")
NOISY_SPREAD = 0.15   # a measured point whose median sits more than this share above its fastest repeat is noisy


@dataclass(frozen=True)
class Provenance:
    """Where a figure came from: source is datasheet, measured or assumed; ref is a URL or reason;
    run names an entry of the profile's ``runs`` (measured figures only)."""

    source: str
    ref: str = ""
    run: str = ""

    @property
    def measured(self) -> bool:
        return self.source == "measured"

    def to_dict(self) -> dict[str, str]:
        d = {"source": self.source}
        if self.ref:
            d["ref"] = self.ref
        if self.run:
            d["run"] = self.run
        return d


@dataclass(frozen=True)
class Quantity:
    """One number with its provenance (unit given by the field that holds it)."""

    value: float
    prov: Provenance

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, **self.prov.to_dict()}


@dataclass(frozen=True)
class Curve:
    """y(x) measured at a few points; evaluated by log-log interpolation.

    kind: expert_ffn | moe_routing | fused_moe | attention_prefill | attention_train (prefill forward +
        backward) | attention_decode | attention_context | attention_generation | moe_a2a | collective |
        host_copy | gemm.
    key: what the curve is for, e.g. {hidden, ffn, dtype, kernel, experts} for expert_ffn,
        {k, n, dtype} for gemm (x = tokens m of one dense GEMM x[m, k]·W[n, k]ᵀ; see moeplan.gemms),
        {hidden, experts, top_k} for moe_routing (x = tokens a device routes),
        {hidden, inter, top_k, experts, moe_tp, moe_ep, dtype} for fused_moe (x = tokens entering one
        MoE layer across its EP group; y = the fused kernel of one layer on one GPU),
        {attention, heads, kv_heads, head_dim, kv_dtype, batch} for attention_context / attention_generation
        (one layer's attention core of ``batch`` sequences on one GPU with ``heads`` query and ``kv_heads``
        KV heads after TP; x = prompt tokens per sequence / KV-cache tokens per sequence; see
        moeplan.attention_tables), {backend, phase, hidden, top_k, experts, ranks, dtype} for moe_a2a
        (one EP dispatch or combine kernel, e.g. DeepEP; x = tokens each rank sends),
        {op, scope, ranks} for collective, {direction, memory} for host_copy.
    x: tokens, sequence length or bytes; y: seconds (median); y_min/y_max: spread of repeats.
    Below the first point the first value holds (the small-batch floor); beyond the last point
    y grows in proportion to x (the throughput of the largest measured point).
    """

    kind: str
    key: dict[str, Any]
    x: tuple[float, ...]
    y: tuple[float, ...]
    prov: Provenance
    y_min: tuple[float, ...] = ()
    y_max: tuple[float, ...] = ()

    def __call__(self, x: float | np.ndarray) -> np.ndarray:
        xs = np.asarray(self.x, dtype=np.float64)
        ys = np.asarray(self.y, dtype=np.float64)
        q = np.asarray(x, dtype=np.float64)
        lx, ly = np.log(xs), np.log(ys)
        out = np.exp(np.interp(np.log(np.maximum(q, xs[0])), lx, ly))
        beyond = q > xs[-1]
        if np.any(beyond):
            out = np.where(beyond, ys[-1] * q / xs[-1], out)
        return out

    def matches(self, kind: str, **key: Any) -> bool:
        return self.kind == kind and all(self.key.get(k) == v for k, v in key.items())

    def spread(self) -> tuple[float, ...]:
        """(y − y_min) / y at each point: how far the median sits above the fastest repeat (empty
        without min/max). The max is left out: one preempted repeat sets it (the H200 runs of
        bench/RESULTS.md put the median point's max 35% above its median, its min 6% below)."""
        return tuple((y - lo) / y for lo, y in zip(self.y_min, self.y))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "key": dict(self.key), "x": list(self.x), "y": list(self.y)}
        if self.y_min:
            d["y_min"] = list(self.y_min)
            d["y_max"] = list(self.y_max)
        d.update(self.prov.to_dict())
        return d


CURVE_KINDS = ("expert_ffn", "moe_routing", "fused_moe", "attention_prefill", "attention_train", "attention_decode",
               "attention_context", "attention_generation", "moe_a2a", "collective", "host_copy", "gemm")
CURVE_REQUIRED_KEYS = {kind: ("attention", "heads", "kv_heads", "head_dim", "kv_dtype", "batch")
                       for kind in ("attention_context", "attention_generation")}
"""Key entries a curve of that kind is looked up by (:class:`moeplan.attention_tables.AttentionTables`)."""
CORRECTION_TARGETS = ("expert_compute", "forward_step")
TILE_ROWS = 128   # rows of one M tile of the grouped GEMM (torch._grouped_mm's CUTLASS kernel on Hopper)


@dataclass(frozen=True)
class ExpertTerms:
    """One device's expert kernel time, corrected: ``scale`` × the cost model's prediction +
    ``per_pass_s`` × weight passes + ``per_slot_s`` × active slots + ``fixed_s`` (seconds; every
    term ≥ 0). A weight pass is one ``tile_rows``-row tile of one slot's tokens: a memory-bound
    GEMM reads its expert's weights once per tile, so at decode sizes time steps with
    ⌈tokens / tile_rows⌉ rather than with tokens (the grouped kernel at 128 tokens per expert takes
    one pass, at 129 two). Active slots carry the per-expert launch cost the runtime pays;
    ``fixed_s`` the layer's own fixed cost."""

    scale: float
    per_pass_s: float
    per_slot_s: float
    fixed_s: float
    tile_rows: int = TILE_ROWS

    @staticmethod
    def features(predicted: np.ndarray, slot_tokens: np.ndarray, tile_rows: int = TILE_ROWS) -> np.ndarray:
        """[..., 4]: prediction (s), weight passes, active slots, 1 for ``slot_tokens`` [..., slots]."""
        n = np.asarray(slot_tokens, dtype=np.float64)
        return np.stack([np.asarray(predicted, dtype=np.float64), np.ceil(n / tile_rows).sum(axis=-1),
                         (n > 0).sum(axis=-1).astype(np.float64), np.ones(n.shape[:-1])], axis=-1)

    def apply(self, predicted: np.ndarray, slot_tokens: np.ndarray) -> np.ndarray:
        """Corrected seconds [...] for predictions [...] of devices with ``slot_tokens`` [..., slots]
        (0 where a device has no tokens)."""
        coef = np.array([self.scale, self.per_pass_s, self.per_slot_s, self.fixed_s])
        busy = np.asarray(slot_tokens).sum(axis=-1) > 0
        return np.where(busy, self.features(predicted, slot_tokens, self.tile_rows) @ coef, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "per_pass_s": self.per_pass_s, "per_slot_s": self.per_slot_s,
                "fixed_s": self.fixed_s, "tile_rows": self.tile_rows}


@dataclass(frozen=True)
class Correction:
    """A measured correction of one cost-model prediction, fitted by ``moeplan calibrate`` on
    runtime measurements (:mod:`moeplan.calibration`).

    target ``expert_compute``: key {hidden, ffn, kernel}; ``terms`` (:class:`ExpertTerms`) replace
        :meth:`CostModel.device_compute`'s prediction. Profiles calibrated before the terms hold the
        earlier binned form instead, still read and applied: ``x`` token-choices per active slot of
        a device, ``factor`` measured / predicted there, multiplying the prediction (log-log
        interpolation in x, the end values held beyond).
    target ``forward_step``: key {model, phase} (model "*" for every model); a whole step is
        ``scale`` × the predicted step (attention, dense, routing, experts, head, norms) plus
        ``offset_per_layer_s`` × layers (the per-layer host and launch time the parts miss).
    ``residual``: median |measured − corrected| / measured over the observations it was fitted on
    (a fitted figure, not a judged one); ``observations``: how many.
    """

    target: str
    key: dict[str, Any]
    prov: Provenance
    observations: int
    residual: float
    x: tuple[float, ...] = ()
    factor: tuple[float, ...] = ()
    scale: float = 1.0
    offset_per_layer_s: float = 0.0
    terms: ExpertTerms | None = None

    def expert_time(self, predicted: np.ndarray, slot_tokens: np.ndarray) -> np.ndarray:
        """Corrected expert compute [...] (expert_compute) of devices with ``slot_tokens``
        [..., slots] whose uncorrected prediction is ``predicted`` [...] seconds."""
        if self.terms is not None:
            return self.terms.apply(predicted, slot_tokens)
        n = np.asarray(slot_tokens, dtype=np.float64)
        per_slot = n.sum(axis=-1) / np.maximum((n > 0).sum(axis=-1), 1)
        return predicted * self.factor_at(np.maximum(per_slot, 1.0))

    def factor_at(self, x: float | np.ndarray) -> np.ndarray:
        """``factor`` at ``x`` (expert_compute): log-log interpolation, end values held."""
        q = np.log(np.maximum(np.asarray(x, dtype=np.float64), 1e-9))
        return np.exp(np.interp(q, np.log(np.asarray(self.x)), np.log(np.asarray(self.factor))))

    def matches(self, target: str, **key: Any) -> bool:
        return self.target == target and all(self.key.get(k) == v for k, v in key.items())

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"target": self.target, "key": dict(self.key), "observations": self.observations,
                             "residual": self.residual}
        if self.terms is not None:
            d.update(terms=self.terms.to_dict())
        elif self.target == "expert_compute":
            d.update(x=list(self.x), factor=list(self.factor))
        else:
            d.update(scale=self.scale, offset_per_layer_s=self.offset_per_layer_s)
        d.update(self.prov.to_dict())
        return d


@dataclass(frozen=True)
class Link:
    """A link class: bandwidth in bytes/s per device per direction, latency in seconds."""

    name: str
    bandwidth: Quantity
    latency: Quantity

    def time(self, nbytes: float | np.ndarray) -> np.ndarray:
        """Datasheet time to move ``nbytes`` over this link (latency + bytes / bandwidth)."""
        b = np.asarray(nbytes, dtype=np.float64)
        return np.where(b > 0, self.latency.value + b / self.bandwidth.value, 0.0)


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator. memory in bytes; matmul_flops per dtype in FLOP/s; hbm, h2d, d2h in bytes/s;
    launch_overhead in seconds per kernel launch."""

    name: str
    vendor: str
    backend: str
    memory: Quantity
    matmul_flops: dict[str, Quantity]
    hbm_bandwidth: Quantity
    h2d_bandwidth: Quantity
    d2h_bandwidth: Quantity
    launch_overhead: Quantity


@dataclass(frozen=True)
class HardwareProfile:
    """A device type, its cluster shape and its links, with measured curves where there are any."""

    name: str
    description: str
    device: DeviceSpec
    devices_per_node: int
    nodes: int
    intra_node: Link
    inter_node: Link
    curves: tuple[Curve, ...] = ()
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_file: str = ""
    corrections: tuple[Correction, ...] = ()

    @property
    def num_devices(self) -> int:
        return self.devices_per_node * self.nodes

    def with_cluster(self, devices: int | None = None, nodes: int | None = None,
                     devices_per_node: int | None = None) -> "HardwareProfile":
        """The same hardware in another cluster shape. ``devices`` is the total; it fills nodes of
        ``devices_per_node`` (default: the profile's), so 32 H100s are 4 nodes of 8."""
        per = devices_per_node or self.devices_per_node
        if devices is not None:
            if devices < 1:
                raise InputError(f"device count must be ≥ 1, got {devices}", field="gpus")
            if nodes is not None:
                if devices % nodes:
                    raise InputError(f"{devices} devices do not split evenly over {nodes} nodes", field="nodes",
                                     fix="choose a node count that divides the device count")
                per = devices // nodes
            elif devices <= per:
                per, nodes = devices, 1
            else:
                if devices % per:
                    raise InputError(f"{devices} devices do not fill nodes of {per}", field="gpus",
                                     fix=f"use a multiple of {per}, or set --nodes")
                nodes = devices // per
        return replace(self, devices_per_node=per, nodes=nodes or self.nodes)

    # ---- curve lookup ----------------------------------------------------------------------
    def find_curve(self, kind: str, **key: Any) -> Curve | None:
        """The first curve of ``kind`` whose key has all the given entries, or None."""
        for c in self.curves:
            if c.matches(kind, **key):
                return c
        return None

    def curve_for(self, kind: str, **key: Any) -> Curve | None:
        """The curve of ``kind`` whose key is exactly ``key`` (a dictionary lookup: imported
        profiles hold thousands of ``fused_moe`` curves), or None."""
        return self._curve_index.get((kind, tuple(sorted(key.items()))))

    @functools.cached_property
    def _curve_index(self) -> dict[tuple[str, tuple], Curve]:
        index: dict[tuple[str, tuple], Curve] = {}
        for c in self.curves:
            index.setdefault((c.kind, tuple(sorted(c.key.items()))), c)
        return index

    def find_correction(self, target: str, **key: Any) -> Correction | None:
        """The first correction of ``target`` whose key has all the given entries, or None."""
        for c in self.corrections:
            if c.matches(target, **key):
                return c
        return None

    def curves_of(self, kind: str) -> list[Curve]:
        return [c for c in self.curves if c.kind == kind]

    @property
    def measured_kinds(self) -> set[str]:
        """Kinds of curve (and scalar groups) that hold measurements."""
        kinds = {c.kind for c in self.curves if c.prov.measured}
        if self.device.matmul_flops.get("bf16") and self.device.matmul_flops["bf16"].prov.measured:
            kinds.add("matmul")
        return kinds

    @property
    def links_measured(self) -> bool:
        return any(c.kind == "collective" and c.prov.measured for c in self.curves)

    @property
    def is_measured(self) -> bool:
        return bool(self.runs)

    def digest(self) -> str:
        """A short SHA-256 of the profile's figures and curves (the cluster shape left out, so a
        profile re-shaped with :meth:`with_cluster` keeps its digest)."""
        content = {k: v for k, v in self.to_dict().items() if k != "cluster"}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def ref(self) -> "HardwareRef":
        """How a plan names this profile: the bundled name when it is one, else its file's absolute path."""
        bundled = {str(Path(v).resolve()): k for k, v in self.bundled().items()}
        path = str(Path(self.source_file).resolve()) if self.source_file else ""
        return HardwareRef(self.name, bundled.get(path, path), self.digest(), self.is_measured)

    def provenance_note(self) -> str:
        """One line saying what is measured and what is datasheet, for every place a profile is shown."""
        if not self.is_measured:
            return "datasheet figures only: predictions are roofline, not measured"
        parts = sorted(self.measured_kinds)
        note = f"measured: {', '.join(parts) or 'nothing'}"
        if not self.links_measured:
            note += "; link curves NOT measured (datasheet bandwidth used for all-to-all)"
        noisy, points = self.noisy_points()
        if noisy:
            note += (f"; {noisy} of {points} measured points have a median > {NOISY_SPREAD:.0%} above their "
                     "fastest repeat (predictions from them are noisy)")
        if self.corrections:
            note += f"; calibrated ({len(self.corrections)} corrections by moeplan calibrate)"
        return note

    def noisy_points(self) -> tuple[int, int]:
        """(noisy, all): measured curve points whose :meth:`Curve.spread` exceeds NOISY_SPREAD, of
        all measured points that record their spread."""
        spreads = [s for c in self.curves if c.prov.measured for s in c.spread()]
        return sum(1 for s in spreads if s > NOISY_SPREAD), len(spreads)

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = self.device
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "description": self.description,
            "device": {
                "name": d.name, "vendor": d.vendor, "backend": d.backend,
                "memory_bytes": d.memory.to_dict(),
                "matmul_flops": {k: q.to_dict() for k, q in d.matmul_flops.items()},
                "hbm_bytes_per_s": d.hbm_bandwidth.to_dict(),
                "h2d_bytes_per_s": d.h2d_bandwidth.to_dict(),
                "d2h_bytes_per_s": d.d2h_bandwidth.to_dict(),
                "launch_overhead_s": d.launch_overhead.to_dict(),
            },
            "cluster": {"devices_per_node": self.devices_per_node, "nodes": self.nodes},
            "links": {
                "intra_node": _link_dict(self.intra_node),
                "inter_node": _link_dict(self.inter_node),
            },
            "runs": self.runs,
            "curves": [c.to_dict() for c in self.curves],
            **({"corrections": [c.to_dict() for c in self.corrections]} if self.corrections else {}),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        self.validate()
        write_yaml(path, self.to_dict())

    def validate(self) -> "HardwareProfile":
        src = self.source_file or self.name
        if self.devices_per_node < 1 or self.nodes < 1:
            raise InputError("cluster sizes must be ≥ 1", source=src, field="cluster")
        for c in self.curves:
            if c.prov.measured and c.prov.run not in self.runs:
                raise InputError(f"curve {c.kind} {c.key} names run '{c.prov.run}' that is not under runs",
                                 source=src, field="curves", fix="add the run's record under 'runs'")
        for c in self.corrections:
            if c.prov.run not in self.runs:
                raise InputError(f"correction {c.target} {c.key} names run '{c.prov.run}' that is not under runs",
                                 source=src, field="corrections", fix="add the calibration's record under 'runs'")
        return self

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "HardwareProfile":
        return guarded_load(lambda: _parse_profile(data, source), source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "HardwareProfile":
        return cls.from_dict(read_yaml(path), str(path))

    @staticmethod
    def bundled() -> dict[str, Path]:
        """Bundled profiles by name: ``h100-sxm`` etc., and ``measured/<name>`` for measured ones."""
        root = resources.files("moeplan.hardware_profiles")
        out: dict[str, Path] = {}
        for p in root.iterdir():
            if p.name.endswith(".yaml"):
                out[p.name[:-5]] = Path(str(p))
        measured = root.joinpath("measured")
        if measured.is_dir():
            for p in measured.iterdir():
                if p.name.endswith(".yaml"):
                    out[f"measured/{p.name[:-5]}"] = Path(str(p))
        return dict(sorted(out.items()))

    @classmethod
    def resolve(cls, ref: str) -> "HardwareProfile":
        """A bundled profile name (``h100-sxm``, ``measured/h100-sxm``), an alias people type
        (``h100``, ``H200``, ``910b``: see :data:`ALIASES` and :meth:`resolve_name`) or a YAML path."""
        bundled = cls.bundled()
        name = cls.resolve_name(ref)
        if name in bundled:
            return cls.load(bundled[name])
        p = Path(ref)
        if p.suffix in (".yaml", ".yml") or p.exists():
            return cls.load(p)
        raise InputError(f"unknown hardware profile '{ref}'", field="hardware",
                         fix=f"use one of: {', '.join(bundled)}, an alias ({', '.join(ALIASES)}), "
                             "or a path to a profile YAML")

    @classmethod
    def resolve_name(cls, ref: str) -> str:
        """The bundled profile an alias stands for: the measured one where one is bundled, else the
        datasheet one; any other reference is returned unchanged."""
        canonical = ALIASES.get(ref.strip().lower())
        if canonical is None:
            return ref
        measured = f"measured/{canonical}"
        return measured if measured in cls.bundled() else canonical


# Names people type for a bundled profile (lower case), → the datasheet profile's name.
ALIASES: dict[str, str] = {
    "h100": "h100-sxm", "h100-sxm5": "h100-sxm", "h100-80gb": "h100-sxm",
    "h200": "h200-sxm", "h200-sxm5": "h200-sxm",
    "a100": "a100-80gb-sxm", "a100-80gb": "a100-80gb-sxm", "a100-sxm": "a100-80gb-sxm",
    "b200": "b200", "mi300x": "mi300x", "mi300": "mi300x",
    "910b": "ascend-910b", "ascend910b": "ascend-910b", "ascend-910b": "ascend-910b",
    "cloudmatrix": "cloudmatrix384", "cloudmatrix384": "cloudmatrix384",
}


@dataclass(frozen=True)
class HardwareRef:
    """The hardware profile a plan was priced with: its ``name``, the ``file`` it came from (a
    bundled name such as ``measured/h200-sxm``, or a YAML file's absolute path), the
    :meth:`HardwareProfile.digest` of its content and whether its figures are ``measured``.
    ``digest`` is "" only for plans of schema 1, which named the profile alone."""

    name: str
    file: str
    digest: str
    measured: bool

    def load(self, source: str = "plan") -> HardwareProfile:
        """The very profile the plan was priced with: InputError when its file is gone or its
        content changed (nothing falls back to another profile)."""
        bundled = HardwareProfile.bundled()
        path = bundled.get(self.file) or (Path(self.file) if self.file and Path(self.file).is_file() else None)
        if path is None:
            raise InputError(f"the plan was priced with hardware profile '{self.name}' from {self.file or '(no file)'}, "
                             "which cannot be found", source=source, field="hardware.file",
                             fix="pass --hardware PATH naming that profile (or another one, to re-price the plan)")
        profile = HardwareProfile.load(path)
        if self.digest and profile.digest() != self.digest:
            raise InputError(f"hardware profile {self.file} changed since the plan was made (digest "
                             f"{profile.digest()}, the plan's {self.digest})", source=source, field="hardware.digest",
                             fix="pass --hardware PATH to price the plan with a profile anyway, or re-plan")
        return profile

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "digest": self.digest, "measured": self.measured}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "HardwareRef":
        f = Fields(data, source, "hardware.")
        return cls(f.str("name"), f.str("file"), f.str("digest"), f.bool("measured"))


def _link_dict(link: Link) -> dict[str, Any]:
    return {"name": link.name, "bytes_per_s": link.bandwidth.to_dict(), "latency_s": link.latency.to_dict()}


def _prov(f: Fields) -> Provenance:
    source = f.str("source", choices=SOURCES)
    ref = f.str("ref", "")
    run = f.str("run", "")
    if source == "datasheet" and not ref:
        raise f.fail("ref", "a datasheet figure needs its reference", "add ref: <URL or document>")
    if source == "measured" and not run:
        raise f.fail("run", "a measured figure needs the run that measured it", "add run: <run id>")
    return Provenance(source, ref, run)


def _quantity(f: Fields, key: str, positive: bool = True) -> Quantity:
    q = f.sub(key)
    return Quantity(q.float("value", positive=positive, minimum=None if positive else 0.0), _prov(q))


def _curve(data: Any, source: str, index: int) -> Curve:
    f = Fields(data, source, f"curves[{index}].")
    x = f.numbers("x", positive=True)
    y = f.numbers("y", positive=True)
    if len(x) < 1 or len(x) != len(y):
        raise f.fail("y", f"x and y must be non-empty and of equal length ({len(x)} vs {len(y)})")
    if any(b <= a for a, b in zip(x, x[1:])):
        raise f.fail("x", "must be strictly increasing")
    y_min = tuple(f.numbers("y_min", [], positive=True))
    y_max = tuple(f.numbers("y_max", [], positive=True))
    if (y_min or y_max) and not (len(y_min) == len(y_max) == len(y)):
        raise f.fail("y_min", "y_min and y_max must match y in length")
    key = f.raw("key", {})
    if not isinstance(key, dict):
        raise f.fail("key", "expected a mapping")
    kind = f.str("kind", choices=CURVE_KINDS)
    missing = [k for k in CURVE_REQUIRED_KEYS.get(kind, ()) if k not in key]
    if missing:
        raise f.fail("key", f"a {kind} curve needs key entries {', '.join(missing)}")
    return Curve(kind, key, tuple(x), tuple(y), _prov(f), y_min, y_max)


def _correction(data: Any, source: str, index: int) -> Correction:
    f = Fields(data, source, f"corrections[{index}].")
    target = f.str("target", choices=CORRECTION_TARGETS)
    key = f.raw("key")
    if not isinstance(key, dict):
        raise f.fail("key", "expected a mapping")
    prov = _prov(f)
    if not prov.measured:
        raise f.fail("source", "a correction is fitted on measurements", "use source: measured")
    common = {"target": target, "key": key, "prov": prov, "observations": f.int("observations", minimum=1),
              "residual": f.float("residual", minimum=0.0, positive=False)}
    if target == "expert_compute" and f.has("terms"):
        t = f.sub("terms")
        terms = ExpertTerms(*(t.float(k, minimum=0.0, positive=False) for k in
                              ("scale", "per_pass_s", "per_slot_s", "fixed_s")),
                            tile_rows=t.int("tile_rows", minimum=1))
        if not any(terms.to_dict()[k] > 0 for k in ("scale", "per_pass_s", "per_slot_s", "fixed_s")):
            raise f.fail("terms", "every term is 0: the corrected time would be 0", "re-run moeplan calibrate")
        return Correction(**common, terms=terms)
    if target == "expert_compute":
        x = f.numbers("x", positive=True)
        factor = f.numbers("factor", positive=True)
        if not x or len(x) != len(factor):
            raise f.fail("factor", f"x and factor must be non-empty and of equal length ({len(x)} vs {len(factor)})")
        if any(b <= a for a, b in zip(x, x[1:])):
            raise f.fail("x", "must be strictly increasing")
        return Correction(**common, x=tuple(x), factor=tuple(factor))
    return Correction(**common, scale=f.float("scale", positive=True),
                      offset_per_layer_s=f.float("offset_per_layer_s", positive=False, minimum=None))


def _parse_profile(data: Any, source: str) -> HardwareProfile:
    f = Fields(data, source)
    version = f.int("schema_version", minimum=1)
    if version > SCHEMA_VERSION:
        raise f.fail("schema_version", f"written by a newer moeplan (schema {version})", "upgrade moeplan")
    dev = f.sub("device")
    flops = dev.sub("matmul_flops")
    if not flops.has("bf16"):
        raise flops.fail("bf16", "missing", "give the dense bf16 matmul rate")
    device = DeviceSpec(
        name=dev.str("name"), vendor=dev.str("vendor"), backend=dev.str("backend", choices=("nccl", "hccl", "rccl", "gloo")),
        memory=_quantity(dev, "memory_bytes"),
        matmul_flops={k: _quantity(flops, k) for k in flops.data},
        hbm_bandwidth=_quantity(dev, "hbm_bytes_per_s"), h2d_bandwidth=_quantity(dev, "h2d_bytes_per_s"),
        d2h_bandwidth=_quantity(dev, "d2h_bytes_per_s"), launch_overhead=_quantity(dev, "launch_overhead_s"),
    )
    cl = f.sub("cluster")
    links = f.sub("links")
    def link(name: str) -> Link:
        l = links.sub(name)
        return Link(l.str("name"), _quantity(l, "bytes_per_s"), _quantity(l, "latency_s", positive=False))
    runs = f.raw("runs", {})
    if not isinstance(runs, dict):
        raise f.fail("runs", "expected a mapping of run id to its record")
    curves = tuple(_curve(c, source, i) for i, c in enumerate(f.list("curves", [])))
    prof = HardwareProfile(
        name=f.str("name"), description=f.str("description", ""), device=device,
        devices_per_node=cl.int("devices_per_node", minimum=1), nodes=cl.int("nodes", 1, minimum=1),
        intra_node=link("intra_node"), inter_node=link("inter_node"), curves=curves, runs=runs,
        source_file=source, corrections=tuple(_correction(c, source, i) for i, c in enumerate(f.list("corrections", []))),
    )
    return prof.validate()


def merge_profiles(base: HardwareProfile, update: HardwareProfile) -> HardwareProfile:
    """Fold ``update``'s measurements into ``base``: its measured curves replace curves of the same
    kind and key, its measured scalars replace base's, and both profiles' runs are kept. Base's
    corrections are dropped (they were fitted against the figures this merge replaces: run
    ``moeplan calibrate`` again); ``update``'s are kept."""
    def newer(a: Quantity, b: Quantity) -> Quantity:
        return b if b.prov.measured else a
    d, u = base.device, update.device
    device = replace(
        d, memory=newer(d.memory, u.memory),
        matmul_flops={k: newer(d.matmul_flops.get(k, q), q) for k, q in {**d.matmul_flops, **u.matmul_flops}.items()},
        hbm_bandwidth=newer(d.hbm_bandwidth, u.hbm_bandwidth), h2d_bandwidth=newer(d.h2d_bandwidth, u.h2d_bandwidth),
        d2h_bandwidth=newer(d.d2h_bandwidth, u.d2h_bandwidth), launch_overhead=newer(d.launch_overhead, u.launch_overhead),
    )
    replaced = [(c.kind, _key_id(c.key)) for c in update.curves if c.prov.measured]
    kept = [c for c in base.curves if (c.kind, _key_id(c.key)) not in replaced]
    def link(a: Link, b: Link) -> Link:
        return Link(a.name, newer(a.bandwidth, b.bandwidth), newer(a.latency, b.latency))
    return replace(base, device=device, curves=tuple(kept) + tuple(c for c in update.curves if c.prov.measured),
                   runs={**base.runs, **update.runs}, corrections=update.corrections,
                   intra_node=link(base.intra_node, update.intra_node),
                   inter_node=link(base.inter_node, update.inter_node)).validate()


def _key_id(key: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in key.items()))


def fraction_of_peak(measured: float, peak: float) -> float:
    """measured / peak, or NaN when the peak is unknown."""
    return measured / peak if peak > 0 else math.nan
