"""Time TraceStats and the simulator on a 1M-token DeepSeek-V3-shaped trace (58 MoE layers, top-8).

Usage: python bench/stats_speed.py [tokens | trace.npz] [--only synth]   → prints a table, writes
bench/results/stats_speed.json (a saved trace skips synthesis, for timing the statistics again and
again; ``--only synth`` times the synthesis and the anchor alone, into bench/results/synth_speed.json)

The anchor is a plain ``np.bincount`` over every choice of the same trace, measured in the same run:
the floor for any statistic that has to look at each choice once. Peak memory is the process's
maximum resident set (``ru_maxrss``); the summary's forked worker (the SCH beside the numpy work) is
reported apart, its resident set counting the trace pages it shares with the parent. Each row gives wall
and CPU seconds (this process's and its finished children's user + system time: less sensitive to other
processes on a shared host; over the row's wall time, the cores it kept busy). Synthesis and the summary
use ``moeplan.cores.cores()`` cores (at most 4).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from moeplan.cores import cores
from moeplan.cost import CostModel
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.plan import contiguous_placement
from moeplan.simulate import Workload, simulate
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize
from moeplan.trace import RoutingTrace


def timed(fn):  # noqa: ANN001, ANN201 - tiny bench helper
    t0, c0 = time.perf_counter(), _cpu_seconds()
    out = fn()
    return out, (time.perf_counter() - t0, _cpu_seconds() - c0)


def _cpu_seconds() -> float:
    """User + system seconds of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    args = [a for a in sys.argv[1:] if a not in ("--only", "synth")]
    only_synth = "--only" in sys.argv[1:]
    arg = args[0] if args else "1000000"
    model = ModelSpec.preset("deepseek-v3")
    rows = {}
    if arg.endswith(".npz"):
        trace = RoutingTrace.load(arg)
    else:
        trace, rows["synthesise trace"] = timed(lambda: synthesize(model, SyntheticTraffic(tokens=int(arg), seed=1)))
    tokens = trace.num_tokens
    synth_peak = _peak_gib()
    flat = trace.expert_ids.reshape(-1)
    _, rows["anchor: one np.bincount over all choices"] = timed(
        lambda: sum(np.bincount(flat[i:i + (1 << 26)], minlength=model.num_experts)
                    for i in range(0, flat.size, 1 << 26)))
    if only_synth:
        _print(tokens, rows)
        print(f"peak resident memory after synthesis: {synth_peak:.2f} GiB")
        (Path(__file__).parent / "results" / "synth_speed.json").write_text(json.dumps(
            {"tokens": tokens, "cores": cores(), "load_average": os.getloadavg(), "wall_cpu_seconds": rows,
             "peak_rss_gib_synthesis": synth_peak}, indent=1))
        return
    st = TraceStats.of(trace)
    _, rows["load [58×256]"] = timed(lambda: st.load)
    _, rows["co-activation, all 58 layers"] = timed(lambda: [st.coactivation(layer) for layer in range(trace.num_layers)])
    _, rows["transitions, all 57 layer pairs"] = timed(lambda: st.all_transition_counts)
    _, rows["SRP (segment 16, all tokens)"] = timed(lambda: st.srp(16))
    _, rows["SCH (segment 16, first 8192 tokens, as the summary)"] = timed(lambda: st.head_for_sch().sch(16))
    _, rows["full summary (load, affinity, SRP, SCH)"] = timed(lambda: TraceStats.of(trace).summary())
    hw = HardwareProfile.resolve("h100-sxm").with_cluster(devices=32)
    placement = contiguous_placement(model.num_moe_layers, model.num_experts, 32, 8, 9)
    _, rows["simulate, prefill 4096 tok/device"] = timed(lambda: simulate(CostModel(model, hw), placement, trace))
    _, rows["simulate, decode 128 tok/device"] = timed(
        lambda: simulate(CostModel(model, hw), placement, trace, Workload("decode", 128, 4096)))
    _print(tokens, rows)
    peak, worker = _peak_gib(), _peak_gib(resource.RUSAGE_CHILDREN)
    print(f"peak resident memory: {synth_peak:.2f} GiB after synthesis, {peak:.2f} GiB after everything; "
          f"summary worker {worker:.2f} GiB (trace pages shared with this process included)")
    out = Path(__file__).parent / "results" / "stats_speed.json"
    out.write_text(json.dumps({"tokens": tokens, "cores": cores(), "load_average": os.getloadavg(),
                               "wall_cpu_seconds": rows, "peak_rss_gib_synthesis": synth_peak,
                               "peak_rss_gib": peak, "peak_rss_gib_summary_worker": worker}, indent=1))


def _print(tokens: int, rows: dict[str, tuple[float, float]]) -> None:
    """The markdown table of ``rows`` (name → (wall s, CPU s)) with each row's ratio to the anchor."""
    anchor = rows["anchor: one np.bincount over all choices"]
    print(f"| step ({tokens:,} tokens × 58 layers × top-8) | wall s | CPU s | × anchor (wall) | × anchor (CPU) |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for name, (wall, cpu) in rows.items():
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {wall / anchor[0]:.1f} | {cpu / anchor[1]:.1f} |")


def _peak_gib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory so far, GiB, of this process (or the largest of its ended children; Linux
    reports ru_maxrss in KiB)."""
    return resource.getrusage(who).ru_maxrss / 2**20


if __name__ == "__main__":
    main()
