"""The one error type for bad input.

Every loader and validator raises :class:`InputError` with the file, the field and
the fix, so the CLI can print one clear line and exit with code 2. Anything else
that escapes is an internal failure (exit code 1).
"""
from __future__ import annotations

import os


class InputError(ValueError):
    """Bad user input: a file, a field or an option that cannot be used.

    Attributes:
        source: the file (or option) the bad value came from, or "" if none.
        field: the dotted field name inside that source, or "" if none.
        fix: one sentence telling the user what to do instead.
    """

    def __init__(self, message: str, *, source: str = "", field: str = "", fix: str = "") -> None:
        self.source = str(source)
        self.field = field
        self.fix = fix
        super().__init__(message)

    def __str__(self) -> str:
        where = ""
        if self.source and self.field:
            where = f"{self.source}: field '{self.field}': "
        elif self.source:
            where = f"{self.source}: "
        elif self.field:
            where = f"field '{self.field}': "
        text = f"{where}{self.args[0]}"
        if self.fix:
            text += f" (fix: {self.fix})"
        return text


def require(condition: bool, message: str, *, source: str = "", field: str = "", fix: str = "") -> None:
    """Raise :class:`InputError` unless ``condition`` holds."""
    if not condition:
        raise InputError(message, source=source, field=field, fix=fix)


def available_memory() -> int:
    """Bytes of memory a process can take now: Linux's ``MemAvailable`` (free plus reclaimable
    cache), else the free physical pages, else effectively unlimited where neither is known."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_memory(needed: int, what: str, fix: str, free: int | None = None) -> None:
    """Refuse, before allocating, a step whose estimated ``needed`` bytes exceed ``free`` (bytes;
    default the host's :func:`available_memory`; a GPU's free memory where the step runs on one)."""
    free = available_memory() if free is None else free
    if needed > free:
        raise InputError(f"{what} needs about {needed / 2**30:.1f} GiB of memory, {free / 2**30:.1f} GiB are free",
                         field="memory", fix=fix)
