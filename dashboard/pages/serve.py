"""Serving deployments: every attention TP × DP / MoE TP × EP split of the set-up's GPUs at a
range of concurrencies, priced by :mod:`moeplan.serving` (the same search as ``moeplan plan
serve``, :mod:`moeplan.serve_search`), with the Pareto front of output tokens/s per GPU vs TPOT."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from moeplan.dashboard import compute, views
from moeplan.precision import FORMAT_BYTES, Precision
from moeplan.serve_search import launch_command, pareto, search
from moeplan.serving import BACKENDS

CONCURRENCIES = [1, 4, 8, 16, 32, 64, 128, 256]

setup = views.require_setup(__file__)
st.title("Serving deployments")
st.caption(views.title_line(setup) + ": aggregated serving; TTFT and TPOT from moeplan's serving model "
           "(fitted on aiconfigurator-core's H100/B200 silicon rows, judged on H200: bench/RESULTS.md).")
a, b, c, d = st.columns(4)
backend = a.selectbox("Backend", BACKENDS, key="serve_backend")
isl = b.number_input("Prompt tokens (ISL)", min_value=1, value=1024, step=256, key="serve_isl")
osl = c.number_input("Output tokens (OSL)", min_value=1, value=1024, step=256, key="serve_osl")
fmt = d.selectbox("Weights", [f for f in FORMAT_BYTES if f not in ("fp16", "mxfp4")], index=1, key="serve_fmt")
e, f = st.columns(2)
ttft_ms = e.number_input("TTFT target (ms)", min_value=1.0, value=2000.0, key="serve_ttft")
tpot_ms = f.number_input("TPOT target (ms)", min_value=0.1, value=50.0, key="serve_tpot")

with views.guarded():
    cost = compute.cost_model(setup)
    found = search(cost, Precision(fmt, fmt, "bf16" if fmt == "bf16" else "fp8"), backend, setup.gpus, int(isl),
                   int(osl), CONCURRENCIES, ttft_ms / 1e3, tpot_ms / 1e3)
if not found:
    st.warning(f"No deployment on {setup.gpus} GPUs meets TTFT ≤ {ttft_ms:.0f} ms and TPOT ≤ {tpot_ms:.1f} ms.")
    st.stop()
front = pareto(found)
rows = pd.DataFrame([{"layout": x.layout.label(), "concurrency": x.concurrency, "TTFT (ms)": x.point.ttft * 1e3,
                      "TPOT (ms)": x.point.tpot * 1e3, "tok/s/GPU": x.point.tokens_per_s_per_gpu,
                      "front": x in front} for x in found])
fig = go.Figure()
for on_front, name in ((False, "meets the targets"), (True, "Pareto front")):
    part = rows[rows["front"] == on_front]
    fig.add_trace(go.Scatter(x=part["TPOT (ms)"], y=part["tok/s/GPU"], mode="markers+lines" if on_front else "markers",
                             name=name, text=part["layout"] + " · c" + part["concurrency"].astype(str)))
fig.update_layout(xaxis_title="TPOT (ms)", yaxis_title="output tokens/s per GPU", height=420,
                  margin=dict(l=10, r=10, t=30, b=10))
st.plotly_chart(fig, key="chart_serve_pareto")
st.dataframe(rows[rows["front"]].drop(columns="front").sort_values("TPOT (ms)"), key="serve_front", hide_index=True)
best = front[-1]
st.markdown(f"Highest throughput: **{best.layout.label()}** at concurrency {best.concurrency}")
st.code(launch_command(backend, setup.model.preset or "MODEL", best.layout), language="bash")
