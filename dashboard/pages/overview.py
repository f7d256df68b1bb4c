"""Set-up: what the sidebar chose — the model, the hardware and its provenance, the traffic."""
from __future__ import annotations

import streamlit as st

from moeplan.cli.common import human_bytes, human_params
from moeplan.dashboard import compute, views
from moeplan.dashboard.views import fact
from moeplan.export.common import hf_model_path

setup = views.require_setup(__file__)
st.title("MoE deployment what-if")
st.markdown("Pick a model, hardware, cluster and traffic in the sidebar, then compare expert placements, check "
            "memory, read the routing trace and export the plan to your runtime — before touching a cluster.")

with views.guarded():
    spec = compute.model_spec(setup.model)
    hw = compute.hardware(setup.hardware, setup.gpus, setup.nodes)
    trace = compute.trace(setup.model, setup.traffic)
    summary = compute.trace_summary(setup.model, setup.traffic)

model_col, hw_col, traffic_col = st.columns(3, border=True)
with model_col:
    st.subheader(spec.name)
    st.caption(setup.model.upload_name if setup.model.upload else hf_model_path(spec))
    a, b = st.columns(2)
    fact(a, "Parameters", human_params(spec.total_params()), f"{human_params(spec.active_params())} active")
    fact(b, "MoE layers", str(spec.num_moe_layers), f"of {spec.num_layers} layers")
    fact(a, "Experts per layer", str(spec.num_experts),
         f"top-{spec.top_k}" + (f" + {spec.num_shared_experts} shared" if spec.num_shared_experts else ""))
    fact(b, "One expert", human_bytes(spec.expert_bytes()),
         f"{spec.weight_bytes:g} byte{'' if spec.weight_bytes == 1 else 's'} per weight")
    fact(a, "Attention", spec.attention.kind.upper(), f"{spec.attention.num_heads} heads")
    fact(b, "KV cache per token", human_bytes(spec.kv_cache_bytes_per_token()), "all layers")

with hw_col:
    dev = hw.device
    st.subheader(dev.name)
    st.caption(f"{setup.hardware}: {hw.provenance_note()}")
    a, b = st.columns(2)
    fact(a, "GPUs", str(hw.num_devices), f"{hw.nodes} node{'s' if hw.nodes > 1 else ''} × {hw.devices_per_node}")
    fact(b, "Memory per GPU", human_bytes(dev.memory.value), dev.memory.prov.source)
    fact(a, "bf16 TFLOP/s", f"{dev.matmul_flops['bf16'].value / 1e12:,.0f}", dev.matmul_flops["bf16"].prov.source)
    fact(b, "HBM TB/s", f"{dev.hbm_bandwidth.value / 1e12:.2f}", dev.hbm_bandwidth.prov.source)
    fact(a, "Intra-node GB/s", f"{hw.intra_node.bandwidth.value / 1e9:,.0f}", hw.intra_node.bandwidth.prov.source,
         help=hw.intra_node.name)
    fact(b, "Inter-node GB/s", f"{hw.inter_node.bandwidth.value / 1e9:,.0f}", hw.inter_node.bandwidth.prov.source,
         help=hw.inter_node.name)

with traffic_col:
    st.subheader("Traffic")
    st.caption(f"{trace.provenance.get('source', '?')} trace: " + (
        setup.traffic.upload_name if setup.traffic.upload else
        f"Zipf {setup.traffic.zipf:g}, affinity {setup.traffic.affinity:g}, locality {setup.traffic.locality:g}, "
        f"seed {setup.traffic.seed}"))
    a, b = st.columns(2)
    fact(a, "Tokens", f"{trace.num_tokens:,}", f"top-{trace.top_k} of {trace.num_experts}")
    fact(b, "Hottest expert ÷ mean", f"{summary['max_over_mean_load_mean']:.2f}",
         f"worst layer {summary['max_over_mean_load_worst']:.2f}")
    fact(a, "Top-1 affinity", f"{summary['top1_affinity_mean']:.3f}", f"uniform: {1 / trace.num_experts:.3f}",
         help="Share of top-1 → top-1 transitions that go to each expert's most common successor.")
    fact(b, "MoE layers", str(trace.num_layers), f"{trace.num_tokens * trace.num_layers * trace.top_k:,} choices")
    fact(a, "SRP", f"{summary['srp_16']:.3f}", "16-token segments",
         help="Segment routing best performance: the best F1 of one fixed expert set per 16-token segment.")
    fact(b, "SCH", f"{summary['sch_16_2k']:.3f}", f"cache of {2 * trace.top_k} experts",
         help="Segment cache best hit rate: an oracle cache of 2 × top-k experts per 16-token segment.")

st.page_link(views.page("placement"), label="Next: compare expert placements", icon=":material/arrow_forward:")
