"""The placement page's "Plan from recorded loads" panel: SGLang recorder dumps or moeplan load
files (uploaded, or paths on the dashboard's machine), read as ``moeplan plan placement --load``
reads them, planned by the same pipeline (:func:`moeplan.dashboard.compute.loads_plan`), and every
balancedness shown under the dispatch model of the runtime that will serve the plan, with DeepSeek's
EPLB fitted on the same loads beside it."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from moeplan.dashboard import compute, uploads, views
from moeplan.dashboard.keys import LoadFile, LoadsKey, Setup
from moeplan.dashboard.views import fact
from moeplan.plan import Plan
from moeplan.solvers.placement.options import ROBUST_MODES

DISPATCH = {"sglang-static": "SGLang (static dispatch)", "even": "EPLB / vLLM (equal split)"}


def files() -> tuple[LoadFile, ...]:
    """The uploaded files and the paths typed, in that order."""
    uploaded = st.session_state.get("loads_upload") or []
    out = [LoadFile(upload=uploads.register(f.name, f.getvalue()), name=f.name) for f in uploaded]
    paths = [line.strip() for line in str(st.session_state.loads_paths).splitlines() if line.strip()]
    return tuple(out + [LoadFile(path=p, name=p) for p in paths])


def render(setup: Setup, slots: int, tokens_per_device: int) -> None:
    """The panel (module docstring)."""
    with st.expander("Plan from recorded loads", expanded=bool(st.session_state.loads_paths)):
        st.caption("One workload per file: SGLang's expert-distribution recorder dumps (`stat` .json/.pt, or "
                   "`per_pass`/`per_token` .pt) or `moeplan import` load files — what `moeplan plan placement "
                   "--load` reads. Several workloads make the placement robust across them.")
        a, b = st.columns(2)
        a.file_uploader("Load files", type=["json", "pt"], accept_multiple_files=True, key="loads_upload")
        b.text_area("…or paths on this machine (one per line; a directory = one workload of rank dumps)",
                    key="loads_paths", height=100)
        chosen = files()
        if not chosen:
            st.info("Give load files to plan from them.")
            return
        c, d, e = st.columns(3)
        c.segmented_control("Serving runtime", list(DISPATCH), key="loads_dispatch", format_func=DISPATCH.get,
                            help="The dispatch model the plan is solved and judged under.")
        d.segmented_control("Robust objective", ROBUST_MODES, key="loads_robust",
                            help="With several workloads: minimise the mean or the worst workload's max GPU load.")
        e.checkbox("Leave-one-out", key="loads_loo", disabled=len(chosen) < 2,
                   help="Also plan on all workloads but each one and judge on it (one more solve per workload).")
        state = st.session_state
        key = LoadsKey(setup, chosen, slots, tokens_per_device, state.loads_dispatch or "sglang-static",
                       state.loads_robust or "mean", bool(state.loads_loo) and len(chosen) > 1)
        with views.guarded():
            plan, result = compute.loads_plan(key)
            eplb = compute.loads_eplb(key)
            _show(plan, result.seconds, eplb)


def _show(plan: Plan, seconds: float, eplb: dict[str, float]) -> None:
    predicted = plan.predicted
    dispatch = predicted["dispatch"]
    cols = st.columns(4)
    fact(cols[0], "Mean balancedness", f"{predicted['balancedness']:.4f}", f"fitted, under {dispatch} dispatch")
    fact(cols[1], "Worst workload", f"{predicted['worst_workload_balancedness']:.4f}", "fitted")
    if "leave_one_out_mean" in predicted:
        fact(cols[2], "Leave-one-out mean", f"{predicted['leave_one_out_mean']:.4f}", "each held out")
    fact(cols[3], "Solve", f"{seconds:.1f} s", "equal-split solver")
    rows = []
    for name, value in predicted["workload_balancedness"].items():
        row = {"workload": name, f"moeplan ({dispatch})": value}
        if "leave_one_out_balancedness" in predicted:
            row["moeplan held out"] = predicted["leave_one_out_balancedness"][name]
        row["EPLB global (even)"] = eplb[name]
        rows.append(row)
    st.dataframe(pd.DataFrame(rows).set_index("workload"), key="loads_table")
    realised = ", ".join(f"{k} {v:.4f}" for k, v in predicted["realised_balancedness"].items())
    st.caption(f"Balancedness = Σ layers max GPU load ÷ Σ layers mean, under the runtime's dispatch ({dispatch}). "
               f"On the pooled workloads the same slots balance at: {realised}. EPLB is fitted on the same "
               "(pooled) workloads and judged as its tensors are served: equal split.")
