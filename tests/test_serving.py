"""Serving predictor: precision per component, experts hit at decode, all-reduce algorithms,
continuous batching and layout checks."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.precision import Precision, format_bytes, matmul_rate
from moeplan.serving import ServeLayout, ServePredictor, ServeTerms, allreduce_time, experts_hit


def predictor(precision: Precision = Precision("fp8", "fp8", "fp8"), layout: ServeLayout = ServeLayout(8, 1, 8, 1),
              hw: str = "h200-sxm", backend: str = "sglang", model: str = "deepseek-v3") -> ServePredictor:
    return ServePredictor(CostModel(ModelSpec.preset(model), HardwareProfile.resolve(hw)), layout, precision, backend)


def test_experts_hit_is_every_expert_at_large_batches_and_about_the_choices_at_small_ones() -> None:
    p = np.full(32, 8 / 256)                       # 32 local experts of 256, top-8
    assert experts_hit(1, p) == pytest.approx(1.0)  # one token picks 8 of 256: 32 × 8/256 = 1 local expert
    assert experts_hit(4, p) < 4.0
    assert experts_hit(10_000, p) == pytest.approx(32.0)


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 500), st.floats(0, 500))
def test_experts_hit_grows_with_tokens_and_never_exceeds_the_local_experts(a: float, b: float) -> None:
    p = np.full(16, 0.03)
    lo, hi = sorted((a, b))
    assert experts_hit(lo, p) <= experts_hit(hi, p) + 1e-12 <= 16 + 1e-9


def test_decode_reads_only_the_experts_its_tokens_hit() -> None:
    pr = predictor()
    small, large = pr.decode_step(4, 2048).experts, pr.decode_step(512, 2048).experts
    assert large > 5 * small


def test_fp8_and_fp4_weights_make_decode_faster_and_fp4_runs_at_the_fp4_rate_on_blackwell() -> None:
    bf16 = predictor(Precision("bf16", "bf16", "bf16"), hw="b200").decode_step(16, 2048).total
    fp8 = predictor(Precision("fp8", "fp8", "fp8"), hw="b200").decode_step(16, 2048).total
    fp4 = predictor(Precision("nvfp4", "nvfp4", "fp8"), hw="b200").decode_step(16, 2048).total
    assert fp4 < fp8 < bf16
    b200, h200 = HardwareProfile.resolve("b200").device, HardwareProfile.resolve("h200-sxm").device
    assert matmul_rate(b200, "nvfp4") == 2 * matmul_rate(b200, "fp8")
    assert matmul_rate(h200, "nvfp4") == matmul_rate(h200, "fp8")      # Hopper has no fp4 tensor cores
    assert matmul_rate(h200, "int4_wo") == h200.matmul_flops["bf16"].value
    assert format_bytes("nvfp4") == pytest.approx(0.5625)


def test_one_shot_allreduce_for_small_messages_two_shot_for_large() -> None:
    bw, lat = 4.5e11, 1e-5
    small, large = 16 * 1024, 256 * 2**20
    assert allreduce_time(small, 8, bw, lat) == pytest.approx(lat + 7 * small / bw)
    assert allreduce_time(large, 8, bw, lat) == pytest.approx(2 * lat + 2 * 7 / 8 * large / bw)
    assert allreduce_time(large, 1, bw, lat) == 0.0


def test_ttft_and_tpot_grow_with_concurrency_and_longer_prompts_slow_decode() -> None:
    pr = predictor()
    low, high = pr.predict(4, 1024, 1024), pr.predict(64, 1024, 1024)
    assert high.ttft > low.ttft and high.tpot > low.tpot
    assert high.tokens_per_s_per_gpu > low.tokens_per_s_per_gpu
    assert pr.predict(64, 8192, 1024).tpot > high.tpot
    assert set(high.to_dict()["decode_step_s"]) == {"attention", "experts", "other", "tp_comm", "ep_comm", "overhead"}


def test_kv_capacity_check() -> None:
    pr = predictor()
    assert pr.predict(8, 1024, 1024).kv_fits
    assert not pr.predict(4096, 8192, 8192).kv_fits


def test_a_skewed_routing_distribution_hits_fewer_experts_on_the_idle_rank_and_more_on_the_busy_one() -> None:
    m = ModelSpec.preset("deepseek-v3")
    skew = np.full(m.num_experts, 1.0)
    skew[:32] = 20.0                                 # rank 0 of EP8 holds the hot experts
    skew *= m.top_k / skew.sum()
    cm = CostModel(m, HardwareProfile.resolve("h200-sxm"))
    lay = ServeLayout(1, 8, 1, 8)
    uniform = ServePredictor(cm, lay, Precision("fp8", "fp8", "fp8"), "sglang").decode_step(2, 2048).experts
    hot = ServePredictor(cm, lay, Precision("fp8", "fp8", "fp8"), "sglang", choose_prob=skew).decode_step(2, 2048).experts
    assert hot > uniform


def test_bad_layouts_backends_and_formats_are_refused_with_the_field() -> None:
    with pytest.raises(InputError, match="moe_tp × moe_ep") as e:
        predictor(layout=ServeLayout(8, 1, 2, 2))
    assert e.value.field == "moe_ep"
    with pytest.raises(InputError, match="unknown backend"):
        predictor(backend="tgi")
    with pytest.raises(InputError, match="unknown number format") as e:
        predictor(precision=Precision("fp8", "int3", "fp8"))
    assert e.value.field == "precision.moe"
    with pytest.raises(InputError):
        predictor().predict(0, 1024, 1024)


def test_fitted_terms_record_their_source() -> None:
    assert "silicon_sample" in ServeTerms().source


def test_disaggregated_decode_pays_no_prefill_and_a_starved_prefill_pool_raises_ttft() -> None:
    from moeplan.serving import predict_disaggregated
    agg = predictor()
    pre = predictor(layout=ServeLayout(8, 1, 8, 1))
    dec = predictor(layout=ServeLayout(1, 8, 1, 8))
    one = predict_disaggregated(pre, dec, 1, 1, 64, 8192, 1024)
    many = predict_disaggregated(pre, dec, 4, 1, 64, 8192, 1024)
    assert one.tpot < agg.predict(64, 8192, 1024).tpot
    assert many.ttft < one.ttft and many.tpot == one.tpot
    assert many.tokens_per_s_per_gpu < one.tokens_per_s_per_gpu     # more prefill GPUs, same decode output


def test_serve_search_keeps_targets_and_the_front_trades_tpot_for_throughput() -> None:
    from moeplan.serve_search import launch_command, layouts, pareto, search
    cm = CostModel(ModelSpec.preset("deepseek-v3"), HardwareProfile.resolve("h200-sxm"))
    assert ServeLayout(1, 8, 1, 8) in layouts(8, 256) and all(la.world == 8 for la in layouts(8, 256))
    found = search(cm, Precision("fp8", "fp8", "fp8"), "sglang", 8, 1024, 1024, [4, 64, 256], 2.0, 0.05)
    assert found and all(c.point.tpot <= 0.05 and c.point.ttft <= 2.0 and c.point.kv_fits for c in found)
    front = pareto(found)
    tpots = [c.point.tpot for c in front]
    rates = [c.point.tokens_per_s_per_gpu for c in front]
    assert tpots == sorted(tpots) and rates == sorted(rates)
    assert all(not (o.point.tpot < c.point.tpot and o.point.tokens_per_s_per_gpu > c.point.tokens_per_s_per_gpu)
               for c in front for o in found)
    assert launch_command("sglang", "m", ServeLayout(1, 8, 1, 8)) == (
        "python -m sglang.launch_server --model-path m --tp 8 --dp 8 --enable-dp-attention --ep-size 8")
    assert launch_command("vllm", "m", ServeLayout(2, 4, 1, 8)).endswith("--data-parallel-size 4 --enable-expert-parallel")
    assert "no vLLM flags" in launch_command("vllm", "m", ServeLayout(8, 1, 2, 4))


def test_plan_serve_cli_prints_the_front_and_refuses_impossible_targets() -> None:
    from typer.testing import CliRunner
    from moeplan.cli import app
    ok = CliRunner().invoke(app, ["plan", "serve", "--model", "deepseek-v3", "--gpus", "8", "--concurrency", "4,64"])
    assert ok.exit_code == 0, ok.output
    assert "Pareto front" in ok.output and "sglang.launch_server" in ok.output
    assert "[dim]" not in ok.output and "[/]" not in ok.output   # styles applied, not printed as text
    assert "no measured attention tables" in " ".join(ok.output.split())   # the datasheet profile says so
    bad = CliRunner().invoke(app, ["plan", "serve", "--model", "deepseek-v3", "--tpot-ms", "0.1"])
    assert bad.exit_code == 2 and "--tpot-ms" in bad.output
    bad = CliRunner().invoke(app, ["plan", "serve", "--model", "deepseek-v3", "--concurrency", "a,b"])
    assert bad.exit_code == 2


def test_expert_parallel_without_attention_dp_adds_no_collective_and_attention_dp_gathers_tokens() -> None:
    tp_ep = predictor(layout=ServeLayout(8, 1, 1, 8)).decode_step(16, 2048)
    assert tp_ep.ep_comm == 0.0                      # the TP all-reduce already sums the expert outputs
    dp = predictor(layout=ServeLayout(1, 8, 1, 8)).decode_step(16, 2048)
    assert dp.ep_comm > 0.0 and dp.tp_comm == 0.0
    more = predictor(layout=ServeLayout(1, 8, 1, 8)).decode_step(256, 2048)
    assert more.ep_comm > dp.ep_comm                 # gathered bytes grow with the replicas' tokens
    wide = ServePredictor(CostModel(ModelSpec.preset("deepseek-v3"), HardwareProfile.resolve("h200-sxm")
                                    ).with_cluster(16), ServeLayout(4, 4, 1, 16), Precision("fp8", "fp8", "fp8"),
                          "sglang").decode_step(16, 2048)
    inside = predictor(layout=ServeLayout(2, 4, 1, 8)).decode_step(16, 2048)
    assert wide.ep_comm > inside.ep_comm             # a DP group strided over two nodes crosses the slower link


def test_per_backend_terms_apply_to_their_backend_only() -> None:
    base = ServeTerms()
    slow = ServeTerms(layer_gap_s=tuple((b, v * (10 if b == "vllm" else 1)) for b, v in base.layer_gap_s),
                      prefill_share=tuple((b, v * (3 if b == "vllm" else 1)) for b, v in base.prefill_share))
    cm = CostModel(ModelSpec.preset("deepseek-v3"), HardwareProfile.resolve("h200-sxm"))
    lay, pr = ServeLayout(8, 1, 8, 1), Precision("fp8", "fp8", "fp8")
    for backend, changes in (("vllm", True), ("sglang", False)):
        a = ServePredictor(cm, lay, pr, backend, base).predict(16, 1024, 1024)
        b = ServePredictor(cm, lay, pr, backend, slow).predict(16, 1024, 1024)
        assert (b.tpot > a.tpot) == changes and (b.decode.overhead > a.decode.overhead) == changes
