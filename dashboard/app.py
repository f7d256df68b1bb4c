"""moeplan what-if dashboard: see the consequences of a MoE deployment before touching a cluster.

Run with ``moeplan dashboard`` or ``streamlit run dashboard/app.py``. The sidebar holds the set-up
(model, hardware, cluster, traffic); the pages call the same objects, solvers and cost model as
the CLI (:mod:`moeplan.dashboard.compute`). A new page is one more ``st.Page`` in :data:`PAGES`.

BLAS runs one thread per computation unless the environment says otherwise: the dashboard's
matrices are small (experts × experts at most), where extra BLAS threads only spin, and a shared
machine's cores are better spent on concurrent sessions (set before numpy loads).
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import streamlit as st  # noqa: E402

from moeplan.dashboard import sidebar, views  # noqa: E402

PAGES = {
    "Plan": [
        st.Page(views.page("overview"), title="Set-up", icon=":material/tune:", default=True),
        st.Page(views.page("placement"), url_path="placement", title="Placement what-if", icon=":material/grid_view:"),
        st.Page(views.page("memory"), url_path="memory", title="Memory", icon=":material/memory:"),
        st.Page(views.page("trace"), url_path="trace", title="Trace", icon=":material/insights:"),
        st.Page(views.page("export"), url_path="export", title="Export", icon=":material/download:"),
    ],
    "Parallelism": [
        st.Page(views.page("folding"), url_path="folding", title="Parallel folding", icon=":material/account_tree:"),
    ],
    "Serving": [
        st.Page(views.page("cache"), url_path="cache", title="Cache sizing", icon=":material/cached:"),
        st.Page(views.page("elastic"), url_path="elastic", title="Elastic scaling", icon=":material/expand:"),
        st.Page(views.page("serve"), url_path="serve", title="Deployments", icon=":material/speed:"),
    ],
}

st.set_page_config(page_title="moeplan what-if", page_icon=":material/hub:", layout="wide")
sidebar.init_state()
page = st.navigation(PAGES)
st.session_state["setup"] = sidebar.setup_panel()
views.framed()
page.run()
