"""Long steps say what they are doing when output is not a terminal (issue 28): ``status`` prints
``[step] …`` and ``[step] … done in X s`` on stderr where Rich's spinner would show nothing;
``progress``/``track`` print ``[progress] … i/N`` lines (at most every few seconds) and a done line
where Rich's bar would show nothing — through ``moeplan compare`` and ``moeplan run --replay``."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeplan.cli import app, common


def test_status_prints_step_lines_off_a_terminal(capsys) -> None:  # noqa: ANN001 - pytest fixture
    assert not common.console.is_terminal
    with common.status("solving [placement] with ilp"):
        pass
    err = capsys.readouterr().err
    assert "[step] solving [placement] with ilp\n" in err
    assert re.search(r"\[step\] solving \[placement\] with ilp done in \d+\.\d s", err)


CMD = [sys.executable, "-c", "from moeplan.cli import main; main()"]


@pytest.fixture(scope="module")
def mixtral_plans(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """A 1000-token Mixtral trace and two 8-GPU plans of it (eplb, even), made through pipes."""
    d = tmp_path_factory.mktemp("plans")
    trace = d / "t.npz"
    made = subprocess.run(CMD + ["trace", "synth", "--model", "mixtral-8x7b", "--tokens", "1000", "-o", str(trace)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    runs = []
    for solver in ("eplb", "even"):
        runs.append(subprocess.run(CMD + ["plan", "placement", "--model", "mixtral-8x7b", "--trace", str(trace),
                                          "--gpus", "8", "--solver", solver, "-o", str(d / f"{solver}.json")],
                                   capture_output=True, text=True, timeout=120))
        assert runs[-1].returncode == 0, runs[-1].stderr
    return trace, d, runs[0]


def test_plan_placement_through_a_pipe_prints_its_steps(mixtral_plans) -> None:  # noqa: ANN001 - fixture
    res = mixtral_plans[2]
    assert "[step] solving with eplb" in res.stderr
    assert re.search(r"\[step\] solving with eplb done in \d+\.\d s", res.stderr)
    assert "[step]" not in res.stdout


def test_track_prints_progress_lines_off_a_terminal(capsys, monkeypatch) -> None:  # noqa: ANN001 - fixtures
    assert not common.err_console.is_terminal
    assert list(common.track(range(3), "scoring [plans]")) == [0, 1, 2]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[progress] scoring [plans] 0/3"                    # fast: no line between start and end
    assert re.fullmatch(r"\[progress\] scoring \[plans\] done: 3/3 in \d+\.\d s", err[1]) and len(err) == 2
    monkeypatch.setattr(common, "PROGRESS_EVERY_S", 0.0)
    with common.progress("routing tokens", total=None) as advance:
        advance(500)
        advance(250)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[progress] routing tokens 0" and re.fullmatch(r"\[progress\] routing tokens 500 \(\d+\.\d s\)", err[1])
    assert err[2].startswith("[progress] routing tokens 750 (") and err[3].startswith("[progress] routing tokens done: 750 in")


def test_compare_through_a_pipe_prints_progress_lines(mixtral_plans) -> None:  # noqa: ANN001 - fixture
    trace, d, _ = mixtral_plans
    res = subprocess.run(CMD + ["compare", str(d / "eplb.json"), str(d / "even.json"), "--trace", str(trace)],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    assert "[progress] evaluating 2 plans 0/2\n" in res.stderr
    assert re.search(r"\[progress\] evaluating 2 plans done: 2/2 in \d+\.\d s", res.stderr)
    assert "[progress]" not in res.stdout and "eplb" in res.stdout and "even" in res.stdout


def test_run_replay_off_a_terminal_prints_progress_lines(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import dataclasses

    import numpy as np

    from moeplan.hardware import HardwareProfile
    from moeplan.model import ModelSpec
    from moeplan.plan import Placement, Plan
    from moeplan.synth import SyntheticTraffic, synthesize
    model = dataclasses.replace(ModelSpec.preset("deepseek-v2-lite"), name="tiny-moe", num_layers=3,
                                moe_layers=(0, 1, 2), hidden_size=16, expert_ffn=24, num_experts=8, top_k=2,
                                shared_ffn=8, num_shared_experts=1, n_group=1, topk_group=1).validate()
    placement = Placement.from_slots(np.tile(np.arange(8).reshape(2, 4), (3, 1, 1)), 8, 2)
    plan, trace = tmp_path / "plan.json", tmp_path / "t.npz"
    Plan(model, HardwareProfile.resolve("h100-sxm").ref(), 2, 1, placement).save(plan)
    synthesize(model, SyntheticTraffic(tokens=200, seed=3)).save(trace)
    res = CliRunner().invoke(app, ["run", "--plan", str(plan), "--trace", str(trace), "--replay", "--device", "cpu",
                                   "--tokens-per-device", "16", "--repeats", "2", "--warmup", "1"])
    assert res.exit_code == 0, res.output
    assert "[progress] replaying 3 layers × 2 devices 0/6" in res.output
    assert re.search(r"\[progress\] replaying 3 layers × 2 devices done: 6/6 in \d+\.\d s", res.output)
