"""Markdown tables of the runtime GPU bench (bench/gpu_runtime.py's JSON) for bench/RESULTS.md.

Usage: python bench/runtime_table.py bench/results/gpu/h100-runtime.json
"""
from __future__ import annotations

import json
import sys


def main() -> None:
    d = json.load(open(sys.argv[1]))
    print("| shape | traffic | devices | batch (tokens/device) | kernel | contiguous straggler ms | balanced straggler ms "
          "| cut measured | cut predicted | cut in tokens |")
    print("| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in d["replay"]:
        c, b = r["contiguous"], r["balanced"]
        print(f"| {r['model']} | {r['traffic']} | {r['devices']} | {r['batch']} ({r['tokens_per_device']}) | {r['kernel']} "
              f"| {1e3 * c['straggler_measured_s']:.2f} | {1e3 * b['straggler_measured_s']:.2f} | {r['cut_measured']:.2f}× "
              f"| {r['cut_predicted']:.2f}× | {r['cut_tokens']:.2f}× |")
    print("\n| layer stack, every expert local | kernel | layers × tokens | measured total ms | predicted total ms |")
    print("| --- | --- | --- | ---: | ---: |")
    for s in d["stack"]:
        print(f"| {s['model']} | {s['kernel']} ({s['impl']}) | {len(s['layers'])} × {s['tokens']} "
              f"| {1e3 * s['total_median_s']:.2f} | {1e3 * s['predicted_total_s']:.2f} |")
    print("\n| expert move through pinned host memory | MiB | D2H ms | H2D ms | H2D GB/s | predicted H2D ms | intact |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for m in d["host_moves"]:
        print(f"| {m['model']} | {m['expert_bytes'] / 2**20:.1f} | {1e3 * m['d2h_median_s']:.3f} | {1e3 * m['h2d_median_s']:.3f} "
              f"| {m['h2d_bytes_per_s'] / 1e9:.1f} | {1e3 * m['predicted_h2d_s']:.3f} | {m['intact']} |")


if __name__ == "__main__":
    main()
