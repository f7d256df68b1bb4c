"""The dashboard, driven by Streamlit's AppTest: every page renders, widgets change what it shows,
and the numbers it shows equal what the library computes for the same inputs."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from moeplan.dispatch import realise
from moeplan.solvers.cache import CacheProblem, StepShape
from moeplan.solvers.cache import solve as solve_cache
from moeplan.solvers.elastic.autoscale import summary_frame
from moeplan.solvers.elastic.study import prepare, run_all
from moeplan.solvers.folding import FoldingProblem
from moeplan.solvers.folding import solve as solve_folding
from moeplan.solvers.placement import PlacementProblem, SolverOptions, solve
from moeplan.solvers.placement.exflow import traffic_report
from moeplan.solvers.placement.metrics import evaluate
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

import moeplan.dashboard
from moeplan.cli import app as cli
from moeplan.cli.common import human_bytes
from moeplan.cli.dashboard_cmd import streamlit_command
from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.export.megatron import megatron_args
from moeplan.export.sglang import location_map
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.plan import Plan
from moeplan.simulate import Workload, simulate
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize

APP = Path(moeplan.dashboard.__file__).parent / "app.py"
PAGES = APP.parent / "pages"
SMALL = {"model_preset": "olmoe-1b-7b", "gpus": 16, "tokens": 2048, "zipf": 1.0}  # 64 experts, 2 nodes of 8


def open_app(folder: Path, **state: object) -> AppTest:
    """The app with ``state`` preset in the session. Its main script is a launcher outside
    ``dashboard/``: AppTest re-detects the ``pages/`` folder beside its main script on every run
    and would then run a page without app.py's set-up panel."""
    launcher = folder / "launch_dashboard.py"
    launcher.write_text(f"import runpy\nrunpy.run_path({str(APP)!r}, run_name='__main__')\n")
    at = AppTest.from_file(str(launcher), default_timeout=180)
    for key, value in {**SMALL, **state}.items():
        at.session_state[key] = value
    return at.run()


def go(at: AppTest, page: str) -> AppTest:
    at.switch_page(str(PAGES / f"{page}.py")).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def library(model: str = "olmoe-1b-7b", gpus: int = 16, tokens: int = 2048, zipf: float = 1.0):  # noqa: ANN201
    spec = ModelSpec.preset(model)
    hw = HardwareProfile.resolve("h100-sxm").with_cluster(devices=gpus)
    trace = synthesize(spec, SyntheticTraffic(tokens=tokens, zipf=zipf, affinity=0.4, locality=0.3, segment=64, seed=0))
    return spec, hw, trace, TraceStats.of(trace)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


@pytest.fixture
def small(tmp_path: Path) -> AppTest:
    return open_app(tmp_path)


def test_every_page_renders_for_the_set_up(small: AppTest) -> None:
    assert not small.exception and not small.error
    assert small.title[0].value == "MoE deployment what-if"
    assert metric(small, "Experts per layer") == "64"
    assert metric(small, "GPUs") == "16"
    for page, title in (("placement", "Placement what-if"), ("memory", "Memory per GPU"), ("trace", "Routing trace"),
                        ("export", "Export the plan"), ("folding", "Parallel folding")):
        at = go(small, page)
        assert at.title[0].value == title
        assert not at.error, [e.value for e in at.error]


def test_placement_numbers_equal_the_library_and_follow_the_slots_slider(small: AppTest) -> None:
    at = go(small, "placement")
    spec, hw, trace, stats = library()
    cost = CostModel(spec, hw)
    for slots in (5, 6):
        at.slider(key="slots").set_value(slots).run()
        assert not at.exception
        table = at.dataframe[0].value
        problem = PlacementProblem.build(cost, stats, slots, 256, "top1")
        for solver, label in (("contiguous", "contiguous"), ("eplb", "EPLB"), ("lpt", "LPT")):
            result = solve(problem, solver, SolverOptions(balance_cap=1.01))
            metrics = evaluate(result.placement, trace, max_tokens=1024, stats=stats).summary()
            sim = simulate(cost, result.placement, trace, Workload(tokens_per_device=256)).summary()
            row = table.loc[label]
            assert row["balancedness"] == pytest.approx(metrics["balancedness"], rel=1e-9)
            assert row["GPUs touched"] == pytest.approx(metrics["devices_touched_per_token_layer"], rel=1e-9)
            assert row["nodes touched"] == pytest.approx(metrics["nodes_touched_per_token_layer"], rel=1e-9)
            assert row["cross-GPU hops"] == pytest.approx(
                traffic_report(problem, result.placement)["cross_device_hops_per_token_layer"], rel=1e-9)
            assert row["MoE time (ms)"] == pytest.approx(sim["moe_seconds"] * 1e3, rel=1e-9)
            assert row["objective (ms)"] == pytest.approx(result.objective * 1e3, rel=1e-9)
            assert row["bound (ms)"] == pytest.approx(result.bound * 1e3, rel=1e-9)
            assert row["gap"] == pytest.approx(result.gap, rel=1e-9)
    assert any(c.value.startswith("6 × 16 GPUs = 96 physical slots for 64 experts") for c in at.caption)


