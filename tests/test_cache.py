"""Expert-cache sizing and offloading: the policies on hand-made traces (Belady worked by hand),
LRU's all-sizes pass against the step simulation, the memory budget arithmetic, the DP against
brute force, regrouping, a non-fitting plan rejected with its numbers, the torch executor on a
CPU (outputs against an all-in-memory reference, counts against the simulation), the CLI (exit
2 on bad input) and the GPU benchmark's CPU path."""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from moeplan.cost import SERVE_MEMORY_FRACTION, CostModel
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.plan import Plan
from moeplan.solvers.cache import (CacheConfig, CacheProblem, CacheState, StepShape, TransitionPredictor, allocate,
                                   cache_table, knee, lp_bound, lru_hit_curves, memory_budget, model_layer_times, regroup,
                                   simulate, solve, step_times)
from moeplan.solvers.cache.sizing import size_curves
from moeplan.synth import SyntheticTraffic, synthesize
from moeplan.trace import RoutingTrace

BELADY_SEQUENCE = [0, 1, 2, 0, 1, 3, 0, 1, 2, 3]


def one_layer(sequence: list[int], experts: int = 4) -> RoutingTrace:
    """A trace of one MoE layer, top-1: token t chose expert sequence[t]."""
    return RoutingTrace(np.array(sequence, dtype=np.int16)[:, None, None], experts, "hand").validate()


def tiny_model() -> ModelSpec:
    """8 experts, top-2, 3 MoE layers, hidden 16, expert FFN 24, a shared expert of 8."""
    return dataclasses.replace(ModelSpec.preset("deepseek-v2-lite"), name="tiny-moe", num_layers=3,
                               moe_layers=(0, 1, 2), hidden_size=16, expert_ffn=24, num_experts=8, top_k=2,
                               shared_ffn=8, num_shared_experts=1, n_group=1, topk_group=1).validate()


@pytest.fixture(scope="module")
def tiny_trace() -> RoutingTrace:
    return synthesize(tiny_model(), SyntheticTraffic(tokens=800, locality=0.5, affinity=0.4, segment=16, seed=3))


def hits_of(policy: str, sequence: list[int], size: int) -> list[int]:
    trace = one_layer(sequence)
    index = StepShape("decode", 1).token_index(trace.num_tokens)
    return simulate(trace, index, np.array([size]), policy).hits[:, 0].tolist()


