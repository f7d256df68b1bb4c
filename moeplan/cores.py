"""CPU cores for moeplan's own array work: how many to use, and one function run beside the caller.

Results never depend on the count: callers split work into pieces fixed in advance (their own random
streams, their own output slices) and only the speed changes.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from typing import Generic, TypeVar

MAX_CORES = 4
"""Most cores used at once: synthesis and the statistics scale no further on a shared host."""

T = TypeVar("T")


def cores() -> int:
    """Cores this process may run on (its CPU affinity), at most :data:`MAX_CORES`, at least 1."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_CORES, available))


class Beside(Generic[T]):
    """``fn()`` computed in a forked child process while the caller goes on (``fn`` and what it reads are
    shared copy-on-write, nothing is pickled but the result); :meth:`result` waits for its value. Where
    one core is available or the platform cannot fork, ``fn`` runs in :meth:`result` instead.

    For Python-bound work (a pure-Python simulation) beside numpy-bound work in the caller: a thread would
    hold the GIL the numpy work needs between its calls."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._process: multiprocessing.process.BaseProcess | None = None
        if cores() > 1 and "fork" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("fork")
            self._receive, send = context.Pipe(duplex=False)
            self._process = context.Process(target=_send_outcome, args=(fn, send), daemon=True)
            self._process.start()
            send.close()

    def result(self) -> T:
        """``fn()``'s value (its exception, raised here, if it raised one)."""
        if self._process is None:
            return self._fn()
        try:
            failed, value = self._receive.recv()
        except EOFError:
            raise RuntimeError(f"the worker process ended with exit code {self._process.exitcode} "
                               "before sending its result") from None
        finally:
            self._process.join()
            self._receive.close()
        if failed:
            raise value
        return value


def _send_outcome(fn: Callable[[], object], send: "multiprocessing.connection.Connection") -> None:
    """In the child: send (False, fn()) or (True, the exception it raised)."""
    try:
        outcome = (False, fn())
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
        outcome = (True, exc)
    send.send(outcome)
    send.close()
