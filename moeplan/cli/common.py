"""Shared CLI plumbing: the console, error handling (exit 2 on bad input, 1 on internal
failure), progress bars and table printing."""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile

if TYPE_CHECKING:
    from moeplan.export.common import Export

_WIDTH = None if sys.stdout.isatty() else 160
# markup=False: file names, messages and table cells are printed as typed ("run[1].npz",
# "[tokens, layers, top_k]"); styles are passed as ``style=``.
console = Console(stderr=False, soft_wrap=True, width=_WIDTH, markup=False)
err_console = Console(stderr=True, soft_wrap=True, width=_WIDTH, markup=False)
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def guarded(func: F) -> F:
    """Run a command: InputError → one red line and exit 2; any other exception → exit 1."""
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _interrupt_on_sigterm()
        try:
            return func(*args, **kwargs)
        except InputError as exc:
            err_console.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False)
            raise typer.Exit(2) from None
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted", style="yellow")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            err_console.print(Text.assemble(("internal error:", "bold red"), f" {type(exc).__name__}: {exc}"),
                              highlight=False)
            if "--debug" in sys.argv:
                raise
            raise typer.Exit(1) from None
    return wrapper  # type: ignore[return-value]


MAX_GPUS = 1 << 17  # 131,072: above any cluster built; per-device arrays stay small


def check_option(name: str, value: float | None, *, minimum: float | None = None, maximum: float | None = None,
                 above: float | None = None) -> None:
    """InputError naming ``--name`` unless ``value`` (None: not given) is finite and in range
    (``minimum``/``maximum`` inclusive, ``above`` exclusive). Checked before any solve or write."""
    if value is None:
        return
    field = name.lstrip("-").replace("-", "_")
    bad = None
    if not math.isfinite(value):
        bad = "must be a finite number"
    elif minimum is not None and value < minimum:
        bad = f"must be ≥ {minimum:g}"
    elif maximum is not None and value > maximum:
        bad = f"must be ≤ {maximum:g}"
    elif above is not None and not value > above:
        bad = f"must be > {above:g}"
    if bad:
        raise InputError(f"{name} {bad}, got {value:g}", field=field)


def resolve_hardware(ref: str) -> HardwareProfile:
    """Resolve ``--hardware`` and say on stderr which profile it became and what in it is measured."""
    profile = HardwareProfile.resolve(ref)
    announce_hardware(profile, ref)
    return profile


def announce_hardware(profile: HardwareProfile, ref: str) -> None:
    """One line on stderr: the hardware reference typed, the profile used, its provenance."""
    name = HardwareProfile.resolve_name(ref)
    used = f"{ref} → {name}" if name != ref else ref
    err_console.print(f"hardware: {used} ({profile.name}; {profile.provenance_note()})", style="dim", highlight=False)


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _interrupt_on_sigterm() -> None:
    """SIGTERM (``kill``, a container stopping) unwinds like Ctrl-C: temporary files are removed,
    the command exits 130. Only the main thread may install signal handlers."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextmanager
def status(message: str) -> Iterator[None]:
    """A step that takes a while: Rich's spinner on a terminal; elsewhere (a log, a pipe, CI), where
    the spinner shows nothing, the lines ``[step] MESSAGE`` and ``[step] MESSAGE done in X s`` on stderr."""
    if console.is_terminal:
        with console.status(Text(message)):
            yield
        return
    err_console.print(f"[step] {message}", highlight=False)
    start = time.perf_counter()
    yield
    err_console.print(f"[step] {message} done in {time.perf_counter() - start:.1f} s", highlight=False)


PROGRESS_EVERY_S = 5.0   # off a terminal: seconds between two ``[progress]`` lines


class _ProgressLines:
    """Off a terminal, where Rich's bar shows nothing: ``[progress] DESCRIPTION i/N (X s)`` on
    stderr at the start and then at most every :data:`PROGRESS_EVERY_S` seconds, and
    ``[progress] DESCRIPTION done: i/N in X s`` at the end."""

    def __init__(self, description: str, total: float | None) -> None:
        self.description, self.total, self.done_count = description, total, 0.0
        self.start = self.last = time.monotonic()
        self._print(f"{self._count()}")

    def advance(self, n: float = 1) -> None:
        self.done_count += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self._print(f"{self._count()} ({now - self.start:.1f} s)")

    def finish(self) -> None:
        self._print(f"done: {self._count()} in {time.monotonic() - self.start:.1f} s")

    def _count(self) -> str:
        return f"{self.done_count:g}" + (f"/{self.total:g}" if self.total is not None else "")

    def _print(self, text: str) -> None:
        err_console.print(f"[progress] {self.description} {text}", highlight=False)


@contextmanager
def progress(description: str, total: float | None = None) -> Iterator[Callable[[float], None]]:
    """A progress bar on stderr on a terminal; elsewhere (a log, a pipe, CI) the plain lines of
    :class:`_ProgressLines`. Yields ``advance(n)``."""
    if not err_console.is_terminal:
        lines = _ProgressLines(description, total)
        yield lines.advance
        lines.finish()
        return
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (plain ``[progress]`` lines off a terminal)."""
    seq = list(items) if total is None else items
    with progress(description, total if total is not None else len(seq)) as advance:  # type: ignore[arg-type]
        for item in seq:
            yield item
            advance(1)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> None:
    table = Table(title=title, caption=caption, show_lines=False, header_style="bold cyan")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[fmt(v) for v in r])
    console.print(table)


def fmt(value: Any) -> str:
    """Compact human formatting for table cells."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "–"
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 1e5 or a < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def human_params(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def human_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def human_seconds(s: float) -> str:
    if s != s:
        return "–"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} µs"


def report_export(result: Export) -> None:
    """Print what an export wrote, its notes and its command line."""
    for path in result.files:
        console.print(f"wrote {path}", highlight=False, markup=False)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    if result.command:
        console.print("\n" + result.command, highlight=False, markup=False, soft_wrap=True)
