"""Dense GEMM shapes under TP/ETP and their price from a measured (k, n) grid (moeplan.gemms)."""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moeplan.cost import CostModel
from moeplan.gemms import GemmCurves, attention_gemms, layer_gemms
from moeplan.hardware import Curve, HardwareProfile, Provenance
from moeplan.model import ModelSpec
from moeplan.parallel import ParallelMapping
from moeplan.parallel_step import attention_shard_time, expert_shard
from moeplan.profiler.sizes import GEMM_MAX_FLOPS, GEMM_MAX_WEIGHT_ELEMS, Sizes

GRID = (128, 512, 2048, 8192)
TOKENS = (1.0, 16.0, 128.0, 1024.0)


def law(m: np.ndarray | float, k: float, n: float) -> np.ndarray:
    """A made-up GEMM time, a power law in m, k and n (exactly bilinear in log k, log n per weight
    element), plus a shape-independent floor that the curves carry as measured."""
    return 3e-12 * np.asarray(m) ** 0.5 * k ** 1.1 * n ** 0.9


def profile_with_grid(shapes: list[tuple[int, int]] | None = None) -> HardwareProfile:
    base = HardwareProfile.resolve("h200-sxm")
    grid = shapes or [(k, n) for k in GRID for n in GRID]
    curves = tuple(Curve("gemm", {"k": k, "n": n, "dtype": "bf16"}, TOKENS, tuple(float(law(m, k, n)) for m in TOKENS),
                         Provenance("assumed", "synthetic power law")) for k, n in grid)
    return replace(base, curves=base.curves + curves)