# ---- policies on hand-made traces -------------------------------------------------------------
def test_belady_matches_the_hand_worked_optimum() -> None:
    # cache of 2 on 0 1 2 0 1 3 0 1 2 3: at t2 evict 1 (next use t4) over 0 (t3); t3 hit; at t4 evict 2
    # (t8) over 0 (t6); at t5 evict 1 (t7) over 0 (t6); t6 hit; at t7 evict 0 (never again) over 3 (t9);
    # at t8 evict 1 (never) over 3; t9 hit. Three hits, the fewest loads any policy can make.
    assert hits_of("belady", BELADY_SEQUENCE, 2) == [0, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert sum(hits_of("lru", BELADY_SEQUENCE, 2)) == 0          # LRU always evicts what comes next


def test_lru_and_lfu_on_small_sequences() -> None:
    assert hits_of("lru", [0, 1, 0, 2, 1, 0], 2) == [0, 0, 1, 0, 0, 0]
    assert hits_of("lru", [0, 1, 0, 2, 0, 1], 2) == [0, 0, 1, 0, 1, 0]
    # perfect LFU (counts survive eviction, ties by recency): at t7 expert 1 (3 uses) is still held
    assert hits_of("lfu", BELADY_SEQUENCE, 2) == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    # LFU keeps the hot expert through a scan that LRU lets flush it
    scan = [0, 0, 0, 1, 2, 3, 0]
    assert hits_of("lfu", scan, 2)[-1] == 1 and hits_of("lru", scan, 2)[-1] == 0
    assert hits_of("lru", BELADY_SEQUENCE, 4) == [0, 0, 0, 1, 1, 0, 1, 1, 1, 1]


def test_a_step_needing_more_than_the_cache_stages_the_rest() -> None:
    state = CacheState(np.array([2]), 6, "lru")
    need = np.zeros((1, 6), dtype=bool)
    need[0, [1, 3, 5]] = True
    hits, loads = state.demand(need, 0)
    assert hits.sum() == 0 and loads.sum() == 3
    assert np.flatnonzero(state.held[0]).tolist() == [1, 3]      # lower ids kept, expert 5 staged
    hits, loads = state.demand(need, 1)
    assert hits.sum() == 2 and np.flatnonzero(loads[0]).tolist() == [5]


def test_prefetch_loads_predictions_and_counts_their_use() -> None:
    state = CacheState(np.array([2]), 4, "prefetch")
    want = np.array([[False, False, True, False]])
    assert state.prefetch(want, 0).sum() == 1
    hits, loads = state.demand(np.array([[False, False, True, True]]), 0)
    assert hits[0, 2] and loads[0, 3] and state.held[0].sum() == 2


def test_lru_all_sizes_pass_equals_the_step_simulation(tiny_trace: RoutingTrace) -> None:
    nl, e = tiny_trace.num_layers, tiny_trace.num_experts
    for shape in (StepShape("decode", 1), StepShape("decode", 3, 40), StepShape("prefill", 5)):
        index = shape.token_index(tiny_trace.num_tokens)
        hits, requests, missing = lru_hit_curves(tiny_trace, index, 2)
        assert np.array_equal(lru_hit_curves(tiny_trace, index)[2][0], missing[0])
        for size in range(e + 1):
            run = simulate(tiny_trace, index, np.full(nl, size), "lru")
            assert run.hits.sum(axis=0).tolist() == hits[:, size].tolist()
            assert run.requests.sum(axis=0).tolist() == requests.tolist()
            for j in (1, 2):
                assert (run.loads >= j).sum(axis=0).tolist() == missing[j - 1, :, size].tolist()


def test_steps_take_the_union_of_their_tokens() -> None:
    trace = one_layer([0, 1, 0, 2, 3, 3])
    prefill = simulate(trace, StepShape("prefill", 3).token_index(6), np.array([4]), "lru")
    assert prefill.requests[:, 0].tolist() == [2, 2]
    decode = StepShape("decode", 2).token_index(6)               # streams 0..2 and 3..5
    assert decode.tolist() == [[0, 3], [1, 4], [2, 5]]


# ---- memory budget, allocation, regrouping ---------------------------------------------------
def test_memory_budget_arithmetic() -> None:
    m = ModelSpec.preset("mixtral-8x7b")
    cost = CostModel(m, HardwareProfile.resolve("h100-sxm"))
    b = memory_budget(cost, StepShape("decode", 4), 2048)
    assert b.capacity == pytest.approx(80 * 2**30 * SERVE_MEMORY_FRACTION)
    assert b.non_expert == m.non_expert_params() * 2
    assert b.kv_cache == pytest.approx(32 * 2 * 8 * 128 * 2 * 4 * 2048)      # layers · K,V · heads · dim · bf16 · tokens
    assert b.activations == 4 * m.hidden_size * 2 * 8
    assert b.left == pytest.approx(b.capacity - b.non_expert - b.kv_cache - b.activations)
    assert b.slots(2) == int(b.left // m.expert_bytes()) - 2
    assert b.all_experts == 32 * 8 * 3 * 4096 * 14336 * 2 > b.capacity      # why Mixtral needs offloading on one H100
    small = memory_budget(cost, StepShape("decode", 4), 2048, memory_bytes=24 * 2**30)
    assert small.capacity == 24 * 2**30 and small.left == pytest.approx(b.left - (b.capacity - 24 * 2**30))
    with pytest.raises(InputError, match="nothing is left for experts"):
        memory_budget(cost, StepShape("decode", 4), 2048, memory_bytes=2**30)


def test_a_cache_that_does_not_fit_is_rejected_with_the_numbers() -> None:
    m = ModelSpec.preset("mixtral-8x7b")
    b = memory_budget(CostModel(m, HardwareProfile.resolve("h100-sxm")), StepShape("decode", 1), 4096)
    assert b.slots(2) == 206                                          # 68.5 GiB left / 336 MiB, less 2 staging
    CacheConfig(tuple([6] * 32), "lru", b.left).check_budget(m, "c.json")         # 192 + 2 fit
    with pytest.raises(InputError) as err:
        CacheConfig(tuple([8] * 32), "lru", b.left).check_budget(m, "c.json")
    text = str(err.value)
    assert "c.json" in text and "(256 cached + 2 staging) experts × 336.0 MiB = 84.66 GiB" in text
    assert f"budget {b.left / 2**30:.2f} GiB" in text


def test_allocation_is_optimal_and_bounded() -> None:
    rng = np.random.default_rng(0)
    stall = np.sort(rng.random((3, 4)), axis=1)[:, ::-1].copy()
    stall[1, 2] = stall[1, 3] + 0.5 * (stall[1, 1] - stall[1, 3])   # layer 1 not convex
    for budget in range(10):
        a = allocate(stall, budget)
        brute = min(sum(stall[layer, s] for layer, s in enumerate(c))
                    for c in itertools.product(range(4), repeat=3) if sum(c) <= budget)
        assert a.stall == pytest.approx(brute) and a.sizes.sum() <= budget
        assert a.lp_bound <= a.stall + 1e-12 and a.best[budget] == pytest.approx(brute)
    assert lp_bound(stall, 0) == pytest.approx(stall[:, 0].sum())
    assert knee(np.array([10.0, 4.0, 2.0, 1.5, 1.2, 1.0])) == 2 and knee(np.ones(5)) == 0


def test_regrouping_batches_requests_that_share_experts() -> None:
    a, b = [0, 1], [2, 3]
    rows = [(a if (t // 8) % 2 == 0 else b)[t % 2] for t in range(64)]      # requests of 8 tokens: A, B, A, B, ...
    trace = one_layer(rows)
    moved = regroup(trace, StepShape("decode", 2, 8), probe_tokens=4)
    assert moved.activated_before[0] == pytest.approx(2.0)                   # every batch mixes A and B
    assert moved.activated_after[0] == pytest.approx(1.0)
    assert sorted(moved.order.tolist()) == list(range(8))


# ---- planning end to end ----------------------------------------------------------------------
def test_solve_plans_within_the_budget_and_reports(tiny_trace: RoutingTrace) -> None:
    m = tiny_model()
    hw = HardwareProfile.resolve("h100-sxm")
    budget = CostModel(m, hw).memory(0, 1, kv_tokens_per_device=4096, batch_tokens_per_device=1)
    cap = budget.non_expert_weights + budget.kv_cache + budget.activations + 14.5 * m.expert_bytes()
    sizing = solve(CacheProblem(CostModel(m, hw), tiny_trace, StepShape("decode", 1), "prefetch", memory_bytes=cap))
    assert sizing.slots == 12 and sizing.sizes.sum() <= 12
    s = sizing.summary()
    assert s["memory_saved_bytes"] == pytest.approx((24 - sizing.sizes.sum() - 2) * m.expert_bytes())
    assert s["lp_bound_tokens_per_s"] >= s["separable_tokens_per_s"] - 1e-9
    belady = sizing.evaluation("belady-planned").run.summary(1)
    lru = sizing.evaluation("lru-planned").run.summary(1)
    assert belady["loads"] <= lru["loads"]
    plan = sizing.to_plan().validate()
    assert plan.cache is not None
    config = CacheConfig.from_dict(plan.cache.to_dict(), m, "plan")
    assert config.sizes == tuple(sizing.sizes.tolist()) and config.prefetch
    table = cache_table(sizing)
    assert len(table["rows"]) == 3 * 9 and table["memory"]["freed_bytes"] == s["memory_saved_bytes"]

    shape = StepShape("decode", 2)                                    # the DP's objective is exact for LRU:
    index = shape.token_index(tiny_trace.num_tokens)                  # its curves equal the full timeline's
    times = model_layer_times(CostModel(m, hw), tiny_trace, index, "decode", 4096)
    curves = size_curves(tiny_trace, index, "lru", None, times)
    for size in (0, 2, 5):
        full = step_times(simulate(tiny_trace, index, np.full(3, size), "lru"), times).stall.mean(axis=0)
        assert full == pytest.approx(curves.stall[:, size])


# ---- the executor on a CPU --------------------------------------------------------------------
def test_executor_matches_reference_and_simulation(tiny_trace: RoutingTrace) -> None:
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from moeplan.runtime.offload import HostExperts, OffloadStack
    from moeplan.runtime.stack import rms_norm
    from moeplan.runtime.weights import INPUT, SHARED, materialise_expert, seeded_generator

    torch.set_num_threads(1)
    m, cpu = tiny_model(), torch.device("cpu")
    shape = StepShape("decode", 2)
    fit, held = tiny_trace.split(0.5)
    predictor = TransitionPredictor.fit(fit, shape).limited(np.full(3, 2), np.full(3, 0.2))
    index = shape.token_index(held.num_tokens)[:24]
    host = HostExperts.materialise(m, 0, torch.float32, False, cpu)
    outputs = []
    for policy, sizes in (("lru", [2, 3, 1]), ("lfu", [2, 2, 2]), ("prefetch", [3, 2, 4]), ("lru", [0, 0, 0]),
                          ("lru", [8, 8, 8])):
        stack = OffloadStack(m, host, sizes, policy, 2, cpu, torch.float32, "loop", predictor)
        run, out = stack.run(held, index, warmup=1)
        sim = simulate(held, index, np.array(sizes), policy, predictor)
        for name in ("requests", "hits", "loads", "staged", "prefetched", "prefetch_used"):
            assert np.array_equal(getattr(run.counts, name), getattr(sim, name)), (policy, sizes, name)
        assert run.bytes_moved == (sim.loads.sum() + sim.prefetched.sum()) * host.expert_bytes
        outputs.append(out)
    used = held.expert_ids[index.ravel()]
    assert sim.loads.sum() == sum(np.unique(used[:, layer]).size for layer in range(3))  # room for all: cold misses only
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])                          # the cache never changes results

    t = index.shape[0] - 1                                                               # independent float64 reference
    rows = index[t]
    h = torch.randn(rows.size, 16, generator=seeded_generator(0, INPUT, t, cpu)).double()
    ids, gates = held.expert_ids[rows], held.gate_weights[rows].astype(np.float64)
    for layer in range(3):
        normed = rms_norm(h.float()).double()
        w13, w2 = (w.double() for w in materialise_expert(0, layer, SHARED, 16, 8, torch.float32, cpu))
        sh = normed @ w13.T
        out = (F.silu(sh[:, :8]) * sh[:, 8:]) @ w2.T
        for b in range(rows.size):
            for j in range(2):
                g, d = (w.double() for w in materialise_expert(0, layer, int(ids[b, layer, j]), 16, 24,
                                                                torch.float32, cpu))
                x = normed[b] @ g.T
                out[b] += gates[b, layer, j] * ((F.silu(x[:24]) * x[24:]) @ d.T)
        h = h + out
    assert torch.allclose(outputs[0].double(), h, atol=1e-5)


def test_executor_counts_misses_by_hand() -> None:
    torch = pytest.importorskip("torch")
    from moeplan.runtime.offload import HostExperts, OffloadStack

    torch.set_num_threads(1)
    m, cpu = tiny_model(), torch.device("cpu")
    pairs = [(0, 1), (0, 1), (2, 3), (2, 3), (4, 5), (2, 3)]
    ids = np.array([[p] * 3 for p in pairs], dtype=np.int16)                            # [6 tokens, 3 layers, 2]
    trace = RoutingTrace(ids, 8, m.name).validate()
    host = HostExperts.materialise(m, 0, torch.float32, False, cpu)
    stack = OffloadStack(m, host, [4, 4, 2], "lru", 1, cpu, torch.float32, "loop")
    run, _ = stack.run(trace, StepShape("decode", 1).token_index(6), warmup=0)
    # a cache of 4: loads 0,1 | - | 2,3 | - | 4,5 evicting 0,1 (the least recent) | 2,3 still held;
    # a cache of 2: 4,5 evicts 2,3, which then miss again
    assert run.counts.loads[:, 0].tolist() == [2, 0, 2, 0, 2, 0]
    assert run.counts.loads[:, 2].tolist() == [2, 0, 2, 0, 2, 2]
    assert run.counts.hits.sum() == 2 * (3 + 3 + 2) and run.counts.staged.sum() == 0
    assert run.bytes_moved == 20 * host.expert_bytes


@pytest.mark.gpu
def test_executor_on_gpu_overlaps_and_matches_simulation(tiny_trace: RoutingTrace) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from moeplan.runtime.offload import HostExperts, OffloadStack

    m, gpu = tiny_model(), torch.device("cuda", 0)
    shape = StepShape("decode", 2)
    fit, held = tiny_trace.split(0.5)
    predictor = TransitionPredictor.fit(fit, shape).limited(np.full(3, 2), np.full(3, 0.2))
    index = shape.token_index(held.num_tokens)[:16]
    host = HostExperts.materialise(m, 0, torch.bfloat16, True, gpu)
    outs = []
    for policy, sizes in (("prefetch", [3, 2, 4]), ("lru", [8, 8, 8])):
        run, out = OffloadStack(m, host, sizes, policy, 2, gpu, torch.bfloat16, "grouped", predictor).run(held, index)
        sim = simulate(held, index, np.array(sizes), policy, predictor)
        assert np.array_equal(run.counts.loads, sim.loads) and run.stall_seconds >= 0
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


# ---- CLI ----------------------------------------------------------------------------------------
def cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from moeplan.cli import app
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_trace: RoutingTrace) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cache")
    model = root / "tiny.json"
    model.write_text(json.dumps(tiny_model().to_dict()))
    trace = root / "t.npz"
    tiny_trace.save(trace)
    plan = root / "c.json"
    m = tiny_model()
    rest = CostModel(m, HardwareProfile.resolve("h100-sxm")).memory(0, 1, kv_tokens_per_device=2 * 4096,
                                                                     batch_tokens_per_device=2)
    budget = (rest.non_expert_weights + rest.kv_cache + rest.activations + 14.5 * m.expert_bytes()) / 2**30
    code, out = cli("plan", "cache", "--model", str(model), "--trace", str(trace), "--budget-gb", repr(budget),
                    "--batch", "2", "--policy", "prefetch", "-o", str(plan), "--json", str(root / "r.json"))
    assert code == 0, out
    assert "Policies at the same total cache" in out and "belady" in out and "12 cache slots + 2 staging" in out
    return {"model": model, "trace": trace, "plan": plan, "root": root}


def test_plan_cache_then_run_offload(files: dict[str, Path]) -> None:
    pytest.importorskip("torch")
    plan = Plan.load(files["plan"])
    assert plan.cache is not None and plan.cache.policy == "prefetch" and plan.cache.prefetch is True
    assert len(plan.cache.sizes) == 3 and plan.cache.budget_bytes > 0
    report = json.loads((files["root"] / "r.json").read_text())
    assert len(report["table"]["rows"]) == 27
    out_json = files["root"] / "run.json"
    code, out = cli("run", "--offload", "--cache-plan", str(files["plan"]), "--trace", str(files["trace"]),
                    "--steps", "12", "--kernel", "loop", "--device", "cpu", "-o", str(out_json))
    assert code == 0, out
    data = json.loads(out_json.read_text())
    assert data["counts_match_simulation"] is True and data["measured"]["tokens_per_s"] > 0
    assert data["measured"]["hit_rate"] == pytest.approx(data["predicted"]["hit_rate"])


def test_run_offload_refuses_what_the_host_cannot_hold(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every routed expert goes to host memory: with (pretended) 100 bytes free the run ends with
    exit 2 naming the estimate before any weight is made."""
    pytest.importorskip("torch")
    import moeplan.errors
    monkeypatch.setattr(moeplan.errors, "available_memory", lambda: 100)
    _bad(*cli("run", "--offload", "--cache-plan", str(files["plan"]), "--trace", str(files["trace"]),
              "--steps", "4", "--device", "cpu"), "offloading tiny-moe (3 MoE layers × 8 experts in host memory",
         "GiB are free", "more memory")


def _bad(code: int, out: str, *needles: str) -> None:
    assert code == 2, out
    assert "error:" in out and "Traceback" not in out
    for needle in needles:
        assert needle in out, out


def test_cli_rejects_bad_input(files: dict[str, Path], tmp_path: Path) -> None:
    m, t = str(files["model"]), str(files["trace"])
    o = str(tmp_path / "x.json")
    _bad(*cli("plan", "cache", "--model", m, "--trace", t, "--policy", "fifo", "-o", o), "policy")
    _bad(*cli("plan", "cache", "--model", m, "--trace", str(tmp_path / "no.npz"), "-o", o), "file not found")
    _bad(*cli("plan", "cache", "--model", "mixtral-8x7b", "--trace", t, "-o", o), "trace has 3 MoE layers")
    _bad(*cli("plan", "cache", "--model", m, "--trace", t, "--budget-gb", "0.0001", "-o", o), "nothing is left")
    _bad(*cli("plan", "cache", "--model", m, "--trace", t, "--batch", "0", "-o", o), "batch")
    _bad(*cli("plan", "cache", "--model", m, "--trace", t, "--regroup", "-o", o), "request_tokens")
    assert not Path(o).exists()
    _bad(*cli("run", "--offload", "--trace", t), "--cache-plan")
    data = json.loads(files["plan"].read_text())
    data["cache"]["sizes"] = [8, 8, 8]
    too_big = tmp_path / "big.json"
    too_big.write_text(json.dumps(data))
    _bad(*cli("run", "--offload", "--cache-plan", str(too_big), "--trace", t, "--device", "cpu"),
         "does not fit its budget", "(24 cached + 2 staging)")
    data["cache"]["policy"] = "belady"
    data["cache"]["prefetch"] = True
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    _bad(*cli("run", "--offload", "--cache-plan", str(bad), "--trace", t), "prefetch")
    del data["cache"]
    none = tmp_path / "none.json"
    none.write_text(json.dumps(data))
    _bad(*cli("run", "--offload", "--cache-plan", str(none), "--trace", t), "no cache section")


# ---- the GPU benchmark's CPU path ---------------------------------------------------------------
def test_gpu_offload_bench_cpu_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_offload.py"
    spec = importlib.util.spec_from_file_location("gpu_offload_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)                # dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.main([str(tmp_path), "--tiny"]) == 0
    data = json.loads((tmp_path / "gpu_offload.json").read_text())
    t = data["targets"]
    assert t["counts_match_simulation"] is True and t["runs"] == 12
    assert 0 < t["memory_saved_fraction_min"] < 1
    row = data["shapes"][0]["traces"][1]["totals"][0]
    assert {"a_lru_uniform", "b_planned_lru", "c_planned_prefetch"} <= set(row)
