"""``moeplan profile``: measure this machine (see :mod:`moeplan.profiler.command`)."""
from __future__ import annotations

from moeplan.cli.apps import app
from moeplan.cli.common import guarded
from moeplan.profiler.command import profile

app.command("profile")(guarded(profile))
