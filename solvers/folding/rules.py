"""The rules a parallel mapping must follow, each with the place that states it.

Training rules are Megatron-Core's (paths in NVIDIA/Megatron-LM at d98e8a64); the serving
attention rule is vLLM's. A rule's ``text`` is a format string over :func:`_facts`; a rule is
``layout`` (group sizes only) or ``schedule`` (also micro-batch, vpp, sequence parallelism), so
the enumeration can check layouts once. :func:`violations` lists every rule a candidate breaks;
:func:`explain_invalid` names the first one, with the numbers.

Placement is not a validity rule: Megatron's default rank order (tp-cp-ep-dp-pp) decides which
groups stay inside a node, and its MoE guide recommends keeping EP × TP inside the NVLink domain
(megatron/core/transformer/moe/README.md, "Guideline 2"); the cost model prices that choice.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moeplan.solvers.folding.problem import Candidate, FoldingProblem

from moeplan.parallel import ParallelMapping

MEGATRON = "NVIDIA/Megatron-LM"


@dataclass(frozen=True)
class Rule:
    """One validity rule: ``holds(problem, candidate)`` is True when the candidate obeys it."""

    id: str
    text: str
    source: str
    holds: Callable[[FoldingProblem, Candidate], bool]
    scope: str = "layout"
    modes: tuple[str, ...] = ("train", "serve")

    def applies(self, problem: FoldingProblem) -> bool:
        return problem.mode in self.modes

    def describe(self, problem: FoldingProblem, candidate: Candidate) -> str:
        """The rule with this candidate's numbers, and where it is stated."""
        return f"{self.text.format(**_facts(problem, candidate))} [{self.source}]"


def _facts(p: FoldingProblem, c: Candidate) -> dict[str, Any]:
    m, t = p.model, c.mapping
    per_dp = p.global_batch // max(c.micro_batch * t.dp, 1)
    return {"tp": t.tp, "cp": t.cp, "dp": t.dp, "pp": t.pp, "etp": t.etp, "ep": t.ep, "edp": t.edp, "vpp": t.vpp,
            "world": p.world, "attention_world": t.world, "expert_world": t.expert_world,
            "heads": m.attention.num_heads, "kv": m.attention.num_kv_heads, "experts": m.num_experts,
            "layers": m.num_layers, "per_stage": m.num_layers // max(t.pp, 1), "seq": p.seq_len,
            "gbs": p.global_batch, "mbs": c.micro_batch, "microbatches": per_dp, "expert_ffn": m.expert_ffn,
            "ffn": max(m.dense_ffn, m.shared_ffn)}


def _positive(p: FoldingProblem, c: Candidate) -> bool:
    t = c.mapping
    return min(t.tp, t.cp, t.dp, t.pp, t.etp, t.ep, t.edp, t.vpp, c.micro_batch) >= 1


def _kv_train(p: FoldingProblem, c: Candidate) -> bool:
    return p.model.attention.kind == "mla" or p.model.attention.num_kv_heads % c.mapping.tp == 0


def _kv_serve(p: FoldingProblem, c: Candidate) -> bool:
    kv, tp = p.model.attention.num_kv_heads, c.mapping.tp
    return p.model.attention.kind == "mla" or kv % tp == 0 or tp % kv == 0


def _ffn_tp(p: FoldingProblem, c: Candidate) -> bool:
    m = p.model
    return all(f % c.mapping.tp == 0 for f in (m.dense_ffn, m.shared_ffn) if f)


def _gbs(p: FoldingProblem, c: Candidate) -> bool:
    return p.global_batch % (c.micro_batch * c.mapping.dp) == 0


