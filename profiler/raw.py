"""The raw measurements of one profiler run (what ``--json`` writes): every measured point with
its repeats, the run record, the datasheet figures of the base profile (for fraction-of-peak) and
what was skipped and why. No torch here: bench/profile_table.py reads it on any machine.

Rates in a point's dict: ``flops_per_s`` and ``bytes_per_s`` from the median time; collectives add
``algbw`` (bytes / s, nccl-tests' "size" over time) and ``busbw`` (algbw × the op's bus factor).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeplan.hardware import HardwareProfile
from moeplan.io import Fields, guarded_load, read_json, write_json

RAW_FORMAT = "moeplan-profile-raw/1"


@dataclass
class Measurement:
    """One measured point. kind: matmul | copy | launch | expert_ffn | attention_prefill |
    attention_decode | host_copy | collective; key: the profile curve it belongs to ({} for a scalar
    figure); params: everything that rebuilds the op; x: its size (n, bytes, tokens, sequence);
    samples_s: seconds of each timed repeat; work: flops / bytes / bus_factor of one run; impl: the
    implementation that ran."""

    kind: str
    key: dict[str, Any]
    params: dict[str, Any]
    x: float
    samples_s: tuple[float, ...]
    work: dict[str, float] = field(default_factory=dict)
    impl: str = ""

    @property
    def median(self) -> float:
        return float(np.median(self.samples_s))

    @property
    def min(self) -> float:
        return float(min(self.samples_s))

    @property
    def max(self) -> float:
        return float(max(self.samples_s))

    def rates(self) -> dict[str, float]:
        """Per-second rates from the median time."""
        t = self.median
        out: dict[str, float] = {}
        if "flops" in self.work:
            out["flops_per_s"] = self.work["flops"] / t
        if "bytes" in self.work:
            out["bytes_per_s"] = self.work["bytes"] / t
        if self.kind == "collective":
            out["algbw"] = self.x / t
            out["busbw"] = self.x / t * self.work.get("bus_factor", 1.0)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "params": self.params, "x": self.x, "median_s": self.median,
                "min_s": self.min, "max_s": self.max, "repeats": len(self.samples_s), **self.rates(),
                "work": self.work, "impl": self.impl, "samples_s": list(self.samples_s)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str, index: int) -> Measurement:
        f = Fields(d, source, f"measurements[{index}].")
        samples = f.numbers("samples_s", positive=True)
        if not samples:
            raise f.fail("samples_s", "no samples")
        return cls(f.str("kind"), dict(f.raw("key", {})), dict(f.raw("params", {})), f.float("x", positive=True),
                   tuple(samples), {k: float(v) for k, v in f.raw("work", {}).items()}, f.str("impl", ""))


@dataclass
class RawProfile:
    """All measurements of one run, the run record (``run_id`` → ``run``), the base profile's name
    and datasheet figures, and what was skipped (``{"what", "why"}`` entries)."""

    run_id: str
    run: dict[str, Any]
    base: str
    datasheet: dict[str, float]
    measurements: list[Measurement] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[Measurement]:
        return [m for m in self.measurements if m.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {"format": RAW_FORMAT, "run_id": self.run_id, "run": self.run, "base": self.base,
                "datasheet": self.datasheet, "skipped": self.skipped,
                "measurements": [m.to_dict() for m in self.measurements]}

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RawProfile:
        src = str(path)

        def build() -> RawProfile:
            f = Fields(read_json(path), src)
            if f.str("format", "") != RAW_FORMAT:
                raise f.fail("format", f"not a moeplan profiler JSON (expected format {RAW_FORMAT})",
                             "give the file written by 'moeplan profile --json'")
            return cls(f.str("run_id"), dict(f.raw("run")), f.str("base"),
                       {k: float(v) for k, v in f.raw("datasheet", {}).items()},
                       [Measurement.from_dict(m, src, i) for i, m in enumerate(f.list("measurements"))],
                       list(f.list("skipped", [])))
        return guarded_load(build, src)


def datasheet_figures(profile: HardwareProfile) -> dict[str, float]:
    """The base profile's figures that measurements are compared with (FLOP/s, bytes/s)."""
    d = profile.device
    out = {f"matmul_{k}": q.value for k, q in d.matmul_flops.items()}
    out.update(hbm=d.hbm_bandwidth.value, h2d=d.h2d_bandwidth.value, d2h=d.d2h_bandwidth.value,
               intra_node=profile.intra_node.bandwidth.value, inter_node=profile.inter_node.bandwidth.value)
    return out
