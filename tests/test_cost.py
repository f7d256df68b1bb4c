"""The cost model's arithmetic on hand-worked cases, and the simulator against it."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moeplan.cost import LAUNCHES_PER_EXPERT, CostModel, CostOptions
from moeplan.errors import InputError
from moeplan.hardware import Curve, HardwareProfile, Provenance
from moeplan.model import ModelSpec
from moeplan.plan import Placement, contiguous_placement
from moeplan.simulate import Workload, home_counts, simulate
from moeplan.trace import RoutingTrace

RUN = Provenance("measured", "test", "r1")


def datasheet(devices: int = 8, per_node: int = 4) -> HardwareProfile:
    return HardwareProfile.resolve("h100-sxm").with_cluster(devices=devices, devices_per_node=per_node)


def test_expert_roofline_by_hand() -> None:
    m = ModelSpec.preset("mixtral-8x7b")
    cost = CostModel(m, datasheet())
    flops_1k = 6 * 4096 * 14336 * 1000.0
    bytes_1k = 3 * 4096 * 14336 * 2 + 1000 * (2 * 4096 + 3 * 14336) * 2
    expected = max(flops_1k / 989.4e12, bytes_1k / 3.35e12) + LAUNCHES_PER_EXPERT * 5e-6
    assert cost.expert_time(1000.0) == pytest.approx(expected)
    assert cost.expert_time(0.0) == 0.0          # an expert with no tokens costs nothing
    assert not cost.compute_measured


def test_measured_curves_are_used_and_grouped_fit_recovers_fixed_and_per_expert_costs() -> None:
    m = ModelSpec.preset("deepseek-v2-lite")
    x = (1.0, 64.0, 1024.0)
    per_expert = np.array([10e-6, 20e-6, 100e-6])
    curves = tuple(Curve("expert_ffn", {"hidden": 2048, "ffn": 1408, "dtype": "bf16", "kernel": "grouped", "experts": g},
                         x, tuple(30e-6 + g * per_expert), RUN) for g in (1, 8))
    loop = Curve("expert_ffn", {"hidden": 2048, "ffn": 1408, "dtype": "bf16", "kernel": "loop"}, x,
                 (50e-6, 60e-6, 150e-6), RUN)
    hw = replace(datasheet(), curves=curves + (loop,), runs={"r1": {}})
    cost = CostModel(m, hw)
    assert cost.compute_measured
    # two experts at 64 tokens, one empty slot: fixed 30 µs + 2 × 20 µs
    assert cost.grouped_time(np.array([64.0, 64.0, 0.0])) == pytest.approx(70e-6)
    assert cost.grouped_time(np.zeros(3)) == 0.0
    assert cost.expert_time(64.0) == pytest.approx(60e-6)
    assert cost.expert_time(4096.0) == pytest.approx(150e-6 * 4)   # beyond the last point: linear in tokens
    loop_cost = CostModel(m, hw, CostOptions(kernel="loop"))
    assert loop_cost.device_compute(np.array([[64.0, 1.0], [0.0, 1024.0]])) == pytest.approx([110e-6, 150e-6])


def test_alltoall_splits_intra_and_inter_node_bytes_and_takes_the_busier_direction() -> None:
    cost = CostModel(ModelSpec.preset("mixtral-8x7b"), datasheet(devices=4, per_node=2))
    b = np.zeros((4, 4))
    b[0, 1] = 450e6   # intra-node: 1 ms at 450 GB/s
    b[0, 2] = 100e6   # inter-node: 2 ms at 50 GB/s
    b[3, 1] = 50e6    # inter-node into device 1: 1 ms
    t = cost.alltoall_time(b)
    intra_lat, inter_lat = 1e-5, 2.5e-5
    assert t[0] == pytest.approx(max(intra_lat + 1e-3, inter_lat + 2e-3))
    assert t[1] == pytest.approx(max(intra_lat + 1e-3, inter_lat + 1e-3))   # receives 450 MB intra, 50 MB inter
    assert t[2] == pytest.approx(inter_lat + 2e-3)
    np.testing.assert_allclose(cost.alltoall_time(np.eye(4) * 1e9), 0.0)   # staying local moves nothing


def test_moe_layer_is_set_by_the_slowest_device_of_each_phase() -> None:
    m = replace(ModelSpec.preset("mixtral-8x7b"), shared_ffn=0)
    cost = CostModel(m, datasheet(devices=2, per_node=2))
    dispatch = np.array([[100.0, 300.0], [50.0, 50.0]])
    slots = np.array([[150.0, 0.0], [350.0, 0.0]])
    lc = cost.moe_layer(dispatch, slots)
    row = 4096 * 2
    assert lc.dispatch[0] == pytest.approx(1e-5 + 300 * row / 450e9)
    assert lc.combine[1] == pytest.approx(1e-5 + 300 * row / 450e9)         # combine is the transpose
    work = lc.compute + lc.routing
    assert lc.time == pytest.approx(lc.dispatch.max() + work.max() + lc.combine.max())
    assert lc.straggler_wait == pytest.approx(work.max() - work.mean())
    assert lc.cross_device_bytes == pytest.approx(350 * row)
    assert lc.cross_node_bytes == 0.0


def test_flops_and_kv_bytes_by_hand() -> None:
    m = ModelSpec.preset("mixtral-8x7b")
    expert = 3 * 4096 * 14336
    assert m.expert_params() == expert
    matmul = m.active_params(include_input_embedding=False) - m.norm_params()
    assert m.flops_per_token() == 2.0 * matmul
    assert m.flops_per_token(1000) - m.flops_per_token() == pytest.approx(2 * 32 * 32 * (128 + 128) * 1000)
    assert m.kv_cache_bytes_per_token() == 32 * 2 * 8 * 128 * 2


def test_memory_per_device_by_hand_and_rejection_with_numbers() -> None:
    m = ModelSpec.preset("deepseek-v3")
    cost = CostModel(m, datasheet(devices=32, per_node=8))
    report = cost.memory(9, 32, kv_tokens_per_device=1000, batch_tokens_per_device=128)
    assert report.non_expert_weights == pytest.approx(m.non_expert_params() * 1.0)      # fp8 weights
    assert report.expert_weights[0] == pytest.approx(9 * 58 * m.expert_bytes())
    assert report.kv_cache == pytest.approx(m.kv_cache_bytes_per_token() * 1000)
    assert report.fits
    crowded = cost.memory(40, 32)
    assert not crowded.fits
    with pytest.raises(InputError, match=r"device 0 needs [0-9.]+ GiB .* of [0-9.]+ GiB"):
        crowded.check()


def test_home_counts_and_simulator_agree_with_the_layer_formula() -> None:
    m = replace(ModelSpec.preset("mixtral-8x7b"), num_layers=2, moe_layers=(0, 1))
    ids = np.zeros((8, 2, 2), dtype=np.int16)
    ids[:, :, 0] = np.arange(8)[:, None] % 8
    ids[:, :, 1] = (np.arange(8)[:, None] + 1) % 8
    trace = RoutingTrace(ids, 8, m.name).validate()
    counts = home_counts(ids, 2, 4, 8)            # 1 batch, 2 devices of 4 tokens
    assert counts.shape == (1, 2, 2, 8)
    assert counts[0, 0, 0].tolist() == [1, 2, 2, 2, 1, 0, 0, 0]
    hw = datasheet(devices=2, per_node=2)
    placement = contiguous_placement(2, 8, 2, 2)
    result = simulate(CostModel(m, hw), placement, trace, Workload("prefill", 4, 4))
    share = placement.expert_device_share()[0]
    dispatch = counts[:, :, 0, :] @ share
    slot_tokens = counts[:, :, 0, :].sum(axis=1)[:, placement.slot_expert[0]] * placement.replica_share[0]
    layer = CostModel(m, hw).moe_layer(dispatch, slot_tokens)
    assert result.layers["total"][0] == pytest.approx(float(layer.time[0]))
    assert result.cross_device_tokens == pytest.approx(2 * (counts[0, 0, 0, 4:].sum() + counts[0, 1, 0, :4].sum()))
    assert result.device_load.sum() == pytest.approx(8 * 2 * 2)


def test_replicas_split_tokens_by_their_shares() -> None:
    se = np.array([[[0, 1], [0, 2]]], dtype=np.int32)
    rs = np.array([[[0.25, 1.0], [0.75, 1.0]]])
    p = Placement.from_slots(se, 3, 2, rs).validate()
    share = p.expert_device_share()[0]
    np.testing.assert_allclose(share[0], [0.25, 0.75])
    np.testing.assert_allclose(share[1], [1.0, 0.0])
