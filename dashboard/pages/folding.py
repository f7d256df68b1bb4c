"""Parallel folding: every valid attention (TP × CP × DP × PP) / MoE (ETP × EP × EDP) mapping of the
set-up's model and cluster, ranked by the cost model (:mod:`moeplan.solvers.folding`), with the
chosen mapping's step-time breakdown, memory and Megatron-Core arguments."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
from moeplan.solvers.folding.solve import PART_NAMES

from moeplan.cli.common import human_bytes
from moeplan.cost import TrainStep
from moeplan.dashboard import charts, compute, views
from moeplan.dashboard.compute import FoldingChoice
from moeplan.export.megatron import megatron_args
from moeplan.plan import Plan

MICRO_BATCHES = ("searched", 1, 2, 4, 8)

setup = views.require_setup()
st.title("Parallel folding")
st.caption(views.title_line(setup))

a, b, c, d, e = st.columns(5)
a.radio("Workload", ("serve", "train"), key="fold_mode", horizontal=True,
        format_func={"serve": "Serving (decode)", "train": "Training"}.get)
training = st.session_state.fold_mode == "train"
b.number_input("Context per request" if not training else "Sequence length", min_value=128, max_value=1_048_576,
               step=1024, key="fold_seq")
c.number_input("Concurrent sequences" if not training else "Global batch (sequences)", min_value=1,
               max_value=1_000_000, step=64, key="fold_batch")
d.selectbox("Micro-batch" if training else "Prompts per prefill step", MICRO_BATCHES, key="fold_mbs",
            help="searched: 1, 2, 4 and 8 in training, 1 in serving.")
e.toggle("TP comm overlap", key="fold_overlap", disabled=not training,
         help="Training: TP collectives overlap the GEMMs (Megatron's --tp-comm-overlap).")

mbs = st.session_state.fold_mbs
choice = FoldingChoice(setup, st.session_state.fold_mode, int(st.session_state.fold_seq),
                       int(st.session_state.fold_batch), None if mbs == "searched" else int(mbs),
                       bool(st.session_state.fold_overlap) and training)
with views.guarded():
    result = compute.folding(choice)
problem = result.problem
counts = result.counts

rows = []
for i, r in enumerate(result.ranked):
    t = r.candidate.mapping
    row = {"#": i + 1, "attention TP·CP·DP·PP": f"{t.tp}·{t.cp}·{t.dp}·{t.pp}", "MoE ETP·EP·EDP": f"{t.etp}·{t.ep}·{t.edp}"}
    if isinstance(r.result, TrainStep):
        row.update({"VPP": t.vpp, "micro-batch": r.candidate.micro_batch, "recompute": r.candidate.recompute,
                    "step (ms)": views.ms(r.score), "MFU": r.result.mfu})
    else:
        row.update({"TPOT (ms)": views.ms(r.result.tpot), "decode tokens/s": r.result.decode_tokens_per_s,
                    "TTFT (ms)": views.ms(r.result.ttft), "KV capacity (tokens)": r.result.kv_capacity_tokens})
    row.update({"memory (GiB)": views.gib(r.result.memory.peak), "EP nodes": r.result.spans["ep"].nodes,
                "why it loses": r.reason or "best"})
    rows.append(row)
table = pd.DataFrame(rows).set_index("#")

best = result.best
m = st.columns(4)
m[0].metric("Best mapping", best.candidate.mapping.label().split(" | ")[0],
            best.candidate.mapping.label().split(" | ")[1], delta_color="off")
if training:
    m[1].metric("Step time", f"{views.ms(best.score):,.0f} ms", f"MFU {100 * best.result.mfu:.1f}%", delta_color="off")
else:
    m[1].metric("Time per output token", f"{views.ms(best.result.tpot):.2f} ms",
                f"{best.result.decode_tokens_per_s:,.0f} tokens/s", delta_color="off")
m[2].metric("Memory per GPU", human_bytes(best.result.memory.peak),
            f"of {human_bytes(best.result.memory.capacity)}", delta_color="off")
m[3].metric("Searched", f"{counts['valid_candidates']:,} candidates",
            f"{counts['valid_layouts']:,} valid layouts of {counts['raw_layouts']:,}, {result.seconds:.2f} s",
            delta_color="off")

st.subheader("Mappings ranked")
number = st.column_config.NumberColumn
st.dataframe(table, key="folding_table", column_config={
    "step (ms)": number(format="%.1f"), "MFU": number(format="percent"), "TPOT (ms)": number(format="%.3f"),
    "decode tokens/s": number(format="%.0f"), "TTFT (ms)": number(format="%.1f"),
    "KV capacity (tokens)": number(format="%.0f"), "memory (GiB)": number(format="%.1f"),
    "why it loses": st.column_config.TextColumn(width="large")})
if result.invalid_examples:
    with st.expander("Why other mappings are invalid"):
        for label, why in result.invalid_examples.items():
            st.markdown(f"- **{label}**: {why}")

labels = [r.candidate.label() for r in result.ranked]
if st.session_state.get("fold_pick") not in labels:
    st.session_state.fold_pick = labels[0]
st.selectbox("Mapping to inspect", labels, key="fold_pick",
             format_func=lambda lab: f"#{labels.index(lab) + 1}  {lab}")
chosen = result.ranked[labels.index(st.session_state.fold_pick)]
left, right = st.columns(2)
with left:
    st.subheader("Step-time breakdown")
    parts = {PART_NAMES.get(k, k): views.ms(v) for k, v in chosen.breakdown.items()}
    st.plotly_chart(charts.step_breakdown(parts, "ms per training step" if training else "ms per decode step"),
                    key="fold_breakdown")
with right:
    st.subheader("Memory per GPU")
    mem = chosen.result.memory
    stack = {"non-expert weights": np.array([views.gib(mem.non_expert_weights)]),
             "experts (one copy each)": np.array([views.gib(float(mem.expert_weights.max()))]),
             "KV cache": np.array([views.gib(mem.kv_cache)]), "activations": np.array([views.gib(mem.activations)]),
             "gradients": np.array([views.gib(mem.gradients)]), "optimizer": np.array([views.gib(mem.optimizer)])}
    st.plotly_chart(charts.memory_stack(stack, views.gib(mem.capacity), chosen.fits), key="fold_memory")

st.subheader("Megatron-Core arguments")
chosen_plan = Plan(model=problem.model, hardware=problem.hardware.name, devices_per_node=problem.devices_per_node,
                   nodes=problem.hardware.nodes, parallel=problem.parallel(chosen.candidate))
with views.guarded():
    st.code(" ".join(megatron_args(chosen_plan)), language="bash", wrap_lines=True)
st.caption(problem.hardware.provenance_note())
