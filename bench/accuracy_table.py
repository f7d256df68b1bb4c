"""Cost-model accuracy from the GPU per-device replay (bench/gpu_runtime.py's JSON).

For every configuration (model shape, traffic, devices, batch size, kernel, placement) it sums
each device's measured and predicted expert compute over the replayed layers and reports the
per-device errors and the straggler's (the max over devices) error; then the median and worst
over all configurations.

Usage: python bench/accuracy_table.py bench/results/gpu/h100-runtime.json  → markdown on stdout
"""
from __future__ import annotations

import json
import statistics
import sys

import numpy as np


def main() -> None:
    data = json.load(open(sys.argv[1]))
    rows, straggler_err, device_err = [], [], []
    for r in data["replay"]:
        for placement in ("contiguous", "balanced"):
            p = r[placement]
            measured = np.array([[t["median_s"] for t in row] for row in p["replay"]["times"]]).sum(axis=0)
            predicted = np.array(p["predicted_s"]).sum(axis=0)
            err = (predicted - measured) / measured
            s_err = (predicted.max() - measured.max()) / measured.max()
            straggler_err.append(abs(s_err))
            device_err.extend(np.abs(err).tolist())
            rows.append((r["model"], r["traffic"], r["devices"], f"{r['batch']} ({r['tokens_per_device']})", r["kernel"],
                         placement, 1e3 * measured.max(), 1e3 * predicted.max(), 100 * s_err,
                         100 * float(np.median(np.abs(err))), 100 * float(np.abs(err).max())))
    print("| shape | traffic | devices | batch (tokens/device) | kernel | placement | straggler measured ms | "
          "straggler predicted ms | straggler error | median device error | worst device error |")
    print("| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(str(v) if isinstance(v, (str, int)) else f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
                                 for v in row[:8]) + f" | {row[8]:+.1f}% | {row[9]:.1f}% | {row[10]:.1f}% |")
    print(f"\n{len(rows)} configurations: straggler |error| median {100 * statistics.median(straggler_err):.1f}%, "
          f"worst {100 * max(straggler_err):.1f}%; per-device |error| median {100 * statistics.median(device_err):.1f}%, "
          f"worst {100 * max(device_err):.1f}% ({len(device_err)} devices)")


if __name__ == "__main__":
    main()
