"""Elastic scaling: the min-move planner and its schedule on hand-made cases (known minima, every
expert served throughout, memory peaks, evacuation first, balance target), the autoscaling
simulation, the CLI, and live 2 → 3 → 2 scaling of the torch runtime on CPU (gloo)."""
from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pytest
from moeplan.solvers.elastic import ScalingProblem, TransferCosts, plan_scaling, scaling_plans, tradeoff
from moeplan.solvers.elastic.assign import kept_upper_bound
from moeplan.solvers.elastic.autoscale import (Policy, autoscale_frame, simulate_autoscale, static_strategy,
                                               strategies, summary_frame)
from moeplan.solvers.elastic.latency import LatencyTable
from moeplan.solvers.elastic.schedule import colour_rounds
from moeplan.solvers.elastic.traffic import SHAPES, arrival_trace
from moeplan.solvers.placement.metrics import layer_balancedness
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.plan import Plan, contiguous_placement
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize


def tiny_model() -> ModelSpec:
    """8 experts, top-2, 3 MoE layers, hidden 16, expert FFN 24, a shared expert of 8."""
    return dataclasses.replace(ModelSpec.preset("deepseek-v2-lite"), name="tiny-moe", num_layers=3,
                               moe_layers=(0, 1, 2), hidden_size=16, expert_ffn=24, num_experts=8, top_k=2,
                               shared_ffn=8, num_shared_experts=1, n_group=1, topk_group=1).validate()


COSTS = TransferCosts.of(CostModel(tiny_model(), HardwareProfile.resolve("h100-sxm")))


def replay(problem: ScalingProblem, new: np.ndarray, step: Any) -> list[np.ndarray]:
    """Play the schedule event by event and check the protocol independently of the planner:
    every copy reads an expert its source holds, each round sends and receives at most one expert
    per device, every new slot is filled (unchanged, local copy or a delivered copy) by the
    switch, and the replicas serving each expert never drop to zero. Returns the serving replica
    counts [layers, experts] after each event (rounds, then the switch)."""
    sched = step.schedule
    old = problem.old_slots
    nl, e = problem.num_layers, problem.num_experts
    staged: set[tuple[int, int, int]] = set()
    serving = []

    def counts(slots: np.ndarray) -> np.ndarray:
        return np.stack([np.bincount(slots[layer].ravel(), minlength=e) for layer in range(nl)])

    for r, chunk in enumerate(sched.by_round()):
        assert chunk, f"round {r} is empty"
        assert len({t.src for t in chunk}) == len(chunk) and len({t.dst for t in chunk}) == len(chunk)
        for t in chunk:
            assert old[t.layer, t.src, t.src_slot] == t.expert      # the source still serves it
            assert new[t.layer, t.dst, t.dst_slot] == t.expert
            staged.add((t.layer, t.dst, t.dst_slot))
        serving.append(counts(old))                                 # old placement serves until the switch
    local = {(c.layer, c.dst, c.dst_slot) for c in sched.local_copies}
    for c in sched.local_copies:
        assert old[c.layer, c.src, c.src_slot] == c.expert == new[c.layer, c.dst, c.dst_slot]
    for layer in range(nl):
        for d in range(problem.new_devices):
            for s in range(problem.slots_per_device):
                unchanged = d < problem.old_devices and s < old.shape[2] and old[layer, d, s] == new[layer, d, s]
                assert unchanged or (layer, d, s) in staged or (layer, d, s) in local, (layer, d, s)
    serving.append(counts(new))
    assert all(c.min() >= 1 for c in serving)
    return serving


# ---- the planner on hand-made cases --------------------------------------------------------------
def test_scale_up_moves_exactly_what_the_new_devices_need() -> None:
    old = np.array([[0, 1], [2, 3]])                       # 2 devices × 2 slots, 4 experts
    for method in ("greedy", "cpsat"):
        problem = ScalingProblem.from_arrays([10, 10, 10, 10], old, 4, 1, devices_per_node=2, expert_bytes=5)
        step = plan_scaling(problem, COSTS, method=method)
        new = step.placement.slot_expert
        assert len(step.schedule.transfers) == 2 == step.assignment.transfers_bound   # each new device gets one
        assert {t.dst for t in step.schedule.transfers} == {2, 3}
        assert new[0, 0, 0] in (0, 1) and new[0, 1, 0] in (2, 3)                     # survivors keep one each
        assert step.schedule.expert_bytes_moved == 10 and step.schedule.rounds == 1
        assert step.balance_after == pytest.approx(1.0)
        replay(problem, new, step)


