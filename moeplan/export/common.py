"""What every exporter shares: the result record, the placement a format needs, the model's
Hugging Face path, replica bookkeeping and shell-ready command lines.

Physical experts are numbered rank-major everywhere (SGLang, vLLM, DeepSeek EPLB): with ``P``
physical experts over ``G`` ranks, rank ``r`` holds physical ids ``r·P/G … (r+1)·P/G − 1``.
That is exactly :meth:`moeplan.plan.Placement.phy2log` (device-major, then slot).
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from moeplan.errors import InputError
from moeplan.model import ModelSpec
from moeplan.plan import Placement, Plan

_ENV_TOKEN = re.compile(r"^(\$[A-Z_][A-Z0-9_]*|\$\(\([^)]*\)\))(:[0-9]+)?$")


@dataclass
class Export:
    """The outcome of one export.

    Attributes:
        files: what was written, in the order a user needs them.
        command: the ready command line (may span lines with ``\\`` continuations).
        notes: one sentence each: what the runtime will and will not do with the plan.
    """

    files: list[Path] = field(default_factory=list)
    command: str = ""
    notes: list[str] = field(default_factory=list)


def require_placement(plan: Plan, fmt: str) -> Placement:
    """The plan's placement, or an InputError saying the format needs one."""
    if plan.placement is None:
        raise InputError(f"the {fmt} export writes an expert placement, and this plan has none",
                         field="placement", fix="solve a placement first, or use --format megatron for a "
                                                "parallel-folding plan")
    return plan.placement


def hf_model_path(model: ModelSpec) -> str:
    """The folder of the model's ``config.json`` if it was read from one on this machine, else the
    Hugging Face repository of the bundled preset with this model's name, else the name itself."""
    source = Path(model.source)
    if source.name == "config.json" and source.is_file():
        return str(source.parent.resolve())
    root = resources.files("moeplan.presets")
    for entry in root.iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text())
            if data.get("name") == model.name and data.get("hf_repo"):
                return str(data["hf_repo"])
    return model.name


def replica_lists(phy2log_row: np.ndarray, num_experts: int) -> list[list[int]]:
    """Physical ids of each logical expert in one layer, ascending."""
    out: list[list[int]] = [[] for _ in range(num_experts)]
    for phys, expert in enumerate(phy2log_row.tolist()):
        out[expert].append(phys)
    return out


def same_rank_replica(phy2log: np.ndarray, num_ranks: int) -> tuple[int, int, int] | None:
    """The first (row, rank, expert) where two physical slots of one rank hold the same expert, or None."""
    rows, width = phy2log.shape
    per_rank = np.sort(phy2log.reshape(rows, num_ranks, width // num_ranks), axis=2)
    dup = per_rank[:, :, 1:] == per_rank[:, :, :-1]
    if not dup.any():
        return None
    row, rank, slot = (int(v) for v in np.argwhere(dup)[0])
    return row, rank, int(per_rank[row, rank, slot])


def arg_lines(args: list[str]) -> list[str]:
    """Shell-quoted words grouped one option per line: a flag and at most one value; leading words
    (the program) share the first line. ``$VAR`` and ``$VAR:port`` placeholders stay unquoted."""
    lines: list[list[str]] = []
    for arg in args:
        word = arg if _ENV_TOKEN.match(arg) else shlex.quote(arg)
        current = lines[-1] if lines else None
        if current is None or arg.startswith("--") or (current[0].startswith("--") and len(current) == 2):
            lines.append([word])
        else:
            current.append(word)
    return [" ".join(line) for line in lines]


def shell_command(args: list[str]) -> str:
    """One command over several lines joined by ``\\`` continuations."""
    return " \\\n    ".join(arg_lines(args))


def output_file(out: Path, default_name: str, suffixes: tuple[str, ...]) -> Path:
    """``out`` itself when it names a file with one of ``suffixes``, else ``out/default_name`` for a folder."""
    if out.suffix in suffixes:
        return out
    if out.is_dir() or (not out.suffix and not out.exists()):
        return out / default_name
    raise InputError(f"expected a folder or a file ending in {' or '.join(suffixes)}", source=str(out),
                     field="output")
