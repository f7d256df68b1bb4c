"""Dense GEMM shards of real models: measured on one GPU vs the cost model's shape-curve price.

For DeepSeek-V3, Qwen3-30B-A3B and Mixtral-8x7B at TP (= ETP) 1, 2, 4 and 8, every dense GEMM
one GPU runs (:func:`moeplan.gemms.layer_gemms`: attention projections incl. MLA's low-rank
ones, shared expert, dense FFN, router, LM head, one routed expert at 1/ETP width) is timed at
the models' exact shapes with the profiler's own method (:func:`moeplan.profiler.timing.measure`
on :func:`moeplan.profiler.compute_ops.gemm_op` with the profiler's GEMM effort: rotated random
inputs, device events, median),
at ``TOKENS`` tokens (48 decode rows, 3072 prefill rows: neither is a token count of the
profile's grid), and predicted by :meth:`moeplan.cost.CostModel.gemm_time` from a profile:

- ``shape_curves``: the profile's measured ``gemm`` grid (the shapes judged here are not grid
  points: judged, not fitted);
- ``square_rate``: the same profile without its ``gemm`` curves, i.e. the roofline on the
  8192³ matmul rate (what folding used before).

A part's shard (attention, shared expert, dense FFN, router, LM head, expert) is the sum of its
GEMMs. Usage:
    python bench/gpu_shapes.py --profile P.yaml --out DIR          # GPU: measure and price
    python bench/gpu_shapes.py --profile P.yaml --price DIR/gpu_shapes.json   # CPU: price again
    python bench/gpu_shapes.py --tiny --profile P.yaml --out DIR  # CPU smoke test, tiny models
Writes DIR/gpu_shapes.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from moeplan.cost import CostModel
from moeplan.gemms import layer_gemms
from moeplan.hardware import HardwareProfile
from moeplan.io import write_json
from moeplan.model import AttentionSpec, ModelSpec

MODELS = ("deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b")
TPS = (1, 2, 4, 8)
TOKENS = (48, 3072)
BAND = (0.8, 1.25)


def tiny(model: ModelSpec) -> ModelSpec:
    """The same family at toy size (CPU smoke test)."""
    a = model.attention
    att = (replace(a, num_heads=8, q_lora_rank=16 if a.q_lora_rank else 0, kv_lora_rank=16, qk_nope_head_dim=8,
                   qk_rope_head_dim=4, v_head_dim=8) if a.kind == "mla"
           else AttentionSpec("gqa", num_heads=8, num_kv_heads=2, head_dim=8))
    return replace(model, hidden_size=64, vocab_size=256, expert_ffn=32, shared_ffn=32 if model.shared_ffn else 0,
                   dense_ffn=96 if model.dense_ffn else 0, attention=att)


def shapes(models: list[ModelSpec]) -> list[dict[str, Any]]:
    """One row per (model, tp, part, GEMM, tokens), without times."""
    rows = []
    for m in models:
        for tp in TPS:
            for part, gemms in layer_gemms(m, tp, tp).items():
                for g in gemms:
                    rows += [{"model": m.name, "tp": tp, "part": part, "gemm": g.name, "k": g.k, "n": g.n, "tokens": t}
                             for t in TOKENS]
    return rows


def measure_rows(rows: list[dict[str, Any]]) -> None:
    """Time every row's GEMM in place (``measured_s`` median, min, max), identical shapes once."""
    from moeplan.profiler.compute_ops import gemm_op
    from moeplan.profiler.device import Accelerator, host_free_bytes
    from moeplan.profiler.sizes import Sizes
    from moeplan.profiler.timing import measure

    acc = Accelerator.detect()
    sizes = Sizes.choose(not acc.is_cpu, False, host_free_bytes(), 1)
    effort = sizes.gemm_effort or sizes.effort                 # the profiler's own effort for its GEMM grid
    done: dict[tuple[int, int, int], Any] = {}
    for r in rows:
        shape = (r["tokens"], r["k"], r["n"])
        if shape not in done:
            done[shape] = measure(acc, gemm_op(acc, *shape), effort)
        t = done[shape]
        r.update(measured_s=t.median, measured_min_s=t.min, measured_max_s=t.max, repeats=t.repeats)


def price(rows: list[dict[str, Any]], models: dict[str, ModelSpec], profile: HardwareProfile) -> None:
    """Add ``shape_curves_s`` and ``square_rate_s`` predictions to every row."""
    square = replace(profile, curves=tuple(c for c in profile.curves if c.kind != "gemm"))
    for name, m in models.items():
        shaped, flat = CostModel(m, profile), CostModel(m, square)
        for r in rows:
            if r["model"] == name:
                r["shape_curves_s"] = float(shaped.gemm_time(r["tokens"], r["k"], r["n"]))
                r["square_rate_s"] = float(flat.gemm_time(r["tokens"], r["k"], r["n"]))


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Predicted/measured per GEMM and per part shard (sum of its GEMMs), for both predictions."""
    shards: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        s = shards[(r["model"], r["tp"], r["part"], r["tokens"])]
        for f in ("measured_s", "shape_curves_s", "square_rate_s"):
            s[f] += r[f]
    shard_rows = [{"model": k[0], "tp": k[1], "part": k[2], "tokens": k[3], **v} for k, v in shards.items()]
    out: dict[str, Any] = {"band": list(BAND), "shards": shard_rows}
    for pred in ("shape_curves", "square_rate"):
        for what, items in (("gemm", rows), ("shard", shard_rows)):
            ratios = [i[f"{pred}_s"] / i["measured_s"] for i in items]
            inside = sum(BAND[0] <= x <= BAND[1] for x in ratios)
            out[f"{pred}_{what}"] = {"count": len(ratios), "min": min(ratios), "max": max(ratios),
                                     "median": statistics.median(ratios), "inside_band": inside}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help="profile YAML with a measured gemm grid")
    ap.add_argument("--out", type=Path, help="directory for gpu_shapes.json (measure mode)")
    ap.add_argument("--price", type=Path, help="price an earlier gpu_shapes.json again (no GPU needed)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke test)")
    args = ap.parse_args()
    profile = HardwareProfile.load(args.profile)
    specs = [ModelSpec.preset(n) for n in MODELS]
    models = {m.name: m for m in (tiny(m) for m in specs)} if args.tiny else {m.name: m for m in specs}
    if args.price:
        result = json.loads(args.price.read_text())
        rows = result["rows"]
        out = args.price
    else:
        rows = shapes(list(models.values()))
        measure_rows(rows)
        import torch
        result = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "torch": torch.__version__, "tiny": args.tiny, "tokens": list(TOKENS), "tps": list(TPS)}
        out = args.out / "gpu_shapes.json"
    price(rows, models, profile)
    result.update(profile=str(args.profile), profile_digest=profile.digest(), rows=rows, summary=summarise(rows))
    write_json(out, result)
    s = result["summary"]
    print(f"{'prediction':14s} {'what':6s} {'n':>4s} {'min':>6s} {'median':>6s} {'max':>6s} {'in 0.8-1.25':>11s}")
    for pred in ("shape_curves", "square_rate"):
        for what in ("gemm", "shard"):
            x = s[f"{pred}_{what}"]
            print(f"{pred:14s} {what:6s} {x['count']:4d} {x['min']:6.2f} {x['median']:6.2f} {x['max']:6.2f} "
                  f"{x['inside_band']:5d}/{x['count']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