def test_scale_down_copies_the_leaving_devices_experts_first() -> None:
    old = np.array([[[0, 4], [1, 5], [2, 6], [3, 7]]] * 2)   # 4 devices × 2 slots, 8 experts, 2 layers
    problem = ScalingProblem.from_arrays(np.ones((2, 8)), old, 2, 4, devices_per_node=2, expert_bytes=1)
    step = plan_scaling(problem, COSTS)
    sched, new = step.schedule, step.placement.slot_expert
    assert len(sched.transfers) == 8 == step.assignment.transfers_bound    # 2 leaving × 2 slots × 2 layers
    assert all(t.evacuation and t.src in (2, 3) and t.dst in (0, 1) for t in sched.transfers)
    assert sorted(new[0].ravel()) == list(range(8))                        # nothing lost
    replay(problem, new, step)
    # expert 7 lives only on the leaving device: its copies come before every other transfer
    old = np.array([[[0, 1, 2], [3, 4, 0], [5, 6, 1], [7, 2, 3]]])
    problem = ScalingProblem.from_arrays(np.arange(1, 9), old, 3, 4, devices_per_node=4)
    step = plan_scaling(problem, COSTS)
    rounds = [(t.round, t.evacuation) for t in step.schedule.transfers]
    evac = [r for r, ev in rounds if ev]
    assert evac and max(evac) < min(r for r, ev in rounds if not ev)
    assert {t.expert for t in step.schedule.transfers if t.evacuation} == {7}
    assert 7 in step.placement.slot_expert[0]
    replay(problem, step.placement.slot_expert, step)


def test_balance_target_trades_moves_for_balance() -> None:
    old = np.array([[0, 1], [2, 3]])                        # the two hot experts share device 0
    load = [40, 40, 10, 10]
    loose = ScalingProblem.from_arrays(load, old, 2, 2, balance_target=2.0)
    assert len(plan_scaling(loose, COSTS).schedule.transfers) == 0
    tight = ScalingProblem.from_arrays(load, old, 2, 2, balance_target=1.05)
    step = plan_scaling(tight, COSTS)
    assert len(step.schedule.transfers) == 2 and step.balance_after == pytest.approx(1.0)   # one swap
    assert step.schedule.extra_units.max() == 1                   # one copy in flight on each device
    replay(tight, step.placement.slot_expert, step)
    rows = tradeoff(tight, COSTS, (1.0, 2.0))
    assert [r.transfers for r in rows] == [2, 0] and rows[0].balance_after < rows[1].balance_after


def test_memory_peak_beyond_capacity_is_a_clear_input_error() -> None:
    old = np.array([[0, 1], [2, 3]])
    load = [40, 40, 10, 10]
    fits = ScalingProblem.from_arrays(load, old, 2, 2, capacity_units=3)
    assert plan_scaling(fits, COSTS).schedule.peak_units.tolist() == [3, 3]
    tight = ScalingProblem.from_arrays(load, old, 2, 2, capacity_units=2)
    with pytest.raises(InputError, match="device 0 would hold 3 expert slots") as err:
        plan_scaling(tight, COSTS)
    assert err.value.field == "memory" and "--balance" in err.value.fix
    assert len(plan_scaling(ScalingProblem.from_arrays(load, old, 2, 2, capacity_units=2, balance_target=2.0),
                            COSTS).schedule.transfers) == 0
    joining = ScalingProblem.from_arrays(np.ones(4), old, 4, 2, capacity_units=[4, 4, 1, 4])
    with pytest.raises(InputError, match="device 2"):
        plan_scaling(joining, COSTS)


