"""``moeplan profile`` and ``moeplan run`` on a host with torch, numpy, pyyaml, rich and typer alone.

The GPU machines have no OR-Tools, HiGHS, PuLP, pandas, Plotly or Streamlit. This test builds a
clean virtual environment with exactly those five packages (and what torch itself needs), installs
moeplan into it without its dependencies, and runs the profiler and the runtime there. The plan and
trace it runs come from the full environment, as they would from a planning host.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.model import ModelSpec
from moeplan.synth import SyntheticTraffic, synthesize

REPO = Path(__file__).resolve().parents[1]
ALONE = ("torch==2.13.0", "numpy", "pyyaml", "rich", "typer")
ABSENT = ("ortools", "highspy", "pulp", "pandas", "plotly", "streamlit")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    source = root / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "__pycache__",
                                                                ".gpu_stage", "moeplan-out"))
    for step in ([str(python), "-m", "pip", "install", "-q", *ALONE],
                 [str(python), "-m", "pip", "install", "-q", "--no-deps", str(source)]):
        done = _run(step, root)
        assert done.returncode == 0, done.stdout + done.stderr
    return python


def test_profile_and_run_need_only_torch_numpy_pyyaml_rich_typer(clean_python: Path, tmp_path: Path) -> None:
    python = clean_python
    absent = _run([str(python), "-c", f"import importlib.util as u; print([m for m in {ABSENT!r} if u.find_spec(m)])"],
                  tmp_path)
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    moeplan = [str(python.parent / "moeplan")]
    helped = _run([*moeplan, "--help"], tmp_path)
    assert helped.returncode == 0 and "profile" in helped.stdout, helped.stdout + helped.stderr

    profiled = _run([*moeplan, "profile", "--quick", "--only", "device",
                     "--out", str(tmp_path / "measured.yaml")], tmp_path)
    assert profiled.returncode == 0, profiled.stdout + profiled.stderr
    assert (tmp_path / "measured.yaml").exists()

    model = dataclasses.replace(ModelSpec.preset("deepseek-v2-lite"), name="tiny-moe", num_layers=2,
                                moe_layers=(0, 1), hidden_size=16, expert_ffn=24, num_experts=8, top_k=2,
                                shared_ffn=8, num_shared_experts=1, n_group=1, topk_group=1).validate()
    (tmp_path / "tiny.json").write_text(json.dumps(model.to_dict()))
    synthesize(model, SyntheticTraffic(tokens=400, seed=1)).save(tmp_path / "t.npz")
    made = CliRunner().invoke(app, ["plan", "placement", "--model", str(tmp_path / "tiny.json"), "--gpus", "2",
                                    "--trace", str(tmp_path / "t.npz"), "--solver", "lpt", "--slots", "8",
                                    "-o", str(tmp_path / "plan.json")])
    assert made.exit_code == 0, made.output
    ran = _run([*moeplan, "run", "--plan", str(tmp_path / "plan.json"), "--trace", str(tmp_path / "t.npz"),
                "--device", "cpu", "--kernel", "loop", "--repeats", "1", "--warmup", "0", "--tokens-per-device", "32",
                "-o", str(tmp_path / "run.json")], tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["totals"]["measured_s"] > 0 and report["totals"]["predicted_s"] > 0
    replayed = _run([*moeplan, "run", "--replay", "--plan", str(tmp_path / "plan.json"), "--trace",
                     str(tmp_path / "t.npz"), "--device", "cpu", "--kernel", "loop", "--repeats", "1", "--warmup", "0",
                     "--tokens-per-device", "32"], tmp_path)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
