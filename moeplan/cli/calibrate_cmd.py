"""``moeplan calibrate RUN.json... --profile P -o P2``: fold runtime measurements back into a
hardware profile as measured corrections (see :mod:`moeplan.calibration`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from moeplan.calibration import SCOPES, calibrate, load_run
from moeplan.cli.apps import app
from moeplan.cli.common import console, guarded, print_table
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile


@app.command("calibrate")
@guarded
def calibrate_cmd(
    runs: list[Path] = typer.Argument(..., help="Measurement JSONs: moeplan run --replay -o reports, "
                                                 "bench/gpu_runtime.py or bench/gpu_forward.py output."),
    profile: str = typer.Option(..., "--profile", help="Hardware profile to correct: bundled name or YAML path."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the calibrated profile YAML."),
    scope: str = typer.Option("model", "--scope", help="forward-step corrections per model (model) or one per "
                                                       "phase for every model (all)."),
) -> None:
    """Fit measured corrections of the cost model on runtime measurements and write the profile."""
    if scope not in SCOPES:
        raise InputError(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}", field="scope")
    for path in runs:
        if not path.is_file():
            raise InputError("no such file", source=str(path), field="runs")
    hw = HardwareProfile.resolve(profile)
    files = [load_run(p) for p in runs]
    calibrated = calibrate(hw, files, scope)
    calibrated.save(output)
    rows = []
    for c in calibrated.corrections:
        key = ", ".join(f"{k}={v}" for k, v in c.key.items())
        if c.terms is not None:
            t = c.terms
            form = (f"×{t.scale:.3f} + {1e6 * t.per_pass_s:.1f} µs/weight pass + {1e6 * t.per_slot_s:.1f} µs/slot "
                    f"+ {1e6 * t.fixed_s:.1f} µs")
        else:
            form = f"×{c.scale:.3f} + {1e6 * c.offset_per_layer_s:.0f} µs/layer"
        rows.append((c.target, key, c.observations, form, f"{100 * c.residual:.1f}%"))
    print_table(f"Corrections fitted on {len(files)} file(s)", ["target", "key", "observations", "correction",
                                                                "fitted residual"], rows,
                caption="residual: median |error| on the observations fitted (not a judged figure); judge on "
                        "runs not given here")
    held = int(np.sum([f.held_out for f in files]))
    if held:
        console.print(f"{held} rows marked \"set\": \"judged\" were held out")
    console.print(f"wrote {output}")
