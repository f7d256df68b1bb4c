"""Long steps say what they are doing when output is not a terminal (issue 28): ``status`` prints
``[step] …`` and ``[step] … done in X s`` on stderr where Rich's spinner would show nothing."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from moeplan.cli import common


def test_status_prints_step_lines_off_a_terminal(capsys) -> None:  # noqa: ANN001 - pytest fixture
    assert not common.console.is_terminal
    with common.status("solving [placement] with ilp"):
        pass
    err = capsys.readouterr().err
    assert "[step] solving [placement] with ilp\n" in err
    assert re.search(r"\[step\] solving \[placement\] with ilp done in \d+\.\d s", err)


def test_plan_placement_through_a_pipe_prints_its_steps(tmp_path: Path) -> None:
    trace = tmp_path / "t.npz"
    cmd = [sys.executable, "-c", "from moeplan.cli import main; main()"]
    made = subprocess.run(cmd + ["trace", "synth", "--model", "mixtral-8x7b", "--tokens", "1000", "-o", str(trace)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    res = subprocess.run(cmd + ["plan", "placement", "--model", "mixtral-8x7b", "--trace", str(trace), "--gpus", "8",
                                "--solver", "eplb", "-o", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "[step] solving with eplb" in res.stderr
    assert re.search(r"\[step\] solving with eplb done in \d+\.\d s", res.stderr)
    assert "[step]" not in res.stdout
