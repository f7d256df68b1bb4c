"""The end-to-end CLI workflow: simulate, plan (trace → stats → placement → validate → export) and compare."""
from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from moeplan.cli.apps import app
from moeplan.plan import Plan

runner = CliRunner()


def invoke(*args: str):  # noqa: ANN201 - test helper
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_plan_end_to_end_then_compare_and_simulate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = invoke("plan", "--model", "qwen1.5-moe-a2.7b", "--hardware", "h100-sxm", "--gpus", "8", "--tokens", "4000",
                 "--solver", "lpt", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "balancedness" in res.output and "eplb" in res.output and "sglang.launch_server" in res.output
    plan = Plan.load(out / "plan.json")
    assert plan.placement is not None and plan.num_devices == 8 and plan.solver["name"] == "lpt"
    location = json.loads((out / "sglang" / "expert_location.json").read_text())
    assert set(location) == {"physical_to_logical_map"} and len(location["physical_to_logical_map"]) == 24
    trace = out / "qwen1.5-moe-a2.7b-synthetic.npz"
    res = invoke("compare", str(out / "plan.json"), str(out / "plan.json"), "--trace", str(trace))
    assert res.exit_code == 0 and "devices touched per token per layer" in res.output
    res = invoke("simulate", "--trace", str(trace), "--plan", str(out / "plan.json"), "--hardware", "h100-sxm",
                 "-o", str(tmp_path / "sim.json"))
    assert res.exit_code == 0 and "dispatch all-to-all" in res.output and "unmeasured" in res.output
    sim = json.loads((tmp_path / "sim.json").read_text())
    assert sim["devices"] == 8 and len(sim["per_layer"]["total"]) == 24


def test_bad_inputs_exit_2_and_write_nothing(tmp_path: Path) -> None:
    res = invoke("plan", "--model", "no-such-model", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "unknown model preset" in res.output
    res = invoke("plan", "--model", "olmoe-1b-7b", "--gpus", "12", "--export", "vllm", "--out", str(tmp_path / "o2"))
    assert res.exit_code == 2 and "12 devices" in res.output
    res = invoke("plan", "--model", "olmoe-1b-7b", "--out", str(tmp_path / "o3"))
    assert res.exit_code == 2 and "--export sglang" in res.output and "OlmoeForCausalLM" in res.output
    assert not (tmp_path / "o3").exists()
    res = invoke("compare", str(tmp_path / "missing.json"), "--trace", str(tmp_path / "t.npz"))
    assert res.exit_code == 2 and "file not found" in res.output
    res = invoke("simulate", "--trace", str(tmp_path / "t.npz"))
    assert res.exit_code == 2
    assert not (tmp_path / "o" / "plan.json").exists()
