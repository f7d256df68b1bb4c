"""Export to SGLang / EPLB / vLLM / Megatron and import back.

Round trips (Plan → format → Plan is the identity) run as property tests over random valid
placements, replicas included, each within its format's rules. Exported files are checked against
the runtime's own rules; where the loader is a small pure function its checks are reproduced here:

* SGLang: ``compute_initial_expert_location_metadata`` → ``init_by_mapping`` →
  ``_compute_logical_to_all_physical_map`` / ``compute_logical_to_rank_dispatch_physical_map`` /
  ``_fair_choices`` in sgl-project/sglang ``python/sglang/srt/eplb/expert_location.py`` @
  ``01fec5c2e61f9568c41a6e1d4fd5ac46c88504f1``, plus ``_find_nearest_expert`` of its late-2025
  form (search-index file id 60778760878, upstream PRs #9849/#10874).
* EPLB: the ``log2phy`` scatter of ``rebalance_experts`` in deepseek-ai/EPLB ``eplb.py`` @
  ``d52c72d5b2f2fb4c41afbf8eb21366820239913d``.
* vLLM: ``_validate_parallel_config`` in ``vllm/config/parallel.py`` @ ``00193b82`` and the
  FusedMoE EP assertions (``global_num_experts % ep_size == 0`` with EPLB).
* Megatron: ``initialize_model_parallel`` world-size rules and ``arguments.py`` VPP rules,
  NVIDIA/Megatron-LM tag ``core_v0.15.0``.
"""
from __future__ import annotations

import json
import os
import shlex
import stat
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.errors import InputError
from moeplan.export.eplb import EplbTensors, export_eplb
from moeplan.export.importers import import_eplb, import_sglang_dump, import_sglang_location
from moeplan.export.megatron import export_megatron, megatron_args, megatron_placement
from moeplan.export.common import same_rank_replica
from moeplan.export.sglang import export_sglang, location_map, repair_same_rank_replicas
from moeplan.solvers.placement.eplb import rebalance_experts
from moeplan.export.vllm import export_vllm, layout_kind
from moeplan.hardware import HardwareProfile
from moeplan.model import AttentionSpec, ModelSpec
from moeplan.plan import Placement, Plan
from moeplan.parallel import ParallelLayout

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
runner = CliRunner()


@lru_cache(maxsize=1)
def h100() -> HardwareProfile:
    return HardwareProfile.resolve("h100-sxm")


def toy_model(dense: int, moe: int, experts: int, n_group: int = 1) -> ModelSpec:
    return ModelSpec(name="toy", num_layers=dense + moe, hidden_size=64, vocab_size=128,
                     attention=AttentionSpec(kind="gqa", num_heads=8, num_kv_heads=8, head_dim=8),
                     moe_layers=tuple(range(dense, dense + moe)), num_experts=experts, top_k=min(2, experts),
                     expert_ffn=32, dense_ffn=64 if dense else 0, n_group=n_group, topk_group=n_group).validate()


def make_plan(model: ModelSpec, slots: np.ndarray, parallel: dict | None = None) -> Plan:
    cluster = h100().with_cluster(devices=slots.shape[1])
    placement = Placement.from_slots(slots, model.num_experts, cluster.devices_per_node, dispatch="even")
    layout = ParallelLayout.from_dict(parallel, "plan") if parallel is not None else None
    return Plan(model=model, hardware=cluster.ref(), devices_per_node=cluster.devices_per_node, nodes=cluster.nodes,
                placement=placement, parallel=layout).validate()


def replica_counts(rng: np.random.Generator, experts: int, physical: int, cap: int) -> np.ndarray:
    counts = np.ones(experts, dtype=int)
    for _ in range(physical - experts):
        counts[rng.choice(np.flatnonzero(counts < cap))] += 1
    return counts


def distinct_rank_layer(rng: np.random.Generator, experts: int, devices: int, slots: int) -> np.ndarray:
    """[devices, slots], every expert present, no rank holding two replicas of one expert."""
    counts = replica_counts(rng, experts, devices * slots, devices)
    copies = np.concatenate([np.full(counts[e], e) for e in rng.permutation(experts)])
    grid = copies.reshape(slots, devices).T  # copy i → device i % D: consecutive copies on distinct devices
    grid = grid[rng.permutation(devices)]
    return np.stack([row[rng.permutation(slots)] for row in grid])


