"""Memory: what each GPU holds under the placement's slot count — weights, replica slots, KV cache,
activations — against its capacity (:meth:`moeplan.cost.CostModel.memory`); a plan that does not
fit is rejected in red with the cost model's own message."""
from __future__ import annotations

import numpy as np
import streamlit as st

from moeplan.cli.common import human_bytes
from moeplan.dashboard import charts, compute, views
from moeplan.dashboard.views import fact
from moeplan.errors import InputError


setup = views.require_setup(__file__)
st.title("Memory per GPU")
st.caption(views.title_line(setup))
with views.guarded():
    spec = compute.model_spec(setup.model)
    hw = compute.hardware(setup.hardware, setup.gpus, setup.nodes)
fewest, default, most = views.placement_slots(setup, upper="experts")

a, b, c = st.columns(3)
a.slider("Expert slots per GPU", fewest, most, key="slots",
         help=f"The placement's slots ({fewest} = every expert once; default {default}). Shared with the placement "
              "what-if, which keeps only counts that fit.")
b.number_input("KV cache per GPU (tokens)", min_value=0, max_value=10_000_000, step=4096, key="kv_tokens",
               help="Tokens of context each GPU keeps cached, e.g. concurrent sequences × context length.")
c.select_slider("Tokens per GPU per step", views.TOKENS_PER_GPU, key="tokens_per_device",
                format_func=lambda t: f"{t:,}", help="Activations of one step's batch.")

problem_key, _ = views.solve_keys(setup)
slots = int(st.session_state.slots)
report = compute.memory(problem_key, slots, float(st.session_state.kv_tokens))
baseline = compute.memory(problem_key, fewest, 0.0)
d = hw.num_devices
parts = {
    "non-expert weights": np.full(d, views.gib(report.non_expert_weights)),
    "experts (one copy each)": views.gib(baseline.expert_weights),
    "replica slots": views.gib(report.expert_weights - baseline.expert_weights),
    "KV cache": np.full(d, views.gib(report.kv_cache)),
    "activations": np.full(d, views.gib(report.activations)),
}

try:
    report.check("this plan")
    free = report.capacity - report.peak
    st.success(f"Fits: the busiest GPU needs {human_bytes(report.peak)} of {human_bytes(report.capacity)}; "
               f"{human_bytes(free)} left, room for {free / spec.kv_cache_bytes_per_token():,.0f} more KV-cache "
               f"tokens per GPU.", icon=":material/check_circle:")
except InputError as exc:
    st.error(f"**Rejected:** {exc.args[0]}.  \nFix: {exc.fix}.", icon=":material/block:")

m = st.columns(5)
fact(m[0], "Capacity", human_bytes(report.capacity), hw.device.memory.prov.source)
fact(m[1], "Busiest GPU", human_bytes(report.peak), f"{100 * report.peak / report.capacity:.0f}% of capacity")
fact(m[2], "Weights", human_bytes(report.non_expert_weights + float(report.expert_weights.max())),
     f"{slots} slots × {spec.num_moe_layers} MoE layers")
fact(m[3], "KV cache", human_bytes(report.kv_cache), f"{human_bytes(spec.kv_cache_bytes_per_token())} per token")
fact(m[4], "Activations", human_bytes(report.activations), f"{problem_key.tokens_per_device:,} tokens per GPU")

st.plotly_chart(charts.memory_stack(parts, views.gib(report.capacity), report.fits), key="chart_memory")
st.caption(f"Every GPU holds {slots} expert slots per MoE layer ({fewest} for one copy of each expert, "
           f"{slots - fewest} for replicas), the non-expert weights (embeddings, attention, shared experts, router), "
           f"its KV cache and one step's activations. {hw.provenance_note().capitalize()}.")
