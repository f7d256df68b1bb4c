"""``python -m moeplan.profiler [OPTIONS]``: the ``moeplan profile`` command without the rest of the
CLI, for ``torchrun --nproc-per-node N -m moeplan.profiler …``. Bad input: one line, exit code 2."""
from __future__ import annotations

import sys
from functools import wraps
from typing import Any

import typer

from moeplan.errors import InputError
from moeplan.profiler.command import profile

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
@wraps(profile)
def _guarded(*args: Any, **kwargs: Any) -> None:
    try:
        profile(*args, **kwargs)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
