"""Export: the Plan JSON of a solved placement and its runtime formats — SGLang's expert-location
file and launch command, EPLB tensors, vLLM's launch script, Megatron-Core's arguments — written
by the same exporters as ``moeplan export``."""
from __future__ import annotations

import streamlit as st

from moeplan.cli.common import human_seconds
from moeplan.dashboard import compute, views
from moeplan.dashboard.exports import export
from moeplan.dashboard.keys import BACKGROUND, SOLVER_LABELS
from moeplan.dashboard.uploads import error_text, register, upload_path
from moeplan.dashboard.views import fact
from moeplan.errors import InputError
from moeplan.plan import Plan

RUNTIMES = {"sglang": "SGLang", "eplb": "EPLB (DeepSeek)", "vllm": "vLLM", "megatron": "Megatron-Core"}
MIME = {".json": "application/json", ".sh": "text/x-shellscript"}

setup = views.require_setup(__file__)
st.title("Export the plan")
st.caption(views.title_line(setup))
views.placement_slots(setup)
problem_key, keys = views.solve_keys(setup)
ready = [s for s in keys if s not in BACKGROUND or compute.job(keys[s]).done()]
if not ready:
    st.info("Pick and solve a placement on the Placement what-if page first.")
    st.page_link(views.page("placement"), label="Placement what-if", icon=":material/grid_view:")
    st.stop()
if st.session_state.get("export_solver") not in ready:
    st.session_state.export_solver = st.session_state.get("fastest_solver") if st.session_state.get(
        "fastest_solver") in ready else ready[0]
st.columns([1, 2])[0].selectbox("Placement to export", ready, key="export_solver", format_func=SOLVER_LABELS.get,
             help=f"Solved with {problem_key.slots} expert slots per GPU and {problem_key.tokens_per_device:,} tokens "
                  "per GPU per step on the Placement what-if page.")

with views.guarded():
    plan = compute.plan(keys[st.session_state.export_solver])
p = plan.predicted
cols = st.columns(4)
fact(cols[0], "Balancedness", f"{p['balancedness']:.3f}", "max ÷ mean GPU load")
fact(cols[1], "GPUs touched per token", f"{p['devices_touched_per_token_layer']:.2f}", "per MoE layer")
fact(cols[2], "MoE time, standard EP", human_seconds(p["moe_seconds_ep"]), "predicted per step")
fact(cols[3], "MoE time, ExFlow", human_seconds(p["moe_seconds_exflow"]), "context-coherent execution")

with views.guarded():
    plan_file = export(plan, "plan")
st.download_button("Download plan JSON", plan_file.files["plan.json"], file_name="plan.json",
                   mime="application/json", type="primary", icon=":material/download:", key="download_plan",
                   help="The same file `moeplan plan placement -o plan.json` writes; read it back with "
                        "`moeplan export plan.json --format …` or `moeplan simulate --plan plan.json`.")

for tab, fmt in zip(st.tabs(list(RUNTIMES.values())), RUNTIMES):
    with tab:
        try:
            out = export(plan, fmt)
        except InputError as exc:
            st.warning(f"{RUNTIMES[fmt]} cannot run this plan: {error_text(exc)}", icon=":material/block:")
            continue
        for name, data in out.files.items():
            suffix = name[name.rfind("."):]
            st.download_button(f"Download {name}", data, file_name=name, mime=MIME.get(suffix, "text/plain"),
                               icon=":material/download:", key=f"download_{fmt}_{name}")
        if out.command:
            st.code(out.command, language="bash")
        for note in out.notes:
            st.markdown(f"- {note}")

st.subheader("Price a saved plan")
saved = st.file_uploader("Plan JSON (from `moeplan plan`, `plan placement` or `plan scale`)", type=["json"],
                         key="price_plan_upload",
                         help="Priced with the hardware profile the plan names (checked by its digest), its cluster "
                              "and cost options, on this page's trace — the figures `moeplan compare` prints.")
if saved is not None:
    try:
        saved_plan = Plan.load(upload_path(register(saved.name, saved.getvalue())))
        row = compute.price_plan(saved_plan, compute.trace(setup.model, setup.traffic), problem_key.tokens_per_device)
    except InputError as exc:
        st.error(error_text(exc), icon=":material/error:")
    else:
        ref = saved_plan.hardware
        st.caption(f"{saved_plan.model.name} on {saved_plan.num_devices} GPUs, priced with {ref.file} "
                   f"(digest {ref.digest or 'none: schema 1'}, {'measured' if ref.measured else 'datasheet'})")
        cols = st.columns(3)
        fact(cols[0], "Balancedness", f"{row['balancedness']:.3f}", "on this trace")
        fact(cols[1], "MoE time, standard EP", human_seconds(row["moe_seconds_ep"]), "predicted per step")
        fact(cols[2], "MoE time, ExFlow", human_seconds(row["moe_seconds_exflow"]), "context-coherent execution")
