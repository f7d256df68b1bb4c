"""``moeplan plan folding``: choose the attention / MoE parallel mapping (MoE Parallel Folding)."""
from __future__ import annotations

import shlex

from pathlib import Path

import typer
from moeplan.solvers.folding import FoldingProblem, FoldingResult, Ranked, solve

from moeplan.cli.apps import plan_app
from moeplan.cli.common import console, guarded, human_bytes, human_seconds, print_table, resolve_hardware
from moeplan.parallel_step import TrainStep
from moeplan.export.megatron import megatron_args
from moeplan.cost import CostModel
from moeplan.model import ModelSpec
from moeplan.precision import Precision

DEFAULT_GLOBAL_BATCH = {"train": 1024, "serve": 256}


@plan_app.command("folding")
@guarded
def folding(
    model: str = typer.Option(..., help="Model preset or config.json."),
    hardware: str = typer.Option("h100-sxm", help="Hardware profile name or YAML."),
    gpus: int = typer.Option(..., help="GPUs in the cluster."),
    nodes: int = typer.Option(None, help="Nodes (default: filled from the profile's GPUs per node)."),
    mode: str = typer.Option("train", help="train (Megatron-Core step time) or serve (TPOT from moeplan.serving, "
                                           "as plan serve prices it)."),
    seq: int = typer.Option(4096, help="Tokens per sequence (serve: prompt tokens per request, the ISL)."),
    gbs: int = typer.Option(None, help="Sequences per step (serve: requests in flight, the concurrency); "
                                       "default 1024 train, 256 serve."),
    mbs: int = typer.Option(None, help="Micro-batch (training only); default: searched 1/2/4/8."),
    osl: int = typer.Option(1024, help="Serve: output tokens per request."),
    backend: str = typer.Option("sglang", help="Serve: sglang, trtllm or vllm."),
    gemm: str = typer.Option("fp8", help="Serve: attention/dense GEMM weight format (as plan serve)."),
    moe: str = typer.Option("fp8", help="Serve: routed-expert weight format (as plan serve)."),
    kv: str = typer.Option("fp8", help="Serve: KV-cache format (as plan serve)."),
    tp_comm_overlap: bool = typer.Option(False, help="Training: TP collectives overlap the GEMMs (Megatron's "
                                                     "--tp-comm-overlap, Transformer Engine userbuffers)."),
    top: int = typer.Option(10, help="Mappings to list."),
    output: Path = typer.Option(None, "-o", "--output", help="Write the winning plan as JSON."),
) -> None:
    """Enumerate every valid attention (TP×CP×DP×PP) / MoE (ETP×EP×EDP×PP) mapping, predict each with
    the cost model, and print the ranking, why each runner-up loses, and the Megatron-Core arguments."""
    hw = resolve_hardware(hardware).with_cluster(devices=gpus, nodes=nodes)
    batch = gbs if gbs is not None else DEFAULT_GLOBAL_BATCH.get(mode, 0)
    problem = FoldingProblem(CostModel(ModelSpec.resolve(model), hw), mode, seq, batch, mbs,
                             tp_comm_overlap=tp_comm_overlap, osl=osl, precision=Precision(gemm, moe, kv).validate(),
                             backend=backend).validate()
    result = solve(problem, top=top)
    _print_ranking(result, top)
    plan = result.to_plan(top)
    console.print("\nMegatron-Core arguments (" + ("training" if mode == "train" else
                  "the serving mapping as training arguments; map attention TP/DP and EP to your server") + "):")
    console.print(shlex.join(megatron_args(plan) + (["--tp-comm-overlap"] if problem.tp_comm_overlap else [])),
                  highlight=False, soft_wrap=True)
    console.print(hw.provenance_note(), style="dim")
    if output:
        plan.save(output)
        console.print(f"wrote {output}")


def _print_ranking(result: FoldingResult, top: int) -> None:
    p, c = result.problem, result.counts
    title = (f"{p.model.name} on {p.world}× {p.hardware.device.name} ({p.hardware.nodes} node(s) × "
             f"{p.devices_per_node}), {p.mode}: seq {p.seq_len}, "
             + (f"global batch {p.global_batch}" if p.mode == "train" else
                f"OSL {p.osl}, {p.global_batch} requests in flight, {p.backend}, {p.precision.label()}"))
    caption = (f"{c['valid_candidates']:,} valid candidates in {c['valid_layouts']:,} valid layouts (of "
               f"{c['raw_layouts']:,}); {result.search} search priced {c['priced']:,} in {result.seconds:.2f} s")
    if p.mode == "train":
        columns = ["#", "attention TP·CP·DP·PP", "MoE ETP·EP·EDP", "VPP", "mbs", "recompute", "step", "MFU",
                   "memory", "EP nodes", "why it loses"]
        rows = [(i + 1, _attention(r), _moe(r), r.candidate.mapping.vpp, r.candidate.micro_batch,
                 r.candidate.recompute, human_seconds(r.score), f"{100 * r.result.mfu:.1f}%",
                 human_bytes(r.result.memory.peak), r.result.spans["ep"].nodes, _reason(r))
                for i, r in enumerate(result.ranked[:top])]
    else:
        columns = ["#", "attention TP·DP·PP", "MoE ETP·EP·EDP", "TPOT", "output tok/s", "TTFT", "prefill tok/s",
                   "KV capacity", "EP nodes", "why it loses"]
        rows = [(i + 1, _attention(r), _moe(r), human_seconds(r.result.tpot), round(r.result.decode_tokens_per_s),
                 human_seconds(r.result.ttft), round(r.result.prefill_tokens_per_s),
                 f"{r.result.kv_capacity_tokens:,.0f} tok", r.result.spans["ep"].nodes, _reason(r))
                for i, r in enumerate(result.ranked[:top])]
    print_table(title, columns, rows, caption=caption)
    for label, why in list(result.invalid_examples.items())[:3]:
        console.print(f"invalid, e.g. {label}: {why}", style="dim", highlight=False)
    best = result.best
    breakdown = best.breakdown
    total = sum(breakdown.values())
    print_table("Winner's predicted breakdown" + (" (per step)" if p.mode == "train" else " (per decode step)"),
                ["part", "time", "share"],
                [(k, human_seconds(v), f"{100 * v / total:.1f}%") for k, v in breakdown.items() if v > 0])


def _attention(r: Ranked) -> str:
    t = r.candidate.mapping
    return f"{t.tp}·{t.cp}·{t.dp}·{t.pp}" if isinstance(r.result, TrainStep) else f"{t.tp}·{t.dp}·{t.pp}"


def _moe(r: Ranked) -> str:
    t = r.candidate.mapping
    return f"{t.etp}·{t.ep}·{t.edp}"


def _reason(r: Ranked) -> str:
    reason = r.reason or "best"
    if r.equivalents:
        reason += f" (ties: {len(r.equivalents)} equivalent mapping{'s' if len(r.equivalents) > 1 else ''})"
    return reason
