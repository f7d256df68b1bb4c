"""Placement what-if: solvers side by side on the same trace — load per GPU and layer, the expert →
GPU map of a layer, balancedness, GPUs/nodes touched, hops, predicted MoE time and its breakdown,
the solver's bound and gap; and a placement planned from recorded loads (:mod:`moeplan.dashboard.recorded`).
Every figure is the library's (:mod:`moeplan.dashboard.compute`)."""
from __future__ import annotations

import time

import pandas as pd
import streamlit as st
from moeplan.solvers.placement.metrics import MAX_TOKENS

from moeplan.dashboard import charts, compute, recorded, views
from moeplan.dashboard.keys import BACKGROUND, SOLVER_HELP, SOLVER_LABELS, SOLVER_NAMES
from moeplan.dashboard.views import fact

METRIC_SAMPLES = (1024, 2048, 4096, 8192, 16384, MAX_TOKENS)
EXECUTION = ("Standard EP", "Context-coherent (ExFlow)")

setup = views.require_setup(__file__)
st.title("Placement what-if")
st.caption(views.title_line(setup))

with views.guarded():
    spec = compute.model_spec(setup.model)
    hw = compute.hardware(setup.hardware, setup.gpus, setup.nodes)
fewest, default, most = views.placement_slots(setup)

left, mid, right = st.columns([5, 3, 3])
left.pills("Solvers", SOLVER_NAMES, selection_mode="multi", key="solvers", format_func=SOLVER_LABELS.get,
           help="\n".join(f"- **{SOLVER_LABELS[s]}**: {SOLVER_HELP[s]}" for s in SOLVER_NAMES)
           + "\n\nExFlow and the ILP run in the background with their progress shown; press Stop (top right) to "
             "stop waiting.")
if fewest < most:
    mid.slider("Expert slots per GPU", fewest, most, key="slots",
               help=f"{fewest} holds every expert once; more slots hold replicas of hot experts (up to what fits in "
                    f"memory: {most}). Default {default}, as `moeplan plan placement`.")
else:
    fact(mid, "Expert slots per GPU", str(fewest), "all that fit in memory")
right.select_slider("Tokens per GPU per step", views.TOKENS_PER_GPU, key="tokens_per_device",
                    format_func=lambda t: f"{t:,}", help="Batch each GPU holds per step: sets the objective's weights, "
                                                         "the activation memory and the simulated step.")
slots = int(st.session_state.slots)
physical = slots * hw.num_devices
mid.caption(f"{slots} × {hw.num_devices} GPUs = {physical:,} physical slots for {spec.num_experts} experts "
            f"({physical - spec.num_experts:,} replicas per layer)")

with st.expander("Solver and prediction settings"):
    a, b, c, d, e = st.columns(5)
    a.segmented_control("Execution", EXECUTION, key="execution",
                        help="How the simulator moves tokens: dispatch from and combine to each token's home GPU, or "
                             "ExFlow's context-coherent execution (a token stays where its last expert ran).")
    b.number_input("ILP time limit (s)", min_value=1, max_value=3600, step=5, key="ilp_time_limit",
                   help="For the whole ILP run, warm start included.")
    c.number_input("Balance cap (max ÷ mean GPU load)", min_value=1.0, max_value=2.0, step=0.01, format="%.2f",
                   key="balance_cap",
                   help="ExFlow and ILP hold each layer's max GPU load to this where replicas allow.")
    d.radio("Token flow between layers", ("top1", "spread"), key="flows",
            help="Where a token is between layers: at its top-1 expert's GPU, or spread over its k experts' GPUs.")
    e.select_slider("Tokens for per-token metrics", METRIC_SAMPLES, key="metric_tokens",
                    format_func=lambda t: f"up to {t:,} (CLI)" if t == MAX_TOKENS else f"{t:,}",
                    help="GPUs/nodes touched and top-1 hops are averaged over this many evenly spaced tokens of the "
                         "trace (balancedness always over all of them). Fewer: faster what-ifs.")

recorded.render(setup, slots, int(st.session_state.tokens_per_device))

problem_key, keys = views.solve_keys(setup)
solvers = list(keys)
if not solvers:
    st.info("Pick at least one solver.")
    st.stop()
