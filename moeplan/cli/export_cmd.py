"""``moeplan export`` (a plan to a runtime's files and command line) and ``moeplan import`` (back)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from moeplan.cli.apps import app
from moeplan.cli.common import console, err_console, guarded, print_table, report_export, resolve_hardware
from moeplan.errors import InputError
from moeplan.export.common import require_placement, same_rank_replica
from moeplan.export.importers import import_eplb, import_sglang_dump, import_sglang_location
from moeplan.export.registry import EXPORTERS, export_plan, exporter
from moeplan.io import write_json
from moeplan.model import ModelSpec
from moeplan.plan import Plan

IMPORT_FORMATS = ("sglang", "eplb", "sglang-dump")


@app.command("export")
@guarded
def export(
    plan_path: Path = typer.Argument(..., metavar="PLAN", help="Plan file (.json)."),
    fmt: str = typer.Option(..., "--format", "-f", help=f"Target: {', '.join(EXPORTERS)}."),
    output: Path = typer.Option(..., "-o", "--output",
                                help="; ".join(e.output_help for e in EXPORTERS.values()) + "."),
    model_path: str = typer.Option(None, "--model-path", help="Model path for the command line "
                                                               "(default: the preset's Hugging Face repository)."),
    rebalance_every: int = typer.Option(None, "--rebalance-every", min=1,
                                        help="Let the runtime re-run EPLB every N steps from this placement "
                                             "(sglang, vllm); default: static placement."),
) -> None:
    """Write a plan in a runtime's own format and print the command line that runs it."""
    exporter(fmt)
    plan = Plan.load(plan_path)
    report_export(export_plan(plan, fmt, output, model_path, rebalance_every))


@app.command("import")
@guarded
def import_(
    source: str = typer.Argument(..., metavar="FILE", help="File to read (sglang also takes inline JSON)."),
    fmt: str = typer.Option(..., "--format", "-f", help=f"Source: {', '.join(IMPORT_FORMATS)}."),
    model: str = typer.Option(..., help="Model preset or config.json path the file was made for."),
    hardware: str = typer.Option(None, help="Hardware profile (needed for sglang and eplb)."),
    gpus: int = typer.Option(None, min=1, help="EP size in GPUs (default: the file's, else the profile's)."),
    output: Path = typer.Option(..., "-o", "--output", help="Plan (.json) to write; sglang-dump: load (.json)."),
) -> None:
    """Read a runtime's placement into a plan, or its recorded expert load into a load matrix."""
    if fmt not in IMPORT_FORMATS:
        raise InputError(f"unknown format {fmt!r}", field="format", fix=f"use one of {', '.join(IMPORT_FORMATS)}")
    spec = ModelSpec.resolve(model)
    if fmt == "sglang-dump":
        recorded = import_sglang_dump(source, spec)
        write_json(output, recorded.to_json(spec))
        per_layer = recorded.load.max(axis=1) / np.maximum(recorded.load.mean(axis=1), 1e-12)
        print_table(f"Recorded load ({recorded.steps} steps)", ["statistic", "value"],
                    [("MoE layers × experts", f"{recorded.load.shape[0]} × {recorded.load.shape[1]}"),
                     ("token-choices", int(recorded.load.sum())),
                     ("max/mean expert load (mean over layers)", float(per_layer.mean())),
                     ("max/mean expert load (worst layer)", float(per_layer.max()))])
        console.print(f"wrote {output}", highlight=False, markup=False)
        return
    if hardware is None:
        raise InputError(f"--format {fmt} needs the cluster", field="hardware", fix="give --hardware (and --gpus)")
    profile = resolve_hardware(hardware)
    plan = (import_sglang_location(source, spec, profile, gpus) if fmt == "sglang"
            else import_eplb(source, spec, profile, gpus))
    plan.save(output)
    p = require_placement(plan, fmt)
    counts = p.replica_counts()
    print_table(f"Imported placement ({fmt})", ["field", "value"],
                [("MoE layers", p.num_layers), ("devices (nodes × per node)", f"{p.num_devices} ({plan.nodes} × "
                                                                             f"{plan.devices_per_node})"),
                 ("slots per device", p.slots_per_device), ("redundant slots", p.num_physical - p.num_experts),
                 ("most replicas of one expert", int(counts.max()))])
    dup = same_rank_replica(p.phy2log(), p.num_devices)
    if dup is not None:
        err_console.print(f"warning: MoE layer {dup[0]}, rank {dup[1]} holds two replicas of expert {dup[2]} "
                          f"(recent SGLang fills only one of them)", highlight=False, markup=False)
    console.print(f"wrote {output}", highlight=False, markup=False)
