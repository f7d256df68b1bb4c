"""A plan is priced with the hardware profile it was made on, by every consumer.

Planned on ``measured/h200-sxm``, a plan must be re-priced by ``moeplan run``, ``moeplan compare``,
``moeplan plan scale`` and the dashboard with that measured file — not with the datasheet profile
of the same name — and a step's simulated total must be the cost model's own StepCost.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from moeplan.solvers.elastic import ScalingProblem, TransferCosts, plan_scaling
from moeplan.solvers.placement.pipeline import placement_quality
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.cli.common import human_seconds
from moeplan.cost import CostModel
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.plan import Plan, contiguous_placement
from moeplan.simulate import Workload, simulate
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize
from moeplan.trace import RoutingTrace

TOKENS_PER_DEVICE = 64


def tiny_model() -> ModelSpec:
    """8 experts, top-2, 3 MoE layers, hidden 16, expert FFN 24, a shared expert of 8."""
    return dataclasses.replace(ModelSpec.preset("deepseek-v2-lite"), name="tiny-moe", num_layers=3,
                               moe_layers=(0, 1, 2), hidden_size=16, expert_ffn=24, num_experts=8, top_k=2,
                               shared_ffn=8, num_shared_experts=1, n_group=1, topk_group=1).validate()


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("pricing")
    model, trace, plan = root / "tiny.json", root / "t.npz", root / "p.json"
    model.write_text(json.dumps(tiny_model().to_dict()))
    synthesize(tiny_model(), SyntheticTraffic(tokens=1200, zipf=1.0, seed=4)).save(trace)
    cli("plan", "placement", "--model", str(model), "--hardware", "measured/h200-sxm", "--gpus", "2",
        "--trace", str(trace), "--solver", "lpt", "--slots", "10", "--tokens-per-device", str(TOKENS_PER_DEVICE),
        "-o", str(plan))
    return plan, trace, root


def test_run_compare_scale_and_dashboard_price_with_the_plans_measured_profile(planned) -> None:
    plan_path, trace_path, root = planned
    plan = Plan.load(plan_path)
    measured = HardwareProfile.resolve("measured/h200-sxm")
    assert plan.hardware == measured.ref() and plan.hardware.measured
    cluster = measured.with_cluster(devices=2)
    datasheet = HardwareProfile.resolve("h200-sxm").with_cluster(devices=2)
    assert cluster.provenance_note() != datasheet.provenance_note()
    cost = CostModel(plan.model, cluster, plan.cost_options)
    trace = RoutingTrace.load(trace_path)
    assert plan.placement is not None
    quality = placement_quality(cost, plan.placement, trace, TOKENS_PER_DEVICE)
    on_datasheet = placement_quality(CostModel(plan.model, datasheet, plan.cost_options), plan.placement, trace,
                                     TOKENS_PER_DEVICE)
    assert quality["moe_seconds_ep"] != on_datasheet["moe_seconds_ep"]     # the profiles really price differently

    out = cli("compare", str(plan_path), "--trace", str(trace_path), "--tokens-per-device", str(TOKENS_PER_DEVICE))
    assert cluster.provenance_note() in out and human_seconds(quality["moe_seconds_ep"]) in out


    scaled = root / "scaled.json"
    cli("plan", "scale", "--plan", str(plan_path), "--trace", str(trace_path), "--to", "4", "-o", str(scaled))
    step = plan_scaling(ScalingProblem.build(CostModel(plan.model, measured, plan.cost_options), plan.placement,
                                             TraceStats.of(trace).load, 4),
                        TransferCosts.of(CostModel(plan.model, measured, plan.cost_options)), plan.placement)
    new = Plan.load(scaled)
    assert new.hardware == measured.ref()
    assert new.predicted["scaling"]["seconds"] == pytest.approx(step.seconds)

    from moeplan.dashboard.compute import plan_cost, price_plan
    assert plan_cost(plan).hw.to_dict() == cluster.to_dict()
    priced = price_plan(plan, trace, TOKENS_PER_DEVICE)
    assert priced["moe_seconds_ep"] == quality["moe_seconds_ep"] and priced["balancedness"] == quality["balancedness"]


def test_run_predicts_with_the_plans_measured_profile(planned) -> None:
    pytest.importorskip("torch")
    plan_path, trace_path, root = planned
    cluster = HardwareProfile.resolve("measured/h200-sxm").with_cluster(devices=2)

    def run_prediction(*hardware: str) -> dict:
        report = root / "run.json"
        cli("run", "--plan", str(plan_path), "--trace", str(trace_path), "--device", "cpu", "--kernel", "loop",
            "--repeats", "1", "--warmup", "0", "--tokens-per-device", str(TOKENS_PER_DEVICE), *hardware,
            "-o", str(report))
        return json.loads(report.read_text())

    ran = run_prediction()
    assert ran["profile_note"] == cluster.provenance_note()
    assert run_prediction("--hardware", "measured/h200-sxm")["totals"]["predicted_s"] == ran["totals"]["predicted_s"]
    assert run_prediction("--hardware", "h200-sxm")["totals"]["predicted_s"] != ran["totals"]["predicted_s"]


def test_a_renamed_profile_stops_every_consumer_with_the_fix(planned, tmp_path: Path) -> None:
    plan_path, trace_path, _ = planned
    own = tmp_path / "my-h200.yaml"
    own.write_text(Path(HardwareProfile.bundled()["measured/h200-sxm"]).read_text())
    data = json.loads(plan_path.read_text())
    data["hardware"]["file"] = str(own)
    moved = tmp_path / "p.json"
    moved.write_text(json.dumps(data))
    own.rename(tmp_path / "renamed.yaml")
    for args in (["compare", str(moved), "--trace", str(trace_path)],
                 ["run", "--plan", str(moved), "--trace", str(trace_path), "--device", "cpu"],
                 ["plan", "scale", "--plan", str(moved), "--trace", str(trace_path), "--to", "4"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "cannot be found" in result.output and "--hardware PATH" in result.output, result.output
    fixed = CliRunner().invoke(app, ["compare", str(moved), "--trace", str(trace_path),
                                     "--hardware", str(tmp_path / "renamed.yaml")])
    assert fixed.exit_code == 0, fixed.output


def test_the_simulated_step_total_is_the_cost_models_step_cost() -> None:
    model = tiny_model()
    cost = CostModel(model, HardwareProfile.resolve("measured/h200-sxm").with_cluster(devices=1))
    trace = synthesize(model, SyntheticTraffic(tokens=600, zipf=1.0, seed=5))
    work = Workload(tokens_per_device=600, context=2048)
    result = simulate(cost, contiguous_placement(3, 8, 1, 1, 8), trace, work)
    assert result.batches == 1
    assert float(np.mean(result.step_total)) == pytest.approx(result.step.total)
    assert result.step.moe == pytest.approx(float(np.mean(result.step_moe)))
    counts = TraceStats.of(trace).load                     # one device holding every expert: the one-GPU step
    assert result.step.total == pytest.approx(cost.forward_time(600, 2048, "prefill", counts).total)
