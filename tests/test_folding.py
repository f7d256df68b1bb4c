"""Parallel folding planner: enumeration, validity rules, group placement, the step / memory
arithmetic of cost.py section 6, ranking sanity and the CLI.

The tiny model below is small enough to count its mappings by hand (see test_enumeration_counts).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from moeplan.solvers.folding import (
    Candidate,
    FoldingProblem,
    explain_invalid,
    price,
    raw_layouts,
    solve,
    valid_candidates,
    valid_layouts,
    valid_schedules,
    violations,
    why_loses,
)
from moeplan.solvers.folding.solve import TIE_TOLERANCE
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.cost import CostModel
from moeplan.parallel import ParallelMapping, group_spans
from moeplan.parallel_step import ServeSetup, TrainSetup, serve_step, train_memory, train_step
from moeplan.hardware import HardwareProfile, Quantity
from moeplan.model import AttentionSpec, ModelSpec
from moeplan.plan import Plan

TINY = ModelSpec(name="tiny", num_layers=4, hidden_size=64, vocab_size=128,
                 attention=AttentionSpec("gqa", num_heads=8, num_kv_heads=2, head_dim=8),
                 moe_layers=(0, 1, 2, 3), num_experts=4, top_k=2, expert_ffn=32).validate()


def h100(devices: int) -> HardwareProfile:
    return HardwareProfile.resolve("h100-sxm").with_cluster(devices=devices)


def tiny_problem(mode: str = "train", **kw: object) -> FoldingProblem:
    args = dict(seq_len=64, global_batch=8, micro_batch=1)
    args.update(kw)
    return FoldingProblem(CostModel(TINY, h100(8)), mode, **args).validate()  # type: ignore[arg-type]


# ---- enumeration ---------------------------------------------------------------------------------
def test_enumeration_counts() -> None:
    # 8 GPUs. Attention (tp, cp, pp) with tp | 2 (2 KV heads), pp | 4 (4 layers), tp·cp·pp | 8:
    # pp=1: 7, pp=2: 5, pp=4: 3 combos. MoE (etp, ep) with ep | 4 (4 experts), etp·ep | 8/pp:
    # pp=1: 9, pp=2: 6, pp=4: 3. Layouts: 7·9 + 5·6 + 3·3 = 102.
    p = tiny_problem()
    assert len(valid_layouts(p)) == 102
    # Schedules (mbs 1, gbs 8): VPP 2 only at pp=2 (2 layers per stage; 8/dp micro-batches are even),
    # every candidate with and without recompute: (63 + 2·30 + 9) · 2 = 264.
    assert len(valid_candidates(p)) == 264
    # Serving: CP = 1, TP may exceed the 2 KV heads (replicated) when it is a multiple of them.
    s = tiny_problem("serve")
    layouts = valid_layouts(s)
    assert all(m.cp == 1 for m in layouts)
    assert {m.tp for m in layouts} == {1, 2, 4, 8}


def test_every_candidate_is_valid_or_explained() -> None:
    for p in (tiny_problem(), tiny_problem(micro_batch=None), tiny_problem("serve")):
        valid = set(valid_candidates(p))
        seen = 0
        for layout in raw_layouts(p):
            for c in valid_schedules(p, layout) if layout in set(valid_layouts(p)) else [Candidate(layout)]:
                seen += 1
                reason = explain_invalid(p, c)
                assert (reason is None) == (c in valid), (c.label(), reason)
        assert seen >= len(valid) > 0
    p = tiny_problem()
    for layout in raw_layouts(p):
        if layout not in set(valid_layouts(p)):
            assert explain_invalid(p, layout)


@pytest.mark.parametrize("mapping, knobs, rule, words", [
    (ParallelMapping(4, 1, 2, 1, 1, 1, 8), {}, "kv_heads_tp", "KV heads / query groups (2) must be a multiple of TP (4)"),
    (ParallelMapping(1, 1, 8, 1, 1, 8, 1), {}, "experts_ep", "experts (4) must be a multiple of EP (8)"),
    (ParallelMapping(1, 1, 1, 8, 1, 1, 1), {}, "layers_pp", "layers (4) must be a multiple of PP (8)"),
    (ParallelMapping(1, 1, 4, 1, 1, 1, 8), {}, "attention_world", "= 4 must equal the 8 GPUs"),
    (ParallelMapping(1, 1, 8, 1, 1, 2, 2), {}, "expert_world", "= 4 must equal the 8 GPUs"),
    (ParallelMapping(1, 1, 8, 1, 1, 1, 8, vpp=2), {}, "vpp_pp", "needs PP > 1"),
    (ParallelMapping(1, 1, 4, 2, 1, 1, 4, vpp=4), {}, "vpp_layers", "VPP (4) must divide the layers per pipeline stage (2)"),
    (ParallelMapping(1, 1, 8, 1, 1, 1, 8), {"micro_batch": 3}, "global_batch", "must be a multiple of micro-batch × DP = 3×8"),
    (ParallelMapping(2, 1, 4, 1, 1, 1, 8), {"sequence_parallel": False}, "sequence_parallel", "needs sequence parallelism"),
])
def test_invalid_mappings_name_their_rule(mapping: ParallelMapping, knobs: dict, rule: str, words: str) -> None:
    p = tiny_problem()
    c = Candidate(mapping, **knobs)
    assert violations(p, c)[0].id == rule
    text = explain_invalid(p, c)
    assert text is not None and words in text


def test_rule_texts_cite_their_source() -> None:
    p = tiny_problem()
    assert "NVIDIA/Megatron-LM megatron/core/transformer/transformer_config.py" in explain_invalid(
        p, ParallelMapping(4, 1, 2, 1, 1, 1, 8))
    odd = FoldingProblem(CostModel(TINY, h100(8)), "train", seq_len=6, global_batch=8, micro_batch=1)
    assert violations(odd, ParallelMapping(1, 2, 4, 1, 1, 1, 8))[0].id == "seq_cp"
    # serving accepts TP above the KV heads (replicated), training does not; serving refuses CP
    assert explain_invalid(tiny_problem("serve"), ParallelMapping(4, 1, 2, 1, 2, 4, 1)) is None
    assert violations(tiny_problem("serve"), ParallelMapping(1, 2, 4, 1, 2, 4, 1))[0].id == "serve_cp"
    # serving prices one instance of attention TP × DP and MoE TP × EP (moeplan.serving): no PP, no EDP
    assert violations(tiny_problem("serve"), ParallelMapping(4, 1, 1, 2, 1, 4, 1))[0].id == "serve_pp"
    assert violations(tiny_problem("serve"), ParallelMapping(4, 1, 2, 1, 1, 1, 8))[0].id == "serve_edp"


def test_vpp_needs_microbatches_in_groups_of_pp() -> None:
    p = tiny_problem(global_batch=6)   # dp 3 is impossible on 8 GPUs; use dp 2, pp 2 → 3 micro-batches
    c = Candidate(ParallelMapping(2, 1, 2, 2, 1, 2, 2, vpp=2), micro_batch=1)
    assert violations(p, c)[0].id == "vpp_microbatches"
    assert explain_invalid(p, replace(c, mapping=replace(c.mapping, vpp=1))) is None


# ---- placement of the groups ---------------------------------------------------------------------
def test_group_spans_follow_megatron_rank_order() -> None:
    s = group_spans(ParallelMapping(2, 1, 8, 8, 1, 8, 2), 8)        # the paper's Mixtral folding mapping
    assert (s["tp"].nodes, s["ep"].nodes, s["dp"].nodes, s["edp"].nodes, s["pp"].nodes) == (1, 1, 2, 2, 8)
    assert s["dp_cp"].size == 8
    s = group_spans(ParallelMapping(2, 1, 4, 2, 2, 8, 1), 8)        # ETP2 × EP8 spans two nodes: EP has stride 2
    assert (s["etp"].nodes, s["ep"].nodes, s["dp"].nodes) == (1, 2, 1)
    s = group_spans(ParallelMapping(2, 4, 2, 1, 1, 16, 1), 8)       # CP folded with TP inside a node
    assert (s["cp"].nodes, s["dp"].nodes, s["ep"].nodes) == (1, 2, 2)


# ---- memory and step arithmetic ------------------------------------------------------------------
def test_train_memory_hand_worked() -> None:
    # TINY: non-expert params 58,944 (attention 4·10,240 + router 4·256 + embedding/head 2·8,192 +
    # norms 9·64); one expert 3·64·32 = 6,144. TP2·DP2·PP2 | EP2·EDP2, bf16 weights.
    cm = CostModel(TINY, h100(8))
    t = ParallelMapping(2, 1, 2, 2, 1, 2, 2)
    setup = TrainSetup(seq_len=64, global_batch=8, micro_batch=1)
    mem = train_memory(cm, t, setup)
    assert mem.non_expert_weights == pytest.approx(58_944 * 2 / 4)            # 29,472
    assert mem.expert_weights[0] == pytest.approx(2 * 4 * 6_144 * 2 / 2)      # 49,152
    assert mem.gradients == pytest.approx((14_736 + 24_576) * 4)              # fp32 main grads
    assert mem.optimizer == pytest.approx(12 * (14_736 / 2 + 24_576 / 2))      # sharded over DP·CP and EDP
    # activations: 32 tokens per GPU after SP; attention+norms 15·64·32 = 30,720; 64 token-choices ×
    # (2·64 + 6·32) = 20,480; × 2 layers per stage × 2 micro-batches in flight.
    assert mem.activations == pytest.approx(2 * 51_200 * 2)
    assert train_memory(cm, t, replace(setup, recompute=True)).activations == pytest.approx(2 * 4_096 * 2 + 51_200)
    assert train_memory(cm, replace(t, vpp=2), setup).activations == pytest.approx(2 * 51_200 * 2.5)
    assert train_memory(cm, t, replace(setup, distributed_optimizer=False)).optimizer == pytest.approx(
        12 * (14_736 + 24_576))


def test_train_step_parts_sum_and_mfu() -> None:
    m = ModelSpec.preset("mixtral-8x22b")
    cm = CostModel(m, h100(128))
    setup = TrainSetup(seq_len=4096, global_batch=256, micro_batch=1)
    step = train_step(cm, ParallelMapping(2, 1, 8, 8, 1, 8, 2), setup)
    assert sum(step.breakdown.values()) == pytest.approx(step.step)
    assert step.microbatches == 32
    assert step.mfu == pytest.approx(step.model_flops / (step.step * 128 * cm.peak_flops))
    # model FLOPs: 3 × (2 × matmul weights + causal attention) per token
    assert step.model_flops == pytest.approx(3 * 256 * 4096 * m.flops_per_token(2048))
    assert step.breakdown["cp_ring"] == 0 and step.breakdown["etp_comm"] == 0
    # recompute adds one forward; interleaving shrinks the bubble by vpp
    rc = train_step(cm, ParallelMapping(2, 1, 8, 8, 1, 8, 2), replace(setup, recompute=True))
    assert rc.step > step.step and rc.breakdown["recompute"] > 0
    vp = train_step(cm, ParallelMapping(2, 1, 8, 8, 1, 8, 2, vpp=7), setup)
    assert vp.breakdown["pipeline_bubble"] < step.breakdown["pipeline_bubble"] / 5


def test_paper_folding_beats_coupled_mapping() -> None:
    # MoE Parallel Folding (arXiv 2504.14960) Table 3, Mixtral-8x22B on 128 H100, GBS 256: folding
    # TP2·EP8·ETP1·PP8 (49.3% MFU) beats MCore's coupled TP2·EP4·(ETP=TP=2)·PP8 (46.3%).
    p = FoldingProblem(CostModel(ModelSpec.preset("mixtral-8x22b"), h100(128)), "train", 4096, 256, 1)
    folded = price(p, Candidate(ParallelMapping(2, 1, 8, 8, 1, 8, 2)))
    coupled = price(p, Candidate(ParallelMapping(2, 1, 8, 8, 2, 4, 2)))
    assert folded.fits and coupled.fits and folded.score < coupled.score


# ---- ranking -------------------------------------------------------------------------------------
def slow_network(devices: int, inter_bytes_per_s: float) -> HardwareProfile:
    hw = h100(devices)
    link = replace(hw.inter_node, bandwidth=Quantity(inter_bytes_per_s, hw.inter_node.bandwidth.prov))
    return replace(hw, inter_node=link)


def test_slow_inter_node_link_keeps_ep_inside_a_node() -> None:
    # Qwen3-30B-A3B (128 experts) on 2 nodes of 8: over a slow inter-node link the best mapping keeps
    # its EP group inside a node; over an NVLink-class one it spreads EP across both nodes.
    model = ModelSpec.preset("qwen3-30b-a3b")
    slow = solve(FoldingProblem(CostModel(model, slow_network(16, 5e9)), "train", 4096, 64, 1))
    fast = solve(FoldingProblem(CostModel(model, slow_network(16, 4.5e11)), "train", 4096, 64, 1))
    assert slow.best.candidate.mapping.ep >= 2 and slow.best.result.spans["ep"].nodes == 1
    assert fast.best.result.spans["ep"].nodes == 2
    crossing = [r for r in slow.ranked if r.result.spans["ep"].nodes > 1]
    assert all(r.score > slow.best.score for r in crossing)
    scores = [r.score for r in slow.ranked]  # best first; scores within the tie tolerance order by simplicity
    assert all(b >= a - 2 * TIE_TOLERANCE * scores[0] for a, b in zip(scores, scores[1:]))
    assert all(r.reason for r in slow.ranked[1:]) and not slow.best.reason
    plan = slow.to_plan()
    assert plan.parallel is not None
    assert set(plan.parallel.to_dict()) >= {"attention", "moe", "vpp", "micro_batch", "global_batch", "recompute",
                                            "distributed_optimizer", "sequence_parallel", "mode"}
    moe, attention = plan.parallel.to_dict()["moe"], plan.parallel.to_dict()["attention"]
    assert moe["etp"] * moe["ep"] * moe["edp"] * attention["pp"] == 16


def test_reason_names_the_node_crossing() -> None:
    model = ModelSpec.preset("qwen3-30b-a3b")
    p = FoldingProblem(CostModel(model, slow_network(16, 5e9)), "train", 4096, 64, 1)
    inside = price(p, Candidate(ParallelMapping(1, 1, 16, 1, 1, 8, 2)))
    across = price(p, Candidate(ParallelMapping(1, 1, 16, 1, 1, 16, 1)))
    assert across.score > inside.score
    assert why_loses(p, across, inside).startswith("EP all-to-all crosses nodes (EP16 over 2 nodes): +")


def test_serving_mla_cache_favours_dp_attention() -> None:
    # MLA's latent KV cache is replicated on every TP rank, so DP attention holds ~8× more tokens.
    m = ModelSpec.preset("deepseek-v2-lite")
    cm = CostModel(m, h100(8))
    setup = ServeSetup(isl=4096, concurrency=64)
    dp = serve_step(cm, ParallelMapping(1, 1, 8, 1, 1, 8, 1), setup)
    tp = serve_step(cm, ParallelMapping(8, 1, 1, 1, 1, 8, 1), setup)
    assert dp.kv_capacity_tokens > 4 * tp.kv_capacity_tokens
    assert dp.decode_tokens_per_s == pytest.approx(64 / dp.tpot)
    assert dp.ttft > 0 and dp.prefill_tokens_per_s > 0


def test_folding_serve_and_plan_serve_price_one_configuration_identically() -> None:
    # one serving model: plan folding --mode serve ranks by moeplan.serving, the model plan serve searches with
    from moeplan.precision import Precision
    from moeplan.serve_search import search
    from moeplan.serving import ServeLayout
    cm = CostModel(ModelSpec.preset("qwen3-30b-a3b"), HardwareProfile.resolve("h200-sxm").with_cluster(devices=8))
    prec = Precision("fp8", "fp8", "fp8")
    problem = FoldingProblem(cm, "serve", seq_len=2048, global_batch=32, osl=512, precision=prec,
                             backend="vllm").validate()
    folded = {r.candidate.mapping.label(): r for r in solve(problem, top=100).ranked}
    served = {(c.layout, c.concurrency): c.point for c in search(cm, prec, "vllm", 8, 2048, 512, [32], 1e9, 1e9)}
    mapping = ParallelMapping(2, 1, 4, 1, 1, 8, 1)
    r = folded[mapping.label()]
    point = served[ServeLayout(2, 4, 1, 8), 32]
    assert r.result.tpot == pytest.approx(point.tpot, rel=1e-12) and r.score == r.result.tpot
    assert r.result.ttft == pytest.approx(point.ttft, rel=1e-12)
    assert r.result.decode == point.decode.parts()
    res = CliRunner().invoke(app, ["plan", "folding", "--model", "qwen3-30b-a3b", "--hardware", "h200-sxm",
                                   "--gpus", "8", "--mode", "serve", "--seq", "2048", "--gbs", "32", "--osl", "512",
                                   "--backend", "vllm", "--mbs", "2"])
    assert res.exit_code == 2 and "one prompt per prefill" in res.output


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_bad_input_exits_2() -> None:
    runner = CliRunner()
    for args in (["--gpus", "12"], ["--gpus", "8", "--mode", "infer"], ["--gpus", "8", "--gbs", "0"],
                 ["--gpus", "8", "--gbs", "6", "--mbs", "4"]):
        r = runner.invoke(app, ["plan", "folding", "--model", "olmoe-1b-7b", *args])
        assert r.exit_code == 2, (args, r.output)


def test_cli_writes_plan(tmp_path) -> None:
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(app, ["plan", "folding", "--model", "olmoe-1b-7b", "--gpus", "8", "--gbs", "32",
                                 "--mbs", "1", "--top", "3", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "--expert-model-parallel-size" in r.output and "--moe-token-dispatcher-type alltoall" in r.output
    plan = Plan.load(out)
    assert plan.parallel is not None and plan.parallel.mode == "train" and plan.parallel.global_batch == 32
    data = json.loads(out.read_text())
    assert data["predicted"]["step_s"] > 0 and "runner_ups" in data["predicted"]


def test_gpu_bench_cpu_path(tmp_path) -> None:
    pytest.importorskip("torch")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_folding.py"
    run = subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--iters", "1", "--warmup", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads((tmp_path / "gpu_folding.json").read_text())
    rows = data["rows"]
    assert len(rows) >= 12 and {r["kind"] for r in rows} == {"attention", "experts"}
    assert all(r["measured_s"] > 0 and r["predicted_s"] > 0 for r in rows)
    assert all(r["predicted_s"] == pytest.approx(r["predicted_forward_s"] + r["predicted_backward_s"]) for r in rows)
    kernels = {r["kernel"] for r in rows if r["kind"] == "experts"}
    assert kernels == ({"loop", "grouped_mm"} if data["grouped_mm"]["ran"] else {"loop"})
    assert data["grouped_mm"]["ran"] or data["grouped_mm"]["why_not"]
