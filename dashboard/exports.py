"""Export a plan with the same exporters as ``moeplan export``: each writes into a scratch folder,
and the files come back as bytes for the download buttons."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moeplan.errors import InputError
from moeplan.export.common import hf_model_path, require_placement, shell_command
from moeplan.export.eplb import EplbTensors
from moeplan.export.megatron import export_megatron
from moeplan.export.sglang import export_sglang, launch_args
from moeplan.export.vllm import export_vllm
from moeplan.io import write_text
from moeplan.plan import Plan

EXPORT_FORMATS = ("plan", "sglang", "eplb", "vllm", "megatron")


@dataclass(frozen=True)
class Exported:
    """What an exporter produced: file name → bytes, the command line, its notes."""

    files: dict[str, bytes]
    command: str
    notes: tuple[str, ...]


def export(plan: Plan, fmt: str) -> Exported:
    """Run the named exporter on ``plan`` in a scratch folder and read its files back: ``plan``
    (the Plan JSON, as :meth:`Plan.save` writes it), ``sglang`` (the expert-location file and the
    launch command naming it beside you), ``eplb`` (EPLB tensors JSON), ``vllm`` (launch script and
    placement), ``megatron`` (argument file and torchrun line)."""
    with tempfile.TemporaryDirectory(prefix="moeplan-export-") as tmp:
        out = Path(tmp)
        if fmt == "plan":
            plan.save(out / "plan.json")
            return Exported(_read(out), "", ())
        if fmt == "sglang":
            result = export_sglang(plan, out / "expert_location.json")
            command = shell_command(launch_args(plan, "expert_location.json", hf_model_path(plan.model), None))
            return Exported(_read(out), command, tuple(result.notes))
        if fmt == "eplb":
            tensors = EplbTensors.from_placement(require_placement(plan, "eplb"), plan.model.moe_layers)
            write_text(out / "eplb.json", json.dumps(tensors.to_json(), separators=(",", ":")) + "\n")
            return Exported(_read(out), "", ("JSON with phy2log, log2phy, logcnt over the MoE layers (layer_ids); "
                                             "`moeplan export --format eplb` also writes the .pt with torch",))
        if fmt == "vllm":
            result = export_vllm(plan, out / "vllm")
            return Exported(_read(out / "vllm"), result.command, tuple(result.notes))
        if fmt == "megatron":
            result = export_megatron(plan, out / "megatron_args.sh")
            return Exported(_read(out), result.command, tuple(result.notes))
    raise InputError(f"unknown export format '{fmt}'", field="format", fix=f"use one of: {', '.join(EXPORT_FORMATS)}")


def _read(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
