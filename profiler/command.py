"""``moeplan profile`` / ``python -m moeplan.profiler``: measure this machine and write a measured
HardwareProfile (YAML) and, with ``--json``, every raw measurement.

Under ``torchrun`` every rank runs this command: rank 0 measures its device and host link, all
ranks measure the collectives, rank 0 writes the files. Options are checked on every rank before
any process group starts, so bad input ends every rank with exit code 2. torch is imported only
once the options are good (``moeplan`` itself does not need torch).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile, merge_profiles
from moeplan.model import ModelSpec
from moeplan.profiler.cpu_base import check_base, cpu_profile
from moeplan.profiler.headline import figures
from moeplan.profiler.raw import RawProfile
from moeplan.profiler.sizes import DEFAULT_MODELS, SECTIONS

BASE_BY_GPU = (("H200", "h200-sxm"), ("H100", "h100-sxm"), ("A100", "a100-80gb-sxm"), ("B200", "b200"),
               ("MI300X", "mi300x"), ("910B", "ascend-910b"))


def base_for(device_name: str) -> str:
    """The bundled datasheet profile for a device name (H100 → h100-sxm, H200 → h200-sxm, …)."""
    for token, name in BASE_BY_GPU:
        if token.lower() in device_name.lower():
            return name
    raise InputError(f"no bundled profile matches the device '{device_name}'", field="base",
                     fix=f"pass --base with one of: {', '.join(HardwareProfile.bundled())}, or a profile YAML")


def parse_sections(only: str) -> tuple[str, ...]:
    wanted = tuple(s.strip() for s in only.split(",") if s.strip())
    bad = [s for s in wanted if s not in SECTIONS]
    if bad or not wanted:
        raise InputError(f"unknown section(s) {', '.join(bad) or '(none given)'}", field="only",
                         fix=f"choose from: {', '.join(SECTIONS)}")
    return tuple(s for s in SECTIONS if s in wanted)


def parse_models(models: str) -> tuple[ModelSpec, ...]:
    refs = [s.strip() for s in models.split(",") if s.strip()]
    if not refs:
        raise InputError("no model given", field="models", fix="give preset names or config.json paths, comma-separated")
    return tuple(ModelSpec.resolve(r) for r in refs)


def profile(
    base: str = typer.Option(None, "--base", help="Datasheet profile to start from (bundled name or YAML) of the device "
                             "measured; default: chosen from the GPU name (H100 → h100-sxm, H200 → h200-sxm), on "
                             "a CPU a profile named after it (cpu-<model>), or the --merge profile."),
    models: str = typer.Option(",".join(DEFAULT_MODELS), "--models",
                               help="Models whose expert and attention shapes to measure (presets or config.json "
                                    "paths, comma-separated)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer sizes and repeats: under a minute."),
    only: str = typer.Option(",".join(SECTIONS), "--only", help=f"Sections to measure, of: {', '.join(SECTIONS)}."),
    merge: Path = typer.Option(None, "--merge", help="Fold this run into an existing profile YAML (keeps its "
                               "figures and runs; default output: that file)."),
    out: Path = typer.Option(None, "--out", help="Profile YAML to write (default: measured-<base>.yaml, or the "
                             "--merge file)."),
    json_out: Path = typer.Option(None, "--json", help="Also write every raw measurement (JSON)."),
) -> None:
    """Measure this machine — matmul, HBM, expert FFN and attention curves, host links and, under
    torchrun with ≥ 2 ranks, the collectives — and write a measured hardware profile."""
    sections = parse_sections(only)
    specs = parse_models(models)
    existing = HardwareProfile.load(merge) if merge is not None else None
    chosen = HardwareProfile.resolve(base) if base else None

    from moeplan.profiler.assemble import measured_profile
    from moeplan.profiler.collectives import Comm
    from moeplan.profiler.device import Accelerator
    from moeplan.profiler.runner import Profiler, Request

    acc = Accelerator.detect(int(os.environ.get("LOCAL_RANK", "0")))
    if existing is not None:
        _check_same_device(existing, acc.name(), str(merge))
        check_base(existing, acc.name(), acc.is_cpu, str(merge))
    if chosen is not None:
        check_base(chosen, acc.name(), acc.is_cpu, base)
    else:
        chosen = existing if existing is not None else _default_base(acc.name(), acc.is_cpu)
    comm = Comm(acc) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    profiler = Profiler(Request(specs, sections, quick, chosen), acc, comm)
    lead = profiler.rank == 0
    err = Console(stderr=True)
    t0 = time.perf_counter()
    if lead:
        total = len(profiler.steps()) * profiler.sizes.passes + profiler.collective_count()
        err.print(f"profiling {acc.name()} ({acc.backend}, {comm.world if comm else 1} rank(s)) against "
                  f"'{chosen.name}': {total} points{' (quick)' if quick else ''}", highlight=False)
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task("starting", total=total)
            section = [""]

            def advance(sec: str, label: str) -> None:
                if sec != section[0]:
                    section[0] = sec
                    if not err.is_terminal:
                        err.print(f"[{time.perf_counter() - t0:6.1f} s] {sec}", highlight=False)
                bar.update(task, advance=1, description=f"{sec}: {label}")
            raw = profiler.run(advance)
    else:
        raw = profiler.run(lambda sec, label: None)
    if comm is not None:
        comm.close()
    if raw is None:
        return
    if json_out is not None:
        raw.save(json_out)
    measured = measured_profile(chosen, raw)
    result = merge_profiles(existing, measured) if existing is not None else measured
    target = out or merge or Path(f"measured-{chosen.name}.yaml")
    result.save(target)
    _summary(raw, time.perf_counter() - t0, target, json_out)


def _default_base(device: str, is_cpu: bool) -> HardwareProfile:
    """The profile a run without --base/--merge starts from: the bundled one of this GPU, or for a
    CPU a profile named after it (:func:`moeplan.profiler.cpu_base.cpu_profile`)."""
    if not is_cpu:
        return HardwareProfile.resolve(base_for(device))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return cpu_profile(device, per_host, max(world // max(per_host, 1), 1))


def _check_same_device(existing: HardwareProfile, device: str, source: str) -> None:
    """A profile holds one device type: refuse to merge measurements of another one into it."""
    others = sorted({str(r.get("gpu")) for r in existing.runs.values() if r.get("gpu") and r.get("gpu") != device})
    if others:
        raise InputError(f"measured on {', '.join(others)}, but this machine's device is {device}", source=source,
                         field="runs", fix="merge into a profile of the same device, or write a new one with --out")


def _summary(raw: RawProfile, seconds: float, target: Path, json_out: Path | None) -> None:
    console = Console()
    table = Table(title=f"Measured on {raw.run.get('gpu')} — run {raw.run_id}", header_style="bold cyan")
    for name in ("figure", "measured", "datasheet", "of peak"):
        table.add_column(name, justify="left" if name == "figure" else "right")
    for f in figures(raw, None):
        table.add_row(f.name, f"{f.value:.4g} {f.unit}", f.datasheet, "–" if f.fraction != f.fraction else f"{f.fraction:.0%}")
    console.print(table)
    for s in raw.skipped:
        console.print(f"[yellow]skipped[/] {s['what']}: {s['why']}", highlight=False)
    console.print(f"{len(raw.measurements)} points in {seconds:.1f} s; wrote {target}"
                  + (f" and {json_out}" if json_out else ""), highlight=False)
