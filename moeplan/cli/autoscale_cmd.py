"""``moeplan autoscale``: simulate autoscaling on bursty traffic — elastic scaling against static
provisioning, restarts and whole-replica scaling."""
from __future__ import annotations

from pathlib import Path

import typer
from moeplan.solvers.elastic.autoscale import POLICIES, autoscale_frame, summary_frame
from moeplan.solvers.elastic.costs import DEFAULT_RESTART_OVERHEAD
from moeplan.solvers.elastic.study import prepare, run_all
from moeplan.solvers.elastic.traffic import SHAPES

from moeplan.cli.apps import app
from moeplan.cli.common import console, guarded, print_table, resolve_hardware
from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.io import write_json
from moeplan.model import ModelSpec
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize
from moeplan.trace import RoutingTrace


def _choices(text: str, allowed: tuple[str, ...], field: str) -> tuple[str, ...]:
    chosen = allowed if text == "all" else tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in chosen if x not in allowed]
    if bad or not chosen:
        raise InputError(f"unknown {field} {bad or text!r}", field=field, fix=f"use all or some of: {', '.join(allowed)}")
    return chosen


def _ints(text: str, field: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}", field=field) from None


@app.command("autoscale")
@guarded
def autoscale(
    model: str = typer.Option("deepseek-v3", help="Model preset or config.json."),
    hardware: str = typer.Option("h100-sxm", help="Hardware profile name or YAML."),
    sizes: str = typer.Option("32,40,48,56,64", help="Device counts the deployment may run at (the smallest is "
                                                     "also the replica size)."),
    shape: str = typer.Option("all", help=f"Traffic shape(s): {', '.join(SHAPES)} or all."),
    seeds: str = typer.Option("0", help="Comma-separated seeds of the traffic noise."),
    policy: str = typer.Option("all", help=f"Policy(ies): {', '.join(POLICIES)} or all."),
    trace_path: Path = typer.Option(None, "--trace", help="Routing trace (.npz) for expert loads (default: "
                                                          "synthetic, Zipf 0.6)."),
    slo: float = typer.Option(None, help="Decode step (time per output token) SLO in milliseconds (default: "
                                         "2.5 × the one-sequence step at the smallest size)."),
    context: int = typer.Option(4096, help="KV-cache tokens per sequence."),
    horizon: float = typer.Option(7200.0, help="Simulated seconds."),
    interval: float = typer.Option(10.0, help="Seconds per decision interval."),
    restart_overhead: float = typer.Option(DEFAULT_RESTART_OVERHEAD, help="Seconds a restart or a new replica "
                                                                          "spends besides loading weights (assumed)."),
    output: Path = typer.Option(None, "-o", "--output", help="Write the summary and the per-interval frames as JSON."),
) -> None:
    """Price decode latency vs (devices, load) and the elastic steps once, then run every traffic shape ×
    strategy × policy: SLO attainment, device-hours and time spent scaling."""
    spec = ModelSpec.resolve(model)
    hw = resolve_hardware(hardware)
    shapes = _choices(shape, SHAPES, "shape")
    policies = _choices(policy, POLICIES, "policy")
    if trace_path:
        trace = RoutingTrace.load(trace_path)
        trace.check_model(spec.num_experts, spec.num_moe_layers, spec.top_k, str(trace_path))
    else:
        trace = synthesize(spec, SyntheticTraffic(tokens=20_000, seed=0))
    study = prepare(CostModel(spec, hw), TraceStats.of(trace).load, _ints(sizes, "sizes"), slo / 1e3 if slo else None, context,
                    restart_overhead)
    runs = run_all(study, shapes, _ints(seeds, "seeds"), policies, horizon, interval)
    table = summary_frame(runs)
    grouped = table.groupby(["shape", "strategy", "policy"], sort=False).mean(numeric_only=True).reset_index()
    print_table(f"Autoscaling {spec.name} on {hw.device.name}, sizes {', '.join(map(str, study.sizes))} "
                f"({len(_ints(seeds, 'seeds'))} seed(s), {horizon:g} s)",
                ["shape", "strategy", "policy", "SLO attainment", "device-hours", "scaling steps", "time scaling"],
                [(r["shape"], r["strategy"], r["policy"], f"{100 * r['slo_attainment']:.1f}%",
                  f"{r['device_hours']:.1f}", f"{r['scaling_steps']:.1f}", f"{r['scaling_seconds']:.1f} s")
                 for _, r in grouped.iterrows()])
    for note in study.notes:
        console.print(f"note: {note}", style="dim", highlight=False)
    if output:
        write_json(output, {"model": spec.name, "hardware": hw.name, "sizes": list(study.sizes), "slo_s": study.slo,
                            "peak_tokens_per_s": study.peak_rate, "notes": study.notes,
                            "elastic_step_seconds": {f"{a}->{b}": v for (a, b), v in study.elastic_seconds.items()},
                            "restart_seconds": {str(k): v for k, v in study.restart_seconds.items()},
                            "replica_seconds": study.replica_seconds,
                            "summary": table.to_dict(orient="records"),
                            "frames": autoscale_frame(runs).to_dict(orient="list")})
        console.print(f"wrote {output}")
