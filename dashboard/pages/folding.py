"""Parallel folding: every valid attention (TP × CP × DP × PP) / MoE (ETP × EP × EDP) mapping of the
set-up's model and cluster, ranked by the cost model (:mod:`moeplan.solvers.folding`), with the
chosen mapping's step-time breakdown, memory and Megatron-Core arguments."""
from __future__ import annotations

import pandas as pd
import streamlit as st
from moeplan.solvers.folding.solve import PART_NAMES, Ranked

from moeplan.cli.common import human_bytes
from moeplan.parallel_step import TrainStep
from moeplan.dashboard import charts, compute, views
from moeplan.dashboard.keys import FoldingChoice
from moeplan.dashboard.views import fact
from moeplan.export.megatron import megatron_args
from moeplan.plan import Plan

MICRO_BATCHES = ("searched", 1, 2, 4, 8)

setup = views.require_setup(__file__)
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
d.selectbox("Micro-batch", MICRO_BATCHES, key="fold_mbs", disabled=not training,
            help="Training: searched 1, 2, 4 and 8. Serving prices one prompt per prefill (moeplan.serving).")
e.toggle("TP comm overlap", key="fold_overlap", disabled=not training,
         help="Training: TP collectives overlap the GEMMs (Megatron's --tp-comm-overlap).")

mbs = st.session_state.fold_mbs
choice = FoldingChoice(setup, st.session_state.fold_mode, int(st.session_state.fold_seq),
                       int(st.session_state.fold_batch), None if mbs == "searched" or not training else int(mbs),
                       bool(st.session_state.fold_overlap) and training)
with views.guarded():
    result = compute.folding(choice)
problem = result.problem
counts = result.counts

rows = []
for i, r in enumerate(result.ranked):
    t = r.candidate.mapping
    row = {"#": i + 1, "attention TP·CP·DP·PP": f"{t.tp}·{t.cp}·{t.dp}·{t.pp}",
           "MoE ETP·EP·EDP": f"{t.etp}·{t.ep}·{t.edp}"}
    if isinstance(r.result, TrainStep):
        row.update({"step (ms)": views.ms(r.score), "MFU": r.result.mfu,
                    "memory (GiB)": views.gib(r.result.memory.peak), "why it loses": r.reason or "best",
                    "VPP": t.vpp, "micro-batch": r.candidate.micro_batch, "recompute": r.candidate.recompute})
    else:
        row.update({"TPOT (ms)": views.ms(r.result.tpot), "decode tokens/s": r.result.decode_tokens_per_s,
                    "memory (GiB)": views.gib(r.result.memory.peak), "why it loses": r.reason or "best",
                    "TTFT (ms)": views.ms(r.result.ttft), "KV capacity (tokens)": r.result.kv_capacity_tokens})
    row["EP over nodes"] = r.result.spans["ep"].nodes
    rows.append(row)
table = pd.DataFrame(rows).set_index("#")


def groups(r: Ranked) -> str:
    """The mapping's parallel groups larger than 1, e.g. "TP2 DP16 · EP32"."""
    t = r.candidate.mapping
    attention = " ".join(f"{n}{v}" for n, v in (("TP", t.tp), ("CP", t.cp), ("DP", t.dp), ("PP", t.pp)) if v > 1)
    moe = " ".join(f"{n}{v}" for n, v in (("ETP", t.etp), ("EP", t.ep), ("EDP", t.edp)) if v > 1)
    return f"{attention or 'one GPU'} · {moe or 'one GPU'}"


best = result.best
m = st.columns([2, 1, 1, 1])
fact(m[0], "Best mapping", groups(best), f"micro-batch {best.candidate.micro_batch}"
     + (", recompute" if best.candidate.recompute else ""))
if training:
    fact(m[1], "Step time", f"{views.ms(best.score):,.0f} ms", f"MFU {100 * best.result.mfu:.1f}%")
else:
    fact(m[1], "Time per output token", f"{views.ms(best.result.tpot):.2f} ms",
         f"{best.result.decode_tokens_per_s:,.0f} tokens/s")
fact(m[2], "Memory per GPU", human_bytes(best.result.memory.peak), f"of {human_bytes(best.result.memory.capacity)}")
fact(m[3], "Candidates priced", f"{counts['priced']:,}",
     f"{counts['valid_layouts']:,} valid layouts of {counts['raw_layouts']:,}, {result.seconds:.2f} s")

st.subheader("Mappings ranked")
number = st.column_config.NumberColumn
st.dataframe(table, key="folding_table", column_config={
    "step (ms)": number(format="%.1f"), "MFU": number(format="percent"), "TPOT (ms)": number(format="%.3f"),
    "decode tokens/s": number(format="%.0f"), "TTFT (ms)": number(format="%.1f"),
    "KV capacity (tokens)": number(format="%.0f"), "memory (GiB)": number(format="%.1f"),
    "why it loses": st.column_config.TextColumn(width="large"),
    "EP over nodes": number(help="nodes the EP all-to-all crosses")})
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
                    key="chart_fold_breakdown")
with right:
    st.subheader("Memory per GPU")
    mem = chosen.result.memory
    stack = {"non-expert weights": views.gib(mem.non_expert_weights),
             "experts (one copy each)": views.gib(float(mem.expert_weights.max())), "KV cache": views.gib(mem.kv_cache),
             "activations": views.gib(mem.activations), "gradients": views.gib(mem.gradients),
             "optimizer": views.gib(mem.optimizer)}
    st.plotly_chart(charts.memory_bar(stack, views.gib(mem.capacity), chosen.fits, "one GPU"), key="chart_fold_memory")
    st.caption(f"{human_bytes(mem.peak)} of {human_bytes(mem.capacity)}"
               + ("" if training else
                  f"; KV cache for {problem.global_batch:,} sequences of {problem.seq_len:,} tokens"))

st.subheader("Megatron-Core arguments")
chosen_plan = Plan(model=problem.model, hardware=problem.hardware.ref(), devices_per_node=problem.devices_per_node,
                   nodes=problem.hardware.nodes, parallel=problem.parallel(chosen.candidate))
with views.guarded():
    st.code(" ".join(megatron_args(chosen_plan)), language="bash", wrap_lines=True)
st.caption(problem.hardware.provenance_note().capitalize() + ".")