exflow = st.session_state.execution == EXECUTION[1]
metric_tokens = int(st.session_state.metric_tokens)

with views.guarded():
    compute.problem(problem_key)
    jobs = {s: compute.job(keys[s]) for s in solvers if s in BACKGROUND}
progress_area = st.container()
ready = [s for s in solvers if s not in jobs or jobs[s].done()]

rows, phases, loads, titles, notes = [], [], {}, {}, {}
with views.guarded(), st.spinner("Solving, measuring and simulating…"):
    for s in ready:
        result = compute.solution(keys[s])
        summary = compute.metrics(keys[s], metric_tokens).summary()
        sim = compute.simulation(keys[s], exflow)
        sim_summary = sim.summary()
        hops = compute.traffic(keys[s])
        label = SOLVER_LABELS[s]
        rows.append({
            "solver": label, "MoE time (ms)": views.ms(sim_summary["moe_seconds"]),
            "balancedness": summary["balancedness"], "worst layer": summary["worst_layer_balancedness"],
            "GPUs touched": summary["devices_touched_per_token_layer"],
            "nodes touched": summary["nodes_touched_per_token_layer"],
            "cross-GPU hops": hops["cross_device_hops_per_token_layer"],
            "objective (ms)": views.ms(result.objective), "bound (ms)": views.ms(result.bound), "gap": result.gap,
            "solve (s)": result.seconds,
        })
        phases.append({"solver": label, "dispatch": views.ms(sim_summary["dispatch_seconds"]),
                       "compute": views.ms(sim_summary["compute_seconds"] - sim_summary["straggler_wait_seconds"]),
                       "straggler wait": views.ms(sim_summary["straggler_wait_seconds"]),
                       "combine": views.ms(sim_summary["combine_seconds"])})
        loads[label] = compute.device_load(keys[s])
        titles[label] = f"<b>{label}</b><br>balancedness {summary['balancedness']:.3f}"
        notes[label] = list(result.notes) + list(summary["notes"]) + list(sim.notes)

