"""Expert placement: EPLB reproduction, hand-made optima, CP-SAT vs PuLP, infeasible inputs,
replica shares, metrics, incremental re-placement within a move budget, and the CLI."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.cost import CostModel
from moeplan.dispatch import even_share
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.plan import Placement, Plan
from moeplan.solvers.placement import PlacementProblem, SolverOptions, lower_bound, rebalance_experts, solve
from moeplan.solvers.placement import milp
from moeplan.solvers.placement.exflow import traffic_report
from moeplan.solvers.placement.incremental import replace_incremental
from moeplan.solvers.placement.layer import balance_shares, layer_model
from moeplan.solvers.placement.metrics import balancedness, top1_hops, touched
from moeplan.solvers.placement.touched_bound import layer_bound, touched_bound
from moeplan.solvers.placement.problem import ObjectiveWeights, check_cluster, slots_per_device_of
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize

README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
COMPUTE_ONLY = ObjectiveWeights(compute=1.0, intra_node=0.0, inter_node=0.0, step_scale=1.0)


# ---- EPLB --------------------------------------------------------------------------------------------------------
def test_eplb_reproduces_the_readme_example() -> None:
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert log2phy[0].tolist() == [[12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2], [1, -1], [3, -1],
                                   [4, -1], [9, -1], [8, 10], [14, -1]]
    per_replica = README_WEIGHT[0][phy2log[0]] / logcnt[0][phy2log[0]]
    assert per_replica.reshape(8, 2).sum(axis=1).tolist() == [121.5, 86.5, 125, 113, 147.5, 131.5, 156, 152]


def test_eplb_global_policy_when_groups_do_not_split_over_nodes() -> None:
    phy2log, _, logcnt = rebalance_experts(README_WEIGHT, 16, 3, 2, 8)
    assert phy2log[1, 12] == phy2log[1, 13] == 8 and phy2log[0, 14] == phy2log[0, 15] == 1  # documented quirk
    assert (np.bincount(phy2log[0], minlength=12) == logcnt[0]).all()


def test_eplb_solver_gives_a_valid_placement_with_equal_shares() -> None:
    p = PlacementProblem.from_arrays(README_WEIGHT, num_devices=8, slots_per_device=2, devices_per_node=4, n_group=4)
    r = solve(p, "eplb")
    r.placement.validate()
    assert r.placement.phy2log().tolist() == rebalance_experts(README_WEIGHT, 16, 4, 2, 8)[0].tolist()
    assert set(np.round(r.placement.replica_share.ravel(), 6)) <= {0.5, 1.0}


# ---- hand-made optima ----------------------------------------------------------------------------------------------
def test_replica_split_reaches_the_proved_optimum_where_lpt_does_not() -> None:
    # 18 token-choices on 2 devices of 3 slots: the optimum is 9 per device, which needs an uneven split
    p = PlacementProblem.from_arrays([5, 4, 3, 3, 3], num_devices=2, slots_per_device=3, weights=COMPUTE_ONLY)
    assert lower_bound(p) == pytest.approx(9.0)
    assert solve(p, "lpt").objective == pytest.approx(9.5)
    for backend in ("cpsat", "pulp"):
        r = solve(p, "ilp", SolverOptions(time_limit=10, milp=backend))
        assert r.objective == pytest.approx(9.0) and r.bound == pytest.approx(9.0) and r.gap == pytest.approx(0.0)
        assert balancedness(r.placement, p.load) == pytest.approx(1.0)
        assert (r.placement.replica_counts() <= 2).all()


def test_chains_of_experts_across_layers_land_on_one_device() -> None:
    e, d, s, layers = 8, 4, 2, 3
    perms = [np.random.default_rng(layer).permutation(e) for layer in range(layers - 1)]
    flows = np.zeros((layers - 1, e, e))
    for layer, perm in enumerate(perms):
        flows[layer, np.arange(e), perm] = 100.0
    p = PlacementProblem.from_arrays(np.full((layers, e), 100.0), d, s, devices_per_node=2, flows=flows)
    for name in ("exflow", "ilp"):
        r = solve(p, name, SolverOptions(time_limit=10))
        assert traffic_report(p, r.placement)["cross_device_hops_per_token_layer"] == pytest.approx(0.0)
        assert r.objective == pytest.approx(r.bound) and balancedness(r.placement, p.load) == pytest.approx(1.0)
    assert traffic_report(p, solve(p, "round_robin").placement)["cross_device_hops_per_token_layer"] > 0.5


def test_cpsat_and_pulp_agree_on_the_layer_milp() -> None:
    rng = np.random.default_rng(7)
    e, d, s = 6, 3, 3
    load = rng.integers(5, 40, size=e).astype(np.float64)
    pe, pd = np.repeat(np.arange(e), d), np.tile(np.arange(d), e)
    cost = rng.integers(0, 4, size=e * d).astype(np.float64)
    model, ix, iy, _ = layer_model(load, pe, pd, cost, d, s, 10.0, load.sum(), integer=True)
    a = milp.solve(model, "cpsat", 20, 0.0)
    b = milp.solve(model, "pulp", 20, 0.0)
    assert a.status == b.status == "optimal"
    assert a.objective == pytest.approx(b.objective) and a.bound == pytest.approx(a.objective)
    for sol in (a, b):
        held = sol.values[ix] > 0.5
        assert np.bincount(pe[held], minlength=e).min() >= 1 and np.bincount(pd[held], minlength=d).max() <= s
        np.testing.assert_allclose(np.bincount(pe, weights=sol.values[iy], minlength=e), load)


def test_pulp_takes_the_warm_start() -> None:
    model, ix, iy, il = layer_model(np.array([4.0, 4.0]), np.array([0, 1]), np.array([0, 1]), np.zeros(2), 2, 1,
                                    1.0, 8.0, integer=True)
    hint = np.zeros(model.num_vars)
    hint[ix], hint[iy], hint[il] = 1, 4, 4
    sol = milp.solve(model, "pulp", 5, 0.0, hint)
    assert sol.status == "optimal" and sol.objective == pytest.approx(4.0)


def test_share_lp_water_fills_replicated_experts() -> None:
    slot_expert = np.array([[0, 1], [0, 2]])
    shares = balance_shares(slot_expert, np.array([10.0, 1.0, 5.0]), None, 1.0, None)
    device = (np.array([10.0, 1.0, 5.0])[slot_expert] * shares).sum(axis=1)
    np.testing.assert_allclose(device, [8.0, 8.0])
    np.testing.assert_allclose(shares, [[0.7, 1.0], [0.3, 1.0]])


# ---- infeasible inputs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, words", [
    (lambda: slots_per_device_of(200, 32, 256), "too few slots"),
    (lambda: slots_per_device_of(290, 32, 256), "do not divide evenly"),
    (lambda: check_cluster(8, 4, 4, 9), "two replicas"),
    (lambda: check_cluster(8, 6, 4, 2), "do not fill nodes"),
    (lambda: PlacementProblem.from_arrays([1, 2, 3, 4, 5], 2, 2), "too few slots"),
])
def test_infeasible_cluster_shapes_are_input_errors(call, words: str) -> None:
    with pytest.raises(InputError, match=words):
        call()


def test_experts_that_cannot_fit_in_memory_are_an_input_error() -> None:
    v3 = ModelSpec.preset("deepseek-v3")
    trace = synthesize(replace(v3, moe_layers=v3.moe_layers), SyntheticTraffic(tokens=64, seed=0))
    hw = HardwareProfile.resolve("h100-sxm").with_cluster(devices=8)
    with pytest.raises(InputError, match="cannot fit") as err:
        PlacementProblem.build(CostModel(v3, hw), TraceStats.of(trace), 32)
    assert err.value.field == "slots" and err.value.fix


# ---- metrics -----------------------------------------------------------------------------------------------------
def test_metrics_on_a_hand_made_placement() -> None:
    # 2 layers, 4 experts, 2 devices × 3 slots; expert 0 replicated 50/50 in layer 0
    se = np.array([[[0, 1, 2], [0, 3, 1]], [[0, 1, 2], [3, 0, 1]]])
    rs = np.array([[[0.5, 1.0, 1.0], [0.5, 1.0, 0.0]], [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]])
    p = Placement(se, rs, 4, 2)
    ids = np.array([[[0, 1], [0, 1]], [[2, 3], [3, 0]]])          # [tokens, layers, top_k]
    np.testing.assert_allclose(touched(p, ids, mode="share"), [(1.5 + 2.0) / 2, (1.0 + 2.0) / 2])
    np.testing.assert_allclose(touched(p, ids, mode="primary"), [(1 + 2) / 2, (1 + 2) / 2])
    np.testing.assert_allclose(top1_hops(p, ids, mode="share"), [(0.5 + 1.0) / 2])
    assert touched(p, ids, level="node").tolist() == [1.0, 1.0]
    np.testing.assert_allclose(touched(Placement(se, rs, 4, 1), ids, level="node"), touched(p, ids))
    assert balancedness(p, np.array([[2, 2, 1, 1], [1, 1, 1, 1]])) == pytest.approx((4 + 3) / (3 + 2))


# ---- incremental ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_problem() -> PlacementProblem:
    spec = replace(ModelSpec.preset("qwen3-30b-a3b"), moe_layers=tuple(range(4)))  # 128 experts, top-8
    trace = synthesize(spec, SyntheticTraffic(tokens=3000, seed=2))
    hw = HardwareProfile.resolve("h100-sxm").with_cluster(devices=16)
    return PlacementProblem.build(CostModel(spec, hw), TraceStats.of(trace), 9)


def test_incremental_respects_the_move_budget(small_problem) -> None:
    p = small_problem
    current = solve(p, "contiguous").placement
    budget = 6 * p.expert_bytes
    r = replace_incremental(p, current, budget)
    assert 0 < len(r.moves) <= 6 and r.bytes_moved <= budget
    assert sum(m.nbytes for m in r.moves) == pytest.approx(r.bytes_moved)
    assert r.balancedness_after < r.balancedness_before and r.objective_after < r.objective_before
    replayed = current.slot_expert.copy()
    for step in sorted({m.round for m in r.moves}):
        batch = [m for m in r.moves if m.round == step]
        assert all(current.slot_expert[m.layer, m.src, m.src_slot] == m.expert for m in batch)
        for m in batch:
            replayed[m.layer, m.dst, m.dst_slot] = m.expert
    np.testing.assert_array_equal(replayed, r.placement.slot_expert)
    bytes_curve = [c["bytes"] for c in r.curve]
    assert bytes_curve == sorted(bytes_curve) and r.curve[-1]["balancedness"] == pytest.approx(r.balancedness_after)


def test_incremental_scores_moves_under_the_problems_dispatch(small_problem) -> None:
    p = replace(small_problem, dispatch="even")
    current = solve(small_problem, "ilp", SolverOptions(time_limit=5)).placement   # weighted shares
    r = replace_incremental(p, current, 40 * p.expert_bytes)
    served_before = Placement(current.slot_expert, even_share(current.slot_expert, p.num_experts), p.num_experts,
                              p.devices_per_node, "even")
    assert r.balancedness_before == pytest.approx(balancedness(served_before, p.load))
    assert r.placement.dispatch == "even"
    np.testing.assert_allclose(r.placement.replica_share, even_share(r.placement.slot_expert, p.num_experts))
    assert r.balancedness_after == pytest.approx(balancedness(r.placement, p.load))
    assert r.balancedness_after < r.balancedness_before and len(r.moves) > 0


def test_incremental_to_fewer_devices_moves_the_orphans(small_problem) -> None:
    p16 = small_problem
    current = solve(p16, "lpt").placement
    p12 = replace(p16, num_devices=12, devices_per_node=4, slots_per_device=11)
    with pytest.raises(InputError, match="needs"):
        replace_incremental(p12, current, 0.0)
    r = replace_incremental(p12, current, 1e15)
    r.placement.validate()
    assert r.placement.num_devices == 12 and (r.placement.replica_counts() >= 1).all()
    lost = {(layer, int(e)) for layer in range(4) for e in np.unique(current.slot_expert[layer, 12:])
            if e not in current.slot_expert[layer, :12]}
    assert lost <= {(m.layer, m.expert) for m in r.moves}


# ---- CLI ---------------------------------------------------------------------------------------------------------
def test_cli_plan_placement_writes_a_plan_and_rejects_bad_slots(tmp_path: Path) -> None:
    spec_name = "mixtral-8x7b"
    trace_path = tmp_path / "t.npz"
    runner = CliRunner()
    assert runner.invoke(app, ["trace", "synth", "-o", str(trace_path), "--model", spec_name, "--tokens", "1500"]
                         ).exit_code == 0
    out = tmp_path / "plan.json"
    base = ["plan", "placement", "--model", spec_name, "--trace", str(trace_path), "--gpus", "8", "-o", str(out)]
    res = runner.invoke(app, base + ["--solver", "ilp", "--time-limit", "4", "--slots", "16", "--judge-fraction", "0",
                                     "--dispatch", "weighted"])
    assert res.exit_code == 0, res.output
    plan = Plan.load(out)
    assert plan.placement.slots_per_device == 2 and plan.solver["name"] == "ilp"
    assert 0 < plan.predicted["moe_seconds_ep"] and plan.predicted["balancedness"] < 1.05
    bad = runner.invoke(app, base[:-1] + [str(tmp_path / "bad.json"), "--slots", "12"])
    assert bad.exit_code == 2 and "divide evenly" in bad.output and not (tmp_path / "bad.json").exists()
    unknown = runner.invoke(app, base[:-1] + [str(tmp_path / "bad.json"), "--solver", "magic"])
    assert unknown.exit_code == 2 and "unknown placement solver" in unknown.output
    moved = tmp_path / "moved.json"
    res = runner.invoke(app, base[:-1] + [str(moved), "--current", str(out), "--move-budget", "2"])
    assert res.exit_code == 0, res.output
    assert Plan.load(moved).moves is not None


# ---- devices-touched bound ---------------------------------------------------------------------------------------
def test_touched_bound_is_tight_on_disjoint_blocks_and_below_every_placement(small_problem) -> None:
    blocks = np.arange(16).reshape(4, 4)
    ids = blocks[np.random.default_rng(0).integers(0, 4, 50)]
    assert layer_bound(ids, 16, 4) == pytest.approx(1.0, abs=1e-3)   # one block per device touches 1
    spec = replace(ModelSpec.preset("qwen3-30b-a3b"), moe_layers=(0,))
    trace = synthesize(spec, SyntheticTraffic(tokens=150, seed=3))
    bound = touched_bound(trace.expert_ids, 128, 9, [0], iterations=30)
    p = replace(small_problem, load=small_problem.load[:1], flows=small_problem.flows[:0],
                coactivation=small_problem.coactivation[:1])
    for solver in ("contiguous", "lpt", "eplb"):
        placed = solve(p, solver).placement
        assert (bound <= touched(placed, trace.expert_ids) + 1e-9).all()
    assert (bound > 1.0).all()
