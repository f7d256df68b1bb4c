"""Trace: expert popularity per layer, the inter-layer affinity of a chosen layer pair, and local
routing consistency (SRP/SCH), from :class:`moeplan.stats.TraceStats`."""
from __future__ import annotations

import streamlit as st

from moeplan.dashboard import charts, compute, views

SEGMENTS = (4, 8, 16, 32, 64, 128, 256)

setup = views.require_setup()
st.title("Routing trace")
with views.guarded():
    spec = compute.model_spec(setup.model)
    trace = compute.trace(setup.model, setup.traffic)
    stats = compute.trace_stats(setup.model, setup.traffic)
st.caption(f"{trace.num_tokens:,} tokens × {trace.num_layers} MoE layers × top-{trace.top_k} of {trace.num_experts} "
           f"experts ({trace.provenance.get('source', '?')}) for {spec.name}")

st.subheader("Expert popularity per layer")
sort = st.toggle("Sort each layer's experts from hottest to coldest", value=True, key="sort_popularity")
imbalance = stats.imbalance()
a, b, c = st.columns(3)
a.metric("Hottest expert ÷ mean (mean over layers)", f"{imbalance.mean():.2f}")
b.metric("Worst layer", f"{imbalance.max():.2f}", f"decoder layer {spec.moe_layers[int(imbalance.argmax())]}",
         delta_color="off")
c.metric("Coldest expert ÷ mean (mean over layers)",
         f"{(stats.load.min(axis=1) / stats.load.mean(axis=1)).mean():.2f}")
st.plotly_chart(charts.popularity(stats.load_share, spec.moe_layers, sort), key="popularity")

if trace.num_layers > 1:
    st.subheader("Inter-layer affinity")
    st.slider("Layer pair (MoE layer → the next)", 0, trace.num_layers - 2, key="affinity_layer", value=0,
              format="%d → next")
    layer = int(st.session_state.affinity_layer)
    prob = compute.transitions(setup.model, setup.traffic, layer)
    strength = stats.affinity_strength()
    a, b = st.columns(2)
    a.metric("Top-1 → top-1 following the likeliest successor", f"{strength[layer]:.3f}",
             f"independent layers: {1 / spec.num_experts:.3f}", delta_color="off")
    b.metric("Strongest P(next | expert)", f"{prob.max():.3f}")
    st.plotly_chart(charts.affinity(prob, spec.moe_layers[layer], spec.moe_layers[layer + 1]), key="affinity")

st.subheader("Local routing consistency")
st.caption("SRP: best F1 with which one fixed expert set per segment of tokens predicts the segment's routing. "
           "SCH: hit rate of an oracle cache holding each segment's most used experts (Liang et al., arXiv 2505.16056).")
a, b = st.columns(2)
a.select_slider("Segment (tokens)", SEGMENTS, value=16, key="segment_len")
b.number_input("Cache size (experts)", min_value=1, max_value=spec.num_experts, value=min(2 * spec.top_k,
               spec.num_experts), key="cache_experts")
cache = int(st.session_state.cache_experts)
srp, sch = compute.consistency(setup.model, setup.traffic, int(st.session_state.segment_len), cache)
a.metric("SRP", f"{srp:.3f}")
b.metric("SCH", f"{sch:.3f}")
curve = [compute.consistency(setup.model, setup.traffic, s, cache) for s in SEGMENTS]
st.plotly_chart(charts.consistency_curve(SEGMENTS, [c[0] for c in curve], [c[1] for c in curve]), key="consistency")