def _vpp_microbatches(p: FoldingProblem, c: Candidate) -> bool:
    t = c.mapping
    return t.vpp == 1 or (p.global_batch // (c.micro_batch * t.dp)) % t.pp == 0


RULES: tuple[Rule, ...] = (
    Rule("positive", "every parallel size, vpp and the micro-batch must be ≥ 1", "moeplan", _positive, "schedule"),
    Rule("attention_world", "TP×CP×DP×PP = {tp}×{cp}×{dp}×{pp} = {attention_world} must equal the {world} GPUs",
         f"{MEGATRON} megatron/core/parallel_state.py (initialize_model_parallel: data_parallel_size = "
         "world_size // (TP·PP·CP), RuntimeError when not divisible)",
         lambda p, c: c.mapping.world == p.world),
    Rule("expert_world", "ETP×EP×EDP×PP = {etp}×{ep}×{edp}×{pp} = {expert_world} must equal the {world} GPUs "
         "(MoE layers fold onto the same GPUs as attention)",
         f"{MEGATRON} megatron/core/parallel_state.py (\"world_size is not divisible by "
         "expert_tensor_model_pipeline_parallel size\")",
         lambda p, c: c.mapping.expert_world == p.world),
    Rule("heads_tp", "attention heads ({heads}) must be a multiple of TP ({tp})",
         f"{MEGATRON} megatron/core/transformer/transformer_config.py (num_attention_heads % "
         "tensor_model_parallel_size)",
         lambda p, c: p.model.attention.num_heads % c.mapping.tp == 0),
    Rule("kv_heads_tp", "KV heads / query groups ({kv}) must be a multiple of TP ({tp})",
         f"{MEGATRON} megatron/core/transformer/transformer_config.py (\"num_query_groups must be a multiple "
         "of tensor_model_parallel_size\")", _kv_train, modes=("train",)),
    Rule("kv_heads_tp_serve", "KV heads ({kv}) must be a multiple of TP ({tp}), or TP a multiple of them "
         "(each TP rank then holds a replica)",
         "vllm-project/vllm vllm/model_executor/models/llama.py (LlamaAttention: partition the KV heads, or "
         "replicate them when there are fewer than TP ranks)", _kv_serve, modes=("serve",)),
    Rule("ffn_tp", "the dense/shared FFN width ({ffn}) must be a multiple of TP ({tp})",
         f"{MEGATRON} megatron/core/tensor_parallel/layers.py (ColumnParallelLinear: divide(output_size, "
         "world_size))", _ffn_tp),
    Rule("expert_ffn_etp", "the expert FFN width ({expert_ffn}) must be a multiple of ETP ({etp})",
         f"{MEGATRON} megatron/core/tensor_parallel/layers.py (ColumnParallelLinear: divide(output_size, "
         "world_size) on the expert-TP group)",
         lambda p, c: p.model.expert_ffn % c.mapping.etp == 0),
    Rule("experts_ep", "the experts ({experts}) must be a multiple of EP ({ep})",
         f"{MEGATRON} megatron/training/arguments.py (\"Number of experts should be a multiple of expert model "
         "parallel_size\"); megatron/core/transformer/moe/moe_layer.py",
         lambda p, c: p.model.num_experts % c.mapping.ep == 0),
    Rule("layers_pp", "the layers ({layers}) must be a multiple of PP ({pp})",
         f"{MEGATRON} megatron/training/arguments.py (\"Number of layers should be divisible by the "
         "pipeline-model-parallel size\")",
         lambda p, c: p.model.num_layers % c.mapping.pp == 0),
    Rule("seq_cp", "with CP > 1 the sequence ({seq}) must be a multiple of 2×CP = {cp}×2",
         f"{MEGATRON} megatron/training/arguments.py (seq_length % (context_parallel_size * 2) == 0)",
         lambda p, c: c.mapping.cp == 1 or p.seq_len % (2 * c.mapping.cp) == 0, modes=("train",)),
    Rule("serve_cp", "serving mappings use CP = 1 (got {cp}): moeplan does not model context-parallel prefill",
         "moeplan", lambda p, c: c.mapping.cp == 1, modes=("serve",)),
    Rule("serve_pp", "serving mappings use PP = 1 (got {pp}): moeplan.serving prices one instance of attention "
         "TP × DP and MoE TP × EP", "moeplan", lambda p, c: c.mapping.pp == 1, modes=("serve",)),
    Rule("serve_edp", "serving mappings use EDP = 1 (got {edp}): the MoE layers span the instance as MoE TP × EP",
         "moeplan", lambda p, c: c.mapping.edp == 1, modes=("serve",)),
    Rule("serve_vpp", "serving mappings use VPP = 1 (got {vpp}): interleaving is a training schedule",
         "moeplan", lambda p, c: c.mapping.vpp == 1, "schedule", modes=("serve",)),
    Rule("vpp_layers", "VPP ({vpp}) must divide the layers per pipeline stage ({per_stage})",
         f"{MEGATRON} megatron/training/arguments.py (\"number of layers per pipeline stage must be divisible "
         "number of layers per virtual pipeline stage\"); megatron/core/transformer/moe/README.md (legal VPP "
         "sizes are the divisors of num_layers / PP)",
         lambda p, c: (p.model.num_layers // c.mapping.pp) % c.mapping.vpp == 0, "schedule"),
    Rule("vpp_pp", "an interleaved schedule (VPP {vpp}) needs PP > 1 (got {pp})",
         f"{MEGATRON} megatron/training/arguments.py (\"When interleaved schedule is used, "
         "pipeline-model-parallel size should be greater than 1\")",
         lambda p, c: c.mapping.vpp == 1 or c.mapping.pp > 1, "schedule"),
    Rule("global_batch", "the global batch ({gbs}) must be a multiple of micro-batch × DP = {mbs}×{dp}",
         f"{MEGATRON} megatron/core/num_microbatches_calculator.py (global_batch_size % "
         "(micro_batch_size * data_parallel_size) == 0)", _gbs, "schedule", modes=("train",)),
    Rule("vpp_microbatches", "with VPP > 1 the micro-batches per DP rank ({microbatches}) must be a multiple of "
         "PP ({pp})",
         f"{MEGATRON} megatron/core/pipeline_parallel/schedules.py (forward_backward_pipelining_with_interleaving:"
         " the last micro-batch group must be 0 or ≥ PP, groups of PP by default)",
         _vpp_microbatches, "schedule", modes=("train",)),
    Rule("sequence_parallel", "MoE with TP > 1 ({tp}) needs sequence parallelism",
         f"{MEGATRON} megatron/core/model_parallel_config.py (\"When using expert parallelism and tensor "
         "parallelism, sequence parallelism must be used\": an error until 2025-08, a warning since); "
         "megatron/training/yaml_arguments.py",
         lambda p, c: c.mapping.tp == 1 or c.sequence_parallel, "schedule", modes=("train",)),
)


def rules_for(problem: FoldingProblem, scope: str | None = None) -> tuple[Rule, ...]:
    """The rules that apply to ``problem``'s mode (of one scope, or all)."""
    return tuple(r for r in RULES if r.applies(problem) and (scope is None or r.scope == scope))


def violations(problem: FoldingProblem, candidate: Candidate | ParallelMapping) -> list[Rule]:
    """Every rule ``candidate`` breaks (empty when valid)."""
    c = candidate if isinstance(candidate, Candidate) else Candidate(candidate)
    if not _positive(problem, c):
        return [RULES[0]]
    return [r for r in rules_for(problem) if not r.holds(problem, c)]


def explain_invalid(problem: FoldingProblem, candidate: Candidate | ParallelMapping) -> str | None:
    """The first rule ``candidate`` breaks, with its numbers and source, or None when it is valid."""
    c = candidate if isinstance(candidate, Candidate) else Candidate(candidate)
    broken = violations(problem, c)
    return broken[0].describe(problem, c) if broken else None
