"""Export a plan with the same exporters as ``moeplan export`` (:mod:`moeplan.export.registry`):
each writes into a scratch folder, and the files come back as bytes for the download buttons."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from moeplan.export.registry import EXPORTERS, export_plan, exporter
from moeplan.plan import Plan

EXPORT_FORMATS = ("plan", *EXPORTERS)


@dataclass(frozen=True)
class Exported:
    """What an exporter produced: file name → bytes, the command line, its notes."""

    files: dict[str, bytes]
    command: str
    notes: tuple[str, ...]


def export(plan: Plan, fmt: str) -> Exported:
    """Run the named exporter on ``plan`` in a scratch folder and read its files back: ``plan``
    (the Plan JSON, as :meth:`Plan.save` writes it) or any registered format, its command line
    naming the files beside you (the scratch folder left out)."""
    with tempfile.TemporaryDirectory(prefix="moeplan-export-") as tmp:
        out = Path(tmp)
        if fmt == "plan":
            plan.save(out / "plan.json")
            return Exported(_read(out), "", ())
        result = export_plan(plan, exporter(fmt).name, out / EXPORTERS[fmt].default_name)
        files: dict[str, bytes] = {}
        for path in result.files:
            files.update(_read(path) if path.is_dir() else {path.name: path.read_bytes()})
        command = result.command.replace(f"{out}/{EXPORTERS[fmt].default_name}/", "").replace(f"{out}/", "")
        return Exported(files, command, tuple(result.notes))


def _read(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
