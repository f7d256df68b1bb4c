"""The headline figures of a profiler run, for the CLI summary and bench/RESULTS.md: matmul rate,
copy bandwidth, launch overhead, host-link bandwidth, expert FFN time at 1/128/4096 tokens for the
Mixtral-8x7B and DeepSeek-V3 expert shapes (loop and grouped), attention prefill/decode time, and
collective bus bandwidth — each with the plain-loop reference (profiler ÷ reference time) where
one was taken and the datasheet figure (fraction of peak: measured rate ÷ datasheet rate; for a
time, the datasheet roofline time ÷ measured time). No torch here.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from moeplan.cost import attention_signature
from moeplan.io import Fields, guarded_load, read_json, write_json
from moeplan.model import ModelSpec
from moeplan.profiler.raw import Measurement, RawProfile

HEADLINE_MODELS = ("mixtral-8x7b", "deepseek-v3")
HEADLINE_TOKENS = (1, 128, 4096)
HEADLINE_LENGTH = 4096
REFERENCE_FORMAT = "moeplan-profile-reference/1"
TIME_UNITS = ("µs", "ms", "µs/launch")


def point_id(kind: str, params: dict[str, Any], x: float) -> str:
    """Identity of a measured point across the profiler and reference JSONs."""
    keep = {k: v for k, v in params.items() if k not in ("models", "expert_of")}
    return f"{kind}|{sorted((k, str(v)) for k, v in keep.items())}|{float(x):g}"


@dataclass(frozen=True)
class Figure:
    """One headline row. value/unit: the figure as shown; median_s: the profiler's median time;
    reference_s: the plain loop's median time (NaN if not taken); datasheet: the compared figure as
    text; fraction: of datasheet peak (NaN when there is none)."""

    name: str
    value: float
    unit: str
    median_s: float
    reference_s: float
    datasheet: str
    fraction: float
    point: Measurement

    @property
    def ratio(self) -> float:
        """profiler time ÷ plain-loop time (1.0 = the same)."""
        return self.median_s / self.reference_s if self.reference_s > 0 else math.nan

    @property
    def reference_value(self) -> float:
        """The figure as the plain loop measured it, in ``unit`` (NaN if not taken)."""
        if self.unit in TIME_UNITS:
            return self.value / self.ratio
        return self.value * self.ratio


@dataclass
class Reference:
    """Plain-loop median times by :func:`point_id` (written by moeplan.profiler.reference)."""

    times: dict[str, float]
    run_id: str

    def save(self, path: str | os.PathLike[str], raw: RawProfile) -> None:
        points = [m for m in raw.measurements if point_id(m.kind, m.params, m.x) in self.times]
        write_json(path, {"format": REFERENCE_FORMAT, "run_id": self.run_id, "figures": [
            {"kind": m.kind, "params": m.params, "x": m.x, "reference_median_s": self.times[point_id(m.kind, m.params, m.x)],
             "profiler_median_s": m.median} for m in points]})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Reference:
        src = str(path)

        def build() -> Reference:
            f = Fields(read_json(path), src)
            if f.str("format", "") != REFERENCE_FORMAT:
                raise f.fail("format", f"not a plain-loop reference JSON (expected {REFERENCE_FORMAT})",
                             "give the file written by 'python -m moeplan.profiler.reference'")
            times = {}
            for i, d in enumerate(f.list("figures")):
                g = Fields(d, src, f"figures[{i}].")
                times[point_id(g.str("kind"), dict(g.raw("params")), g.float("x"))] = g.float("reference_median_s",
                                                                                            positive=True)
            return cls(times, f.str("run_id", ""))
        return guarded_load(build, src)


def headline_points(raw: RawProfile) -> list[Measurement]:
    """The measured points the headline shows (what the plain-loop reference re-times)."""
    return [f.point for f in figures(raw, None) if f.point.kind != "collective"]


def figures(raw: RawProfile, reference: Reference | None) -> list[Figure]:
    """All headline rows of a run, in reading order."""
    ds = raw.datasheet
    out: list[Figure] = []

    def add(name: str, m: Measurement, value: float, unit: str, datasheet: str, fraction: float) -> None:
        ref = reference.times.get(point_id(m.kind, m.params, m.x), math.nan) if reference else math.nan
        out.append(Figure(name, value, unit, m.median, ref, datasheet, fraction, m))

    for m in raw.of_kind("matmul"):
        peak = ds.get(f"matmul_{m.params['dtype']}", math.nan)
        rate = m.rates()["flops_per_s"]
        add(f"matmul {m.params['dtype']} {int(m.x)}³", m, rate / 1e12, "TFLOP/s", f"{peak / 1e12:.0f} TFLOP/s",
            rate / peak)
    for m in raw.of_kind("copy"):
        rate = m.rates()["bytes_per_s"]
        add(f"HBM copy {m.x / 2**20:.0f} MiB (read + write)", m, rate / 1e12, "TB/s", f"{ds['hbm'] / 1e12:.2f} TB/s",
            rate / ds["hbm"])
    for m in raw.of_kind("launch"):
        add("launch overhead", m, m.median / m.work["launches"] * 1e6, "µs/launch", "–", math.nan)
    host = raw.of_kind("host_copy")
    for direction in ("h2d", "d2h"):
        for memory in ("pinned", "pageable"):
            mine = [m for m in host if m.params["direction"] == direction and m.params["memory"] == memory]
            if mine:
                m = max(mine, key=lambda p: p.x)
                rate = m.rates()["bytes_per_s"]
                add(f"{direction.upper()} {memory} {m.x / 2**20:.0f} MiB", m, rate / 1e9, "GB/s",
                    f"{ds[direction] / 1e9:.0f} GB/s", rate / ds[direction])
    for m in host:
        if m.params.get("expert_of") and m.params["direction"] == "h2d" and m.params["memory"] == "pinned":
            peak = m.x / ds["h2d"]
            add(f"move one {'/'.join(m.params['expert_of'])} expert ({m.x / 2**20:.1f} MiB) H2D pinned", m,
                m.median * 1e3, "ms", f"{peak * 1e3:.3g} ms at datasheet", peak / m.median)
    _expert_rows(raw, add)
    _attention_rows(raw, add)
    _collective_rows(raw, add)
    return out


def _peak_time(m: Measurement, ds: dict[str, float]) -> float:
    """Datasheet roofline time of a point: max(FLOPs / bf16 peak, bytes / HBM)."""
    return max(m.work.get("flops", 0.0) / ds["matmul_bf16"], m.work.get("bytes", 0.0) / ds["hbm"])


def _nearest(points: list[Measurement], targets: tuple[int, ...]) -> list[Measurement]:
    out: list[Measurement] = []
    for t in targets:
        best = min(points, key=lambda p: abs(math.log(p.x / t)))
        if best not in out:
            out.append(best)
    return out


def _wanted(keys: set[Any], presets: list[Any]) -> list[Any]:
    """The headline models' entries among ``keys`` (all keys when none of them was measured)."""
    hits = [k for k in presets if k in keys]
    return hits or sorted(keys, key=str)


