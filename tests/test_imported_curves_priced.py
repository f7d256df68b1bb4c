"""Imported measured curves (``moeplan hardware-import --aiconfigurator``) are what placement,
folding and serving price from: each prediction equals the curve's value at the bytes or tokens
it prices, and moves when the curve moves."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moeplan.attention_tables import AttentionShape
from moeplan.cost import CostModel
from moeplan.hardware import Curve, HardwareProfile, Provenance
from moeplan.model import ModelSpec
from moeplan.parallel import ParallelMapping, group_spans
from moeplan.parallel_step import forward_pass
from moeplan.precision import Precision
from moeplan.serving import ServeLayout, ServePredictor

RUN = "aiconfigurator"
PROV = Provenance("measured", "aiconfigurator-core 0.12.0 systems/data/h200_sxm/comm/nccl/2.29.2/nccl_perf.parquet", RUN)
BYTES = (1e3, 1e5, 1e7, 1e9)


def curve(kind: str, key: dict, x: tuple[float, ...], y: tuple[float, ...]) -> Curve:
    return Curve(kind, key, x, y, PROV)


def collective(op: str, ranks: int, scale: float = 1.0) -> Curve:
    """A measured curve of ``op`` over ``ranks`` ranks: 20 µs at 1 kB to 4 ms at 1 GB, × ``scale``."""
    return curve("collective", {"op": op, "scope": "intra_node", "ranks": ranks}, BYTES,
                 tuple(scale * v for v in (2e-5, 4e-5, 3e-4, 4e-3)))


def profile(*curves: Curve) -> HardwareProfile:
    base = HardwareProfile.resolve("h200-sxm")
    return replace(base, curves=tuple(curves), runs={RUN: {"tool": "aiconfigurator-core 0.12.0"}}).validate()


def test_placement_prices_dispatch_and_combine_from_the_all_to_all_curve() -> None:
    model = ModelSpec.preset("deepseek-v3")
    traffic = np.full((8, 8), 64.0)                 # token-choices from each of 8 GPUs to each other
    layers = {}
    for scale in (1.0, 3.0):
        cm = CostModel(model, profile(collective("all_to_all", 8, scale)))
        layers[scale] = cm.moe_layer(traffic, np.full((8, 32), 16.0))
    row = model.hidden_size * CostModel(model, profile()).opt.act_bytes
    sent = 7 * 64.0 * row                           # what one GPU sends to the other seven
    expected = float(collective("all_to_all", 8)(sent * 8 / 7))   # the curve's x is the whole send buffer
    assert layers[1.0].dispatch == pytest.approx(np.full(8, expected))
    assert layers[1.0].combine == pytest.approx(np.full(8, expected))
    assert layers[3.0].dispatch == pytest.approx(3.0 * layers[1.0].dispatch)


def test_folding_prices_ep_all_to_all_and_tp_all_reduce_from_their_curves() -> None:
    model = ModelSpec.preset("qwen3-30b-a3b")
    mapping = ParallelMapping(tp=2, cp=1, dp=4, pp=1, etp=1, ep=8, edp=1)
    tokens = 4096.0
    passes = {}
    for scale in (1.0, 2.0):
        cm = CostModel(model, profile(collective("all_to_all", 8, scale), collective("all_reduce", 2, scale)))
        spans = group_spans(mapping, cm.hw.devices_per_node)
        passes[scale] = forward_pass(cm, mapping, tokens, tokens, spans, tokens, sequence_parallel=False)
    row = model.hidden_size * CostModel(model, profile()).opt.act_bytes
    a2a = float(collective("all_to_all", 8)(tokens / 2 * model.top_k * row))
    assert passes[1.0].ep_all_to_all == pytest.approx(model.num_moe_layers * 2 * a2a)
    all_reduce = float(collective("all_reduce", 2)(tokens * row))
    assert not model.shared_ffn and not model.dense_layers       # one all-reduce per layer (its attention block)
    assert passes[1.0].tp_comm == pytest.approx(all_reduce * model.num_layers)
    assert passes[2.0].ep_all_to_all == pytest.approx(2 * passes[1.0].ep_all_to_all)
    assert passes[2.0].tp_comm == pytest.approx(2 * passes[1.0].tp_comm)


def test_serving_prices_tp_all_reduce_and_deepep_fallback_from_their_curves() -> None:
    model = ModelSpec.preset("deepseek-v3")
    cm = CostModel(model, profile(collective("all_reduce", 8), collective("all_to_all", 8)))
    pr = Precision("fp8", "fp8", "fp8")
    tp = ServePredictor(cm, ServeLayout(8, 1, 1, 8), pr, "sglang").decode_step(16, 2048)
    act = 16 * model.hidden_size * 2.0
    assert tp.tp_comm == pytest.approx(2 * model.num_layers * float(collective("all_reduce", 8)(act)))
    wide = ServePredictor(cm, ServeLayout(1, 8, 1, 8), pr, "sglang", moe_dispatch="deepep").decode_step(16, 2048)
    sent = 16 * model.top_k * model.hidden_size * 2.0      # each GPU's tokens, top-k copies, bf16
    assert wide.ep_comm == pytest.approx(model.num_moe_layers * 2 * float(collective("all_to_all", 8)(sent)))
    slower = CostModel(model, profile(collective("all_reduce", 8, 2.0), collective("all_to_all", 8, 2.0)))
    assert ServePredictor(slower, ServeLayout(8, 1, 1, 8), pr, "sglang").decode_step(16, 2048).tp_comm \
        == pytest.approx(2 * tp.tp_comm)


def test_serving_prices_deepep_dispatch_and_combine_from_the_imported_kernels() -> None:
    model = ModelSpec.preset("deepseek-v3")
    key = dict(backend="deepep_ll", hidden=model.hidden_size, top_k=model.top_k, experts=model.num_experts, ranks=8,
               dtype="default")
    tokens = (1.0, 16.0, 128.0)
    dispatch = curve("moe_a2a", {**key, "phase": "dispatch"}, tokens, (2e-5, 3e-5, 9e-5))
    combine = curve("moe_a2a", {**key, "phase": "combine"}, tokens, (3e-5, 5e-5, 1.5e-4))
    cm = CostModel(model, profile(dispatch, combine, collective("all_to_all", 8)))
    step = ServePredictor(cm, ServeLayout(1, 8, 1, 8), Precision("fp8", "fp8", "fp8"), "sglang",
                          moe_dispatch="deepep").decode_step(16, 2048)
    assert step.ep_comm == pytest.approx(model.num_moe_layers * (3e-5 + 5e-5))   # the kernels, not NCCL's curve


def test_serving_and_cost_model_price_the_attention_core_from_the_imported_tables() -> None:
    model = ModelSpec.preset("qwen3-235b-a22b")
    pr = Precision("bf16", "bf16", "bf16")
    shape = AttentionShape.of(model, 4, pr.kv_bytes)
    assert shape is not None and (shape.heads, shape.kv_heads) == (16, 1)
    lengths = (1.0, 1024.0, 2048.0, 8192.0, 65536.0)   # 2048: the priced length is a measured point

    def tables(scale: float) -> list[Curve]:
        out = []
        for kind in ("attention_context", "attention_generation"):
            for s in (shape, AttentionShape.of(model, 1, pr.kv_bytes)):
                for batch in (1, 16, 64):
                    key = {"attention": "gqa", "heads": s.heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim,
                           "kv_dtype": "bf16", "batch": batch}
                    out.append(curve(kind, key, lengths, tuple(scale * batch * 1e-5 * (1 + x / 1024) for x in lengths)))
        return out

    steps, cores = {}, {}
    for scale in (1.0, 2.0):
        cm = CostModel(model, profile(*tables(scale)))
        p = ServePredictor(cm, ServeLayout(4, 1, 4, 1), pr, "sglang")
        steps[scale] = (p.decode_step(32, 2048).attention, p.prefill_step(2048).attention)
        cores[scale] = cm.attention_core_time(32, 2048, "decode")
    core_decode = float(np.exp(np.interp(np.log(32), np.log([16, 64]), np.log([16e-5 * 3, 64e-5 * 3]))))
    core_prefill = 1e-5 * 3
    assert steps[2.0][0] - steps[1.0][0] == pytest.approx(model.num_layers * core_decode)
    assert steps[2.0][1] - steps[1.0][1] == pytest.approx(model.num_layers * core_prefill)
    assert cores[1.0] == pytest.approx(core_decode) and cores[2.0] == pytest.approx(2 * core_decode)
    roofline = ServePredictor(CostModel(model, profile()), ServeLayout(4, 1, 4, 1), pr, "sglang")
    assert roofline.decode_step(32, 2048).attention != pytest.approx(steps[1.0][0])   # no table: the roofline