def test_deepseek_v3_shards_follow_the_tp_split() -> None:
    m = ModelSpec.preset("deepseek-v3")
    got = {g.name: (g.k, g.n) for g in attention_gemms(m, 8)}
    assert got == {"kv_a": (7168, 576), "q_a": (7168, 1536), "q_b": (1536, 16 * 192), "kv_b": (512, 16 * 256),
                   "o": (16 * 128, 7168)}
    parts = layer_gemms(m, 8, 4)
    assert [(g.k, g.n) for g in parts["expert"]] == [(7168, 2 * 512), (512, 7168)]
    assert [(g.k, g.n) for g in parts["dense_ffn"]] == [(7168, 2 * 18432 // 8), (18432 // 8, 7168)]
    assert parts["lm_head"][0].n == m.vocab_size // 8 and parts["router"][0].n == 256


def test_gqa_kv_heads_are_replicated_past_their_count() -> None:
    m = ModelSpec.preset("mixtral-8x7b")                        # 32 query heads, 8 KV heads of 128
    assert attention_gemms(m, 8)[0].n == (4 + 2 * 1) * 128
    assert attention_gemms(m, 16)[0].n == (2 + 2 * 1) * 128        # one KV head each, not half of one
    assert "shared_expert" not in layer_gemms(m, 1) and "dense_ffn" not in layer_gemms(m, 1)


def test_grid_interpolation_is_exact_for_a_power_law_and_scales_past_the_grid() -> None:
    curves = GemmCurves.of(profile_with_grid())
    assert curves is not None
    for k, n in ((700, 3000), (128, 8192), (2048, 2048), (300, 6000)):
        for m in (5.0, 64.0, 700.0):
            assert float(curves.time(m, k, n)) == pytest.approx(float(law(m, k, n)), rel=1e-9)
    big = float(curves.time(64.0, 32768, 8192))                    # k past the grid: the largest shape's rate
    assert big == pytest.approx(float(law(64.0, 8192, 8192)) * 4, rel=1e-9)
    small = float(curves.time(64.0, 16, 512))                      # k below the grid: the smallest shape's time
    assert small == pytest.approx(float(law(64.0, 128, 512)), rel=1e-9)


def test_a_missing_corner_falls_back_to_the_nearest_measured_shape() -> None:
    shapes = [(k, n) for k in GRID for n in GRID if (k, n) != (2048, 2048)]
    curves = GemmCurves.of(profile_with_grid(shapes))
    assert curves is not None
    t = float(curves.time(64.0, 1800, 1900))                       # (2048, 2048) is a corner of its box
    k0, n0 = min(curves.by_shape, key=lambda s: (np.log(s[0] / 1800)) ** 2 + (np.log(s[1] / 1900)) ** 2)
    assert t == pytest.approx(float(law(64.0, k0, n0)) / (k0 * n0) * 1800 * 1900, rel=1e-9)


def test_the_cost_model_prices_thin_shards_from_the_grid_and_from_the_roofline_without_it() -> None:
    m = ModelSpec.preset("qwen3-30b-a3b")
    flat = CostModel(m, HardwareProfile.resolve("h200-sxm"))
    shaped = CostModel(m, profile_with_grid())
    assert not flat.gemms_measured and shaped.gemms_measured
    assert shaped.gemm_time(64, 2048, 5120) == pytest.approx(law(64, 2048, 5120), rel=1e-9)
    assert float(shaped.gemm_time(0, 2048, 5120)) == 0.0
    assert flat.expert_width_share(64, 4) == 0.25                  # no grid: 1/ETP as before
    share = shaped.expert_width_share(64, 4)
    gemms = layer_gemms(m, 1, 4)["expert"]
    full = layer_gemms(m, 1, 1)["expert"]
    assert share == pytest.approx(sum(law(64, g.k, g.n) for g in gemms) / sum(law(64, g.k, g.n) for g in full))
    mapping = ParallelMapping(4, 1, 1, 1, 4, 1, 1)
    one = ParallelMapping(1, 1, 1, 1, 1, 1, 1)
    shard = attention_shard_time(shaped, mapping, 4096, 4096, "prefill")
    projections = float(shaped.gemms_time(4096, attention_gemms(m, 4)))
    assert shard == pytest.approx(shaped.attention_core_time(4096, 4096, "prefill") / 4 + projections)
    flat_projections = float(flat.gemms_time(4096, attention_gemms(m, 4)))     # roofline GEMMs at shard shapes
    assert flat_projections > 0 and attention_shard_time(flat, mapping, 4096, 4096, "prefill") == pytest.approx(
        flat.attention_core_time(4096, 4096, "prefill") / 4 + flat_projections)
    c1, k1 = expert_shard(shaped, one, 4096)
    c4, k4 = expert_shard(shaped, mapping, 4096)
    assert c4 == pytest.approx(c1) and k4 < k1


def test_profiler_grid_spans_the_presets_and_respects_its_caps() -> None:
    s = Sizes.choose(accelerator=True, quick=False, host_free_bytes=2**36, ranks_on_host=1)
    for name in ("deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b"):
        m = ModelSpec.preset(name)
        for tp in (1, 2, 4, 8):
            for part, gemms in layer_gemms(m, tp, tp).items():
                for g in gemms:
                    if part not in ("router", "lm_head"):     # Mixtral's 8-wide router, Qwen3's 152k head lie past it
                        assert s.gemm_k[0] <= g.k <= s.gemm_k[-1] and s.gemm_n[0] <= g.n <= s.gemm_n[-1], (name, tp, g)
    assert GEMM_MAX_WEIGHT_ELEMS * 2 == 2**31 and GEMM_MAX_FLOPS > 2 * 8192 * 8192 * 8192


def test_shape_bench_prices_measured_rows_again_from_a_profile(tmp_path: Path) -> None:
    """bench/gpu_shapes.py --price: rows measured elsewhere, priced from a grid profile on the CPU."""
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_shapes.py"
    spec = importlib.util.spec_from_file_location("gpu_shapes_bench", script)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    models = {m.name: m for m in (ModelSpec.preset(n) for n in bench.MODELS)}
    rows = bench.shapes(list(models.values()))
    assert {r["tp"] for r in rows} == set(bench.TPS) and {r["part"] for r in rows} >= {"attention", "expert", "lm_head"}
    inside = [r for r in rows if 128 <= r["k"] <= 8192 and 128 <= r["n"] <= 8192 and r["tokens"] <= TOKENS[-1]]
    for r in inside:
        r["measured_s"] = float(law(r["tokens"], r["k"], r["n"]))
    bench.price(inside, models, profile_with_grid())
    summary = bench.summarise(inside)
    assert summary["shape_curves_gemm"]["min"] == pytest.approx(1.0) == summary["shape_curves_gemm"]["max"]
    assert summary["shape_curves_shard"]["inside_band"] == summary["shape_curves_shard"]["count"]
