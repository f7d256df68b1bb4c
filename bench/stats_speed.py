"""Time TraceStats and the simulator on a 1M-token DeepSeek-V3-shaped trace (58 MoE layers, top-8).

Usage: python bench/stats_speed.py [tokens] [--only synth]   → prints a table, writes
bench/results/stats_speed.json (``--only synth``: only the synthesis and the anchor, written to
bench/results/synth_speed.json). The synthesis and anchor rows also give CPU seconds
(``time.process_time``), steadier than wall time on a shared host.

The anchor is a plain ``np.bincount`` over every choice of the same trace, measured in the same run:
the floor for any statistic that has to look at each choice once. Peak memory is the process's
maximum resident set (``ru_maxrss``).
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from moeplan.cost import CostModel
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.plan import contiguous_placement
from moeplan.simulate import Workload, simulate
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize


def timed(fn):  # noqa: ANN001, ANN201 - tiny bench helper
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    args = [a for a in sys.argv[1:] if a not in ("--only", "synth")]
    only_synth = "--only" in sys.argv[1:]
    tokens = int(args[0]) if args else 1_000_000
    model = ModelSpec.preset("deepseek-v3")
    cpu0 = time.process_time()
    trace, t_synth = timed(lambda: synthesize(model, SyntheticTraffic(tokens=tokens, seed=1)))
    cpu = {"synthesise trace": time.process_time() - cpu0}
    synth_peak = _peak_gib()
    rows = {"synthesise trace": t_synth}
    flat = trace.expert_ids.reshape(-1)
    cpu0 = time.process_time()
    _, rows["anchor: one np.bincount over all choices"] = timed(
        lambda: sum(np.bincount(flat[i:i + (1 << 26)], minlength=model.num_experts)
                    for i in range(0, flat.size, 1 << 26)))
    cpu["anchor: one np.bincount over all choices"] = time.process_time() - cpu0
    if only_synth:
        for name, secs in rows.items():
            print(f"| {name} | {secs:.2f} s wall | {cpu[name]:.2f} s CPU |")
        print(f"peak resident memory after synthesis: {synth_peak:.2f} GiB")
        (Path(__file__).parent / "results" / "synth_speed.json").write_text(json.dumps(
            {"tokens": tokens, "seconds": rows, "cpu_seconds": cpu, "peak_rss_gib_synthesis": synth_peak}, indent=1))
        return
    st = TraceStats.of(trace)
    _, rows["load [58×256]"] = timed(lambda: st.load)
    _, rows["co-activation, all 58 layers"] = timed(lambda: [st.coactivation(layer) for layer in range(trace.num_layers)])
    _, rows["transitions, all 57 layer pairs"] = timed(lambda: st.all_transition_counts)
    _, rows["SRP + SCH (segment 16)"] = timed(lambda: (st.srp(16), st.sch(16)))
    _, rows["full summary (load, affinity, SRP, SCH)"] = timed(lambda: TraceStats.of(trace).summary())
    hw = HardwareProfile.resolve("h100-sxm").with_cluster(devices=32)
    placement = contiguous_placement(model.num_moe_layers, model.num_experts, 32, 8, 9)
    _, rows["simulate, prefill 4096 tok/device"] = timed(lambda: simulate(CostModel(model, hw), placement, trace))
    _, rows["simulate, decode 128 tok/device"] = timed(
        lambda: simulate(CostModel(model, hw), placement, trace, Workload("decode", 128, 4096)))
    print(f"| step ({tokens:,} tokens × 58 layers × top-8) | seconds |\n| --- | ---: |")
    for name, secs in rows.items():
        print(f"| {name} | {secs:.2f} |")
    print("CPU seconds: " + ", ".join(f"{name} {secs:.2f}" for name, secs in cpu.items()))
    peak = _peak_gib()
    print(f"peak resident memory: {synth_peak:.2f} GiB after synthesis, {peak:.2f} GiB after everything")
    out = Path(__file__).parent / "results" / "stats_speed.json"
    out.write_text(json.dumps({"tokens": tokens, "seconds": rows, "cpu_seconds": cpu, "peak_rss_gib_synthesis": synth_peak,
                               "peak_rss_gib": peak}, indent=1))


def _peak_gib() -> float:
    """The process's peak resident memory so far, GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    main()
