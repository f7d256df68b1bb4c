"""A plain-loop reference for the profiler's headline figures.

It rebuilds each headline op from the profiler's raw JSON (the same op code, see
:func:`moeplan.profiler.ops.build_op`) and times it the way a hand-written benchmark would: one set
of fresh random inputs, a few warm-ups, then a loop of ``start.record(); op; end.record();
synchronize`` — no input rotation, no adaptive repeats, no barriers. The report shows
profiler time ÷ plain-loop time per figure (the target is within 10%).

    python -m moeplan.profiler.reference PROFILE.json --out REFERENCE.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from moeplan.errors import InputError
from moeplan.profiler.device import Accelerator
from moeplan.profiler.headline import Reference, headline_points, point_id
from moeplan.profiler.ops import build_op
from moeplan.profiler.raw import RawProfile
from moeplan.profiler.timing import Op

WARMUP = 3
WARMUP_S = 0.1       # and at least this long, so the clocks are up
REPEATS = 20


def plain_median(acc: Accelerator, op: Op, repeats: int = REPEATS) -> float:
    """Median seconds of ``op`` over ``repeats`` runs on one input set, after at least WARMUP runs
    and WARMUP_S seconds of warm-up."""
    inputs = op.make()
    t0 = time.perf_counter()
    done = 0
    while done < WARMUP or time.perf_counter() - t0 < WARMUP_S:
        op.run(inputs)
        acc.synchronize()
        done += 1
    times = []
    for _ in range(repeats):
        if acc.module is None:
            t0 = time.perf_counter()
            op.run(inputs)
            times.append(time.perf_counter() - t0)
            continue
        start, end = acc.module.Event(enable_timing=True), acc.module.Event(enable_timing=True)
        start.record()
        op.run(inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def reference_times(raw: RawProfile, acc: Accelerator, repeats: int = REPEATS) -> tuple[Reference, list[str]]:
    """Plain-loop times of the run's headline points; also the points that failed, with why."""
    times: dict[str, float] = {}
    failed = []
    for m in headline_points(raw):
        try:
            times[point_id(m.kind, m.params, m.x)] = plain_median(acc, build_op(acc, m.kind, m.params, m.x), repeats)
        except RuntimeError as exc:
            failed.append(f"{m.kind} {m.x:g}: {str(exc).splitlines()[0][:200]}")
        acc.empty_cache()
    return Reference(times, raw.run_id), failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeplan.profiler.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile_json", help="raw measurements written by 'moeplan profile --json'")
    parser.add_argument("--out", required=True, help="reference JSON to write")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per figure")
    args = parser.parse_args(argv)
    try:
        raw = RawProfile.load(args.profile_json)
        acc = Accelerator.detect()
        if raw.run.get("gpu") != acc.name():
            print(f"warning: profile measured on {raw.run.get('gpu')}, this is {acc.name()}", file=sys.stderr)
        ref, failed = reference_times(raw, acc, args.repeats)
        ref.save(args.out, raw)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    print(f"plain-loop reference of {len(ref.times)} figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
