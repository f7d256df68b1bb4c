"""Search serving deployments for a TTFT / TPOT target: every attention TP × attention-DP and
MoE-TP × EP split of ``gpus`` GPUs at each concurrency, priced by
:class:`moeplan.serving.ServePredictor`, the ones that fit in memory and meet the targets kept,
and their Pareto front of output tokens/s per GPU against TPOT. Aggregated serving only.
Launch commands follow the backends' flags: SGLang ``--tp`` is the world size with
``--dp --enable-dp-attention`` for attention DP and ``--ep-size`` for EP (sgl-project/sglang
python/sglang/srt/server_args.py); vLLM ``--tensor-parallel-size``/``--data-parallel-size`` with
``--enable-expert-parallel`` making EP = TP × DP (vllm-project/vllm vllm/engine/arg_utils.py)."""
from __future__ import annotations

from dataclasses import dataclass

from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.precision import Precision
from moeplan.serving import ServeLayout, ServePoint, ServePredictor, ServeTerms


@dataclass(frozen=True)
class ServeCandidate:
    """One deployment: layout, concurrency and its predicted figures."""

    layout: ServeLayout
    concurrency: int
    point: ServePoint


def layouts(gpus: int, num_experts: int) -> list[ServeLayout]:
    """Every split of ``gpus`` into attention TP × DP and MoE TP × EP with EP dividing the experts."""
    divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
    return [ServeLayout(tp, gpus // tp, gpus // ep, ep) for tp in divisors for ep in divisors if num_experts % ep == 0]


def search(cost: CostModel, precision: Precision, backend: str, gpus: int, isl: int, osl: int,
           concurrencies: list[int], ttft_max: float, tpot_max: float,
           terms: ServeTerms | None = None) -> list[ServeCandidate]:
    """Candidates that fit the KV cache and meet TTFT ≤ ``ttft_max`` and TPOT ≤ ``tpot_max`` (seconds)."""
    if gpus < 1 or not concurrencies or min(concurrencies) < 1:
        raise InputError("gpus and every concurrency must be ≥ 1", field="concurrency")
    kept = []
    for lay in layouts(gpus, cost.model.num_experts):
        pred = ServePredictor(cost, lay, precision, backend, terms or ServeTerms())
        for c in concurrencies:
            p = pred.predict(c, isl, osl)
            if p.kv_fits and p.ttft <= ttft_max and p.tpot <= tpot_max:
                kept.append(ServeCandidate(lay, c, p))
    return kept


def pareto(candidates: list[ServeCandidate]) -> list[ServeCandidate]:
    """Candidates no other beats on both TPOT (lower) and tokens/s per GPU (higher), by TPOT."""
    front: list[ServeCandidate] = []
    for cand in sorted(candidates, key=lambda c: (c.point.tpot, -c.point.tokens_per_s_per_gpu)):
        if not front or cand.point.tokens_per_s_per_gpu > front[-1].point.tokens_per_s_per_gpu:
            front.append(cand)
    return front


def launch_command(backend: str, model: str, lay: ServeLayout) -> str:
    """The server command for ``lay``, or a sentence saying the backend cannot express it."""
    if backend == "sglang":
        cmd = f"python -m sglang.launch_server --model-path {model} --tp {lay.world}"
        if lay.attention_dp > 1:
            cmd += f" --dp {lay.attention_dp} --enable-dp-attention"
        return cmd + (f" --ep-size {lay.moe_ep}" if lay.moe_ep > 1 else "")
    if backend == "vllm":
        cmd = f"vllm serve {model} --tensor-parallel-size {lay.attention_tp}"
        if lay.attention_dp > 1:
            cmd += f" --data-parallel-size {lay.attention_dp}"
        if lay.moe_ep == lay.world and lay.world > 1:
            return cmd + " --enable-expert-parallel"
        if lay.moe_ep == 1:
            return cmd
        return f"(vLLM runs EP = TP × DP or EP = 1; {lay.label()} has no vLLM flags)"
    return f"(no launch command for {backend}: see TensorRT-LLM's moe_expert_parallel_size / enable_attention_dp)"
