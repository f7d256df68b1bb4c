"""Dispatch models: the balance moeplan reports is the one the target runtime realises from the
exported file alone; recorded loads plan robust placements; weighted plans are refused where a
runtime cannot honour their shares."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.dispatch import even_share, realise, sglang_static_share
from moeplan.errors import InputError
from moeplan.export.registry import export_plan
from moeplan.hardware import HardwareProfile
from moeplan.cost import CostModel
from moeplan.loads import read_loads
from moeplan.model import ModelSpec
from moeplan.plan import Placement, Plan
from moeplan.solvers.placement import PlacementProblem, SolverOptions, solve
from moeplan.solvers.placement.metrics import balancedness
from moeplan.stats import TraceStats
from moeplan.trace import RoutingTrace

MODEL = "deepseek-v2-lite"


def sglang_reference_dispatch(phy2log: list[list[int]], num_gpus: int) -> list[list[list[int]]]:
    """Written from SGLang's ``compute_logical_to_rank_dispatch_physical_map`` (sgl-project/sglang @
    01fec5c2, python/sglang/srt/eplb/expert_location.py) with plain lists: [gpu][layer][logical]."""
    r = random.Random(42)
    num_physical = len(phy2log[0])
    num_logical = max(max(row) for row in phy2log) + 1
    local = num_physical // num_gpus
    out = [[[-1] * num_logical for _ in phy2log] for _ in range(num_gpus)]
    for layer, row in enumerate(phy2log):
        for logical in range(num_logical):
            candidates = [p for p in range(num_physical) if row[p] == logical]
            partial = [-1] * num_gpus
            for gpu in range(num_gpus):
                same = [p for p in candidates if p // local == gpu]
                if same:
                    partial[gpu] = same[0]
            remain = partial.count(-1)
            q, rem = divmod(remain, len(candidates))
            fair = candidates * q + r.sample(candidates, k=rem)
            r.shuffle(fair)
            it = iter(fair)
            for gpu in range(num_gpus):
                out[gpu][layer][logical] = partial[gpu] if partial[gpu] != -1 else next(it)
    return out


def balance_of(physical_load: np.ndarray, devices: int) -> float:
    """Σ max / Σ mean device load from per-physical-expert loads [layers, P] (rank-major slots)."""
    dev = physical_load.reshape(physical_load.shape[0], devices, -1).sum(axis=2)
    return float(dev.max(axis=1).sum() / dev.mean(axis=1).sum())


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dispatch") / "t.npz"
    assert CliRunner().invoke(app, ["trace", "synth", "-o", str(path), "--model", MODEL, "--tokens", "1500"]
                              ).exit_code == 0
    return path


def plan_with(tmp: Path, trace: Path, dispatch: str, solver: str) -> Plan:
    out = tmp / f"{dispatch}.json"
    res = CliRunner().invoke(app, ["plan", "placement", "--model", MODEL, "--trace", str(trace), "--gpus", "8",
                                   "--slots", "80", "--solver", solver, "--time-limit", "5", "--judge-fraction", "0",
                                   "--dispatch", dispatch, "-o", str(out)])
    assert res.exit_code == 0, res.output
    return Plan.load(out)


def test_sglang_static_balance_equals_the_exported_maps(tmp_path: Path, trace_file: Path) -> None:
    plan = plan_with(tmp_path, trace_file, "sglang-static", "even")
    assert plan.placement.dispatch == "sglang-static"
    export_plan(plan, "sglang", tmp_path / "loc.json")
    phy2log = json.loads((tmp_path / "loc.json").read_text())["physical_to_logical_map"]
    chosen = np.array(sglang_reference_dispatch(phy2log, 8))               # [gpu, layer, logical]
    model = plan.model
    load = TraceStats.of(RoutingTrace.load(trace_file)).load
    rows = np.array(phy2log)[list(model.moe_layers)]
    physical = np.zeros(rows.shape)
    for i, layer in enumerate(model.moe_layers):
        for gpu in range(8):   # each rank sends 1/8 of every expert's tokens to its chosen replica
            np.add.at(physical[i], chosen[gpu, layer], load[i] / 8)
    assert balance_of(physical, 8) == pytest.approx(plan.predicted["balancedness"], rel=1e-9)


def test_even_balance_equals_the_exported_eplb_tensors(tmp_path: Path, trace_file: Path) -> None:
    plan = plan_with(tmp_path, trace_file, "even", "ilp")
    export_plan(plan, "eplb", tmp_path / "eplb")
    data = json.loads((tmp_path / "eplb" / "eplb.json").read_text())
    phy2log, logcnt = np.array(data["phy2log"]), np.array(data["logcnt"])
    load = TraceStats.of(RoutingTrace.load(trace_file)).load
    physical = np.take_along_axis(load / logcnt, phy2log, axis=1)
    assert balance_of(physical, data["num_gpus"]) == pytest.approx(plan.predicted["balancedness"], rel=1e-9)


def test_weighted_balance_is_the_plans_shares_and_export_is_refused(tmp_path: Path, trace_file: Path) -> None:
    plan = plan_with(tmp_path, trace_file, "weighted", "ilp")
    saved = json.loads((tmp_path / "weighted.json").read_text())["placement"]
    share = np.array(saved["replica_share"])
    load = TraceStats.of(RoutingTrace.load(trace_file)).load
    physical = np.take_along_axis(load, np.array(saved["slot_expert"]).reshape(load.shape[0], -1), axis=1)
    assert balance_of(physical * share.reshape(physical.shape), 8) == pytest.approx(
        plan.predicted["balancedness"], rel=1e-6)
    realised = plan.predicted["realised_balancedness"]
    assert realised["weighted"] == pytest.approx(plan.predicted["balancedness"])
    res = CliRunner().invoke(app, ["export", str(tmp_path / "weighted.json"), "--format", "eplb",
                                   "-o", str(tmp_path / "out")])
    if np.allclose(share, even_share(np.array(saved["slot_expert"]), plan.model.num_experts)):
        pytest.skip("the solver's shares happen to be even")
    assert res.exit_code == 2 and f"{realised['even']:.4f}" in res.output and "--dispatch even" in res.output


def test_sglang_static_is_even_exactly_when_counts_divide_the_ranks() -> None:
    model = ModelSpec.resolve(MODEL)
    layers = model.num_moe_layers
    slots = np.array([[list(range(8 * d, 8 * d + 8)) + [8 * ((d + 1) % 8) + layer % 8] for d in range(8)]
                      for layer in range(layers)])
    even = even_share(slots, 64)
    static = realise(Placement.from_slots(slots, 64, 8), "sglang-static", model).replica_share
    distinct = all(len(set(dev)) == len(dev) for layer in slots for dev in layer)
    assert distinct and np.allclose(static, even)
    three = slots.copy()
    three[:, 2, 8] = three[:, 0, 8]  # a third replica of device 0's spare expert: 3 replicas over 8 ranks
    full = np.tile(np.arange(72) % 64, (model.num_layers, 1))
    full[list(model.moe_layers)] = three.reshape(model.num_moe_layers, -1)
    share = sglang_static_share(full, 8)
    assert np.allclose(np.bincount(full[1], weights=share[1], minlength=64), 1.0)
    assert not np.allclose(share[list(model.moe_layers)].reshape(three.shape), even_share(three, 64))


def write_dump(path: Path, model: ModelSpec, load: np.ndarray) -> Path:
    full = np.zeros((model.num_layers, model.num_experts), dtype=np.int64)
    full[list(model.moe_layers)] = load
    path.write_text(json.dumps({"logical_count": full.tolist()}))
    return path


def test_loads_plan_robust_placement_with_leave_one_out(tmp_path: Path) -> None:
    model = ModelSpec.resolve(MODEL)
    rng = np.random.default_rng(1)
    base = rng.gamma(0.7, size=(model.num_moe_layers, 64))
    files = [write_dump(tmp_path / f"w{i}.json", model, np.rint(1000 * base * rng.gamma(4, size=base.shape) / 4))
             for i in range(3)]
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", "placement", "--model", MODEL, "--gpus", "8", "--slots", "80",
                                   "--solver", "even", "--dispatch", "sglang-static", "--leave-one-out", "-o", str(out),
                                   *[a for f in files for a in ("--load", str(f))]])
    assert res.exit_code == 0, res.output
    plan = Plan.load(out)
    per = plan.predicted["workload_balancedness"]
    assert set(per) == {"w0.json", "w1.json", "w2.json"} and max(per.values()) < 1.1
    assert set(plan.predicted["leave_one_out_balancedness"]) == set(per)
    assert plan.placement.dispatch == "sglang-static"
    # robust beats planning on one workload, judged on the others
    cost = CostModel(model, HardwareProfile.resolve("h100-sxm").with_cluster(devices=8))
    w = read_loads(files, model)
    both = solve(PlacementProblem.from_loads(cost, w.loads, 10), "even", SolverOptions())
    one = solve(PlacementProblem.from_loads(cost, w.loads[:1], 10), "even", SolverOptions())
    assert np.mean([balancedness(both.placement, x) for x in w.loads]) <= \
        np.mean([balancedness(one.placement, x) for x in w.loads]) + 1e-9


def test_dump_with_dense_counts_or_wrong_layers_is_refused(tmp_path: Path) -> None:
    model = ModelSpec.resolve(MODEL)
    full = np.ones((model.num_layers, model.num_experts), dtype=np.int64)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"logical_count": full.tolist()}))
    with pytest.raises(InputError, match="dense layer 0"):
        read_loads([bad], model)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "moeplan-load", "layer_ids": [5, 6], "load": [[1] * 64] * 2}))
    with pytest.raises(InputError, match="names layers"):
        read_loads([other], model)
