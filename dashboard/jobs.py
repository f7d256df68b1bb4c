"""Solves that run in a background thread, so a page can show their progress and Streamlit's stop
button can stop the page while the solve finishes on its own (the ILP within its time limit)."""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor

import streamlit as st
from moeplan.solvers.placement import SolveResult


class Job:
    """A solve running in the background: its future, and when it started running (monotonic
    seconds; None while queued behind another)."""

    def __init__(self, executor: ThreadPoolExecutor, run: Callable[[], SolveResult]) -> None:
        self.started: float | None = None
        self.future: Future[SolveResult] = executor.submit(self._timed, run)

    def _timed(self, run: Callable[[], SolveResult]) -> SolveResult:
        self.started = time.monotonic()
        return run()

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> SolveResult:
        return self.future.result()

    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started


@st.cache_resource(show_spinner=False)
def _registry() -> tuple[ThreadPoolExecutor, dict[Hashable, Job]]:
    """One worker for the whole server (solves are CPU-bound), and every job by its key."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeplan-solve"), {}


def submit(key: Hashable, run: Callable[[], SolveResult]) -> Job:
    """The job of ``key``, started with ``run`` on first request; later requests get the same job
    (running or done), whichever session asks."""
    executor, jobs = _registry()
    if key not in jobs:
        jobs[key] = Job(executor, run)
    return jobs[key]