def test_heatmap_and_layer_map_show_the_chosen_solver_and_layer(small: AppTest) -> None:
    at = go(small, "placement")
    at.selectbox(key="map_solver").set_value("eplb")
    at.slider(key="map_layer").set_value(7).run()
    spec = ModelSpec.preset("olmoe-1b-7b")
    figures = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    heatmaps = next(f for f in figures if len([t for t in f["data"] if t["type"] == "heatmap"]) == 3)
    assert [t["name"] for t in heatmaps["data"]] == ["contiguous", "EPLB", "LPT"]
    layer_map = figures[-1]
    assert f"EPLB: decoder layer {spec.moe_layers[7]} (MoE layer 7)" in layer_map["layout"]["title"]["text"]


def test_ilp_solves_in_the_background_and_joins_the_comparison(tmp_path: Path) -> None:
    at = open_app(tmp_path, model_preset="mixtral-8x7b", gpus=8, solvers=["lpt", "ilp"], ilp_time_limit=2)
    at = go(at, "placement")
    table = at.dataframe[0].value
    assert list(table.index) == ["LPT", "ILP"]
    ilp = table.loc["ILP"]
    assert ilp["bound (ms)"] <= ilp["objective (ms)"] <= table.loc["LPT", "objective (ms)"] + 1e-9
    assert ilp["gap"] == pytest.approx(1 - ilp["bound (ms)"] / ilp["objective (ms)"], abs=1e-9)


def test_memory_page_rejects_a_plan_that_does_not_fit(small: AppTest) -> None:
    at = go(small, "memory")
    spec, hw, _, _ = library()
    report = CostModel(spec, hw).memory(int(at.session_state["slots"]), 16, kv_tokens_per_device=65536,
                                        batch_tokens_per_device=256)
    assert metric(at, "Busiest GPU") == human_bytes(report.peak)
    assert at.success and not at.error
    at.number_input(key="kv_tokens").set_value(10_000_000).run()
    report = CostModel(spec, hw).memory(int(at.session_state["slots"]), 16, kv_tokens_per_device=10_000_000,
                                        batch_tokens_per_device=256)
    with pytest.raises(InputError) as rejected:
        report.check("this plan")
    assert at.error[0].value == f"**Rejected:** {rejected.value.args[0]}.  \nFix: {rejected.value.fix}."


def test_trace_page_shows_trace_stats(small: AppTest) -> None:
    at = go(small, "trace")
    _, _, _, stats = library()
    at.slider(key="affinity_layer").set_value(3)
    at.select_slider(key="segment_len").set_value(32).run()
    assert metric(at, "Strongest P(next | expert)") == f"{stats.transitions(3).max():.3f}"
    srp, sch = stats.srp(32), stats.head_for_sch().sch(32, 16)
    assert metric(at, "SRP") == f"{srp:.3f}" and metric(at, "SCH") == f"{sch:.3f}"
    assert metric(at, "Worst layer") == f"{stats.imbalance().max():.2f}"


def test_export_page_offers_the_plan_and_every_runtime(small: AppTest) -> None:
    at = go(go(small, "placement"), "export")
    at.selectbox(key="export_solver").set_value("lpt").run()
    labels = {b.label for b in at.get("download_button")}
    assert {"Download plan JSON", "Download eplb.json", "Download launch_vllm.sh",
            "Download placement_eplb.json"} <= labels
    assert "Download expert_location.json" not in labels   # SGLang has no expert-location support for OLMoE
    assert any("SGLang cannot place the experts of OLMoE" in w.value and "get_model_config_for_expert_location"
               in w.value for w in at.warning)
    assert any("Megatron-Core cannot run this plan" in w.value for w in at.warning)  # replicas: Megatron has none
    spec, hw, trace, stats = library()
    problem = PlacementProblem.build(CostModel(spec, hw), stats, int(at.session_state["slots"]), 256)
    result = solve(problem, "lpt", SolverOptions(balance_cap=1.01))
    served = realise(result.placement, "sglang-static", spec)  # the exported plan: what SGLang realises
    assert metric(at, "Balancedness") == f"{evaluate(served, trace, stats=stats).balancedness:.3f}"
    at.selectbox(key="export_solver").set_value("eplb").run()  # EPLB may put two replicas of an expert on one GPU
    eplb = Plan(model=spec, hardware=hw.ref(), devices_per_node=8, nodes=2,
                placement=solve(problem, "eplb", SolverOptions(balance_cap=1.01)).placement)
    with pytest.raises(InputError) as refused:
        location_map(eplb)
    assert f"SGLang cannot run this plan: {refused.value}" in [w.value for w in at.warning]