def any_layer(rng: np.random.Generator, experts: int, devices: int, slots: int) -> np.ndarray:
    """[devices, slots], every expert present, replicas anywhere (same rank allowed)."""
    counts = replica_counts(rng, experts, devices * slots, devices * slots)
    return rng.permutation(np.repeat(np.arange(experts), counts)).reshape(devices, slots)


@st.composite
def cases(draw: st.DrawFn) -> tuple[ModelSpec, int, int, int]:
    """(model, devices, slots per device, seed) with E ≤ devices·slots ≤ E·devices."""
    devices = draw(st.sampled_from([2, 3, 4, 8, 16]))
    experts = draw(st.integers(2, 24))
    slots = draw(st.integers(-(-experts // devices), min(experts, -(-experts // devices) + 2)))
    model = toy_model(draw(st.integers(0, 2)), draw(st.integers(1, 3)), experts)
    return model, devices, slots, draw(st.integers(0, 2**31))


def random_plan(case: tuple[ModelSpec, int, int, int], layer_fn) -> Plan:  # noqa: ANN001
    model, devices, slots, seed = case
    rng = np.random.default_rng(seed)
    layers = np.stack([layer_fn(rng, model.num_experts, devices, slots) for _ in range(model.num_moe_layers)])
    return make_plan(model, layers)


def same_placement(a: Plan, b: Plan) -> None:
    assert b.model == a.model
    assert (b.hardware, b.devices_per_node, b.nodes) == (a.hardware, a.devices_per_node, a.nodes)
    assert b.placement is not None and a.placement is not None
    assert np.array_equal(b.placement.slot_expert, a.placement.slot_expert)
    assert np.allclose(b.placement.replica_share, a.placement.replica_share)


# ---- the runtimes' own checks, reproduced ------------------------------------------------------

def sglang_loader(data: dict, num_layers: int, num_logical: int, ep_num_redundant: int, ep_size: int,
                  moe_layers: tuple[int, ...]) -> None:
    """SGLang's path from ``--init-expert-location`` to loaded weights, pure-python parts (see module doc)."""
    assert "physical_to_logical_map" in data

    def init_by_mapping(physical_to_logical_map, moe_ep_rank=None):  # noqa: ANN001, ANN202 - the signature
        return physical_to_logical_map

    phy2log = [list(map(int, row)) for row in init_by_mapping(**data)]  # extra keys: TypeError
    num_physical = num_logical + ep_num_redundant                       # _init_common
    assert num_physical % ep_size == 0
    local = num_physical // ep_size
    assert len(phy2log) == num_layers                                   # rows indexed by layer_id
    assert all(len(row) == num_physical for row in phy2log)             # FusedMoE allocates `local` slots
    candidates = [[[] for _ in range(num_logical)] for _ in phy2log]    # _compute_logical_to_all_physical_map
    for layer, row in enumerate(phy2log):
        for phys, logical in enumerate(row):
            assert 0 <= logical, "a negative id wraps silently in SGLang"
            candidates[layer][logical].append(phys)                     # IndexError for ≥ E
    for layer in candidates:                                            # static dispatch: _fair_choices
        for cands in layer:
            assert len(cands) > 0, "divmod(k, 0) in _fair_choices"
    for layer in moe_layers:                                            # _find_nearest_expert per rank
        for rank in range(ep_size):
            for cands in candidates[layer]:
                same_gpu = [p for p in cands if p // local == rank]
                chosen = cands[0] if len(cands) == 1 else (same_gpu[0] if same_gpu else None)
                assert all(p == chosen for p in same_gpu), "a local replica whose weights are never loaded"


def eplb_structure(phy2log: np.ndarray, log2phy: np.ndarray, logcnt: np.ndarray, num_gpus: int) -> None:
    """EPLB's output structure: rank-major P % G, logcnt = replica counts, log2phy = the reference scatter."""
    layers, physical = phy2log.shape
    experts = logcnt.shape[1]
    assert physical % num_gpus == 0
    assert np.array_equal(logcnt, np.stack([np.bincount(r, minlength=experts) for r in phy2log]))
    assert logcnt.min() >= 1
    maxlogcnt = int(logcnt.max())
    assert log2phy.shape == (layers, experts, maxlogcnt)
    phyrank = np.full((layers, physical), -1)
    for layer, e, k in np.argwhere(log2phy >= 0):
        phyrank[layer, log2phy[layer, e, k]] = k
    assert (phyrank >= 0).all()
    rebuilt = np.full((layers, experts * maxlogcnt), -1)
    for layer in range(layers):  # log2phy.view(L,-1).scatter_(-1, phy2log*maxlogcnt + phyrank, arange(P))
        rebuilt[layer, phy2log[layer] * maxlogcnt + phyrank[layer]] = np.arange(physical)
    assert np.array_equal(rebuilt.reshape(log2phy.shape), log2phy)


def command_words(command: str) -> list[str]:
    return shlex.split(command.replace("\\\n", " "))


def flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


# ---- SGLang -------------------------------------------------------------------------------------

@PROPERTY
@given(cases())
def test_sglang_round_trip_and_loader_accepts(case: tuple[ModelSpec, int, int, int]) -> None:
    plan = random_plan(case, distinct_rank_layer)
    model, p = plan.model, plan.placement
    with tempfile.TemporaryDirectory() as tmp:
        result = export_sglang(plan, Path(tmp) / "loc.json")
        data = json.loads(result.files[0].read_text())
        words = command_words(result.command)
        redundant = int(flag(words, "--ep-num-redundant-experts"))
        ep = int(flag(words, "--ep-size"))
        sglang_loader(data, model.num_layers, model.num_experts, redundant, ep, model.moe_layers)
        assert flag(words, "--init-expert-location") == str(result.files[0].resolve())
        assert "--enable-eplb" not in words and int(flag(words, "--tp-size")) == ep == p.num_devices
        back = import_sglang_location(str(result.files[0]), model, h100(), p.num_devices)
    same_placement(plan, back)


def test_sglang_dense_rows_are_sglangs_trivial_rows() -> None:
    model = toy_model(2, 2, 6)
    plan = make_plan(model, np.stack([distinct_rank_layer(np.random.default_rng(i), 6, 4, 2) for i in range(2)]))
    phy2log, swaps = location_map(plan)
    assert swaps == 0 and phy2log.shape == (4, 8) and phy2log.dtype == np.int64
    assert np.array_equal(phy2log[0], np.arange(8) % 6) and np.array_equal(phy2log[1], np.arange(8) % 6)
    assert np.array_equal(phy2log[2:], plan.placement.phy2log())


def test_sglang_rejects_two_replicas_on_one_rank() -> None:
    model = toy_model(0, 1, 4)
    slots = np.array([[[0, 0], [1, 2], [3, 1]]])  # rank 0 holds expert 0 twice
    with pytest.raises(AssertionError, match="never loaded"):
        sglang_loader({"physical_to_logical_map": slots.reshape(1, -1).tolist()}, 1, 4, 2, 3, (0,))
    with tempfile.TemporaryDirectory() as tmp:
        result = export_sglang(make_plan(model, slots), Path(tmp) / "loc.json")
        repaired = json.loads(result.files[0].read_text())["physical_to_logical_map"]
    assert any("1 slot swap" in n for n in result.notes)
    sglang_loader({"physical_to_logical_map": repaired}, 1, 4, 2, 3, (0,))  # loads: no rank holds a twin
    assert same_rank_replica(np.array(repaired), 3) is None
    assert sorted(np.bincount(np.array(repaired).ravel())) == sorted(np.bincount(slots.ravel()))


@pytest.mark.parametrize("seed", range(8))
def test_sglang_repairs_eplb_plans_with_replicas(seed: int) -> None:
    load = np.random.default_rng(seed).lognormal(0, 1, (4, 32))
    phy2log, _, counts = rebalance_experts(load, 48, 1, 1, 8)  # EPLB's packing puts twins onto one GPU
    if counts.max() > 8:  # more replicas than ranks: no placement avoids twins
        with pytest.raises(InputError, match="no slot swap separates them"):
            repair_same_rank_replicas(phy2log, 8)
        return
    assert same_rank_replica(phy2log, 8) is not None
    repaired, swaps = repair_same_rank_replicas(phy2log, 8)
    assert swaps > 0 and same_rank_replica(repaired, 8) is None
    for row in range(4):
        assert np.array_equal(np.bincount(repaired[row], minlength=32), np.bincount(phy2log[row], minlength=32))


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "dbrx", "olmoe-1b-7b"])
def test_sglang_refuses_models_it_cannot_place(preset: str, tmp_path: Path) -> None:
    model = ModelSpec.preset(preset)
    slots = np.broadcast_to(np.arange(model.num_experts).reshape(2, -1), (model.num_moe_layers, 2,
                                                                             model.num_experts // 2)).copy()
    with pytest.raises(InputError, match="get_model_config_for_expert_location") as err:
        export_sglang(make_plan(model, slots), tmp_path / "loc.json")
    assert err.value.field == "model.family" and not (tmp_path / "loc.json").exists()


def test_sglang_loader_reproduction_rejects_extra_keys_and_missing_experts() -> None:
    with pytest.raises(TypeError):
        sglang_loader({"physical_to_logical_map": [[0, 1]], "meta": 1}, 1, 2, 0, 2, (0,))
    with pytest.raises(AssertionError, match="_fair_choices"):
        sglang_loader({"physical_to_logical_map": [[0, 0]]}, 1, 2, 0, 2, (0,))


def test_deepseek_v3_32_gpus_288_slots_is_accepted_by_sglang(tmp_path: Path) -> None:
    model = ModelSpec.preset("deepseek-v3")
    grid = np.zeros((32, 9), dtype=int)
    grid[:, :8] = np.arange(256).reshape(32, 8)          # contiguous: rank r holds 8r … 8r+7
    replica_rank = [31 - k for k in range(32)]
    replica_rank[0], replica_rank[28] = replica_rank[28], replica_rank[0]
    assert sorted(replica_rank) == list(range(32))
    assert all(r != k // 8 for k, r in enumerate(replica_rank))
    for expert, rank in enumerate(replica_rank):
        grid[rank, 8] = expert                            # one replica of experts 0…31 per rank
    plan = make_plan(model, np.broadcast_to(grid, (model.num_moe_layers, 32, 9)).copy())
    assert (plan.nodes, plan.devices_per_node) == (4, 8)
    result = export_sglang(plan, tmp_path / "ds.json")
    data = json.loads(result.files[0].read_text())
    assert list(data) == ["physical_to_logical_map"]
    assert np.asarray(data["physical_to_logical_map"]).shape == (61, 288)
    words = command_words(result.command)
    sglang_loader(data, 61, 256, int(flag(words, "--ep-num-redundant-experts")), int(flag(words, "--ep-size")),
                  model.moe_layers)
    assert words[:3] == ["python", "-m", "sglang.launch_server"]
    assert flag(words, "--model-path") == "deepseek-ai/DeepSeek-V3"
    assert (flag(words, "--tp-size"), flag(words, "--ep-size"), flag(words, "--ep-num-redundant-experts"),
            flag(words, "--moe-a2a-backend"), flag(words, "--nnodes")) == ("32", "32", "32", "deepep", "4")


def test_sglang_pt_round_trip_and_dp_attention(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    model = toy_model(1, 2, 8)
    slots = np.stack([distinct_rank_layer(np.random.default_rng(i), 8, 4, 3) for i in range(2)])
    parallel = {"attention": {"tp": 2, "cp": 1, "dp": 2, "pp": 1}, "moe": {"etp": 1, "ep": 4, "edp": 1}}
    plan = make_plan(model, slots, parallel)
    result = export_sglang(plan, tmp_path / "loc.pt", rebalance_every=500)
    words = command_words(result.command)
    assert flag(words, "--dp-size") == "2" and "--enable-dp-attention" in words
    assert flag(words, "--eplb-rebalance-num-iterations") == "500" and "--enable-eplb" in words
    same_placement(plan, import_sglang_location(str(result.files[0]), model, h100(), 4))


# ---- EPLB tensors ------------------------------------------------------------------------------

@PROPERTY
@given(cases())
def test_eplb_round_trip_and_structure(case: tuple[ModelSpec, int, int, int]) -> None:
    plan = random_plan(case, any_layer)
    with tempfile.TemporaryDirectory() as tmp:
        tensors = EplbTensors.from_placement(plan.placement, plan.model.moe_layers)
        path = Path(tmp) / "eplb.json"
        path.write_text(json.dumps(tensors.to_json()))
        data = json.loads(path.read_text())
        eplb_structure(np.asarray(data["phy2log"]), np.asarray(data["log2phy"]), np.asarray(data["logcnt"]),
                       data["num_gpus"])
        assert data["layer_ids"] == list(plan.model.moe_layers)
        back = import_eplb(str(path), plan.model, h100())
    same_placement(plan, back)


def test_eplb_export_writes_json_and_pt(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = toy_model(1, 2, 6)
    plan = make_plan(model, np.stack([any_layer(np.random.default_rng(i), 6, 4, 3) for i in range(2)]))
    result = export_eplb(plan, tmp_path / "out")
    assert [p.name for p in result.files] == ["eplb.json", "eplb.pt"]
    payload = torch.load(result.files[1], weights_only=True)
    assert set(payload) == {"phy2log", "log2phy", "logcnt", "layer_ids", "num_gpus"}
    assert all(t.dtype == torch.int64 for t in payload.values())
    eplb_structure(payload["phy2log"].numpy(), payload["log2phy"].numpy(), payload["logcnt"].numpy(),
                   int(payload["num_gpus"]))
    same_placement(plan, import_eplb(str(result.files[1]), model, h100()))
    same_placement(plan, import_eplb(str(result.files[0]), model, h100()))


def test_eplb_reads_replicas_in_eplb_order() -> None:
    """Real EPLB output lists replicas by creation rank, not by physical id: accepted as the same placement."""
    phy2log = np.array([[0, 1, 0, 2]])
    data = {"phy2log": phy2log.tolist(), "log2phy": [[[2, 0], [1, -1], [3, -1]]], "logcnt": [[2, 1, 1]]}
    tensors = EplbTensors.from_dict(data, 3, "t", num_gpus=2)
    assert np.array_equal(tensors.log2phy, [[[0, 2], [1, -1], [3, -1]]])


# ---- vLLM --------------------------------------------------------------------------------------

def vllm_config_checks(words: list[str], num_experts: int, num_physical: int) -> None:
    """vLLM's ``_validate_parallel_config`` and FusedMoE EP assertions for the emitted flags."""
    ep_size = int(flag(words, "--tensor-parallel-size")) * int(flag(words, "--data-parallel-size"))
    config = json.loads(flag(words, "--eplb-config")) if "--eplb-config" in words else {}
    redundant = config.get("num_redundant_experts", 0)
    if "--enable-eplb" in words:
        assert "--enable-expert-parallel" in words, "enable_expert_parallel must be True to use EPLB."
        assert ep_size > 1, "EPLB requires tensor, prefill-context, or data parallelism"
        assert (num_experts + redundant) % ep_size == 0
        assert set(config) <= {"window_size", "step_interval", "num_redundant_experts", "log_balancedness"}
    else:
        assert redundant == 0, "Either enable EPLB or unset num_redundant_experts"
    assert num_experts + redundant == num_physical


@settings(max_examples=30, deadline=None)
@given(cases())
def test_vllm_round_trip_through_its_placement_file(case: tuple[ModelSpec, int, int, int]) -> None:
    plan = random_plan(case, any_layer)
    p = plan.placement
    with tempfile.TemporaryDirectory() as tmp:
        result = export_vllm(plan, Path(tmp) / "vllm")
        words = command_words(result.command)
        vllm_config_checks(words, p.num_experts, p.num_physical)
        kind = layout_kind(p, plan.model)
        assert ("--enable-eplb" in words) == (kind not in ("linear", "round_robin"))
        assert "cannot load" in " ".join(result.notes) or kind != "custom"
        assert json.loads(result.files[1].read_text())["note"]
        back = import_eplb(str(result.files[1]), plan.model, h100())
        assert result.files[0].read_text().startswith("#!/usr/bin/env bash")
    same_placement(plan, back)


def test_vllm_loads_linear_and_round_robin_exactly(tmp_path: Path) -> None:
    model = toy_model(0, 2, 8, n_group=2)
    linear = make_plan(model, np.broadcast_to(np.arange(8).reshape(4, 2), (2, 4, 2)).copy())
    round_robin = make_plan(model, np.broadcast_to(np.array([[0, 4], [1, 5], [2, 6], [3, 7]]), (2, 4, 2)).copy())
    words = command_words(export_vllm(linear, tmp_path / "a").command)
    assert "--enable-eplb" not in words and "--expert-placement-strategy" not in words
    words = command_words(export_vllm(round_robin, tmp_path / "b").command)
    assert flag(words, "--expert-placement-strategy") == "round_robin" and "--enable-eplb" not in words
    # DP > 1 runs vLLM's all-to-all kernels; round_robin survives only on DeepEP low-latency (or NIXL EP)
    dp = int(flag(words, "--data-parallel-size"))
    assert dp == 1 or flag(words, "--all2all-backend") == "deepep_low_latency"
    ungrouped = make_plan(toy_model(0, 2, 8), round_robin.placement.slot_expert)
    assert layout_kind(ungrouped.placement, ungrouped.model) == "custom"  # vLLM would fall back to linear
    initial = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]).reshape(4, 3)  # build_initial_global_..._map(8, 4)
    start = make_plan(model, np.broadcast_to(initial, (2, 4, 3)).copy())
    assert layout_kind(start.placement, model) == "eplb_initial"
    words = command_words(export_vllm(start, tmp_path / "c").command)
    vllm_config_checks(words, 8, 12)
    assert json.loads(flag(words, "--eplb-config"))["num_redundant_experts"] == 4


# ---- Megatron ----------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.integers(1, 4), st.integers(1, 3))
def test_megatron_round_trip_contiguous(ep: int, per_rank: int, moe_layers: int) -> None:
    model = toy_model(1, moe_layers, ep * per_rank)
    placement = megatron_placement(moe_layers, model.num_experts, ep, min(ep, 8))
    plan = make_plan(model, placement.slot_expert)
    words = megatron_args(plan)
    back = megatron_placement(moe_layers, int(flag(words, "--num-experts")),
                              int(flag(words, "--expert-model-parallel-size")), plan.devices_per_node)
    assert np.array_equal(back.slot_expert, plan.placement.slot_expert)
    assert ("--moe-grouped-gemm" in words) == (per_rank > 1)
    assert flag(words, "--moe-layer-freq") == f"([0]*1+[1]*{moe_layers})"


def test_megatron_rejects_replicas_and_scattered_experts() -> None:
    model = toy_model(0, 1, 4)
    with pytest.raises(InputError, match="no redundant experts"):
        megatron_args(make_plan(model, np.array([[[0, 1, 2], [3, 0, 1]]])))
    with pytest.raises(InputError, match="contiguous"):
        megatron_args(make_plan(model, np.array([[[0, 2], [1, 3]]])))
    swapped = megatron_args(make_plan(model, np.array([[[1, 0], [2, 3]]])))
    assert flag(swapped, "--expert-model-parallel-size") == "2"


def test_megatron_folding_arguments_follow_megatrons_rules(tmp_path: Path) -> None:
    model = ModelSpec.preset("qwen3-30b-a3b")
    parallel = {"attention": {"tp": 2, "cp": 2, "dp": 2, "pp": 2}, "moe": {"etp": 1, "ep": 8, "edp": 1, "pp": 2},
                "vpp": 2, "micro_batch": 1, "global_batch": 64, "recompute": True, "distributed_optimizer": True,
                "seq_len": 4096, "sequence_parallel": True, "mode": "train"}  # the folding solver's record
    plan = Plan(model=model, hardware=HardwareProfile.resolve("h100-sxm").ref(), devices_per_node=8, nodes=2,
                parallel=ParallelLayout.from_dict(parallel, "plan"))
    result = export_megatron(plan, tmp_path / "args.sh")
    words = command_words(result.command)
    tp, cp, pp = (int(flag(words, f)) for f in ("--tensor-model-parallel-size", "--context-parallel-size",
                                               "--pipeline-model-parallel-size"))
    ep, etp = int(flag(words, "--expert-model-parallel-size")), int(flag(words, "--expert-tensor-parallel-size"))
    world = plan.num_devices
    assert world % (tp * cp * pp) == 0 and world % (etp * ep * pp) == 0     # initialize_model_parallel
    assert model.num_experts % ep == 0 and "--sequence-parallel" in words
    per_stage = model.num_layers // pp                                       # arguments.py VPP rules
    assert per_stage % int(flag(words, "--num-layers-per-virtual-pipeline-stage")) == 0
    assert flag(words, "--num-layers-per-virtual-pipeline-stage") == "12" and "--use-distributed-optimizer" in words
    assert flag(words, "--moe-token-dispatcher-type") == "alltoall" and flag(words, "--seq-length") == "4096"
    assert "MOEPLAN_MEGATRON_ARGS=(" in result.files[0].read_text()
    # validate_args asserts CUDA_DEVICE_MAX_CONNECTIONS == "1" for TP or CP > 1 before Blackwell
    assert words[0] == "CUDA_DEVICE_MAX_CONNECTIONS=1" and words[1] == "torchrun"
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in result.files[0].read_text()


def test_megatron_without_tp_or_cp_sets_no_connection_limit(tmp_path: Path) -> None:
    parallel = {"attention": {"tp": 1, "cp": 1, "dp": 8, "pp": 1}, "moe": {"etp": 1, "ep": 8, "edp": 1}}
    plan = Plan(model=ModelSpec.preset("qwen3-30b-a3b"), hardware=HardwareProfile.resolve("h100-sxm").ref(),
                devices_per_node=8, nodes=1, parallel=ParallelLayout.from_dict(parallel, "plan"))
    result = export_megatron(plan, tmp_path / "args.sh")
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in result.command + result.files[0].read_text()


def test_exported_shell_scripts_are_executable(tmp_path: Path) -> None:
    """vLLM's launch script and Megatron's .sh get 0777 less the umask (a plain chmod +x)."""
    mask = os.umask(0o022)
    os.umask(mask)
    parallel = {"attention": {"tp": 1, "cp": 1, "dp": 8, "pp": 1}, "moe": {"etp": 1, "ep": 8, "edp": 1}}
    plan = Plan(model=ModelSpec.preset("qwen3-30b-a3b"), hardware=HardwareProfile.resolve("h100-sxm").ref(),
                devices_per_node=8, nodes=1, parallel=ParallelLayout.from_dict(parallel, "plan"))
    scripts = [export_megatron(plan, tmp_path / "args.sh").files[0]]
    model = toy_model(0, 2, 8, n_group=2)
    linear = make_plan(model, np.broadcast_to(np.arange(8).reshape(4, 2), (2, 4, 2)).copy())
    scripts += [f for f in export_vllm(linear, tmp_path / "v").files if f.suffix == ".sh"]
    assert len(scripts) == 2
    for script in scripts:
        assert stat.S_IMODE(script.stat().st_mode) == 0o777 & ~mask, script
    others = [f for f in export_vllm(linear, tmp_path / "v").files if f.suffix != ".sh"]
    assert others and all(stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask for f in others)


@pytest.mark.parametrize("parallel, field", [
    ({"attention": {"tp": 2, "cp": 1, "dp": 2, "pp": 1}, "moe": {"etp": 1, "ep": 4, "edp": 1}}, "parallel.attention"),
    ({"attention": {"tp": 2, "cp": 1, "dp": 4, "pp": 1}, "moe": {"etp": 1, "ep": 4, "edp": 1}}, "parallel.moe"),
    ({"attention": {"tp": 2, "cp": 1, "dp": 4, "pp": 1}, "moe": {"etp": 1, "ep": 8, "edp": 1}, "zz": 1}, "parallel.zz"),
    ({"attention": {"tp": 1, "cp": 1, "dp": 8, "pp": 1}, "moe": {"etp": 1, "ep": 8, "edp": 1}, "vpp": 2},
     "parallel.vpp"),
    ({"attention": {"tp": 1, "cp": 2, "dp": 4, "pp": 1}, "moe": {"etp": 1, "ep": 8, "edp": 1}, "seq_len": 4097},
     "parallel.seq_len"),
    ({"attention": {"tp": 1, "cp": 1, "dp": 8, "pp": 1}, "moe": {"etp": 1, "ep": 8, "edp": 1}, "mode": "x"},
     "parallel.mode"),
])
def test_megatron_bad_mapping_names_the_field(parallel: dict, field: str) -> None:
    with pytest.raises(InputError) as err:
        plan = Plan(model=ModelSpec.preset("qwen3-30b-a3b"), hardware=HardwareProfile.resolve("h100-sxm").ref(),
                    devices_per_node=8, nodes=1, parallel=ParallelLayout.from_dict(parallel, "plan"))
        megatron_args(plan)
    assert err.value.field == field


# ---- SGLang load dumps -------------------------------------------------------------------------

def test_sglang_dump_load_is_moe_rows_summed_over_steps(tmp_path: Path) -> None:
    model = toy_model(2, 3, 5)
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(4, 5, 5))
    counts[:, :2] = 0
    path = tmp_path / "dump.json"
    path.write_text(json.dumps({"rank": 0, "logical_count": counts.tolist(),
                                "average_utilization_rate_over_window": None}))
    recorded = import_sglang_dump(str(path), model)
    assert np.array_equal(recorded.load, counts[:, 2:].sum(axis=0)) and recorded.steps == 4
    (tmp_path / "model.json").write_text(json.dumps(model.to_dict()))
    out = runner.invoke(app, ["import", "-f", "sglang-dump", str(path), "--model", str(tmp_path / "model.json"),
                              "-o", str(tmp_path / "load.json")])
    assert out.exit_code == 0, out.output
    written = json.loads((tmp_path / "load.json").read_text())
    assert written["layer_ids"] == [2, 3, 4] and np.array_equal(written["load"], recorded.load)
    torch = pytest.importorskip("torch")
    pt = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save({"rank": 0, "logical_count": torch.tensor(counts, dtype=torch.int32),
                "average_utilization_rate_over_window": 0.5}, pt)
    assert np.array_equal(import_sglang_dump(str(pt), model).load, recorded.load)


# ---- CLI: export prints the command; malformed imports exit 2 naming the field -------------------

def test_cli_export_and_import_round_trip(tmp_path: Path) -> None:
    model = toy_model(1, 2, 8)
    plan = make_plan(model, np.stack([distinct_rank_layer(np.random.default_rng(i), 8, 4, 3) for i in range(2)]))
    plan.save(tmp_path / "plan.json")
    (tmp_path / "model.json").write_text(json.dumps(model.to_dict()))
    out = runner.invoke(app, ["export", "--format", "sglang", str(tmp_path / "plan.json"), "-o", str(tmp_path / "s")])
    assert out.exit_code == 0, out.output
    assert "python -m sglang.launch_server" in out.output and "--init-expert-location" in out.output
    back = runner.invoke(app, ["import", "--format", "sglang", str(tmp_path / "s" / "expert_location.json"),
                               "--model", str(tmp_path / "model.json"), "--hardware", "h100-sxm", "--gpus", "4",
                               "-o", str(tmp_path / "back.json")])
    assert back.exit_code == 0, back.output
    same_placement(plan, Plan.load(tmp_path / "back.json"))
    for fmt in ("eplb", "vllm"):
        result = runner.invoke(app, ["export", "-f", fmt, str(tmp_path / "plan.json"), "-o", str(tmp_path / fmt)])
        assert result.exit_code == 0, result.output
    assert "vllm serve" in result.output
    bad = runner.invoke(app, ["export", "-f", "megatron", str(tmp_path / "plan.json"), "-o", str(tmp_path / "m")])
    assert bad.exit_code == 2 and "no redundant experts" in bad.output


GOOD_ROWS = [[0, 1, 2, 3], [0, 1, 2, 3], [3, 2, 1, 0]]


@pytest.mark.parametrize("fmt, payload, field", [
    ("sglang", {"physical_to_logical_map": GOOD_ROWS[:2]}, "physical_to_logical_map"),             # wrong shape
    ("sglang", {"physical_to_logical_map": [[0, 1, 2, 3], [0, 1, 2, 2], [0, 1, 2, 3]]},
     "physical_to_logical_map"),                                                                   # missing expert
    ("sglang", {"physical_to_logical_map": GOOD_ROWS, "meta": "x"}, "meta"),                        # unknown key
    ("sglang", {"logical_count": [[0]]}, "physical_to_logical_map"),                               # wrong kind
    ("sglang", {"physical_to_logical_map": [[0, 1, 2, 3], [0, 1, 2, 9], [0, 1, 2, 3]]},
     "physical_to_logical_map"),                                                                   # out of range
    ("eplb", {"phy2log": [[0, 1, 2, 3], [0, 1, 2, 3, 0]]}, "phy2log"),                              # ragged
    ("eplb", {"phy2log": [[0, 1, 2, 2], [0, 1, 2, 3]]}, "phy2log"),                                 # missing expert
    ("eplb", {"phy2log": GOOD_ROWS[:2], "extra": 1}, "extra"),                                      # unknown key
    ("eplb", {"phy2log": GOOD_ROWS[:2], "logcnt": [[1, 1, 1, 2], [1, 1, 1, 1]]}, "logcnt"),
    ("eplb", {"phy2log": GOOD_ROWS[:2], "log2phy": [[[1], [0], [2], [3]], [[0], [1], [2], [3]]]}, "log2phy"),
    ("eplb", {"phy2log": GOOD_ROWS[:2], "layer_ids": [0, 1]}, "layer_ids"),
    ("sglang-dump", {"logical_count": [[[1, 2, 3, 4]] * 2]}, "logical_count"),                     # wrong shape
    ("sglang-dump", {"logical_count": [[[1, 0, 0, 0], [1, 2, 3, 4], [1, 2, 3, 4]]]}, "logical_count"),  # dense
    ("sglang-dump", {"records": []}, "records"),
])
def test_cli_malformed_import_exits_2_naming_the_field(tmp_path: Path, fmt: str, payload: dict, field: str) -> None:
    model = toy_model(1, 2, 4)
    (tmp_path / "model.json").write_text(json.dumps(model.to_dict()))
    src = tmp_path / "in.json"
    src.write_text(json.dumps(payload))
    result = runner.invoke(app, ["import", "--format", fmt, str(src), "--model", str(tmp_path / "model.json"),
                                 "--hardware", "h100-sxm", "--gpus", "2", "-o", str(tmp_path / "out.json")])
    assert result.exit_code == 2, result.output
    assert f"field '{field}'" in result.output
    assert not (tmp_path / "out.json").exists()
