"""Cache sizing: one GPU keeps a cache of experts per MoE layer and fetches the rest from host
memory (:mod:`moeplan.solvers.cache`) — hit rate and throughput against each layer's cache size,
the memory it frees, and the planned sizes."""
from __future__ import annotations

import pandas as pd
import streamlit as st
from moeplan.solvers.cache import POLICIES

from moeplan.cli.common import human_bytes
from moeplan.dashboard import charts, compute, views
from moeplan.dashboard.keys import CacheChoice
from moeplan.dashboard.views import fact

POLICY_LABELS = {"lru": "LRU", "lfu": "LFU", "belady": "Belady (offline bound)", "prefetch": "LRU + prefetch"}

setup = views.require_setup(__file__)
st.title("Expert cache sizing")
with views.guarded():
    spec = compute.model_spec(setup.model)
    gpu = compute.profile(setup.hardware)
st.caption(f"{spec.name} on one {gpu.device.name} ({setup.hardware}): each MoE layer keeps some experts on the GPU; "
           f"a miss copies the expert over the host link. {gpu.provenance_note().capitalize()}.")

a, b, c, d, e = st.columns(5)
a.selectbox("Policy", POLICIES, key="cache_policy", format_func=POLICY_LABELS.get,
            help="Belady knows the future: an upper bound on what any policy can hit.")
b.segmented_control("Phase", ("decode", "prefill"), key="cache_phase")
c.number_input("Sequences per step" if st.session_state.cache_phase != "prefill" else "Tokens per chunk",
               min_value=1, max_value=65536, key="cache_batch")
d.number_input("Context (tokens)", min_value=1, max_value=1_048_576, step=1024, key="cache_context",
               help="KV-cache tokens per sequence: memory taken from the cache, and attention time.")
e.number_input("GPU memory budget (GiB, 0 = 90% of the GPU)", min_value=0.0, max_value=4096.0, step=1.0,
               key="cache_budget")

choice = CacheChoice(setup, st.session_state.cache_policy, st.session_state.cache_phase or "decode",
                     int(st.session_state.cache_batch), int(st.session_state.cache_context),
                     float(st.session_state.cache_budget) * 2**30 if st.session_state.cache_budget else None)
with views.guarded():
    sizing = compute.cache_sizing(choice)
    table = compute.cache_view(choice)
summary = sizing.summary()
expert_gib = views.gib(sizing.budget.expert_bytes)

m = st.columns(4)
fact(m[0], "Predicted throughput", f"{summary['tokens_per_s']:,.1f} tokens/s",
     f"{summary['speedup_vs_lru_uniform']:.2f}× LRU with uniform sizes")
fact(m[1], "Memory freed", human_bytes(summary["memory_saved_bytes"]),
     f"{100 * summary['memory_saved_fraction']:.0f}% of all experts' {human_bytes(sizing.budget.all_experts)}")
fact(m[2], "Hit rate", f"{summary['hit_rate']:.3f}", f"{summary['cached_experts']:,} experts cached")
fact(m[3], "Knee", f"{summary['knee_slots']:,} experts", f"{human_bytes(summary['knee_bytes'])}: more pays little")

st.subheader("Throughput against cache memory")
st.plotly_chart(charts.cache_throughput(table["curve_tokens_per_s"], expert_gib, summary["cached_experts"],
                                        summary["knee_slots"]), key="chart_cache_curve")

st.subheader("One layer")
st.session_state.cache_layer = min(int(st.session_state.cache_layer), spec.num_moe_layers - 1)
st.slider("MoE layer", 0, spec.num_moe_layers - 1, key="cache_layer", format=f"%d of {spec.num_moe_layers}")
layer = int(st.session_state.cache_layer)
rows = [r for r in table["rows"] if r["layer"] == layer]
st.caption(f"Decoder layer {spec.moe_layers[layer]}: hit rate and predicted throughput with this layer's cache at "
           "each size and every other layer's as planned; hover for the memory each size frees.")
st.plotly_chart(charts.cache_layer(rows, expert_gib), key="chart_cache_layer")

st.subheader("Planned cache per layer")
st.plotly_chart(charts.cache_sizes(sizing.sizes.tolist(), spec.moe_layers, spec.num_experts), key="chart_cache_sizes")

st.subheader("Policies at the same total cache")
evaluations = pd.DataFrame([ev.to_dict(sizing.budget.expert_bytes) for ev in sizing.evaluations])
number = st.column_config.NumberColumn
st.dataframe(evaluations[["name", "policy", "cached_experts", "hit_rate", "transfers_per_step", "tokens_per_s"]]
             .set_index("name"), key="cache_policies", column_config={
                 "name": "configuration", "cached_experts": number("experts cached"),
                 "hit_rate": number("hit rate", format="%.3f"),
                 "transfers_per_step": number("experts copied per step", format="%.1f"),
                 "tokens_per_s": number("tokens/s", format="%.2f")})
with st.expander("Notes"):
    for note in sizing.notes:
        st.markdown(f"- {note}")