def test_folding_page_ranks_like_the_folding_solver(tmp_path: Path) -> None:
    at = open_app(tmp_path, model_preset="qwen3-30b-a3b", fold_mode="train", fold_batch=1024)
    at = go(at, "folding")
    spec = ModelSpec.preset("qwen3-30b-a3b")
    hw = HardwareProfile.resolve("h100-sxm").with_cluster(devices=16)
    problem = FoldingProblem(CostModel(spec, hw), "train", 4096, 1024).validate()
    result = solve_folding(problem, top=20)
    table = at.dataframe[0].value
    assert table.iloc[0]["step (ms)"] == pytest.approx(result.best.score * 1e3, rel=1e-9)
    assert table.iloc[1]["why it loses"] == result.ranked[1].reason
    second = result.ranked[1]
    at.selectbox(key="fold_pick").set_value(second.candidate.label()).run()
    plan = Plan(model=spec, hardware=hw.ref(), devices_per_node=8, nodes=2, parallel=problem.parallel(second.candidate))
    assert at.code[0].value == " ".join(megatron_args(plan))


def test_uploaded_config_and_trace_drive_the_pages(tmp_path: Path) -> None:
    spec = ModelSpec.preset("mixtral-8x7b")
    config = json.loads(resources.files("moeplan.presets").joinpath("mixtral-8x7b.json").read_text())["config"]
    trace = synthesize(spec, SyntheticTraffic(tokens=1000, seed=3))
    trace.save(tmp_path / "mine.npz")
    at = open_app(tmp_path, gpus=8, model_source="Upload config.json", traffic_source="Upload trace")
    assert at.info  # asks for the files
    at.sidebar.get("file_uploader")[0].set_value(("config.json", json.dumps(config).encode(), "application/json"))
    at.sidebar.get("file_uploader")[1].set_value(("mine.npz", (tmp_path / "mine.npz").read_bytes(),
                                                  "application/octet-stream"))
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.subheader[0].value == "uploaded model"
    assert metric(at, "Tokens") == "1,000"
    at.sidebar.get("file_uploader")[0].set_value(("config.json", b"{not json", "application/json")).run()
    assert at.error and at.error[0].value.startswith("config.json: not valid JSON")


def test_a_trace_for_another_model_is_refused(tmp_path: Path) -> None:
    synthesize(ModelSpec.preset("mixtral-8x7b"), SyntheticTraffic(tokens=500)).save(tmp_path / "mixtral.npz")
    at = open_app(tmp_path, traffic_source="Upload trace")
    at.sidebar.get("file_uploader")[0].set_value(("mixtral.npz", (tmp_path / "mixtral.npz").read_bytes(),
                                                  "application/octet-stream")).run()
    assert at.error and "mixtral.npz" in at.error[0].value and "the model has 16 × 64" in at.error[0].value


def test_dashboard_command_runs_streamlit_on_the_packaged_app() -> None:
    result = CliRunner().invoke(cli, ["dashboard", "--help"])
    assert result.exit_code == 0 and "--port" in result.output
    command = streamlit_command(8600, "localhost")
    entry = Path(command[command.index("run") + 1])
    assert entry.name == "app.py" and entry.exists() and (entry.parent / "pages" / "placement.py").exists()
    flags = dict(zip(command[5::2], command[6::2]))
    assert flags["--server.headless"] == "true" and flags["--server.port"] == "8600"




def test_cache_page_shows_the_cache_planner(tmp_path: Path) -> None:
    at = go(open_app(tmp_path, model_preset="mixtral-8x7b", gpus=8), "cache")
    spec, _, trace, _ = library("mixtral-8x7b", gpus=8)
    gpu = HardwareProfile.resolve("h100-sxm")
    for policy in ("prefetch", "lru"):
        at.selectbox(key="cache_policy").set_value(policy).run()
        sizing = solve_cache(CacheProblem(CostModel(spec, gpu), trace, StepShape("decode", 1), policy, 4096, None))
        summary = sizing.summary()
        assert metric(at, "Predicted throughput") == f"{summary['tokens_per_s']:,.1f} tokens/s"
        assert metric(at, "Memory freed") == human_bytes(summary["memory_saved_bytes"])
        assert at.dataframe[0].value.loc["plan", "tokens_per_s"] == pytest.approx(summary["tokens_per_s"], rel=1e-9)


