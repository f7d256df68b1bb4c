"""The backward pass priced piece by piece (moeplan.backward) and the training step built on it."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_gemms import law, profile_with_grid

from moeplan.backward import (FLASH_BACKWARD_RATIO, attention_core_backward_time, experts_backward_time,
                              gemm_backward_time, swiglu_backward_time)
from moeplan.cost import CostModel, CostOptions, attention_signature
from moeplan.gemms import Gemm, swiglu_gemms
from moeplan.hardware import Curve, HardwareProfile, Provenance
from moeplan.model import ModelSpec
from moeplan.parallel import ParallelMapping
from moeplan.parallel_step import (TrainSetup, attention_shard_backward_time, expert_shard_backward_time,
                                   train_passes, train_step)


def grid_model(name: str = "mixtral-8x7b") -> CostModel:
    return CostModel(ModelSpec.preset(name), profile_with_grid())


def test_dgrad_and_wgrad_are_priced_at_their_own_grid_shapes() -> None:
    """y[300, 700] = x[300, 512]·Wᵀ: dgrad is 300 rows 700 → 512, wgrad 700 rows with the 300
    tokens as inner dimension, 512 out; neither is the forward's shape, so not 2 × forward."""
    cm = grid_model()
    got = float(gemm_backward_time(cm, 300.0, Gemm("g", 512, 700)))
    assert got == pytest.approx(float(law(300, 700, 512) + law(700, 300, 512)), rel=1e-9)
    assert got != pytest.approx(2 * float(law(300, 512, 700)), rel=0.05)


def test_backward_gemms_follow_each_rows_count_elementwise() -> None:
    cm = grid_model()
    g = Gemm("g", 512, 700)
    tokens = np.array([[300.0, 0.0], [150.0, 300.0]])
    got = gemm_backward_time(cm, tokens, g)
    assert got.shape == (2, 2) and got[0, 1] == 0.0
    assert got[1, 0] == pytest.approx(float(gemm_backward_time(cm, 150.0, g)), rel=1e-12)
    assert got[0, 0] == got[1, 1]


def test_without_a_grid_the_backward_gemms_fall_back_to_the_roofline() -> None:
    """A datasheet profile: each backward GEMM is the forward's FLOPs at the bf16 rate plus a
    launch when compute-bound, i.e. twice the forward."""
    cm = CostModel(ModelSpec.preset("mixtral-8x7b"), HardwareProfile.resolve("h200-sxm"))
    assert not cm.gemms_measured
    m, k, n = 4096.0, 4096, 8192
    one = 2.0 * m * k * n / cm.peak_flops + cm.launch
    assert float(gemm_backward_time(cm, m, Gemm("g", k, n))) == pytest.approx(2 * one, rel=1e-9)


def test_experts_backward_scales_the_forward_kernel_by_the_swiglu_backward_over_forward_price() -> None:
    cm = grid_model()
    m = cm.model
    slots = np.array([64.0, 512.0, 0.0])
    per_expert = [float(swiglu_backward_time(cm, n, m.expert_ffn, 2, "expert")) for n in slots]
    assert per_expert[2] == 0.0
    gemms = sum(float(gemm_backward_time(cm, 512.0, g)) for g in swiglu_gemms("expert", m.hidden_size, m.expert_ffn, 2))
    assert per_expert[1] > gemms                               # plus the activation's backward bytes
    forward_price = sum(float(cm.swiglu_time(np.asarray(n), m.expert_ffn, 2, "expert")) for n in slots[:2])
    ratio = sum(per_expert) / forward_price
    assert 1.5 < ratio < 2.5                                   # two GEMMs back for each forward one
    for kernel_s in (1e-3, 3e-3):                              # the kernel's own time carries over
        assert float(experts_backward_time(cm, slots, 2, kernel_s)) == pytest.approx(kernel_s * ratio, rel=1e-12)
    assert float(experts_backward_time(cm, np.zeros(3), 2, 1e-3)) == 0.0


def test_attention_core_backward_is_flash_attentions_ratio_of_the_forward() -> None:
    cm = grid_model()
    fwd = cm.attention_core_time(4096.0, 4096.0, "prefill")
    assert attention_core_backward_time(cm, 4096.0, 4096.0) == pytest.approx(FLASH_BACKWARD_RATIO * fwd)


def test_a_measured_train_curve_gives_the_attention_backward() -> None:
    """With attention_prefill and attention_train curves for the model's shape the core's
    backward is their difference, not the FLOP ratio."""
    cm = grid_model()
    sig, prov = attention_signature(cm.model), Provenance("assumed", "synthetic")
    seqs = (1024.0, 4096.0)
    curves = (Curve("attention_prefill", {"signature": sig, "batch": 1}, seqs, (1e-4, 1e-3), prov),
              Curve("attention_train", {"signature": sig, "batch": 1}, seqs, (5e-4, 4e-3), prov))
    measured = CostModel(cm.model, replace(cm.hw, curves=cm.hw.curves + curves))
    assert attention_core_backward_time(measured, 4096.0, 4096.0) == pytest.approx(3e-3)
    assert attention_core_backward_time(measured, 2048.0, 4096.0) == pytest.approx(1.5e-3)   # half the queries


def test_shard_backward_splits_heads_and_experts() -> None:
    cm = grid_model("mixtral-8x22b")
    one, four = (attention_shard_backward_time(cm, ParallelMapping(tp, 1, 1, 1, 1, 1, 1), 4096.0, 4096.0)
                 for tp in (1, 4))
    assert one / 4 < four < one
    tp1, tp2 = (expert_shard_backward_time(cm, ParallelMapping(tp, 1, 1, 1, 1, 2, 1), 4096.0) for tp in (1, 2))
    assert tp2 < tp1                                           # half the token-choices on the same experts


def test_train_step_adds_the_priced_backward_not_a_multiple_of_the_forward() -> None:
    cm = CostModel(ModelSpec.preset("mixtral-8x22b"), profile_with_grid(), CostOptions(kernel="grouped"))
    mapping = ParallelMapping(2, 1, 4, 2, 1, 8, 1)
    setup = TrainSetup(seq_len=4096, global_batch=32)
    fwd, bwd = train_passes(cm, mapping, setup)
    m = cm.model
    assert bwd.attention == pytest.approx(
        m.num_layers * attention_shard_backward_time(cm, mapping, 4096.0, 4096.0) / mapping.pp, rel=1e-12)
    assert bwd.tp_comm == fwd.tp_comm and bwd.ep_all_to_all == fwd.ep_all_to_all
    assert bwd.moe_compute != pytest.approx(2 * fwd.moe_compute, rel=1e-3)
    step = train_step(cm, mapping, setup)
    mb = setup.microbatches(mapping)
    assert step.breakdown["attention"] == pytest.approx(mb * (fwd.attention + bwd.attention), rel=1e-12)
    assert step.breakdown["moe_compute"] == pytest.approx(mb * (fwd.moe_compute + bwd.moe_compute), rel=1e-12)
