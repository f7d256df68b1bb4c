"""The ``moeplan`` command line. Each command lives in a module of this package and registers
itself on the applications of :mod:`moeplan.cli.apps`."""
from __future__ import annotations

from moeplan.cli import collect_cmd, info, simulate_cmd, trace_cmd  # noqa: F401  (registration)
from moeplan.cli import export_cmd  # noqa: F401  (registration)
from moeplan.cli import run_cmd  # noqa: F401  (registration)
from moeplan.cli import profile_cmd  # noqa: F401  (registration)
from moeplan.cli import calibrate_cmd  # noqa: F401  (registration)
from moeplan.cli import plan_folding  # noqa: F401  (registration)
from moeplan.cli import plan_cache  # noqa: F401  (registration)
from moeplan.cli import autoscale_cmd, plan_scale  # noqa: F401  (registration)
from moeplan.cli import plan_placement  # noqa: F401  (registration)
from moeplan.cli import dashboard_cmd, plan_cmd  # noqa: F401  (registration)
from moeplan.cli import hardware_cmd, plan_serve  # noqa: F401  (registration)
from moeplan.cli.apps import app


def main() -> None:
    app()
