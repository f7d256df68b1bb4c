"""``moeplan plan serve``: search serving deployments for a TTFT / TPOT target."""
from __future__ import annotations

import typer

from moeplan.attention_tables import AttentionShape
from moeplan.cli.apps import plan_app
from moeplan.cli.common import console, guarded, print_table
from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.precision import Precision
from moeplan.serve_search import launch_command, pareto, search


@plan_app.command("serve")
@guarded
def serve(
    model: str = typer.Option(..., help="Model preset or config.json."),
    hardware: str = typer.Option("h200-sxm", help="Hardware profile name or YAML (e.g. from hardware-import)."),
    gpus: int = typer.Option(8, help="GPUs of one serving instance."),
    backend: str = typer.Option("sglang", help="sglang, trtllm or vllm."),
    isl: int = typer.Option(1024, help="Prompt tokens per request."),
    osl: int = typer.Option(1024, help="Output tokens per request."),
    concurrency: str = typer.Option("1,4,8,16,32,64,128,256", help="Concurrencies to try, comma-separated."),
    ttft_ms: float = typer.Option(2000.0, help="TTFT target (ms)."),
    tpot_ms: float = typer.Option(50.0, help="TPOT target (ms)."),
    gemm: str = typer.Option("fp8", help="Attention/dense GEMM weight format (bf16, fp8, fp8_block, nvfp4, int4_wo)."),
    moe: str = typer.Option("fp8", help="Routed-expert weight format (bf16, fp8, fp8_block, nvfp4, mxfp4, int4_wo)."),
    kv: str = typer.Option("fp8", help="KV-cache format (bf16, fp8)."),
) -> None:
    """Price every attention TP × DP / MoE TP × EP split at each concurrency (aggregated serving),
    keep those meeting the targets, print the Pareto front (tokens/s per GPU vs TPOT) and the
    launch command of the best-throughput one."""
    try:
        levels = [int(x) for x in concurrency.split(",") if x.strip()]
    except ValueError as exc:
        raise InputError(f"not a list of integers: {concurrency!r}", field="--concurrency", fix="e.g. 8,16,32") from exc
    hw = HardwareProfile.resolve(hardware)
    cost = CostModel(ModelSpec.resolve(model), hw.with_cluster(devices=gpus) if gpus > hw.num_devices else hw)
    precision = Precision(gemm, moe, kv)
    found = search(cost, precision, backend, gpus, isl, osl, levels, ttft_ms / 1e3, tpot_ms / 1e3)
    if not found:
        raise InputError(f"no deployment on {gpus} GPUs meets TTFT ≤ {ttft_ms} ms and TPOT ≤ {tpot_ms} ms",
                         field="--tpot-ms", fix="relax the targets, add GPUs or lower the precision")
    front = pareto(found)
    rows = [(c.layout.label(), c.concurrency, f"{c.point.ttft * 1e3:.0f}", f"{c.point.tpot * 1e3:.1f}",
             f"{c.point.tokens_per_s_per_gpu:.0f}") for c in front]
    print_table(f"{cost.model.name} on {gpus}× {hw.device.name}, {backend}, ISL {isl} / OSL {osl}: Pareto front "
                f"({len(found)} deployments meet the targets)",
                ["layout", "concurrency", "TTFT ms", "TPOT ms", "tok/s/GPU"], rows)
    best = front[-1]
    console.print(f"best throughput: {best.layout.label()} at concurrency {best.concurrency}")
    console.print(launch_command(backend, model, best.layout), highlight=False, soft_wrap=True)
    console.print("TTFT/TPOT from moeplan.serving (fitted on aiconfigurator-core's H100/B200 silicon rows; "
                  "bench/RESULTS.md gives its held-out error)", style="dim")
    tables = cost.attention_tables
    if tables is None or not any(tables.has("decode", AttentionShape.of(cost.model, tp, precision.kv_bytes))
                                 for tp in range(1, gpus + 1)):
        console.print(f"{hw.name} has no measured attention tables for {cost.model.name}'s attention: the "
                      "attention core is a roofline, which the "
                      "fit (on imported profiles) did not judge and which prices decode below measured (bench/RESULTS.md, "
                      "issue 25); `moeplan hardware-import --aiconfigurator SYSTEM "
                      "--framework BACKEND` builds a profile with them", style="dim", markup=False)