def test_balance_target_is_respected_and_every_expert_stays_served() -> None:
    rng = np.random.default_rng(0)
    load = rng.zipf(1.6, size=(4, 32)).astype(float).clip(max=60)
    old = contiguous_placement(4, 32, 4, 4, 9).slot_expert
    for to in (6, 8, 2):
        for method in ("greedy", "cpsat"):
            problem = ScalingProblem.from_arrays(load, old, to, -(-32 // to) + (1 if to == 8 else 0),
                                                 devices_per_node=4)
            step = plan_scaling(problem, COSTS, method=method)
            per_layer = layer_balancedness(step.placement, load)
            for layer, lay in enumerate(step.assignment.layers):
                assert lay.max_load <= lay.cap * (1 + 1e-9)
                if lay.cap <= 1.05 * lay.mean_load * (1 + 1e-9):
                    assert per_layer[layer] <= 1.05 + 1e-9
            assert len(step.schedule.transfers) >= step.assignment.transfers_bound
            replay(problem, step.placement.slot_expert, step)
            step.placement.validate()


def test_colouring_uses_max_degree_rounds_and_bound_matches_max_flow() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        m = int(rng.integers(1, 60))
        src, dst = rng.integers(0, 6, m).tolist(), rng.integers(0, 6, m).tolist()
        colour = colour_rounds(src, dst, 6)
        delta = max(np.bincount(src).max(), np.bincount(dst).max())
        assert colour.max() + 1 == delta
        for c in range(delta):
            pick = colour == c
            assert len(set(np.array(src)[pick])) == pick.sum() == len(set(np.array(dst)[pick]))
        holds = rng.random((8, 5)) < 0.4
        reps = rng.integers(1, 3, 8)
        g = nx.DiGraph()
        for i in range(8):
            g.add_edge("s", ("e", i), capacity=int(reps[i]))
        for i, j in zip(*np.nonzero(holds)):
            g.add_edge(("e", int(i)), ("d", int(j)), capacity=1)
        for j in range(5):
            g.add_edge(("d", j), "t", capacity=2)
        assert kept_upper_bound(reps, holds, 2) == nx.maximum_flow_value(g, "s", "t")


def test_step_time_and_baselines_come_from_the_profile() -> None:
    model = ModelSpec.preset("mixtral-8x22b")
    hw = HardwareProfile.resolve("h100-sxm")
    stats_load = TraceStats.of(synthesize(model, SyntheticTraffic(tokens=2000, seed=0))).load
    old = contiguous_placement(model.num_moe_layers, 8, 8, 8)
    costs = TransferCosts.of(CostModel(model, hw))
    step = plan_scaling(ScalingProblem.build(CostModel(model, hw), old, stats_load, 16), costs, old)
    s = step.summary()
    assert s["transfers"] == s["transfers_lower_bound"] == 8 * model.num_moe_layers
    per_transfer = costs.p2p(model.expert_bytes(), "inter_node")
    assert per_transfer == pytest.approx(hw.inter_node.latency.value + model.expert_bytes() / 5e10)
    assert step.schedule.round_seconds.sum() == pytest.approx(step.schedule.rounds * per_transfer)
    assert s["restart"]["downtime_s"] == s["restart"]["seconds"] > costs.restart_overhead
    assert s["new_replica"]["devices_after"] == 16 and s["new_replica"]["downtime_s"] == 0
    assert s["peak_extra_slots_max"] == 0 and s["downtime_s"] == 0
    timeline = step.schedule.timeline()
    assert timeline["end_s"].iloc[-1] == pytest.approx(step.seconds)
    assert timeline["transfers"].iloc[1:-1].sum() == s["transfers"]


# ---- autoscaling -------------------------------------------------------------------------------------
def toy_table() -> LatencyTable:
    """2, 3 or 4 devices; a step of 10 ms + 0.1 ms per sequence; 100 sequences per device at most."""
    batch = np.array([1, 10, 50, 100, 200], dtype=float)
    step = np.tile(0.01 + 1e-4 * batch, (3, 1))
    return LatencyTable((2, 3, 4), batch, step, np.full(3, 100.0), 1024, ())


def test_traffic_shapes_are_seeded_and_shaped() -> None:
    for shape in SHAPES:
        a, b = arrival_trace(shape, 3), arrival_trace(shape, 3)
        assert np.array_equal(a.demand, b.demand) and not np.array_equal(a.demand, arrival_trace(shape, 4).demand)
        assert a.demand.min() >= 0 and a.times.size == 720
    step = arrival_trace("step", 0, noise=0.0)
    assert step.demand[0] == 0.25 and step.demand[360] == 0.95
    with pytest.raises(InputError):
        arrival_trace("sawtooth")


def test_elastic_autoscaling_tracks_demand_and_restarts_lose_slo() -> None:
    table = toy_table()
    slo = 0.015                                           # 50 sequences per device
    strats = strategies((2, 3, 4), {(2, 3): 1.0, (3, 2): 0.5, (3, 4): 1.0, (4, 3): 0.5}, lambda m: 90.0, 90.0)
    trace = arrival_trace("diurnal", 0, noise=0.0)
    peak = 0.9 * table.capacity(4, slo)
    runs = [simulate_autoscale(trace, peak, table, strats[name], Policy(policy), slo)
            for name in ("elastic", "restart", "replica") for policy in ("threshold", "lookahead")]
    runs.append(simulate_autoscale(trace, peak, table, static_strategy(table, (2, 3, 4), peak, slo), Policy(), slo))
    summary = summary_frame(runs).set_index(["strategy", "policy"])
    static = summary.loc[("static", "threshold")]
    assert static["slo_attainment"] == 1.0 and static["device_hours"] == pytest.approx(4 * 2)
    for policy in ("threshold", "lookahead"):
        elastic = summary.loc[("elastic", policy)]
        assert elastic["device_hours"] < static["device_hours"] and elastic["slo_attainment"] > 0.97
        assert summary.loc[("restart", policy)]["slo_attainment"] < elastic["slo_attainment"]
        assert elastic["scaling_steps"] >= 4 and elastic["peak_devices"] == 4
    assert summary.loc[("elastic", "lookahead")]["slo_attainment"] == pytest.approx(1.0)
    frame = autoscale_frame(runs)
    assert set(frame.columns) >= {"time_s", "demand_tokens_per_s", "devices", "tpot_s", "slo_met_fraction"}
    assert len(frame) == len(runs) * trace.times.size
    with pytest.raises(InputError):
        simulate_autoscale(trace, peak, table, strats["elastic"], Policy(up=0.5, down=0.7), slo)


# ---- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture
def tiny_files(tmp_path: Path) -> tuple[Path, Path]:
    model = tiny_model()
    plan = tmp_path / "plan.json"
    Plan(model, HardwareProfile.resolve("h100-sxm").ref(), 2, 1, contiguous_placement(3, 8, 2, 2, 5)).save(plan)
    trace = tmp_path / "trace.npz"
    synthesize(model, SyntheticTraffic(tokens=600, zipf=1.0, seed=3)).save(trace)
    return plan, trace


def test_plan_scale_cli_writes_the_new_plan_with_ordered_moves(tiny_files, tmp_path: Path) -> None:
    plan, trace = tiny_files
    out = tmp_path / "new.json"
    res = CliRunner().invoke(app, ["plan", "scale", "--plan", str(plan), "--trace", str(trace), "--to", "4",
                                   "--tradeoff", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "restart at the new size" in res.output and "Bytes moved vs balance" in res.output
    new = Plan.load(out)
    assert new.num_devices == 4 and new.placement.slot_expert.shape == (3, 4, 3)   # 8 experts + 1 redundant per device
    kinds = [m.kind for m in new.moves]
    assert "transfer" in kinds and "bring_up" in kinds
    rounds = [m.round for m in new.moves if m.kind == "transfer"]
    assert rounds == sorted(rounds)
    assert new.predicted["scaling"]["from_devices"] == 2 and new.predicted["scaling"]["downtime_s"] == 0


@pytest.mark.parametrize("args, message", [
    (["--to", "4", "--to-nodes", "1"], "exactly one"),
    ([], "exactly one"),
    (["--to", "4", "--method", "magic"], "unknown method"),
    (["--to", "4", "--balance", "0.9"], "balance target"),
    (["--to", "12"], "do not fill whole nodes"),
    (["--to", "4", "--slots", "9"], "exceed"),
])
def test_plan_scale_cli_bad_input_exits_2(tiny_files, tmp_path: Path, args: list[str], message: str) -> None:
    plan, trace = tiny_files
    out = tmp_path / "never.json"
    res = CliRunner().invoke(app, ["plan", "scale", "--plan", str(plan), "--trace", str(trace), *args, "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert message in res.output and not out.exists()


def test_plan_scale_cli_rejects_a_plan_without_placement(tiny_files, tmp_path: Path) -> None:
    _, trace = tiny_files
    bare = tmp_path / "bare.json"
    Plan(tiny_model(), HardwareProfile.resolve("h100-sxm").ref(), 2, 1).save(bare)
    res = CliRunner().invoke(app, ["plan", "scale", "--plan", str(bare), "--trace", str(trace), "--to", "4"])
    assert res.exit_code == 2 and "no placement" in res.output


def test_autoscale_cli_runs_and_rejects_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "auto.json"
    res = CliRunner().invoke(app, ["autoscale", "--model", "mixtral-8x7b", "--sizes", "2,4", "--shape", "spike",
                                   "--policy", "threshold", "--horizon", "1200", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert {r["strategy"] for r in data["summary"]} == {"elastic", "restart", "replica", "static"}
    assert len(data["frames"]["time_s"]) == 4 * 120
    for bad in (["--shape", "sawtooth"], ["--sizes", "4"], ["--policy", "psychic"], ["--sizes", "2,x"]):
        res = CliRunner().invoke(app, ["autoscale", "--model", "mixtral-8x7b", *bad])
        assert res.exit_code == 2, (bad, res.output)


# ---- live scaling on CPU: 2 → 3 → 2 active ranks of 3 ---------------------------------------------
def _worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch
    import torch.distributed as dist

    from moeplan.runtime.comm import Comm
    from moeplan.runtime.elastic import run_elastic

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = tiny_model()
    trace = synthesize(model, SyntheticTraffic(tokens=600, zipf=1.0, seed=3))
    start = contiguous_placement(3, 8, 2, 1, 5)
    comm = Comm(rank, world, torch.device("cpu"))
    plans = scaling_plans(CostModel(model, HardwareProfile.resolve("h100-sxm")), start, TraceStats.of(trace).load,
                          [2, 3, 2])
    scaled = run_elastic(comm, model, start, trace, plans, 12, 24, 4, rounds_per_batch=4)
    failed = run_elastic(comm, model, start, trace, plans, 8, 24, 2, rounds_per_batch=4, fault_at_chunk={0: 1})
    if rank == 0:
        Path(folder, "report.json").write_text(json.dumps({"scaled": scaled, "failed": failed}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_live_scaling_two_three_two_loses_no_batch_and_keeps_outputs(tmp_path: Path) -> None:
    mp = pytest.importorskip("torch.multiprocessing")
    mp.start_processes(_worker, args=(3, _free_port(), str(tmp_path)), nprocs=3, start_method="spawn")
    report = json.loads((tmp_path / "report.json").read_text())
    scaled = report["scaled"]
    assert scaled["epochs"] == [[0, 1], [0, 1, 2], [0, 1]]          # joined, then left
    assert scaled["ledger_checked"] and scaled["served"]["0"] == scaled["served"]["1"] == 12
    assert 0 < scaled["served"]["2"] < 12                          # rank 2 served only while active
    assert scaled["batch_active"] == [2 if e != 1 else 3 for e in scaled["batch_epoch"]]
    assert sorted(set(scaled["batch_epoch"])) == [0, 1, 2]
    assert scaled["weight_mismatches"] == 0                        # received experts are the experts
    diffs = np.array(scaled["batch_max_abs_diff"])
    epochs = np.array(scaled["batch_epoch"])
    assert np.all(diffs[epochs == 0] == 0.0)                       # bit for bit before the first switch
    assert diffs.max() < 1e-5                                      # after: float32 rounding of regrouped GEMMs
    assert len(scaled["batch_seconds"]) == 12 and min(scaled["batch_seconds"]) > 0
    for rank_reports in scaled["migrations"]:
        assert [r["state"] for r in rank_reports] == ["committed", "committed"]
    moved = [sum(r[i]["bytes_received"] for r in scaled["migrations"]) for i in range(2)]
    sent = [sum(r[i]["bytes_sent"] for r in scaled["migrations"]) for i in range(2)]
    assert moved == sent and min(moved) > 0
    failed = report["failed"]
    assert failed["epochs"] == [[0, 1]] and failed["outputs_equal"]      # rolled back: nothing changed
    states = [[r["state"] for r in ranks] for ranks in failed["migrations"]]
    assert states == [["rolled_back", "skipped"]] * 3
    assert failed["served"] == {"0": 8, "1": 8, "2": 0}
