"""``moeplan hardware-import``: a hardware profile from NVIDIA aiconfigurator-core's measured
tables (``moeplan hardware PROFILE`` then shows every imported curve as measured, with its source)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from moeplan.cli.apps import app
from moeplan.cli.common import console, guarded


@app.command("hardware-import")
@guarded
def hardware_import(
    aiconfigurator: str = typer.Option(..., "--aiconfigurator", help="aiconfigurator system, e.g. h200_sxm"),
    output: Path = typer.Option(..., "-o", "--output", help="profile YAML to write"),
    framework: Optional[str] = typer.Option(None, "--framework",
                                            help="sglang, trtllm or vllm: add that backend's custom all-reduce, "
                                                 "fused-MoE, bf16 GEMM, attention (GQA, MLA) and DeepEP tables"),
    package: Optional[str] = typer.Option(None, "--aiconfigurator-path",
                                          help="folder an aiconfigurator-core wheel was unzipped into "
                                               "(default: the installed package)"),
) -> None:
    """Build a profile from aiconfigurator-core's measured collective tables (NCCL all-reduce,
    all-gather, reduce-scatter, all-to-all on 2/4/8 GPUs; with --framework the backend's
    CUDA-graph custom all-reduce, fused-MoE kernels, bf16 dense GEMMs, attention kernels and DeepEP
    dispatch/combine) on top of moeplan's datasheet profile of the same GPU."""
    from moeplan.aiconfigurator_import import import_profile

    hw = import_profile(aiconfigurator, framework, package)
    hw.save(output)
    kinds = Counter(c.kind for c in hw.curves if c.prov.measured)
    console.print(f"wrote {output}: measured curves {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))} "
                  f"({hw.runs['aiconfigurator']['tool']})")
