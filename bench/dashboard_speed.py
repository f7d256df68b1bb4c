"""How long a what-if takes in the dashboard after a slider moves.

Drives the real app with Streamlit's AppTest (the script runs exactly as in a browser session,
with the same caches): DeepSeek-V3 on 32 H100s, skewed synthetic traffic (8,192 tokens, Zipf 1.2),
the default heuristic solvers (contiguous, EPLB, LPT) on the Placement what-if page. After one
warm-up run it moves each slider to values never seen before (so nothing is cached) and times
the rerun until the page is complete: the comparison table, breakdown, heatmaps and layer map.

    python bench/dashboard_speed.py            # prints one row per slider move, then the medians
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as the dashboard's app.py does, before numpy loads

from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
PLACEMENT = str(APP.parent / "pages" / "placement.py")


def launcher(folder: Path) -> Path:
    """A main script outside ``dashboard/`` that runs app.py: AppTest re-detects a ``pages/``
    folder beside its main script on every run and would then skip app.py's set-up panel."""
    path = folder / "launch_dashboard.py"
    path.write_text(f"import runpy\nrunpy.run_path({str(APP)!r}, run_name='__main__')\n")
    return path


def timed(at: AppTest) -> float:
    start = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - start
    if at.exception or at.error:
        raise RuntimeError(f"the page failed: {[e.value for e in at.exception] + [e.value for e in at.error]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zipf", type=float, default=1.2, help="Zipf skew of the synthetic traffic.")
    parser.add_argument("--gpus", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        at = AppTest.from_file(str(launcher(Path(tmp))), default_timeout=600)
        at.run()
        at.number_input(key="gpus").set_value(args.gpus)
        at.slider(key="zipf").set_value(args.zipf)
        at.switch_page(PLACEMENT)
        warm = timed(at)
        slots = int(at.session_state["slots"])
        top = int(at.slider(key="slots").max)
        moves = [("expert slots per GPU", "slots", s) for s in (slots + 1, slots + 2, slots + 3) if s <= top]
        moves += [("tokens per GPU per step", "tokens_per_device", t) for t in (512, 1024)]
        moves += [("MoE layer of the expert map", "map_layer", layer) for layer in (5, 17, 40)]
        rows = []
        for label, key, value in moves:
            widget = at.slider(key=key) if key != "tokens_per_device" else at.select_slider(key=key)
            widget.set_value(value)
            rows.append((label, value, timed(at)))
        at.slider(key="zipf").set_value(args.zipf + 0.1)
        rows.append(("Zipf skew (new trace)", args.zipf + 0.1, timed(at)))
    print(f"DeepSeek-V3, {args.gpus} GPUs, 8,192 tokens, Zipf {args.zipf}, solvers contiguous + EPLB + LPT")
    print(f"first full run (synthesis, statistics, problem, 3 solves): {warm:.2f} s")
    print(f"{'slider':32} {'value':>8} {'seconds':>8}")
    for label, value, seconds in rows:
        print(f"{label:32} {value:>8} {seconds:>8.2f}")
    for label in dict.fromkeys(r[0] for r in rows):
        times = [r[2] for r in rows if r[0] == label]
        print(f"median, {label}: {statistics.median(times):.2f} s")


if __name__ == "__main__":
    main()
