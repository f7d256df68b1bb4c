"""Hardware profiles from NVIDIA aiconfigurator-core's measured tables.

aiconfigurator-core (Apache-2.0, PyPI) ships per-system measurement tables under
``aiconfigurator_core/systems/data/<system>/``. This module reads its collective tables —
exactly what a single-GPU machine cannot measure — into ``collective`` curves of a moeplan
profile, starting from moeplan's bundled datasheet profile of the same GPU:

- ``comm/nccl/<version>/nccl_perf.parquet``: NCCL all_reduce / all_gather / reduce_scatter /
  alltoall on 2, 4 and 8 GPUs of one NVLink node (columns op_name, nccl_dtype, num_gpus,
  message_size in elements, latency in milliseconds);
- ``comm/<framework>/<version>/custom_allreduce_perf.parquet``: the backend's own all-reduce
  (SGLang/vLLM custom all-reduce, TRT-LLM's AllReduce), CUDA-graph variant (eager rows
  dropped); with ``framework`` given it replaces NCCL's all_reduce curves,
  since that is what the backend's decode step runs;
- ``moe/<framework>/<version>/moe_perf.parquet`` (with ``framework`` given): the backend's fused-MoE
  kernel latency by num_tokens (the tokens entering the layer across the EP group — the EP=8
  column runs about 1/8 of the EP=1 work at 16k tokens), hidden, inter, top-k, experts, moe_tp,
  moe_ep and weight dtype, into ``fused_moe`` curves. Only the ``power_law_1.01`` routing
  distribution is read: AIConfigurator's own default (``sdk/config.py`` workload_distribution
  "power_law" with ``_power_law_alpha = 1.01`` in ``sdk/models/deepseek.py``), the imbalance of
  real routing. Where a table holds several kernels for one shape, the fastest at each token
  count is kept (the backends pick their MoE kernel by shape);
- ``gemm/<framework>/<version>/gemm_perf.parquet`` (with ``framework`` given): the backend's dense
  GEMM latency by m (tokens), n (output features), k (input features) and gemm_dtype, into ``gemm``
  curves {k, n, dtype} (x = m) — the grid :meth:`moeplan.cost.CostModel.gemm_time` prices every
  dense GEMM from. Only the ``bfloat16`` rows are read (dtype ``bf16``): :class:`moeplan.gemms.GemmCurves`
  prices from the bf16 grid alone, so the tables' fp8 / fp8_block rows would go unused. Where
  several kernels timed one point the fastest is kept.

- ``attention/<framework>/<version>/{context,generation}_attention_perf.parquet`` and
  ``mla/<framework>/<version>/{context,generation}_mla_perf.parquet`` (with ``framework`` given):
  the backend's attention core (scores, softmax, values; no projections) of one layer on one GPU,
  keyed as the tables are — per-GPU query heads (after TP), KV heads, head dim, KV-cache dtype and
  batch — into ``attention_context`` curves (x = prompt tokens per sequence, step 0) and
  ``attention_generation`` curves (x = KV-cache tokens per sequence, isl + step), y = seconds of the
  batch (:class:`moeplan.attention_tables.AttentionTables` prices from them). Only full attention
  (``window_size`` 0) is read: a sliding-window layer is priced as full attention over its window.
  MLA rows are DeepSeek-V3's MLA (``num_heads`` per GPU; ``tp_size`` only says how the collector
  got there). The fastest kernel / attention dtype of each point is kept. vLLM ships only MLA
  *module* tables (projections included), which are not read;
- ``comm/<framework>/<version>/wideep_deepep_{ll,normal}_perf.parquet`` (SGLang) and
  ``comm/<framework>/<version>/moe_a2a_perf.parquet`` (TRT-LLM, vLLM), with ``framework`` given: the
  DeepEP dispatch and combine kernels of wide expert parallelism (low-latency mode for decode,
  normal / high-throughput for prefill) on one 8-GPU node (``node_num`` 1, ``ep_size`` 8) by
  tokens per rank, hidden, top-k and experts, into ``moe_a2a`` curves (x = tokens each rank
  dispatches, y = seconds of one dispatch or one combine; SGLang's normal mode: transmit + notify,
  the fastest SM count kept).

The newest version folder of each collective, GEMM, attention and DeepEP table is used; for the MoE tables every version
folder is read and, per shape, the newest that measured it wins (TRT-LLM's newest folders hold
only a few shapes). Every curve is tagged measured, with the package
version, the table's path and its ``collection_meta.yaml`` runtime in the run record ``aiconfigurator``.
pandas (with a parquet engine) is imported only here, when importing.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from moeplan.errors import InputError
from moeplan.hardware import Curve, HardwareProfile, Provenance

SYSTEM_PROFILE = {"h100_sxm": "h100-sxm", "h200_sxm": "h200-sxm", "b200_sxm": "b200", "a100_sxm": "a100-80gb-sxm"}
FRAMEWORKS = ("sglang", "trtllm", "vllm")
OPS = {"all_reduce": "all_reduce", "all_gather": "all_gather", "reduce_scatter": "reduce_scatter",
       "alltoall": "all_to_all"}
MOE_DTYPES = {"bfloat16": "bf16", "fp8": "fp8", "fp8_block": "fp8_block", "w4a16_mxfp4": "mxfp4",
              "int4_wo": "int4_wo", "nvfp4": "nvfp4", "w4a8_mxfp4_mxfp8": "mxfp4_a8"}   # table moe_dtype -> key
MOE_DISTRIBUTION = "power_law_1.01"
DTYPE_BYTES = {"half": 2, "bfloat16": 2, "float16": 2, "int8": 1, "float": 4, "float32": 4}
RUN = "aiconfigurator"


def package_root(path: str | None) -> tuple[Path, str]:
    """(the ``aiconfigurator_core`` package folder, its version): under ``path`` (an unpacked
    wheel or a site-packages folder) or the installed package."""
    if path:
        base = Path(path)
        pkg = base if (base / "systems").is_dir() else base / "aiconfigurator_core"
        if not (pkg / "systems").is_dir():
            raise InputError("no aiconfigurator_core/systems folder here", source=str(base), field="--aiconfigurator-path",
                             fix="give the folder an aiconfigurator-core wheel was unzipped into")
        meta = sorted(pkg.parent.glob("aiconfigurator_core-*.dist-info/METADATA"))
        version = _metadata_version(meta[0].read_text()) if meta else "unknown"
        return pkg, version
    try:
        from importlib import metadata, resources
        return Path(str(resources.files("aiconfigurator_core"))), metadata.version("aiconfigurator-core")
    except (ModuleNotFoundError, metadata.PackageNotFoundError) as exc:
        raise InputError("aiconfigurator-core is not installed", field="--aiconfigurator-path",
                         fix="pip install aiconfigurator-core, or unzip its wheel and give --aiconfigurator-path") from exc


def _metadata_version(text: str) -> str:
    found = re.search(r"^Version:\s*(\S+)", text, re.M)
    return found.group(1) if found else "unknown"


def _newest(folder: Path, table: str) -> Path | None:
    """The newest version folder under ``folder`` holding ``table``."""
    def order(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.name))
    hits = sorted((p for p in folder.glob("*") if (p / table).is_file()), key=order) if folder.is_dir() else []
    return hits[-1] if hits else None


def _meta(folder: Path) -> dict[str, Any]:
    path = folder / "collection_meta.yaml"
    data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return {"runtime": data.get("runtime", {}), "provenance": data.get("provenance", "")} if isinstance(data, dict) else {}


def _curves(table: Path, rel: str, version: str, op_col: str, dtype_col: str, keep: Any) -> list[Curve]:
    import pandas as pd

    df = pd.read_parquet(table)
    df = df[keep(df)]
    out = []
    ref = f"aiconfigurator-core {version} {rel}"
    for (op, dtype, ranks), g in df.groupby([op_col, dtype_col, "num_gpus"]):
        if op not in OPS or dtype not in ("half", "bfloat16"):     # the activations' 16-bit tables
            continue
        g = g.groupby("message_size", as_index=False)["latency"].median().sort_values("message_size")
        x = tuple(float(v) * DTYPE_BYTES[dtype] for v in g["message_size"])
        y = tuple(float(v) / 1e3 for v in g["latency"])
        out.append(Curve("collective", {"op": OPS[op], "scope": "intra_node", "ranks": int(ranks)}, x, y,
                         Provenance("measured", ref, RUN)))
    return out


def _version_order(p: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", p.name))


def _moe_curves(folder: Path, system: str, framework: str, version: str,
                tables: dict[str, Any]) -> list[Curve]:
    """``fused_moe`` curves (x tokens, y seconds) of every shape the framework's MoE tables hold,
    the newest version folder winning per shape; the tables read are added to ``tables``."""
    import pandas as pd

    cols = ["kernel_source", "moe_dtype", "num_tokens", "hidden_size", "inter_size", "topk", "num_experts",
            "moe_tp_size", "moe_ep_size", "distribution", "latency"]
    shape = ["moe_dtype", "hidden_size", "inter_size", "topk", "num_experts", "moe_tp_size", "moe_ep_size"]
    found: dict[tuple, Curve] = {}
    versions = sorted((p for p in folder.glob("*") if (p / "moe_perf.parquet").is_file()), key=_version_order) \
        if folder.is_dir() else []
    for vdir in versions:
        rel = f"systems/data/{system}/moe/{framework}/{vdir.name}/moe_perf.parquet"
        df = pd.read_parquet(vdir / "moe_perf.parquet", columns=cols)
        df = df[(df["distribution"] == MOE_DISTRIBUTION) & df["moe_dtype"].isin(list(MOE_DTYPES))]
        if df.empty:
            continue
        tables[rel] = _meta(vdir)
        best = df.groupby(shape + ["num_tokens"], as_index=False)["latency"].min()
        for key, g in best.groupby(shape):
            g = g.sort_values("num_tokens")
            dtype, hidden, inter, topk, experts, mtp, mep = key
            found[key] = Curve("fused_moe", {"hidden": int(hidden), "inter": int(inter), "top_k": int(topk),
                                             "experts": int(experts), "moe_tp": int(mtp), "moe_ep": int(mep),
                                             "dtype": MOE_DTYPES[dtype]},
                               tuple(float(v) for v in g["num_tokens"]), tuple(float(v) / 1e3 for v in g["latency"]),
                               Provenance("measured", f"aiconfigurator-core {version} {rel} ({MOE_DISTRIBUTION})", RUN))
    return list(found.values())


GEMM_DTYPES = {"bfloat16": "bf16"}   # table gemm_dtype -> gemm curve dtype (the one GemmCurves prices from)


def _gemm_curves(folder: Path, system: str, framework: str, version: str,
                 tables: dict[str, Any]) -> list[Curve]:
    """``gemm`` curves (x tokens m, y seconds) of every (k, n) the framework's newest GEMM table
    holds in :data:`GEMM_DTYPES`; the table read is added to ``tables``."""
    import pandas as pd

    vdir = _newest(folder, "gemm_perf.parquet")
    if vdir is None:
        return []
    rel = f"systems/data/{system}/gemm/{framework}/{vdir.name}/gemm_perf.parquet"
    df = pd.read_parquet(vdir / "gemm_perf.parquet", columns=["gemm_dtype", "m", "n", "k", "latency"])
    df = df[df["gemm_dtype"].isin(list(GEMM_DTYPES)) & (df["latency"] > 0) & (df["m"] > 0)]
    if df.empty:
        return []
    tables[rel] = _meta(vdir)
    best = df.groupby(["gemm_dtype", "k", "n", "m"], as_index=False)["latency"].min()
    prov = Provenance("measured", f"aiconfigurator-core {version} {rel}", RUN)
    return [Curve("gemm", {"k": int(k), "n": int(n), "dtype": GEMM_DTYPES[dtype]},
                  tuple(float(v) for v in g["m"]), tuple(float(v) / 1e3 for v in g["latency"]), prov)
            for (dtype, k, n), g in best.sort_values("m").groupby(["gemm_dtype", "k", "n"])]


KV_DTYPES = {"bfloat16": "bf16", "fp8": "fp8"}   # table kv_cache_dtype -> AttentionShape.kv_dtype
A2A_DTYPES = {"bfloat16": "bf16", "default": "default", "fp8": "fp8", "nvfp4": "nvfp4", "fp4": "fp4"}


def _table(folder: Path, name: str, system: str, sub: str, version: str,
           tables: dict[str, Any]) -> tuple[Any, str] | None:
    """(the newest ``name`` table under ``folder`` as a DataFrame, its reference) or None; the table
    read is added to ``tables``."""
    import pandas as pd

    vdir = _newest(folder, name)
    if vdir is None:
        return None
    rel = f"systems/data/{system}/{sub}/{vdir.name}/{name}"
    tables[rel] = _meta(vdir)
    return pd.read_parquet(vdir / name), f"aiconfigurator-core {version} {rel}"


def _attention_curves(pkg_system: Path, system: str, framework: str, version: str,
                      tables: dict[str, Any]) -> list[Curve]:
    """``attention_context`` / ``attention_generation`` curves of the framework's GQA and MLA
    attention tables (see the module docstring)."""
    out: list[Curve] = []
    sources = (("attention_context", "attention", "context_attention_perf.parquet", "gqa"),
               ("attention_generation", "attention", "generation_attention_perf.parquet", "gqa"),
               ("attention_context", "mla", "context_mla_perf.parquet", "mla"),
               ("attention_generation", "mla", "generation_mla_perf.parquet", "mla"))
    for kind, sub, name, attention in sources:
        found = _table(pkg_system / sub / framework, name, system, f"{sub}/{framework}", version, tables)
        if found is None:
            continue
        df, ref = found
        df = df[df["kv_cache_dtype"].isin(list(KV_DTYPES)) & (df["latency"] > 0)]
        if attention == "gqa":
            df = df[df["window_size"] == 0].rename(columns={"num_key_value_heads": "kv_heads"})
        else:
            df = df.assign(kv_heads=1, head_dim=0)
        df = df.assign(length=df["isl"] + df["step"])
        shape = ["num_heads", "kv_heads", "head_dim", "kv_cache_dtype", "batch_size"]
        best = df.groupby(shape + ["length"], as_index=False)["latency"].min().sort_values("length")
        prov = Provenance("measured", ref, RUN)
        for (heads, kv_heads, head_dim, kv_dtype, batch), g in best.groupby(shape):
            out.append(Curve(kind, {"attention": attention, "heads": int(heads), "kv_heads": int(kv_heads),
                                    "head_dim": int(head_dim), "kv_dtype": KV_DTYPES[kv_dtype], "batch": int(batch)},
                             tuple(float(v) for v in g["length"]), tuple(float(v) / 1e3 for v in g["latency"]), prov))
    return out


def _a2a_curves(comm: Path, system: str, framework: str, version: str, tables: dict[str, Any]) -> list[Curve]:
    """``moe_a2a`` curves of the framework's DeepEP dispatch / combine tables (see the module
    docstring): x tokens per rank, y seconds."""
    import pandas as pd

    frames = []
    for name in ("wideep_deepep_ll_perf.parquet", "wideep_deepep_normal_perf.parquet", "moe_a2a_perf.parquet"):
        found = _table(comm / framework, name, system, f"comm/{framework}", version, tables)
        if found is None:
            continue
        df, ref = found
        if name == "moe_a2a_perf.parquet":
            rows = df.rename(columns={"comm_backend": "backend", "topk": "top_k", "num_tokens": "tokens",
                                      "comm_dtype": "dtype", "ep_size": "ranks"})
        else:
            mode = "deepep_ll" if "_ll_" in name else "deepep_normal"
            parts = []
            for phase in ("dispatch", "combine"):
                us = (df[f"{phase}_avg_t_us"] if mode == "deepep_ll"
                      else df[f"{phase}_transmit_us"] + df[f"{phase}_notify_us"])
                parts.append(pd.DataFrame({"phase": phase, "latency": us, "hidden_size": df["hidden_size"],
                                           "top_k": df["num_topk"], "num_experts": df["num_experts"],
                                           "tokens": df["num_token"], "ranks": 8 * df["node_num"]}))
            rows = pd.concat(parts).assign(backend=mode, dtype="default")
        frames.append(rows[rows["dtype"].isin(list(A2A_DTYPES)) & (rows["latency"] > 0)].assign(ref=ref))
    if not frames:
        return []
    df = pd.concat(frames)
    shape = ["ref", "backend", "phase", "hidden_size", "top_k", "num_experts", "ranks", "dtype"]
    best = df.groupby(shape + ["tokens"], as_index=False)["latency"].min().sort_values("tokens")
    return [Curve("moe_a2a", {"backend": str(backend), "phase": str(phase), "hidden": int(hidden), "top_k": int(topk),
                              "experts": int(experts), "ranks": int(ranks), "dtype": A2A_DTYPES[dtype]},
                  tuple(float(v) for v in g["tokens"]), tuple(float(v) / 1e6 for v in g["latency"]),
                  Provenance("measured", ref, RUN))
            for (ref, backend, phase, hidden, topk, experts, ranks, dtype), g in best.groupby(shape)]


def import_profile(system: str, framework: str | None = None, path: str | None = None) -> HardwareProfile:
    """A profile of ``system`` (an aiconfigurator system name, e.g. ``h200_sxm``): moeplan's
    bundled datasheet profile of that GPU plus the package's measured collective curves and,
    with ``framework``, that backend's measured fused-MoE kernel, bf16 dense-GEMM, attention and
    DeepEP dispatch/combine curves."""
    if system not in SYSTEM_PROFILE:
        raise InputError(f"no moeplan profile for aiconfigurator system {system!r}", field="--aiconfigurator",
                         fix=f"use one of {', '.join(SYSTEM_PROFILE)}")
    if framework is not None and framework not in FRAMEWORKS:
        raise InputError(f"unknown framework {framework!r}", field="--framework", fix=f"use one of {', '.join(FRAMEWORKS)}")
    pkg, version = package_root(path)
    comm = pkg / "systems" / "data" / system / "comm"
    nccl = _newest(comm / "nccl", "nccl_perf.parquet")
    if nccl is None:
        raise InputError(f"aiconfigurator-core {version} has no NCCL table for {system}", source=str(comm),
                         field="--aiconfigurator", fix="pick a system with systems/data/<system>/comm/nccl")
    rel = f"systems/data/{system}/comm/nccl/{nccl.name}/nccl_perf.parquet"
    curves = _curves(nccl / "nccl_perf.parquet", rel, version, "op_name", "nccl_dtype", lambda d: d["op_name"].notna())
    tables: dict[str, Any] = {rel: _meta(nccl)}
    if framework:
        custom = _newest(comm / framework, "custom_allreduce_perf.parquet")
        if custom is not None:
            crel = f"systems/data/{system}/comm/{framework}/{custom.name}/custom_allreduce_perf.parquet"
            graph = _curves(custom / "custom_allreduce_perf.parquet", crel, version, "op_name", "allreduce_dtype",
                            lambda d: ~d["kernel_source"].astype(str).str.contains("eager", case=False))
            ranks = {c.key["ranks"] for c in graph}
            curves = [c for c in curves if not (c.key["op"] == "all_reduce" and c.key["ranks"] in ranks)] + graph
            tables[crel] = _meta(custom)
        curves += _moe_curves(pkg / "systems" / "data" / system / "moe" / framework, system, framework, version, tables)
        curves += _gemm_curves(pkg / "systems" / "data" / system / "gemm" / framework, system, framework, version, tables)
        curves += _attention_curves(pkg / "systems" / "data" / system, system, framework, version, tables)
        curves += _a2a_curves(comm, system, framework, version, tables)
    base = HardwareProfile.resolve(SYSTEM_PROFILE[system])
    run = {"tool": f"aiconfigurator-core {version}", "system": system, "framework": framework or "nccl",
           "tables": tables, "license": "Apache-2.0 (NVIDIA aiconfigurator-core)"}
    return replace(base, description=f"{base.description}; collectives{', fused-MoE kernels, bf16 GEMMs, attention and DeepEP' if framework else ''} measured by "
                               f"NVIDIA aiconfigurator-core {version}",
                   curves=tuple(base.curves) + tuple(curves), runs={**base.runs, RUN: run}).validate()
