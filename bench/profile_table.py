"""Markdown table of a profiler run's headline figures, for bench/RESULTS.md.

    python bench/profile_table.py PROFILE.json [--reference REFERENCE.json]

PROFILE.json: the raw measurements of ``moeplan profile --json``; REFERENCE.json: the plain-loop
times of ``python -m moeplan.profiler.reference`` (adds the profiler ÷ plain-loop column). Each row
also shows the base profile's datasheet figure and the fraction of it reached (for times: datasheet
roofline time ÷ measured time). Needs no torch.
"""
from __future__ import annotations

import argparse
import sys

from moeplan.errors import InputError
from moeplan.profiler.headline import Reference, markdown
from moeplan.profiler.raw import RawProfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile_json", help="raw measurements (moeplan profile --json)")
    parser.add_argument("--reference", help="plain-loop reference (python -m moeplan.profiler.reference)")
    args = parser.parse_args(argv)
    try:
        raw = RawProfile.load(args.profile_json)
        ref = Reference.load(args.reference) if args.reference else None
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ref is not None and ref.run_id != raw.run_id:
        print(f"warning: reference is for run {ref.run_id}, profile is run {raw.run_id}", file=sys.stderr)
    sys.stdout.write(markdown(raw, ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