if rows:
    table = pd.DataFrame(rows).set_index("solver")
    best = table["MoE time (ms)"].idxmin()
    base = table["MoE time (ms)"].iloc[0]
    fastest = table.loc[best]
    st.session_state.fastest_solver = next(s for s in ready if SOLVER_LABELS[s] == best)
    cols = st.columns(4)
    fact(cols[0], f"Fastest predicted: {best}", f"{fastest['MoE time (ms)']:.2f} ms", "MoE time per step")
    fact(cols[1], "Its balancedness", f"{fastest['balancedness']:.3f}", "max ÷ mean GPU load (1 = even)")
    fact(cols[2], "GPUs touched per token", f"{fastest['GPUs touched']:.2f}",
         f"nodes {fastest['nodes touched']:.2f}, per MoE layer")
    if len(table) > 1:
        cols[3].metric(f"{best} vs {table.index[0]}", f"{fastest['MoE time (ms)'] - base:+.2f} ms",
                       f"{100 * (fastest['MoE time (ms)'] / base - 1):+.1f}%", delta_color="inverse")

    st.subheader("Side by side")
    number = st.column_config.NumberColumn
    st.dataframe(table, key="comparison", column_config={
        "MoE time (ms)": number(format="%.2f", help="predicted MoE time per simulated step, all MoE layers"),
        "balancedness": number(format="%.3f", help="Σ layers max GPU load ÷ Σ layers mean GPU load (1 = even)"),
        "worst layer": number(format="%.3f", help="max ÷ mean GPU load of the worst layer"),
        "GPUs touched": number(format="%.2f", help="distinct GPUs a token's top-k choices reach, per MoE layer"),
        "nodes touched": number(format="%.2f", help="distinct nodes a token's top-k choices reach, per MoE layer"),
        "cross-GPU hops": number(format="%.2f", help="top-k rows per token per layer transition that leave their "
                                                     "GPU (token flow setting)"),
        "objective (ms)": number(format="%.3f", help="the solver's objective per step: compute + inter-layer traffic"),
        "bound (ms)": number(format="%.3f", help="proved lower bound on the objective of any placement"),
        "gap": number(format="percent", help="(objective − bound) ÷ objective"),
        "solve (s)": number(format="%.2f", help="solver wall time"),
    })
    sim_any = compute.simulation(keys[ready[0]], exflow)
    per_gpu = sim_any.tokens / max(sim_any.batches, 1) / hw.num_devices
    st.caption(f"MoE time: moeplan.simulate ({st.session_state.execution or EXECUTION[0]}) replays the trace in "
               f"{sim_any.batches} step{'s' if sim_any.batches > 1 else ''} of {per_gpu:,.0f} tokens per GPU. "
               f"Objective and bound: the solver's cost model at {problem_key.tokens_per_device:,} tokens per GPU. "
               f"{hw.provenance_note().capitalize()}.")
    if per_gpu < problem_key.tokens_per_device:
        st.warning(f"The trace holds {sim_any.tokens:,} tokens, less than one step of "
                   f"{problem_key.tokens_per_device:,} tokens per GPU × {hw.num_devices} GPUs: the simulated step has "
                   f"{per_gpu:,.0f} tokens per GPU. Add tokens in the sidebar or lower the tokens per GPU.",
                   icon=":material/warning:")

    st.subheader("Where the MoE time goes")
    st.plotly_chart(charts.moe_breakdown(phases), key="chart_breakdown")

    st.subheader("Load per GPU and layer")
    st.caption("Each GPU's token-choices ÷ its layer's mean: blue below, red above the mean. A red cell is a "
               "straggler the whole layer waits for; lines separate nodes.")
    st.plotly_chart(charts.load_heatmaps(loads, titles, spec.moe_layers, hw.devices_per_node), key="chart_heatmaps")

    st.subheader("Expert → GPU map of one layer")
    a, b = st.columns([2, 5])
    if st.session_state.get("map_solver") not in ready:
        st.session_state.map_solver = st.session_state.fastest_solver
    a.selectbox("Solver", ready, key="map_solver", format_func=SOLVER_LABELS.get)
    st.session_state.map_layer = min(int(st.session_state.map_layer), spec.num_moe_layers - 1)
    b.slider("MoE layer", 0, spec.num_moe_layers - 1, key="map_layer",
             format=f"%d of {spec.num_moe_layers}",
             help="Index among the MoE layers (the decoder layer is shown in the title).")
    chosen, layer = st.session_state.map_solver, int(st.session_state.map_layer)
    placement = compute.solution(keys[chosen]).placement
    layer_load = compute.trace_stats(setup.model, setup.traffic).load[layer]
    slot_tokens = layer_load[placement.slot_expert[layer]] * placement.replica_share[layer]
    st.plotly_chart(charts.layer_map(placement.slot_expert[layer], slot_tokens, placement.replica_counts()[layer],
                                     f"{SOLVER_LABELS[chosen]}: decoder layer {spec.moe_layers[layer]} "
                                     f"(MoE layer {layer}); * = replicated expert", hw.devices_per_node),
                    key="chart_layer_map")

    with st.expander("Notes: how each number was obtained"):
        for label, lines in notes.items():
            st.markdown(f"**{label}**\n" + "\n".join(f"- {line}" for line in lines))

pending = [s for s in solvers if s not in ready]
if pending:
    with progress_area, st.status(f"Solving {', '.join(SOLVER_LABELS[s] for s in pending)} in the background…",
                                  expanded=True) as status:
        lines = {s: st.empty() for s in pending}
        st.caption("Press Stop (top right) to stop waiting: the solve finishes in the background (the ILP within its "
                   "time limit) and its result appears on the next run.")
        limit = float(st.session_state.ilp_time_limit)
        while not all(jobs[s].done() for s in pending):
            for s in pending:
                elapsed = jobs[s].elapsed()
                if jobs[s].started is None:
                    lines[s].caption(f"{SOLVER_LABELS[s]}: queued behind another background solve")
                elif s == "ilp":
                    lines[s].progress(min(elapsed / limit, 1.0),
                                      text=f"ILP: {elapsed:.0f} s of its {limit:g} s limit (warm start from the best "
                                           "of ExFlow, LPT and EPLB, then one MILP per layer)")
                else:
                    lines[s].caption(f"{SOLVER_LABELS[s]}: {elapsed:.0f} s")
            time.sleep(0.5)
        status.update(label="Done", state="complete")
    st.rerun()
