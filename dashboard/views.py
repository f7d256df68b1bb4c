"""What every page shares: the set-up the sidebar produced, error display, and number formats."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import streamlit as st

from moeplan.dashboard import compute
from moeplan.dashboard import uploads
from moeplan.dashboard.keys import SOLVER_NAMES, ProblemKey, Setup, SolveKey, solve_key
from moeplan.errors import InputError

GIB = 2**30
TOKENS_PER_GPU = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # choices of tokens per GPU per step
PAGES = Path(__file__).parent / "pages"
APP = Path(__file__).parent / "app.py"
FRAMED, RETURN_TO = "_framed_by_app", "_return_to_page"


def page(name: str) -> str:
    """The path of a page of this app, for ``st.page_link`` and ``st.switch_page``."""
    return str(PAGES / f"{name}.py")


def require_setup(page_file: str) -> Setup:
    """The sidebar's set-up for the page in ``page_file``; stops the page with a hint while the
    set-up is incomplete.

    In a fresh server, Streamlit's first run may execute a page without app.py (it then treats
    ``pages/`` as an old-style multipage folder, until the first ``st.navigation`` call). The
    page notices (app.py did not mark this run) and hands over to app.py, which returns to it."""
    if not st.session_state.pop(FRAMED, False):
        st.session_state[RETURN_TO] = page_file
        st.switch_page(str(APP))
    setup = st.session_state.get("setup")
    if setup is None:
        st.info("Complete the set-up in the sidebar.")
        st.stop()
    return setup


def framed() -> None:
    """Called by app.py before running the page: marks this run as framed by app.py, and goes
    back to the page that handed over to it (:func:`require_setup`)."""
    target = st.session_state.pop(RETURN_TO, None)
    if target is not None:
        st.switch_page(target)
    st.session_state[FRAMED] = True


@contextmanager
def guarded() -> Iterator[None]:
    """Show bad input (InputError) as one red line, as the CLI prints it, and stop the page."""
    try:
        yield
    except InputError as exc:
        st.error(uploads.error_text(exc), icon=":material/block:")
        st.stop()


def fact(container: Any, label: str, value: str, note: str | None = None, help: str | None = None) -> None:
    """A metric whose small line is a plain note (no arrow, no colour)."""
    container.metric(label, value, note, delta_color="off", delta_arrow="off", help=help)


def ms(seconds: float) -> float:
    return seconds * 1e3


def gib(nbytes: float) -> float:
    return nbytes / GIB


def title_line(setup: Setup) -> str:
    """"DeepSeek-V3 on 32 × NVIDIA H100 … (4 nodes × 8)" for page captions."""
    with guarded():
        spec = compute.model_spec(setup.model)
        hw = compute.hardware(setup.hardware, setup.gpus, setup.nodes)
    return (f"{spec.name} on {hw.num_devices} × {hw.device.name} ({hw.nodes} node{'s' if hw.nodes > 1 else ''} × "
            f"{hw.devices_per_node} GPUs), profile {setup.hardware}")


def placement_slots(setup: Setup, upper: str = "fit") -> tuple[int, int, int]:
    """(fewest, default, most) expert slots per GPU for the set-up at the chosen tokens per GPU, with
    ``st.session_state.slots`` set: to the default when the model or cluster changed, else kept
    within [fewest, most] (``upper="fit"``: the most that fit in memory; ``"experts"``: one slot
    per expert, for the memory page to show what does not fit)."""
    with guarded():
        fewest, default, most = compute.slot_range(setup, int(st.session_state.tokens_per_device))
    if upper == "experts":
        most = compute.model_spec(setup.model).num_experts
    cluster = (setup.model, setup.hardware, setup.gpus, setup.nodes)
    chosen = int(st.session_state.get("slots", default))
    if st.session_state.get("slots_for") != cluster:
        chosen = default
    elif not fewest <= chosen <= most:
        st.toast(f"Expert slots per GPU set to {min(max(chosen, fewest), most)}: {chosen} do not fit in memory.")
        chosen = min(max(chosen, fewest), most)
    st.session_state.slots = chosen
    st.session_state.slots_for = cluster
    return fewest, default, most


def solve_keys(setup: Setup) -> tuple[ProblemKey, dict[str, SolveKey]]:
    """The placement what-if's problem and the chosen solvers' keys, from the placement page's
    settings (kept in the session)."""
    problem_key = ProblemKey(setup, int(st.session_state.slots), int(st.session_state.tokens_per_device),
                             st.session_state.flows)
    keys = {s: solve_key(problem_key, s, float(st.session_state.balance_cap),
                                 float(st.session_state.ilp_time_limit))
            for s in SOLVER_NAMES if s in st.session_state.solvers}
    return problem_key, keys
