"""RoutingTrace (validation, NPZ round trip), synthetic traffic knobs, and TraceStats on a hand-made trace."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moeplan.consistency import window_count_histogram
from moeplan.errors import InputError
from moeplan.model import ModelSpec
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize
from moeplan.trace import RoutingTrace

V3 = ModelSpec.preset("deepseek-v3")
SMALL = replace(ModelSpec.preset("qwen3-30b-a3b"), moe_layers=tuple(range(6)))  # 128 experts, top-8, 6 layers


def knobs(**kwargs: float) -> SyntheticTraffic:
    return SyntheticTraffic(**{"tokens": 4000, "zipf": 0.6, "affinity": 0.0, "locality": 0.0, "seed": 0, **kwargs})


# ---- synth -------------------------------------------------------------------------------------------------------
def test_synth_shape_distinct_choices_and_gates() -> None:
    t = synthesize(V3, SyntheticTraffic(tokens=2000, seed=3))
    assert t.expert_ids.shape == (2000, 58, 8) and t.expert_ids.dtype == np.int16
    assert t.num_experts == 256 and t.model == "DeepSeek-V3" and t.provenance["source"] == "synthetic"
    ordered = np.sort(t.expert_ids, axis=2)
    assert not np.any(ordered[:, :, 1:] == ordered[:, :, :-1])
    assert t.expert_ids.min() >= 0 and t.expert_ids.max() < 256
    np.testing.assert_allclose(t.gate_weights.astype(np.float32).sum(axis=2), 1.0, atol=1e-2)
    assert np.all(np.diff(t.gate_weights.astype(np.float32), axis=2) <= 0)


def test_synth_respects_deepseek_v3_grouped_routing() -> None:
    t = synthesize(V3, SyntheticTraffic(tokens=2000, locality=0.5, affinity=0.4, seed=1))
    groups = np.sort(t.expert_ids.astype(np.int64) // V3.experts_per_group, axis=2)
    distinct = 1 + np.count_nonzero(np.diff(groups, axis=2), axis=2)
    assert distinct.max() <= V3.topk_group == 4
    assert distinct.min() >= 1


def test_synth_is_deterministic_per_seed() -> None:
    a = synthesize(SMALL, knobs(seed=7, affinity=0.3, locality=0.3))
    b = synthesize(SMALL, knobs(seed=7, affinity=0.3, locality=0.3))
    c = synthesize(SMALL, knobs(seed=8, affinity=0.3, locality=0.3))
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    np.testing.assert_array_equal(a.gate_weights, b.gate_weights)
    assert not np.array_equal(a.expert_ids, c.expert_ids)


def test_zipf_skew_raises_imbalance() -> None:
    flat, skewed = (TraceStats.of(synthesize(SMALL, knobs(zipf=z))).imbalance().mean() for z in (0.0, 1.2))
    assert flat < 1.5 and skewed > 4


def test_affinity_raises_affinity_strength() -> None:
    none, strong = (TraceStats.of(synthesize(SMALL, knobs(affinity=a))).affinity_strength().mean() for a in (0.0, 0.8))
    assert strong > 2 * none


def test_locality_raises_srp_and_sch() -> None:
    base, local = (TraceStats.of(synthesize(SMALL, knobs(locality=x))) for x in (0.0, 0.8))
    assert local.srp(16) > base.srp(16) + 0.1
    assert local.sch(16) > base.sch(16) + 0.1


@pytest.mark.parametrize("kwargs, field", [
    ({"tokens": 0}, "tokens"), ({"zipf": -1}, "zipf"), ({"affinity": 1.5}, "affinity"),
    ({"affinity": 0.6, "locality": 0.6}, "affinity"), ({"segment": 0}, "segment"),
])
def test_synth_knobs_are_checked(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InputError) as info:
        synthesize(SMALL, SyntheticTraffic(**kwargs))
    assert info.value.field == field


# ---- RoutingTrace ----------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path: Path) -> None:
    t = synthesize(SMALL, knobs(tokens=500, affinity=0.2))
    path = tmp_path / "t.npz"
    t.save(path)
    back = RoutingTrace.load(path)
    np.testing.assert_array_equal(back.expert_ids, t.expert_ids)
    np.testing.assert_array_equal(back.gate_weights, t.gate_weights.astype(np.float16))
    assert (back.num_experts, back.model, back.provenance) == (t.num_experts, t.model, t.provenance)
    bare = RoutingTrace(t.expert_ids.astype(np.int64), 128, "m", None, {"source": "imported"})
    bare.save(path)
    loaded = RoutingTrace.load(path)
    assert loaded.gate_weights is None and loaded.expert_ids.dtype == np.int16


def test_an_invalid_trace_is_never_written(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    ids = np.array([[[0, 0]]], dtype=np.int16)
    with pytest.raises(InputError, match="same expert twice"):
        RoutingTrace(ids, 4, "m").save(path)
    with pytest.raises(InputError) as info:
        RoutingTrace(np.array([[[0, 9]]], dtype=np.int16), 4, "m").save(path)
    assert info.value.field == "expert_ids"
    with pytest.raises(InputError) as info:
        RoutingTrace(np.array([[[0, 1]]], dtype=np.int16), 4, "m", np.ones((1, 1, 3), np.float32)).save(path)
    assert info.value.field == "gate_weights"
    assert not path.exists() and not list(tmp_path.iterdir())


def test_split_and_check_model() -> None:
    t = synthesize(SMALL, knobs(tokens=100))
    fit, held = t.split(0.8)
    assert (fit.num_tokens, held.num_tokens) == (80, 20)
    np.testing.assert_array_equal(np.concatenate([fit.expert_ids, held.expert_ids]), t.expert_ids)
    t.check_model(128, 6, 8)
    with pytest.raises(InputError):
        t.check_model(256, 6, 8)
    with pytest.raises(InputError):
        t.split(1.0)


# ---- TraceStats on a hand-made trace ---------------------------------------------------------------------------
#   token:     0       1       2       3
#   layer 0: [0,1]  [0,2]  [0,1]  [3,1]
#   layer 1: [2,3]  [2,0]  [3,2]  [1,0]
HAND = RoutingTrace(np.array([[[0, 1], [2, 3]], [[0, 2], [2, 0]], [[0, 1], [3, 2]], [[3, 1], [1, 0]]],
                             dtype=np.int16), 4, "hand")


def test_load_by_hand() -> None:
    np.testing.assert_array_equal(TraceStats.of(HAND).load, [[3, 3, 1, 1], [2, 1, 3, 2]])
    np.testing.assert_allclose(TraceStats.of(HAND).imbalance(), [1.5, 1.5])


def test_coactivation_by_hand() -> None:
    c = TraceStats.of(HAND).coactivation(0)
    expected = np.zeros((4, 4), dtype=np.int64)
    for i, j, n in ((0, 1, 2), (0, 2, 1), (1, 3, 1)):
        expected[i, j] = expected[j, i] = n
    np.testing.assert_array_equal(c, expected)


def test_transitions_by_hand() -> None:
    st = TraceStats.of(HAND)
    expected = np.zeros((4, 4), dtype=np.int64)
    pairs = {(0, 2): 3, (0, 3): 2, (0, 0): 1, (1, 2): 2, (1, 3): 2, (1, 1): 1, (1, 0): 1, (2, 2): 1, (2, 0): 1,
             (3, 1): 1, (3, 0): 1}
    for (i, j), n in pairs.items():
        expected[i, j] = n
    np.testing.assert_array_equal(st.transition_counts(0), expected)
    np.testing.assert_allclose(st.transitions(0), expected / expected.sum(axis=1, keepdims=True))
    np.testing.assert_array_equal(st.all_transition_counts[0], expected)
    with pytest.raises(IndexError):
        st.transition_counts(1)
    # top-1 paths 0→2, 0→2, 0→3, 3→1: expert 0's likeliest successor covers 2 of its 3, expert 3's 1 of 1
    np.testing.assert_allclose(st.affinity_strength(), [3 / 4])


def test_srp_and_sch_by_hand() -> None:
    st = TraceStats.of(HAND)
    # layer 0, windows of 2 sliding by one: counts [2,1,1,0] [2,1,1,0] [1,2,0,1]; threshold 1 predicts
    # 9 pairs × 2 tokens for all 12 choices: F1 = 2·12 / (18 + 12) = 0.8 (threshold 2: 12/18, 0: 24/36)
    assert st.srp(segment=2, layers=[0]) == pytest.approx(0.8)
    # cache 2, look-ahead 2: t0 [0,1] two cold hits; t1 [0,2] 0 hit, 2 miss (evicts 1: fewer future uses
    # tie, older); t2 [0,1] 0 hit, 1 miss (evicts 2: no future use, older than 0); t3 [3,1] 1 hit → 5/8
    assert st.sch(segment=2, cache_size=2, layers=[0]) == pytest.approx(5 / 8)
    # model level: one cache of 2 × 2 layers over both layers (moe-lrc @ 7b3ca46 41_sch_calc.py gives these)
    assert st.sch(segment=2, cache_size=2) == pytest.approx(0.6875)
    assert st.sch(segment=2, cache_size=1) == pytest.approx(0.3125)
    assert st.sch(segment=2) == pytest.approx(1.0)  # default 2 × top-k = 4 per layer = every expert
    assert st.srp(segment=2) == pytest.approx(0.7741935)


def test_toy_stream_matches_the_paper_code() -> None:
    st = TraceStats.of(RoutingTrace(np.array([0, 0, 1, 1, 2, 2, 3, 3], dtype=np.int16).reshape(8, 1, 1), 4, "toy"))
    # 0, 0, 1, 1 hit (the first two distinct experts fill the cache), 2 and 3 miss once each
    assert st.sch(4, cache_size=2) == pytest.approx(6 / 8)
    # 5 windows of 4: counts (2,2,0,0) (1,2,1,0) (0,2,2,0) (0,1,2,1) (0,0,2,2); threshold 2 picks 8 pairs, 16 matches
    assert st.srp(4) == pytest.approx(2 * 16 / (8 * 4 + 20))


# Figures from the paper's own code (github ljcleo/moe-lrc @ 7b3ca46: 41_sch_calc.py::calc_fsf,
# 30_srp_calc.py::seg_stat + 31_srp_refine.py) run on the traces below; (tokens, layers, experts, top_k), window.
UPSTREAM = [
    ((96, 3, 8, 2), 4, [0.71875, 0.7708333, 0.75], 0.7552083, [0.7067669, 0.7236181, 0.7229219], 0.7177554),
    ((64, 2, 16, 4), 16, [0.67578125, 0.66796875], 0.638671875, [0.5210062, 0.5139706], 0.5173891),
    ((128, 4, 6, 1), 2, [0.6796875, 0.71875, 0.6796875, 0.703125], 0.693359375,
     [0.8355263, 0.8327869, 0.8300654, 0.8246753], 0.8307441),
    ((80, 2, 32, 8), 4, [0.703125, 0.7], 0.70703125, [0.7343988, 0.7232006], 0.7288168),
]


@pytest.mark.parametrize("seed", range(len(UPSTREAM)))
def test_srp_and_sch_equal_the_paper_code(seed: int) -> None:
    (tokens, layers, experts, k), window, sch_layers, sch_model, srp_layers, srp_model = UPSTREAM[seed]
    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.choice(experts, k, replace=False) for _ in range(layers)] for _ in range(tokens)])
    for t in range(1, tokens):
        if rng.random() < 0.5:
            ids[t] = ids[t - 1]
    st = TraceStats.of(RoutingTrace(ids.astype(np.int16), experts, "upstream"))
    for layer in range(layers):
        assert st.sch(window, k + 1, [layer]) == pytest.approx(sch_layers[layer], abs=1e-6)
        assert st.srp(window, [layer]) == pytest.approx(srp_layers[layer], abs=1e-6)
    assert st.sch(window, k + 1) == pytest.approx(sch_model, abs=1e-6)
    assert st.srp(window) == pytest.approx(srp_model, abs=1e-6)


@pytest.mark.parametrize("segment", [1, 2, 5, 16, 17, 18, 40])
def test_window_count_histogram_counts_every_window(segment: int) -> None:
    """Both paths (per-choice history up to 17 tokens, sorting beyond) against counting each window directly,
    on traces longer than a history chunk with repeats, so context, chunk seams and both trace ends matter."""
    rng = np.random.default_rng(segment)
    tokens, layers, experts, k = 700, 3, 12, 3
    pool = rng.random((20, layers, experts)).argsort(axis=2)[:, :, :k]
    ids = pool[rng.integers(0, len(pool), tokens)].astype(np.int16)
    expected = np.zeros(segment + 1, dtype=np.int64)
    for start in range(tokens - segment + 1):
        for layer in range(layers):
            expected += np.bincount(np.bincount(ids[start:start + segment, layer].ravel(), minlength=experts),
                                    minlength=segment + 1)
    np.testing.assert_array_equal(window_count_histogram(ids, experts, segment), expected)
    assert not window_count_histogram(ids[:segment - 1], experts, segment).any()


@pytest.mark.parametrize("kwargs, field", [({"cache_size": 0}, "cache_size"), ({"cache_size": -2}, "cache_size"),
                                           ({"segment": 0}, "segment"), ({"layers": [5]}, "layer")])
def test_consistency_refuses_bad_input(kwargs: dict, field: str) -> None:
    with pytest.raises(InputError) as err:
        TraceStats.of(HAND).consistency(**{"segment": 2, **kwargs})
    assert err.value.field == field


def test_synthesis_refuses_before_allocating_what_memory_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import moeplan.errors
    from moeplan.errors import InputError
    from moeplan.model import ModelSpec
    from moeplan.synth import SyntheticTraffic, synthesis_bytes, synthesize
    huge = dataclasses.replace(ModelSpec.preset("deepseek-v3"), num_experts=32_768, n_group=8)
    assert synthesis_bytes(huge, SyntheticTraffic(tokens=100)) > 20 * 2**30
    monkeypatch.setattr(moeplan.errors, "available_memory", lambda: 8 * 2**30)
    with pytest.raises(InputError, match=r"needs about .* GiB of memory, 8.0 GiB are free"):
        synthesize(huge, SyntheticTraffic(tokens=100))


# ---- the same figures whatever the cores ----------------------------------------------------------------------
@pytest.mark.parametrize("model", [SMALL, V3], ids=["qwen3-6-layers", "deepseek-v3-grouped"])
def test_synth_is_the_same_on_one_two_and_three_threads(model: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    import moeplan.synth
    monkeypatch.setattr(moeplan.synth, "CHUNK", 700)  # 5 chunks, the last one short
    traces = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(moeplan.synth, "cores", lambda threads=threads: threads)
        traces.append(synthesize(model, SyntheticTraffic(tokens=3000, locality=0.4, affinity=0.4, seed=11)))
    for other in traces[1:]:
        np.testing.assert_array_equal(other.expert_ids, traces[0].expert_ids)
        np.testing.assert_array_equal(other.gate_weights, traces[0].gate_weights)


def pinned_trace() -> RoutingTrace:
    """9,000 tokens (longer than the summary's SCH head) × 5 layers × top-6 of 64, with repeats."""
    rng = np.random.default_rng(28)
    tokens, layers, experts, k = 9000, 5, 64, 6
    pool = rng.random((40, layers, experts)).argsort(axis=2)[:, :, :k]
    ids = pool[rng.integers(0, len(pool), tokens)]
    fresh = rng.random(tokens) < 0.3
    ids[fresh] = rng.random((fresh.sum(), layers, experts)).argsort(axis=2)[:, :, :k]
    return RoutingTrace(ids.astype(np.int16), experts, "pinned")


@pytest.mark.parametrize("cores", [1, 2])
def test_summary_equals_the_figures_before_the_speedups(cores: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Figures of moeplan.stats at df6cb29 (one process, SCH pushing on every key change, affinity in one
    bincount over every layer pair), to the last bit, with the SCH beside (2 cores) or inline (1)."""
    import moeplan.cores
    monkeypatch.setattr(moeplan.cores, "cores", lambda: cores)
    st = TraceStats.of(pinned_trace())
    assert st.summary() == {
        "tokens": 9000, "moe_layers": 5, "experts": 64, "top_k": 6,
        "max_over_mean_load_mean": 1.8678518518518519, "max_over_mean_load_worst": 2.1605925925925926,
        "top1_affinity_mean": 0.5476388888888889, "srp_16": 0.29720752700370795, "sch_16_2k": 0.4097900390625}
    assert st.affinity_strength().tolist() == [0.5177777777777778, 0.5873333333333334, 0.5856666666666667,
                                               0.49977777777777777]
    assert st.sch(4, 3) == 0.20378888888888888 and st.sch(16, layers=[1]) == 0.38401851851851854


def scan_cache_hits(requests: np.ndarray, cache_size: int, lookahead: int) -> int:
    """The look-ahead cache of moeplan.consistency simulated plainly: the victim found by scanning the cache."""
    rows = requests.tolist()
    cache: list[int] = []
    last: dict[int, int] = {}
    seen: set[int] = set()
    hits = stamp = 0
    for i, row in enumerate(rows):
        for x in row:
            hits += x in cache or (x not in seen and len(seen) < cache_size)
            seen.add(x)
        ahead = [y for r in rows[i:i + lookahead] for y in r]
        for x in row:
            if x not in cache:
                if len(cache) == cache_size:
                    cache.remove(min(cache, key=lambda y: (ahead.count(y), last[y])))
                cache.append(x)
            ahead.remove(x)
            stamp += 1
            last[x] = stamp
    return hits


def test_lookahead_cache_equals_a_plain_simulation() -> None:
    from moeplan.consistency import lookahead_cache_hits
    rng = np.random.default_rng(5)
    for _ in range(150):
        universe, tokens = int(rng.integers(2, 30)), int(rng.integers(1, 120))
        k = int(rng.integers(1, min(universe, 6) + 1))
        pool = rng.random((int(rng.integers(1, 20)), universe)).argsort(axis=1)[:, :k]
        requests = pool[rng.integers(0, len(pool), tokens)]
        cache_size, lookahead = int(rng.integers(1, universe + 1)), int(rng.integers(1, 12))
        assert lookahead_cache_hits(requests, universe, cache_size, lookahead) == \
            scan_cache_hits(requests, cache_size, lookahead)


def test_a_failing_function_beside_raises_in_the_caller() -> None:
    from moeplan.cores import Beside
    assert Beside(lambda: 6 * 7).result() == 42
    with pytest.raises(ZeroDivisionError):
        Beside(lambda: 1 / 0).result()
