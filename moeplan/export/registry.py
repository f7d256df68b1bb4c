"""The exporter registry: every runtime format by name, so ``moeplan export``, ``moeplan plan``
and the dashboard run the same exporter the same way.

Each :class:`Exporter` writes a plan into ``out`` (a file or folder path, as the format takes it;
:attr:`Exporter.default_name` is what it is called inside a folder) and returns an
:class:`~moeplan.export.common.Export` (files, command line, notes). ``model_path`` and
``rebalance_every`` reach the serving runtimes that take them; giving them to a format that does
not is an input error.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moeplan.errors import InputError
from moeplan.export.common import Export
from moeplan.model import ModelSpec
from moeplan.plan import Plan


@dataclass(frozen=True)
class Exporter:
    """One format: ``write(plan, out, model_path, rebalance_every)``; ``output_help`` says what
    ``out`` may be; ``serving`` is True when the format takes ``model_path`` and ``rebalance_every``;
    ``check_model(model, source, field)`` raises InputError for a model the runtime cannot take at all,
    so a caller can refuse before solving."""

    name: str
    write: Callable[[Plan, Path, str | None, int | None], Export]
    default_name: str
    output_help: str
    serving: bool
    check_model: Callable[[ModelSpec, str, str], None] = lambda model, source, field: None  # takes every model


def _sglang(plan: Plan, out: Path, model_path: str | None, rebalance_every: int | None) -> Export:
    from moeplan.export.sglang import export_sglang
    return export_sglang(plan, out, model_path, rebalance_every)


def _sglang_model(model: ModelSpec, source: str, field: str) -> None:
    from moeplan.export.sglang import check_model_supported
    check_model_supported(model, source, field)


def _vllm(plan: Plan, out: Path, model_path: str | None, rebalance_every: int | None) -> Export:
    from moeplan.export.vllm import export_vllm
    return export_vllm(plan, out, model_path, rebalance_every)


def _eplb(plan: Plan, out: Path, model_path: str | None, rebalance_every: int | None) -> Export:
    from moeplan.export.eplb import export_eplb
    return export_eplb(plan, out)


def _megatron(plan: Plan, out: Path, model_path: str | None, rebalance_every: int | None) -> Export:
    from moeplan.export.megatron import export_megatron
    return export_megatron(plan, out)


EXPORTERS: dict[str, Exporter] = {e.name: e for e in (
    Exporter("sglang", _sglang, "expert_location.json", "sglang: .json/.pt file or folder", True, _sglang_model),
    Exporter("eplb", _eplb, "eplb", "eplb: folder or .json/.pt stem", False),
    Exporter("vllm", _vllm, "vllm", "vllm: folder", True),
    Exporter("megatron", _megatron, "megatron_args.sh", "megatron: .sh file or folder", False),
)}


def exporter(fmt: str) -> Exporter:
    """The exporter named ``fmt``; InputError naming the formats otherwise."""
    if fmt not in EXPORTERS:
        raise InputError(f"unknown format {fmt!r}", field="format", fix=f"use one of {', '.join(EXPORTERS)}")
    return EXPORTERS[fmt]


def export_plan(plan: Plan, fmt: str, out: Path, model_path: str | None = None,
                rebalance_every: int | None = None) -> Export:
    """Write ``plan`` in format ``fmt`` to ``out`` (module docstring)."""
    chosen = exporter(fmt)
    if not chosen.serving and (model_path is not None or rebalance_every is not None):
        raise InputError(f"--rebalance-every and --model-path do not apply to {fmt}", field="format")
    return chosen.write(plan, out, model_path, rebalance_every)
