"""Trace: expert popularity per layer, the inter-layer affinity of a chosen layer pair, and local
routing consistency (SRP/SCH), from :class:`moeplan.stats.TraceStats`."""
from __future__ import annotations

import numpy as np
import streamlit as st

from moeplan.dashboard import charts, compute, views
from moeplan.dashboard.views import fact

SEGMENTS = (4, 8, 16, 32, 64, 128, 256)

setup = views.require_setup(__file__)
st.title("Routing trace")
with views.guarded():
    spec = compute.model_spec(setup.model)
    trace = compute.trace(setup.model, setup.traffic)
    stats = compute.trace_stats(setup.model, setup.traffic)
st.caption(f"{trace.num_tokens:,} tokens × {trace.num_layers} MoE layers × top-{trace.top_k} of {trace.num_experts} "
           f"experts ({trace.provenance.get('source', '?')}) for {spec.name}")

st.subheader("Expert popularity per layer")
imbalance = stats.imbalance()
a, b, c = st.columns(3)
fact(a, "Hottest expert ÷ mean", f"{imbalance.mean():.2f}", "mean over layers")
fact(b, "Worst layer", f"{imbalance.max():.2f}", f"decoder layer {spec.moe_layers[int(imbalance.argmax())]}")
fact(c, "Coldest expert ÷ mean", f"{(stats.load.min(axis=1) / stats.load.mean(axis=1)).mean():.2f}",
     "mean over layers")
st.toggle("Sort each layer's experts from hottest to coldest", key="sort_popularity")
st.plotly_chart(charts.popularity(stats.load_share, spec.moe_layers, bool(st.session_state.sort_popularity)),
                key="chart_popularity")

if trace.num_layers > 1:
    st.subheader("Inter-layer affinity")
    st.session_state.affinity_layer = min(int(st.session_state.affinity_layer), trace.num_layers - 2)
    st.slider("MoE layer (→ the next one)", 0, trace.num_layers - 2, key="affinity_layer",
              help="Where the tokens of each expert at this layer go at the next MoE layer.")
    layer = int(st.session_state.affinity_layer)
    src, dst = spec.moe_layers[layer], spec.moe_layers[layer + 1]
    prob = compute.transitions(setup.model, setup.traffic, layer)
    a, b, c = st.columns([2, 2, 3])
    fact(a, "Top-1 tokens following the likeliest successor", f"{stats.affinity_strength()[layer]:.3f}",
         f"independent layers: {1 / spec.num_experts:.3f}")
    fact(b, "Strongest P(next | expert)", f"{prob.max():.3f}", f"decoder layer {src} → {dst}")
    c.radio("Show", ("probability", "lift"), key="affinity_view", horizontal=True,
            format_func={"lift": "lift over popularity", "probability": "P(next | expert)"}.get,
            help="P(next | expert) is dominated by the next layer's hot experts; dividing by their popularity "
                 "(P(next)) shows which experts tokens follow beyond that (1 = no affinity).")
    lift = st.session_state.affinity_view == "lift"
    popularity = np.broadcast_to(stats.load_share[layer + 1], prob.shape)
    shown = np.divide(prob, popularity, out=np.zeros_like(prob), where=popularity > 0) if lift else prob
    st.plotly_chart(charts.affinity(shown, src, dst, lift), key="chart_affinity")

st.subheader("Local routing consistency")
st.caption("SRP: best F1 with which one fixed expert set per segment of tokens predicts the segment's routing. "
           "SCH: hit rate of an oracle cache holding each segment's most used experts (Liang et al., "
           "arXiv 2505.16056).")
st.session_state.setdefault("cache_experts", min(2 * spec.top_k, spec.num_experts))
st.session_state.cache_experts = min(int(st.session_state.cache_experts), spec.num_experts)
a, b = st.columns(2)
a.select_slider("Segment (tokens)", SEGMENTS, key="segment_len")
b.number_input("Cache size (experts)", min_value=1, max_value=spec.num_experts, key="cache_experts")
cache = int(st.session_state.cache_experts)
srp, sch = compute.consistency(setup.model, setup.traffic, int(st.session_state.segment_len), cache)
fact(a, "SRP", f"{srp:.3f}", f"{st.session_state.segment_len}-token segments")
fact(b, "SCH", f"{sch:.3f}", f"cache of {cache} experts")
curve = [compute.consistency(setup.model, setup.traffic, s, cache) for s in SEGMENTS]
st.plotly_chart(charts.consistency_curve(SEGMENTS, [c[0] for c in curve], [c[1] for c in curve]),
                key="chart_consistency")
