"""The Typer applications every command module registers on."""
from __future__ import annotations

import typer

app = typer.Typer(
    name="moeplan", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    help="Measure, predict and plan Mixture-of-Experts deployments: expert placement, parallel folding, "
         "expert caching and elastic scaling, from real model configs, measured hardware and routing traces.",
)
trace_app = typer.Typer(no_args_is_help=True, help="Routing traces: synthesise, collect from a real model, summarise.")
plan_app = typer.Typer(help="Solve for a plan: expert placement, parallel folding, cache sizes, scaling.")
app.add_typer(trace_app, name="trace")
app.add_typer(plan_app, name="plan")
