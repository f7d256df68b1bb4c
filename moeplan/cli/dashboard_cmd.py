"""``moeplan dashboard``: start the Streamlit what-if dashboard (``streamlit run`` on its app.py)."""
from __future__ import annotations

import subprocess
import sys
from importlib import resources

import typer

from moeplan.cli.apps import app
from moeplan.cli.common import console, guarded


def streamlit_command(port: int, address: str) -> list[str]:
    """``python -m streamlit run <moeplan/dashboard/app.py>`` headless on ``address:port``, without
    usage statistics, file watcher or deploy button (the Stop button stays)."""
    entry = resources.files("moeplan.dashboard").joinpath("app.py")
    return [sys.executable, "-m", "streamlit", "run", str(entry), "--server.headless", "true",
            "--server.port", str(port), "--server.address", address, "--server.fileWatcherType", "none",
            "--client.toolbarMode", "viewer", "--browser.gatherUsageStats", "false"]


@app.command("dashboard")
@guarded
def dashboard(
    port: int = typer.Option(8501, min=1, max=65535, help="Port to serve on."),
    address: str = typer.Option("localhost", help="Address to bind (0.0.0.0 to let other machines connect)."),
) -> None:
    """Start the what-if dashboard: pick a model, hardware, cluster and traffic, compare placement solvers
    side by side, check memory, read the trace, export the plan; open the printed address in a browser."""
    console.print(f"moeplan dashboard: http://{address}:{port}  (Ctrl+C stops it)")
    raise typer.Exit(subprocess.call(streamlit_command(port, address)))
