"""Elastic scaling: the set-up's deployment under bursty traffic, scaling live between GPU counts
(:mod:`moeplan.solvers.elastic`) against restarts, whole replicas and static provisioning — load,
GPUs and latency over time, SLO attainment and GPU-hours."""
from __future__ import annotations

import streamlit as st
from moeplan.solvers.elastic.autoscale import POLICIES
from moeplan.solvers.elastic.traffic import SHAPES

from moeplan.dashboard import charts, compute, views
from moeplan.dashboard.keys import ElasticChoice

setup = views.require_setup(__file__)
st.title("Elastic scaling")
st.caption(views.title_line(setup) + ": the smallest size below is where the deployment starts; it can grow to the "
           "others as demand rises.")
with views.guarded():
    per = compute.hardware(setup.hardware, setup.gpus, setup.nodes).devices_per_node
options = [setup.gpus + k * per for k in range(9)]
if not st.session_state.get("elastic_sizes") or not set(st.session_state.elastic_sizes) <= set(options):
    st.session_state.elastic_sizes = options[:5]

a, b, c, d = st.columns([4, 2, 2, 1])
a.multiselect("GPU counts the deployment may run at", options, key="elastic_sizes")
b.selectbox("Traffic shape", SHAPES, key="elastic_shape", help="Two hours of bursty demand.")
c.segmented_control("Policy", POLICIES, key="elastic_policy",
                    help="threshold: scale on the last interval's demand; lookahead: knows the demand ahead (an "
                         "upper bound on what forecasting can buy).")
d.number_input("Seed", min_value=0, step=1, key="elastic_seed")
sizes = tuple(sorted(st.session_state.elastic_sizes))
if len(sizes) < 2:
    st.info("Pick at least two GPU counts.")
    st.stop()

choice = ElasticChoice(setup, sizes, st.session_state.elastic_shape, st.session_state.elastic_policy or POLICIES[0],
                       int(st.session_state.elastic_seed))
with views.guarded():
    study = compute.elastic_study(setup, sizes)
    frame, summary = compute.elastic_runs(choice)

st.subheader("SLO attainment and cost")
table = summary.set_index("strategy")[["slo_attainment", "device_hours", "scaling_steps", "scaling_seconds",
                                       "peak_devices"]]
number = st.column_config.NumberColumn
st.dataframe(table, key="elastic_summary", column_config={
    "slo_attainment": number("SLO attainment", format="percent", help="share of tokens served within the SLO"),
    "device_hours": number("GPU-hours", format="%.1f"), "scaling_steps": number("scaling steps"),
    "scaling_seconds": number("time scaling (s)", format="%.0f"), "peak_devices": number("peak GPUs")})
st.plotly_chart(charts.autoscale(frame, study.slo), key="chart_autoscale")
with st.expander("Notes"):
    for note in study.notes:
        st.markdown(f"- {note}")
