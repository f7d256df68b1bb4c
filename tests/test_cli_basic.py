"""The basic commands work end to end, and bad input exits 2 with one line naming the file or field."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.trace import RoutingTrace


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_models_lists_every_preset_with_published_figures() -> None:
    code, out = run("models")
    assert code == 0, out
    for slug in ModelSpec.preset_names():
        assert slug in out
    assert "671.03 B" in out and "671.00 B" in out  # DeepSeek-V3: counted next to published


def test_models_shows_one_model() -> None:
    code, out = run("models", "deepseek-v3")
    assert code == 0, out
    assert "256 × 8" in out and "8 groups, top 4" in out and "mla" in out


def test_hardware_lists_and_shows_profiles() -> None:
    code, out = run("hardware")
    assert code == 0, out
    for name in HardwareProfile.bundled():
        assert name in out
    code, out = run("hardware", "h100-sxm")
    assert code == 0, out
    assert "NVLink" in out and "datasheet" in out and "datasheet figures only" in out


def test_trace_synth_then_stats(tmp_path: Path) -> None:
    trace_path = tmp_path / "t.npz"
    code, out = run("trace", "synth", "--model", "deepseek-v3", "--tokens", "2000", "-o", str(trace_path))
    assert code == 0, out
    trace = RoutingTrace.load(trace_path)
    assert trace.expert_ids.shape == (2000, 58, 8)
    stats_json = tmp_path / "stats.json"
    code, out = run("trace", "stats", str(trace_path), "--json", str(stats_json))
    assert code == 0, out
    assert "58 × 256 × 8" in out and "SRP" in out
    data = json.loads(stats_json.read_text())
    assert data["tokens"] == 2000 and len(data["load"]) == 58
    assert np.array(data["load"]).sum() == 2000 * 58 * 8


def _bad(code: int, out: str, *needles: str) -> None:
    assert code == 2, out
    assert "error:" in out and "Traceback" not in out
    for needle in needles:
        assert needle in out, out


def test_missing_trace_file(tmp_path: Path) -> None:
    _bad(*run("trace", "stats", str(tmp_path / "nothing.npz")), "nothing.npz", "file not found")


def test_bad_preset_name(tmp_path: Path) -> None:
    _bad(*run("trace", "synth", "--model", "deepseek-v9", "--tokens", "10", "-o", str(tmp_path / "t.npz")),
         "deepseek-v9", "'model'")
    assert not (tmp_path / "t.npz").exists()
    _bad(*run("models", "deepseek-v9"), "deepseek-v9")


def test_corrupt_npz(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    _bad(*run("trace", "stats", str(path)), "corrupt.npz", "NPZ")


def test_npz_without_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    _bad(*run("trace", "stats", str(path)), "other.npz", "expert_ids")


def test_wrong_yaml_field(tmp_path: Path) -> None:
    data = HardwareProfile.resolve("h100-sxm").to_dict()
    data["device"]["memory_bytes"]["value"] = "plenty"
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    _bad(*run("hardware", str(path)), "mine.yaml", "device.memory_bytes.value")


def test_bad_option_values(tmp_path: Path) -> None:
    _bad(*run("trace", "synth", "--model", "mixtral-8x7b", "--tokens", "10", "--affinity", "2",
              "-o", str(tmp_path / "t.npz")), "affinity")
    trace_path = tmp_path / "t.npz"
    assert run("trace", "synth", "--model", "mixtral-8x7b", "--tokens", "50", "-o", str(trace_path))[0] == 0
    _bad(*run("trace", "stats", str(trace_path), "--layer", "99"), "layer")


def test_models_config_path_not_found(tmp_path: Path) -> None:
    _bad(*run("models", str(tmp_path / "nowhere" / "config.json")), "config.json", "file not found")


@pytest.mark.parametrize("text", ["{", '{"model_type": "mixtral"}'])
def test_models_bad_config_json(text: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    _bad(*run("models", str(path)), "config.json")


def test_streamlit_started_by_hand_binds_localhost() -> None:
    root = Path(__file__).resolve().parents[1]
    for folder in (root, root / "dashboard"):  # streamlit reads .streamlit/ of the folder it is started in
        lines = [x.strip() for x in (folder / ".streamlit" / "config.toml").read_text().splitlines()]
        assert lines.index("[server]") < lines.index('address = "localhost"')


def test_printed_megatron_arguments_survive_a_shell() -> None:
    import shlex
    code, out = run("plan", "folding", "--model", "deepseek-v3", "--hardware", "h100-sxm", "--gpus", "256")
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("--num-layers"))
    words = shlex.split(line)
    freq = words[words.index("--moe-layer-freq") + 1]
    assert freq.startswith("([0]*3+[1]*58)") or freq == "([0]*3+[1]*58)"