def _expert_rows(raw: RawProfile, add: Any) -> None:
    ds = raw.datasheet
    pts = raw.of_kind("expert_ffn")
    shapes = {(m.key["hidden"], m.key["ffn"]) for m in pts}
    presets = [(s.hidden_size, s.expert_ffn) for s in (ModelSpec.preset(n) for n in HEADLINE_MODELS)]
    for h, f in _wanted(shapes, presets):
        mine = [m for m in pts if (m.key["hidden"], m.key["ffn"]) == (h, f)]
        top_g = max((int(m.key.get("experts", 1)) for m in mine if m.key["kernel"] == "grouped"), default=0)
        for kernel, g in (("loop", 1), ("grouped", top_g)):
            series = [m for m in mine if m.key["kernel"] == kernel and (kernel == "loop" or m.key["experts"] == g)]
            if not series:
                continue
            label = _models_label(series[0])
            for m in _nearest(series, HEADLINE_TOKENS):
                peak = _peak_time(m, ds)
                what = "loop" if kernel == "loop" else f"grouped ×{g}"
                add(f"expert {label} {h}×{f} {what} @ {int(m.x)} tok", m, m.median * 1e6, "µs",
                    f"{peak * 1e6:.3g} µs roofline", peak / m.median)


def _attention_rows(raw: RawProfile, add: Any) -> None:
    ds = raw.datasheet
    presets = [attention_signature(ModelSpec.preset(n)) for n in HEADLINE_MODELS]
    for kind in ("attention_prefill", "attention_train", "attention_decode"):
        pts = raw.of_kind(kind)
        for sig in _wanted({m.key["signature"] for m in pts}, presets):
            series = [m for m in pts if m.key["signature"] == sig]
            for m in _nearest(series, (HEADLINE_LENGTH,)):
                peak = _peak_time(m, ds)
                phase = kind.split("_")[1]
                add(f"{phase} {_models_label(m)} ×{m.key['batch']} @ {int(m.x)}", m, m.median * 1e6, "µs",
                    f"{peak * 1e6:.3g} µs roofline", peak / m.median)


def _collective_rows(raw: RawProfile, add: Any) -> None:
    ds = raw.datasheet
    pts = raw.of_kind("collective")
    for scope in ("intra_node", "inter_node"):
        for op in dict.fromkeys(m.key["op"] for m in pts if m.key["scope"] == scope):
            series = [m for m in pts if m.key["scope"] == scope and m.key["op"] == op]
            top = max(m.x for m in series)
            at_top = [m for m in series if m.x == top]
            m = min(at_top, key=lambda p: p.rates()["busbw"])          # the slowest pair for send_recv
            bw = m.rates()["busbw"]
            pair = f" (slowest of {len(at_top)} pairs)" if len(at_top) > 1 else ""
            add(f"{op} {scope} ×{m.key['ranks']} {top / 2**20:.0f} MiB busbw{pair}", m, bw / 1e9, "GB/s",
                f"{ds[scope] / 1e9:.0f} GB/s", bw / ds[scope])


def _models_label(m: Measurement) -> str:
    models = m.params.get("models") or []
    return "/".join(models[:2]) if models else ""


def markdown(raw: RawProfile, reference: Reference | None) -> str:
    """The headline as a markdown table (bench/RESULTS.md)."""
    run = raw.run
    title = (f"**{run.get('gpu', '?')}** — run `{raw.run_id}`, {run.get('tool', '')}, torch {run.get('torch', '?')}, "
             f"CUDA {run.get('cuda', '–')}, driver {run.get('driver', '–')}, {run.get('gpu_count', 1)} device(s), "
             f"base profile `{raw.base}`")
    lines = [title, "",
             "| figure | measured | plain loop | profiler ÷ loop time | datasheet | of peak |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for f in figures(raw, reference):
        loop = "–" if math.isnan(f.ratio) else f"{f.reference_value:.4g} {f.unit}"
        ratio = "–" if math.isnan(f.ratio) else f"{f.ratio:.3f}"
        frac = "–" if math.isnan(f.fraction) else f"{f.fraction:.0%}"
        lines.append(f"| {f.name} | {f.value:.4g} {f.unit} | {loop} | {ratio} | {f.datasheet} | {frac} |")
    if raw.skipped:
        lines += ["", "Skipped: " + "; ".join(f"{s['what']} ({s['why']})" for s in raw.skipped)]
    return "\n".join(lines) + "\n"