def test_elastic_page_shows_the_autoscaling_study(tmp_path: Path) -> None:
    at = go(open_app(tmp_path, model_preset="mixtral-8x7b", gpus=8), "elastic")
    spec, _, _, stats = library("mixtral-8x7b", gpus=8)
    study = prepare(CostModel(spec, HardwareProfile.resolve("h100-sxm")), stats.load, (8, 16, 24, 32, 40))
    for shape in ("diurnal", "spike"):
        at.selectbox(key="elastic_shape").set_value(shape).run()
        expected = summary_frame(run_all(study, (shape,), (0,), ("threshold",))).set_index("strategy")
        shown = at.dataframe[0].value
        assert list(shown.index) == list(expected.index)
        for column in ("slo_attainment", "device_hours", "scaling_steps"):
            assert shown[column].tolist() == pytest.approx(expected[column].tolist(), rel=1e-9)


def test_serve_page_shows_the_pareto_front_of_the_serving_search(tmp_path: Path) -> None:
    from moeplan.precision import Precision
    from moeplan.serve_search import pareto, search
    at = go(open_app(tmp_path, model_preset="qwen3-30b-a3b", gpus=8), "serve")
    spec = ModelSpec.preset("qwen3-30b-a3b")
    cm = CostModel(spec, HardwareProfile.resolve("h100-sxm").with_cluster(devices=8))
    front = pareto(search(cm, Precision("fp8", "fp8", "fp8"), "sglang", 8, 1024, 1024,
                          [1, 4, 8, 16, 32, 64, 128, 256], 2.0, 0.05))
    table = at.dataframe[0].value
    assert list(table["TPOT (ms)"]) == pytest.approx([x.point.tpot * 1e3 for x in front])
    assert "sglang.launch_server" in at.code[0].value


def test_placement_from_recorded_loads_equals_the_cli_pipeline(tmp_path: Path) -> None:
    """Two recorded workloads, one uploaded and one by path: the panel's balance figures are
    ``moeplan plan placement --load``'s under the chosen dispatch model, EPLB global beside them."""
    from moeplan.loads import read_loads
    from moeplan.solvers.placement import rebalance_experts
    from moeplan.solvers.placement.metrics import balancedness
    from moeplan.solvers.placement.pipeline import plan_from_loads
    from moeplan.plan import Placement

    spec, hw, _, _ = library()
    rng = np.random.default_rng(4)
    paths = []
    for i in range(2):
        counts = rng.zipf(1.6, (spec.num_layers, spec.num_experts)).clip(max=500) * (10 + i)
        paths.append(tmp_path / f"w{i}.json")
        paths[-1].write_text(json.dumps({"logical_count": counts.tolist()}))
    at = go(open_app(tmp_path, loads_paths=str(paths[1]), loads_loo=True, loads_dispatch="even"), "placement")
    at.get("file_uploader")[0].set_value(("w0.json", paths[0].read_bytes(), "application/json")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = next(df.value for df in at.dataframe if "EPLB global (even)" in df.value.columns)
    slots = int(at.session_state["slots"])
    cost = CostModel(spec, hw)
    w = read_loads(paths, spec)
    _, plan, _ = plan_from_loads(cost, w, slots, 256, "even", "even", SolverOptions(), leave_one_out=True)
    phy2log, _, _ = rebalance_experts(w.pooled(), hw.num_devices * slots, 1, 1, hw.num_devices)
    eplb = Placement.from_slots(phy2log.reshape(spec.num_moe_layers, hw.num_devices, slots), spec.num_experts,
                                hw.devices_per_node, dispatch="even")
    for name, load in zip(("w0.json", "w1.json"), w.loads):
        row = table.loc[name]
        assert row["moeplan (even)"] == pytest.approx(plan.predicted["workload_balancedness"][name], rel=1e-9)
        assert row["moeplan held out"] == pytest.approx(plan.predicted["leave_one_out_balancedness"][name], rel=1e-9)
        assert row["EPLB global (even)"] == pytest.approx(balancedness(eplb, load), rel=1e-9)
    assert metric(at, "Leave-one-out mean") == f"{plan.predicted['leave_one_out_mean']:.4f}"
    at.session_state["loads_paths"] = str(tmp_path / "missing.json")
    at.run()
    assert at.error and "missing.json" in at.error[0].value
