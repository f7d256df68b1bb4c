"""Serving predictions vs NVIDIA's measured deployments (aiconfigurator-core's silicon sample).

aiconfigurator-core (Apache-2.0, PyPI) ships ``aiconfigurator_core/systems/silicon_sample.csv``:
measured TTFT and TPOT of real SGLang / TRT-LLM / vLLM deployments. This script takes its
aggregated (non-disaggregated) rows of MoE models that moeplan has a preset for on H100, H200
and B200, merges repeated measurements of one configuration (median), drops rows whose sizes
contradict each other, and predicts every row with :class:`moeplan.serving.ServePredictor` (the one
serving model; ``plan serve`` and ``plan folding --mode serve`` price with it) at the row's precision per
  component, backend and layout, its :class:`~moeplan.serving.ServeTerms` fitted here on the
  **H100 and B200 rows only** (least squares on log-error of TTFT and TPOT); the **H200 rows are
  held out** and never used for fitting. Its profiles carry the package's measured NCCL and backend custom all-reduce
  curves, the backend's fused-MoE kernel, bf16 GEMM, attention and DeepEP curves
  (:func:`moeplan.aiconfigurator_import.import_profile`, as ``moeplan hardware-import --framework``). With
  ``--moe-dispatch deepep`` the attention-DP rows are priced as DeepEP deployments (a what-if: the
  sample does not say which rows ran DeepEP; the backends' default is ``gather``).

Anchor, same run: AIConfigurator's own estimator on the same rows (:mod:`aic_estimate`, when the
wheel folder is given), on the rows it can price.

It prints (and writes with --out) the median |error| per model / GPU / backend group (moeplan and
AIConfigurator side by side), the fitted terms, the worst held-out rows, and the headline figures
on H100+H200 (the issue's target set).

Usage: python bench/serve_silicon.py --aiconfigurator /tmp/aic/pkg [--out bench/results/serve_silicon.md]
[--moe-dispatch gather|deepep]
(the folder of an unpacked aiconfigurator-core wheel, or omitted when the package is installed)
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import time
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from aic_estimate import AicEstimator
from moeplan.aiconfigurator_import import import_profile
from moeplan.cost import CostModel
from moeplan.hardware import HardwareProfile
from moeplan.io import write_text
from moeplan.model import ModelSpec
from moeplan.precision import Precision
from moeplan.serving import BACKENDS, ServeLayout, ServePoint, ServePredictor, ServeTerms, predict_disaggregated

PRESET_OF = {"deepseek-ai/DeepSeek-R1": "deepseek-v3", "deepseek-ai/DeepSeek-V3": "deepseek-v3",
             "nvidia/DeepSeek-R1-NVFP4": "deepseek-v3", "nvidia/DeepSeek-V3.1-NVFP4": "deepseek-v3",
             "Qwen/Qwen3-235B-A22B-FP8": "qwen3-235b-a22b", "openai/gpt-oss-120b": "gpt-oss-120b",
             "moonshotai/Kimi-K2.5": "kimi-k2.5", "MiniMaxAI/MiniMax-M2.5": "minimax-m2.5", "zhipuai/GLM-5": "glm-5",
             "Qwen/Qwen3.5-397B-A17B": "qwen3.5-397b-a17b"}
HARDWARE_OF = {"h100_sxm": "h100-sxm", "h200_sxm": "h200-sxm", "b200_sxm": "b200"}
FIT_SYSTEMS = ("h100_sxm", "b200_sxm")
HELD_OUT = ("h200_sxm",)
AIC_ISSUE = "TTFT 40%, TPOT 10% (issue 25's figures, its own 431-row H100/H200 selection)"


@dataclass(frozen=True)
class SiliconRow:
    """One measured configuration: model preset, system, backend, precision, layout, ISL/OSL,
    concurrency, measured TTFT and TPOT (seconds, median over repeats)."""

    model: str
    system: str
    backend: str
    precision: Precision
    layout: ServeLayout
    isl: int
    osl: int
    concurrency: int
    ttft: float
    tpot: float
    repeats: int
    model_path: str


def find_sample(root: str | None) -> Path:
    """silicon_sample.csv inside an unpacked wheel folder, or in the installed package."""
    if root:
        hits = sorted(Path(root).rglob("silicon_sample.csv"))
        if not hits:
            raise SystemExit(f"no silicon_sample.csv under {root}")
        return hits[0]
    from importlib import resources
    return Path(str(resources.files("aiconfigurator_core").joinpath("systems/silicon_sample.csv")))


BLOCK_FP8 = ("deepseek-v3", "qwen3-235b-a22b", "minimax-m2.5", "qwen3.5-397b-a17b")


def _precision(gemm: str, moe: str, model: str, backend: str) -> Precision:
    """The row's formats. GPT-OSS ships MXFP4 experts and bf16 attention whatever the row's
    label; an "fp8" row of a checkpoint whose config.json declares 128 × 128 weight blocks
    (``quantization_config.weight_block_size``: DeepSeek-V3/R1, Qwen3-235B-A22B-FP8, MiniMax-M2.5
    in aiconfigurator_core/model_configs; Qwen3.5-397B-A17B's fp8 rows are fp8_block already)
    runs block-scaled fp8, as the other rows of the same checkpoint say.

    The sample does not record the KV-cache dtype; each backend's default stands in. vLLM and
    SGLang default to ``--kv-cache-dtype auto``, the model's activation dtype (bf16) unless the
    checkpoint ships a KV quantisation (vllm CacheConfig.cache_dtype, sglang ServerArgs.kv_cache_dtype):
    bf16 for these checkpoints except NVIDIA's NVFP4 ones (ModelOpt, kv_cache_quant_algo FP8).
    TRT-LLM's deployment recipes for the quantised checkpoints set ``kv_cache_config.dtype: fp8``
    (NVIDIA/TensorRT-LLM docs/source/deployment-guide): fp8 with fp8/fp4 GEMMs, else bf16."""
    if model == "gpt-oss-120b":
        return Precision(gemm="bf16", moe="mxfp4", kv="bf16")
    if model in BLOCK_FP8:
        gemm, moe = ("fp8_block" if f == "fp8" else f for f in (gemm, moe))
    fp8_kv = gemm == "nvfp4" or (backend == "trtllm" and gemm != "bf16")
    return Precision(gemm=gemm, moe=moe, kv="fp8" if fp8_kv else "bf16")


def _layout(r: dict[str, str], prefix: str = "") -> ServeLayout | None:
    """The serving layout of a row, or None when its sizes contradict each other (here or
    against the sizes its id names); an empty attention_dp_size (the Qwen3-235B rows) reads as 1. TRT-LLM and
    vLLM rows give attention TP per replica; SGLang's DP-attention rows give --tp = world."""
    try:
        tp, adp = int(float(r[prefix + "tp_size"])), int(float(r[prefix + "attention_dp_size"] or 1))
        mtp, mep = int(float(r[prefix + "moe_tp_size"])), int(float(r[prefix + "moe_ep_size"]))
    except ValueError:
        return None
    if min(tp, adp, mtp, mep) < 1:
        return None
    world = mtp * mep
    if tp * adp == world:
        return ServeLayout(tp, adp, mtp, mep)
    if tp == world and world % adp == 0:
        return ServeLayout(world // adp, adp, mtp, mep)
    return None


def load_rows(path: Path) -> tuple[list[SiliconRow], dict[str, int]]:
    """Aggregated MoE rows with a preset on H100/H200/B200, repeats merged; and the counts dropped."""
    groups: dict[tuple, list[tuple[float, float]]] = {}
    paths: dict[tuple, str] = {}
    dropped = {"not agg / other GPU / no preset": 0, "contradicting sizes": 0, "no quant mode": 0}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            model = PRESET_OF.get(r["model_path"])
            if r["mode"] != "agg" or r["system"] not in HARDWARE_OF or model is None:
                dropped["not agg / other GPU / no preset"] += 1
                continue
            layout = _layout(r)
            named = re.search(r"_tp(\d+)(?:_0)?_ep(\d+)", r["id"])
            if named and int(named.group(1)) != int(float(r["tp_size"] or 0)):
                layout = None          # the row's id names other sizes than its columns
            conc = re.search(r"silicon_concurrency=(\d+)", r["silicon_data_source"])
            if layout is None or r["pp_size"] not in ("1", "1.0"):
                dropped["contradicting sizes"] += 1
                continue
            if not r["gemm_quant_mode"] or not r["moe_quant_mode"]:
                dropped["no quant mode"] += 1
                continue
            concurrency = int(conc.group(1)) if conc else int(float(r["batch_size"]))
            prec = _precision(r["gemm_quant_mode"], r["moe_quant_mode"], model, r["backend"])
            key = (model, r["system"], r["backend"], prec, layout, int(r["isl"]), int(r["osl"]), concurrency)
            groups.setdefault(key, []).append((float(r["silicon_ttft_ms"]) / 1e3, float(r["silicon_tpot_ms"]) / 1e3))
            paths.setdefault(key, r["model_path"])
    rows = [SiliconRow(*k, ttft=float(np.median([v[0] for v in vals])), tpot=float(np.median([v[1] for v in vals])),
                       repeats=len(vals), model_path=paths[k]) for k, vals in groups.items()]
    return rows, dropped


@dataclass(frozen=True)
class DisaggRow:
    """One measured disaggregated configuration: prefill and decode layouts and worker counts."""

    model: str
    system: str
    backend: str
    precision: Precision
    prefill: ServeLayout
    prefill_workers: int
    decode: ServeLayout
    decode_workers: int
    isl: int
    osl: int
    concurrency: int
    ttft: float
    tpot: float


def load_disagg_rows(path: Path) -> list[DisaggRow]:
    """Disaggregated MoE rows with a preset on H100/H200/B200 whose sizes agree and that record
    their worker counts (549 of the 643 such rows leave prefill/decode_num_workers empty)."""
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            model = PRESET_OF.get(r["model_path"])
            if r["mode"] != "disagg" or r["system"] not in HARDWARE_OF or model is None:
                continue
            pre, dec = _layout(r, "prefill_"), _layout(r, "decode_")
            conc = re.search(r"silicon_concurrency=(\d+)", r["silicon_data_source"])
            if (pre is None or dec is None or conc is None or not r["prefill_num_workers"] or not r["decode_num_workers"]
                    or not r["gemm_quant_mode"] or not r["moe_quant_mode"]):
                continue
            rows.append(DisaggRow(model, r["system"], r["backend"], _precision(r["gemm_quant_mode"],
                                  r["moe_quant_mode"], model, r["backend"]), pre, int(float(r["prefill_num_workers"])), dec,
                                  int(float(r["decode_num_workers"])), int(r["isl"]), int(r["osl"]),
                                  int(conc.group(1)), float(r["silicon_ttft_ms"]) / 1e3,
                                  float(r["silicon_tpot_ms"]) / 1e3))
    return rows


class Pricer:
    """Cost models per (model, system, backend), reused across rows. With ``package`` the
    profiles carry aiconfigurator-core's measured NCCL, backend custom all-reduce, fused-MoE, bf16 GEMM,
    attention and DeepEP curves (``moeplan hardware-import --framework``); without it the datasheet
    profile. ``moe_dispatch`` applies to the attention-DP rows (the others run no all-to-all)."""

    def __init__(self, package: str | None, moe_dispatch: str = "gather") -> None:
        self.package = package
        self.moe_dispatch = moe_dispatch
        self._cm: dict[tuple[str, str, str, int], CostModel] = {}
        self._hw: dict[tuple[str, str], HardwareProfile] = {}
        self._predictors: dict[int, ServePredictor] = {}

    def cost(self, model: str, system: str, world: int, backend: str = "") -> CostModel:
        """The cost model of ``model`` on ``system``'s profile for ``backend``, widened to
        ``world`` GPUs where that is more than one node (cached per world)."""
        if (system, backend) not in self._hw:
            self._hw[system, backend] = (import_profile(system, backend, self.package)
                                         if backend and self.package is not None
                                         else HardwareProfile.resolve(HARDWARE_OF[system]))
        hw = self._hw[system, backend]
        width = max(world, hw.num_devices)
        key = (model, system, backend, width)
        if key not in self._cm:
            cm = CostModel(ModelSpec.preset(model), hw)
            self._cm[key] = cm.with_cluster(width) if width > hw.num_devices else cm
        return self._cm[key]

    def disagg(self, row: DisaggRow, terms: ServeTerms) -> tuple[float, float]:
        def side(layout: ServeLayout) -> ServePredictor:
            return ServePredictor(self.cost(row.model, row.system, layout.world, row.backend), layout,
                                  row.precision, row.backend, terms)
        p = predict_disaggregated(side(row.prefill), side(row.decode), row.prefill_workers, row.decode_workers,
                                  row.concurrency, row.isl, row.osl)
        return p.ttft, p.tpot

    def model(self, row: SiliconRow, terms: ServeTerms) -> tuple[float, float]:
        """(TTFT, TPOT) of ``row`` under ``terms``; the row's predictor (its curve look-ups) is
        built once and re-priced with each set of terms the fit tries."""
        p = self.point(row, terms)
        return p.ttft, p.tpot

    def point(self, row: SiliconRow, terms: ServeTerms) -> ServePoint:
        """The whole prediction of ``row`` under ``terms`` (its predictor built once)."""
        if id(row) not in self._predictors:
            cm = self.cost(row.model, row.system, row.layout.world, row.backend)
            dispatch = self.moe_dispatch if row.layout.attention_dp > 1 else "gather"
            self._predictors[id(row)] = ServePredictor(cm, row.layout, row.precision, row.backend, terms,
                                                       moe_dispatch=dispatch)
        pred = self._predictors[id(row)]
        pred.terms = terms
        return pred.predict(row.concurrency, row.isl, row.osl)


PER_BACKEND = ("layer_gap_s", "step_overhead_s", "request_overhead_s", "prefill_share")
# flops_efficiency ≥ 0.4: the package's measured prefill-sized GEMMs (gemm_perf.parquet, m 1k–8k,
# n, k ≥ 4k) reach a median 0.47–0.81 of the datasheet rate per backend and format on H100 and B200;
# a lower value would let prefill time stand in for the queueing the TTFT terms model.
FIT_BOUNDS = {"hbm_efficiency": (0.2, 1.0), "flops_efficiency": (0.4, 1.0), "layer_gap_s": (1e-7, 2e-4),
              "collective_latency_s": (1e-7, 1e-4), "step_overhead_s": (1e-5, 2e-2), "request_overhead_s": (1e-4, 1.0),
              "prefill_share": (0.05, 4.0), "queue_factor": (0.01, 200.0), "schedule_wait_steps": (0.01, 100.0)}


def _names() -> list[tuple[str, str | None]]:
    """The fitted constants in vector order: (ServeTerms field, backend or None)."""
    return [(f, b) for f in FIT_BOUNDS for b in (BACKENDS if f in PER_BACKEND else (None,))]


def terms_from(x: np.ndarray, source: str = "") -> ServeTerms:
    """ServeTerms from a vector of log-values in :func:`_names` order."""
    fields: dict[str, Any] = {}
    for (name, backend), v in zip(_names(), np.exp(x)):
        if backend is None:
            fields[name] = min(float(v), 1.0) if name.endswith("efficiency") else float(v)
        else:
            fields[name] = fields.get(name, ()) + ((backend, float(v)),)
    return ServeTerms(**fields, source=source)


def fit(pricer: Pricer, rows: list[SiliconRow]) -> ServeTerms:
    """Least squares on log(predicted / measured) of TTFT and TPOT over ``rows``."""
    d = ServeTerms()
    x0 = np.log([getattr(d, n) if b is None else dict(getattr(d, n))[b] for n, b in _names()])
    lo = np.log([FIT_BOUNDS[n][0] for n, _ in _names()])
    hi = np.log([FIT_BOUNDS[n][1] for n, _ in _names()])
    x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)

    def residuals(x: np.ndarray) -> np.ndarray:
        t = terms_from(x)
        out = []
        for r in rows:
            ttft, tpot = pricer.model(r, t)
            out += [math.log(ttft / r.ttft), math.log(tpot / r.tpot)]
        return np.asarray(out)

    res = least_squares(residuals, x0, bounds=(lo, hi), loss="soft_l1", f_scale=0.2, max_nfev=60)
    return terms_from(res.x, source=f"bench/serve_silicon.py fit on {len(rows)} H100+B200 aggregated rows of "
                                     "aiconfigurator-core 0.12.0 silicon_sample.csv")


def median_err(pred: list[float], meas: list[float]) -> float:
    return float(np.median(np.abs(np.asarray(pred) / np.asarray(meas) - 1.0))) * 100 if pred else float("nan")


def _errors(rows: list, preds: dict) -> tuple[float, float]:
    return (median_err([preds[id(r)][0] for r in rows], [r.ttft for r in rows]),
            median_err([preds[id(r)][1] for r in rows], [r.tpot for r in rows]))


def _fmt(v: float | dict[str, float]) -> str:
    """A fitted term (a number or one per backend) to four significant digits."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{b}: {x:.4g}" for b, x in v.items()) + "}"
    return f"{v:.4g}"


def _pct(pairs: list[tuple[float, float]]) -> str:
    """Median |predicted / measured − 1| of (predicted, measured) pairs, as text."""
    return f"{median_err([p for p, _ in pairs], [m for _, m in pairs]):.0f}%" if pairs else "–"


def report(pricer: Pricer, rows: list[SiliconRow], disagg: list[DisaggRow], terms: ServeTerms,
           dropped: dict[str, int], seconds: float, sample: Path, aic: dict[int, tuple[float, float] | None],
           aic_failures: dict[str, int]) -> str:
    preds = {id(r): pricer.model(r, terms) for r in rows}
    lines = [f"Sample: {sample} ({len(rows)} configurations after merging repeats; dropped: {dropped})", "",
             "Fitted terms (H100 + B200 rows only): " + ", ".join(
                 f"{k}={_fmt(v)}" for k, v in terms.to_dict().items() if k != "source"), "",
             "AIConfigurator columns: its estimator run here on the rows it can price (`n AIC`); "
             f"not priced: {aic_failures or 'none'}.", "",
             "| model | GPU | backend | rows | split | TTFT | TPOT | TPOT median signed | TPOT worst | n AIC | "
             "AIC TTFT | AIC TPOT | moeplan TPOT on those |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted({(r.model, r.system, r.backend) for r in rows}):
        sub = [r for r in rows if (r.model, r.system, r.backend) == k]
        signed = [preds[id(r)][1] / r.tpot - 1.0 for r in sub]
        ttft, tpot = _errors(sub, preds)
        both = [r for r in sub if aic.get(id(r))]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {len(sub)} | {'held out' if k[1] in HELD_OUT else 'fitted'} | "
                     f"{ttft:.0f}% | {tpot:.0f}% | {100 * float(np.median(signed)):+.0f}% | "
                     f"{100 * max(signed, key=abs):+.0f}% | {len(both)} | "
                     f"{_pct([(aic[id(r)][0], r.ttft) for r in both])} | {_pct([(aic[id(r)][1], r.tpot) for r in both])} | "
                     f"{_pct([(preds[id(r)][1], r.tpot) for r in both])} |")
    lines.append("")
    for label, systems in (("H100+H200 (issue target set)", ("h100_sxm", "h200_sxm")), ("H200 only (held out)", HELD_OUT),
                           ("H100+B200 (fitted)", FIT_SYSTEMS), ("all rows", tuple(HARDWARE_OF))):
        sub = [r for r in rows if r.system in systems]
        ttft, tpot = _errors(sub, preds)
        both = [r for r in sub if aic.get(id(r))]
        lines.append(f"- {label}, {len(sub)} rows: serving model TTFT {ttft:.1f}% TPOT {tpot:.1f}%; on the {len(both)} "
                     f"rows AIConfigurator prices: AIConfigurator TTFT {_pct([(aic[id(r)][0], r.ttft) for r in both])} "
                     f"TPOT {_pct([(aic[id(r)][1], r.tpot) for r in both])}, serving model TTFT "
                     f"{_pct([(preds[id(r)][0], r.ttft) for r in both])} TPOT {_pct([(preds[id(r)][1], r.tpot) for r in both])}")
    lines.append(f"- AIConfigurator as quoted in the issue: {AIC_ISSUE}")
    lines += ["", "Worst held-out rows (by TPOT error):", ""]
    held = sorted((r for r in rows if r.system in HELD_OUT), key=lambda r: -abs(preds[id(r)][1] / r.tpot - 1.0))[:8]
    for r in held:
        (tt, tp) = preds[id(r)]
        lines.append(f"- {r.model} {r.backend} {r.layout.label()} {r.precision.label()} ISL {r.isl} OSL {r.osl} "
                     f"c{r.concurrency}: TPOT {tp * 1e3:.1f} vs {r.tpot * 1e3:.1f} ms, TTFT {tt * 1e3:.0f} vs "
                     f"{r.ttft * 1e3:.0f} ms" + ("" if pricer.point(r, terms).kv_fits else
                                               "; the KV cache of all requests does not fit next to the weights"))
    lines += ["", "Disaggregated rows (judged only: the terms above, fitted on aggregated rows):", "",
              "| model | GPU | backend | rows | TTFT | TPOT |", "|---|---|---|---|---|---|"]
    for k in sorted({(r.model, r.system, r.backend) for r in disagg}):
        sub = [r for r in disagg if (r.model, r.system, r.backend) == k]
        pr = [pricer.disagg(r, terms) for r in sub]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {len(sub)} | {median_err([x[0] for x in pr], [r.ttft for r in sub]):.0f}% "
                     f"| {median_err([x[1] for x in pr], [r.tpot for r in sub]):.0f}% |")
    pr = [pricer.disagg(r, terms) for r in disagg]
    lines.append(f"| all | | | {len(disagg)} | {median_err([x[0] for x in pr], [r.ttft for r in disagg]):.0f}% "
                 f"| {median_err([x[1] for x in pr], [r.tpot for r in disagg]):.0f}% |")
    lines += ["", f"Fit took {seconds:.1f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aiconfigurator", help="folder of an unpacked aiconfigurator-core wheel")
    ap.add_argument("--out", help="write the report here (markdown)")
    ap.add_argument("--moe-dispatch", choices=("gather", "deepep"), default="gather",
                    help="how attention-DP rows hand tokens to the experts (default: the backends' gather)")
    args = ap.parse_args()
    sample = find_sample(args.aiconfigurator)
    rows, dropped = load_rows(sample)
    pricer = Pricer(str(sample.parents[2]) if args.aiconfigurator else None, args.moe_dispatch)
    t0 = time.perf_counter()
    terms = fit(pricer, [r for r in rows if r.system in FIT_SYSTEMS])
    seconds = time.perf_counter() - t0
    aic: dict[int, tuple[float, float] | None] = {}
    failures: dict[str, int] = {}
    if args.aiconfigurator:
        estimator = AicEstimator(args.aiconfigurator)
        aic = {id(r): estimator.predict(r) for r in rows}
        failures = estimator.failures
    text = report(pricer, rows, load_disagg_rows(sample), terms, dropped, seconds, sample, aic, failures)
    print(text)
    if args.out:
        write_text(args.out, text)


if __name__ == "__main__":
    main()
