"""The set-up panel (sidebar): model, hardware profile, cluster shape and traffic, as a
:class:`moeplan.dashboard.compute.Setup`. Every page of the app reads the same set-up.

Widget values live in ``st.session_state`` under the keys of :data:`DEFAULTS` (set once per
session), so widgets are created without default arguments and keep their values when the user
moves between pages (:func:`keep_page_state`).
"""
from __future__ import annotations

from typing import Any

import streamlit as st

from moeplan.dashboard import compute
from moeplan.dashboard import uploads
from moeplan.dashboard.keys import ModelChoice, Setup, TrafficChoice
from moeplan.errors import InputError

DEFAULTS: dict[str, Any] = {
    "model_source": "Preset", "model_preset": "deepseek-v3", "hardware": "h100-sxm", "gpus": 32, "nodes": "auto",
    "traffic_source": "Synthetic", "tokens": 8192, "zipf": 0.6, "affinity": 0.4, "locality": 0.3, "segment": 64,
    "seed": 0,
    # placement what-if (kept across pages: the memory and export pages read them)
    "solvers": ["contiguous", "eplb", "lpt"], "tokens_per_device": 256, "execution": "Standard EP",
    "ilp_time_limit": 10, "balance_cap": 1.01, "flows": "top1", "metric_tokens": 1024,
    "map_layer": 0, "kv_tokens": 65536,
    "loads_paths": "", "loads_dispatch": "sglang-static", "loads_robust": "mean", "loads_loo": False,
    # trace
    "sort_popularity": True, "affinity_layer": 0, "affinity_view": "probability", "segment_len": 16,
    # parallel folding
    "fold_mode": "serve", "fold_seq": 4096, "fold_batch": 256, "fold_mbs": "searched", "fold_overlap": False,
    # cache sizing
    "cache_policy": "prefetch", "cache_phase": "decode", "cache_batch": 1, "cache_context": 4096, "cache_budget": 0.0,
    "cache_layer": 0,
    # elastic scaling
    "elastic_shape": "diurnal", "elastic_policy": "threshold", "elastic_seed": 0,
}
PAGE_KEYS = ("solvers", "slots", "tokens_per_device", "execution", "ilp_time_limit", "balance_cap", "flows",
             "metric_tokens", "map_solver", "map_layer", "kv_tokens", "export_solver", "fold_mode", "fold_seq",
             "fold_batch", "fold_mbs", "fold_overlap", "fold_pick", "sort_popularity", "affinity_layer",
             "affinity_view", "segment_len", "cache_experts", "cache_policy", "cache_phase", "cache_batch",
             "cache_context", "cache_budget", "cache_layer", "elastic_sizes", "elastic_shape", "elastic_policy",
             "elastic_seed", "loads_paths", "loads_dispatch", "loads_robust", "loads_loo")
TOKEN_CHOICES = (1024, 2048, 4096, 8192, 16384, 32768, 65536)


def init_state() -> None:
    """Session defaults (once), and page widgets' values kept when their page is not shown."""
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)
    keep_page_state()


def keep_page_state() -> None:
    """Streamlit drops a widget's value when its page is not rendered; re-assigning it keeps it."""
    for key in PAGE_KEYS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def setup_panel() -> Setup | None:
    """Draw the sidebar; returns the set-up, or None (with the reason shown) while it is incomplete."""
    bar = st.sidebar
    bar.header("Set-up")
    model = _model(bar)
    hw = _hardware(bar)
    traffic = _traffic(bar)
    if model is None or hw is None or traffic is None:
        return None
    return Setup(model, hw[0], hw[1], hw[2], traffic)


def _model(bar: Any) -> ModelChoice | None:
    bar.radio("Model", ("Preset", "Upload config.json"), key="model_source", horizontal=True)
    if st.session_state.model_source == "Preset":
        labels = compute.preset_labels()
        bar.selectbox("Model preset", list(labels), key="model_preset", format_func=labels.get)
        return ModelChoice(preset=st.session_state.model_preset)
    upload = bar.file_uploader("Hugging Face config.json", type=["json"], key="model_upload",
                               help="The model's config.json (Mixtral, DeepSeek-V2/V3, Qwen-MoE, OLMoE, DBRX, "
                                    "GPT-OSS).")
    if upload is None:
        bar.info("Upload a config.json to continue.")
        return None
    return ModelChoice(preset="", upload=uploads.register(upload.name, upload.getvalue()),
                       upload_name=upload.name)


def _hardware(bar: Any) -> tuple[str, int, int | None] | None:
    labels = compute.hardware_labels()
    bar.selectbox("Hardware profile", list(labels), key="hardware", format_func=labels.get,
                  help="Profiles under measured/ hold curves measured on real GPUs; the others use datasheet "
                       "figures (roofline predictions).")
    bar.caption(compute.profile(st.session_state.hardware).provenance_note())
    left, right = bar.columns(2)
    left.number_input("GPUs", min_value=1, max_value=4096, step=1, key="gpus")
    gpus = int(st.session_state.gpus)
    per = compute.profile(st.session_state.hardware).devices_per_node
    options = ["auto"] + [n for n in range(1, gpus + 1) if gpus % n == 0]
    if st.session_state.nodes not in options:
        st.session_state.nodes = "auto"
    right.selectbox("Nodes", options, key="nodes",
                    help=f"auto: fill nodes of {per} GPUs (the profile's node size).")
    nodes = None if st.session_state.nodes == "auto" else int(st.session_state.nodes)
    return st.session_state.hardware, gpus, nodes


def _traffic(bar: Any) -> TrafficChoice | None:
    bar.radio("Traffic", ("Synthetic", "Upload trace"), key="traffic_source", horizontal=True)
    if st.session_state.traffic_source == "Upload trace":
        upload = bar.file_uploader("Routing trace (.npz)", type=["npz"], key="trace_upload",
                                   help="Written by `moeplan trace synth` or `moeplan trace collect`.")
        if upload is None:
            bar.info("Upload a routing trace to continue.")
            return None
        return TrafficChoice(upload=uploads.register(upload.name, upload.getvalue()),
                             upload_name=upload.name)
    bar.select_slider("Tokens", TOKEN_CHOICES, key="tokens", format_func=lambda t: f"{t:,}",
                      help="Tokens in the synthetic trace (more: steadier statistics, slower what-ifs).")
    bar.slider("Zipf skew", 0.0, 2.0, step=0.1, key="zipf", help="Expert popularity skew per layer (0 = uniform).")
    bar.slider("Inter-layer affinity", 0.0, 0.9, step=0.05, key="affinity",
               help="Share of choices that follow the previous layer's expert.")
    bar.slider("Temporal locality", 0.0, 0.9, step=0.05, key="locality",
               help="Share of choices that follow the current context.")
    with bar.expander("More traffic knobs"):
        st.number_input("Context run (tokens)", min_value=1, max_value=100_000, step=16, key="segment",
                        help="Mean tokens a context lasts (temporal locality).")
        st.number_input("Seed", min_value=0, step=1, key="seed")
    choice = TrafficChoice(tokens=int(st.session_state.tokens), zipf=float(st.session_state.zipf),
                           affinity=float(st.session_state.affinity), locality=float(st.session_state.locality),
                           segment=int(st.session_state.segment), seed=int(st.session_state.seed))
    try:
        choice.knobs().validate()
    except InputError as exc:
        bar.error(uploads.error_text(exc))
        return None
    return choice
