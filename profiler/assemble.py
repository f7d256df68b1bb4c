"""Turn one run's raw measurements into a ``measured`` HardwareProfile: start from the base
profile, replace every figure that was measured (tagged ``source: measured, run: <run id>``), keep
the rest as the base had it, and record the run under ``runs``.

What replaces what:
- ``matmul_flops[bf16|fp8]``: dense matmul rate (FLOP/s); ``hbm_bytes_per_s``: device copy (bytes
  read + written per second); ``launch_overhead_s``: seconds per eager launch; ``memory_bytes``:
  the device's reported total memory;
- ``h2d/d2h_bytes_per_s``: pinned copy rate at the largest size measured;
- ``links.<scope>``: all-to-all bus bandwidth at the largest size, and latency = time at the
  smallest size minus its bytes over that bandwidth (the model ``Link.time`` uses);
- curves ``gemm``, ``expert_ffn``, ``attention_prefill``, ``attention_train``, ``attention_decode``, ``host_copy``, ``collective``:
  one per key, y = median seconds per x with min/max of the repeats (point-to-point: median over
  all measured pairs, min/max over every pair's repeats).

The base's calibration corrections are dropped: they were fitted against the figures a new run
replaces (``moeplan calibrate`` fits them again).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any

import numpy as np

from moeplan.hardware import Curve, HardwareProfile, Link, Provenance, Quantity
from moeplan.profiler.raw import Measurement, RawProfile

CURVE_KINDS = ("gemm", "expert_ffn", "moe_routing", "attention_prefill", "attention_train", "attention_decode", "host_copy",
               "collective")


def measured_profile(base: HardwareProfile, raw: RawProfile) -> HardwareProfile:
    """``base`` with everything ``raw`` measured replaced (see the module docstring)."""
    def prov(ref: str) -> Provenance:
        return Provenance("measured", ref, raw.run_id)

    d = base.device
    flops = dict(d.matmul_flops)
    for m in raw.of_kind("matmul"):
        n = int(m.x)
        flops[m.params["dtype"]] = Quantity(m.rates()["flops_per_s"], prov(
            f"{n}x{n}x{n} {m.params['dtype']} matmul on random data, median of {len(m.samples_s)} ({m.impl})"))
    device = replace(d, matmul_flops=flops, backend=str(raw.run.get("backend", d.backend)))
    for m in raw.of_kind("copy"):
        device = replace(device, hbm_bandwidth=Quantity(m.rates()["bytes_per_s"], prov(
            f"device copy of {m.x / 2**20:.0f} MiB, bytes read + written, median of {len(m.samples_s)}")))
    for m in raw.of_kind("launch"):
        device = replace(device, launch_overhead=Quantity(m.median / m.work["launches"], prov(
            f"{int(m.work['launches'])} back-to-back one-element kernels between device events")))
    if raw.run.get("device_memory_bytes"):
        device = replace(device, memory=Quantity(float(raw.run["device_memory_bytes"]),
                                                 prov("total memory the device reports")))
    for direction in ("h2d", "d2h"):
        pinned = [m for m in raw.of_kind("host_copy") if m.key == {"direction": direction, "memory": "pinned"}]
        if pinned:
            top = max(pinned, key=lambda m: m.x)
            q = Quantity(top.rates()["bytes_per_s"], prov(f"pinned {direction} copy of {top.x / 2**20:.0f} MiB"))
            device = replace(device, h2d_bandwidth=q) if direction == "h2d" else replace(device, d2h_bandwidth=q)
    curves = tuple(_curves(raw, prov))
    links = {scope: _link(getattr(base, scope), raw, scope, prov) for scope in ("intra_node", "inter_node")}
    runs = {**base.runs, raw.run_id: raw.run}
    return replace(base, device=device, curves=_replace_curves(base.curves, curves), runs=runs, corrections=(),
                   intra_node=links["intra_node"], inter_node=links["inter_node"]).validate()


def _curves(raw: RawProfile, prov: Any) -> list[Curve]:
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[Measurement]] = defaultdict(list)
    for m in raw.measurements:
        if m.kind in CURVE_KINDS:
            groups[(m.kind, _key_id(m.key))].append(m)
    out = []
    for (kind, _), ms in groups.items():
        by_x: dict[float, list[Measurement]] = defaultdict(list)
        for m in ms:
            by_x[m.x].append(m)
        xs = sorted(by_x)
        y = [float(np.median([m.median for m in by_x[x]])) for x in xs]
        y_min = [min(m.min for m in by_x[x]) for x in xs]
        y_max = [max(m.max for m in by_x[x]) for x in xs]
        first = ms[0]
        out.append(Curve(kind, dict(first.key), tuple(xs), tuple(y), prov(_curve_ref(first, len(by_x[xs[0]]))),
                         tuple(y_min), tuple(y_max)))
    return out


def _curve_ref(m: Measurement, instances: int) -> str:
    """What a curve measured, in a sentence."""
    models = m.params.get("models")
    text = m.impl
    if models:
        text += f"; shape of {', '.join(models)}"
    if m.kind == "collective":
        text += f"; x = bytes per rank (nccl-tests size), busbw factor {m.work.get('bus_factor', 1.0):.3g}"
        if instances > 1:
            text += f"; median over {instances} rank pairs"
    if m.kind in ("attention_prefill", "attention_train", "attention_decode"):
        text += f"; batch {m.params.get('batch')}"
    return text + "; median of repeats, min/max kept"


def _link(link: Link, raw: RawProfile, scope: str, prov: Any) -> Link:
    a2a = sorted((m for m in raw.of_kind("collective") if m.key.get("op") == "all_to_all"
                  and m.key.get("scope") == scope), key=lambda m: m.x)
    if not a2a:
        return link
    top, low = a2a[-1], a2a[0]
    bw = top.rates()["busbw"]
    factor = top.work.get("bus_factor", 1.0)
    latency = max(low.median - low.x * factor / bw, 0.0)
    ranks = top.key.get("ranks")
    return Link(link.name,
                Quantity(bw, prov(f"all_to_all busbw at {top.x / 2**20:.0f} MiB per rank over {ranks} ranks")),
                Quantity(latency, prov(f"all_to_all time at {low.x / 2**10:.0f} KiB minus its bytes at that bandwidth")))


def _replace_curves(old: tuple[Curve, ...], new: tuple[Curve, ...]) -> tuple[Curve, ...]:
    fresh = {(c.kind, _key_id(c.key)) for c in new}
    return tuple(c for c in old if (c.kind, _key_id(c.key)) not in fresh) + new


def _key_id(key: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in key.items()))
