"""SRP and SCH against the paper's own code (github ljcleo/moe-lrc @ 7b3ca46), on synthetic traces of several
shapes: per layer and model level, plus the first-version SCH (per-segment top-C oracle) for comparison, and
the time each figure takes.

Usage: python bench/consistency.py [--upstream PATH/TO/moe-lrc/src] [tokens]
  → prints a table, writes bench/results/consistency.json. With ``--upstream``, ``41_sch_calc.py::calc_fsf``
  is read from that checkout (it needs torch) and run on the same traces; SRP's upstream figure is the same
  sliding-window count written with torch as ``30_srp_calc.py::seg_stat`` does (power-of-two doubling).
"""
from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path

import numpy as np

from moeplan.model import ModelSpec
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize

SHAPES = [("olmoe-1b-7b", 4), ("olmoe-1b-7b", 16), ("qwen3-30b-a3b", 16), ("mixtral-8x7b", 4), ("deepseek-v2-lite", 16)]


def upstream_sch(src: Path):  # noqa: ANN201 - the upstream function
    text = (src / "41_sch_calc.py").read_text()
    node = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == "calc_fsf")
    import torch
    scope: dict = {"torch": torch}
    exec(compile(ast.Module([node], []), "41_sch_calc.py", "exec"), scope)  # noqa: S102 - the paper's own code
    return lambda ids, universe, m: scope["calc_fsf"](torch.from_numpy(ids.astype(np.int64)), universe, m).numpy()


def upstream_srp(ids: np.ndarray, experts: int, m: int) -> tuple[int, int, int]:
    """(matches, predictions, activations) per threshold as 30_srp_calc.py::seg_stat builds them, one layer."""
    import torch
    mask = torch.zeros(ids.shape[0], experts, dtype=torch.int16)
    mask.scatter_(1, torch.from_numpy(ids.astype(np.int64)), 1)
    seg = 1
    while seg < m:
        mask = mask[:-seg] + mask[seg:]
        seg <<= 1
    hist = torch.bincount(mask.flatten().long(), minlength=m + 1)[: m + 1]
    matches = (hist * torch.arange(m + 1)).flip(0).cumsum(0).flip(0)
    preds = hist.flip(0).cumsum(0).flip(0) * m
    return matches, preds, matches[0]


def first_version_sch(ids: np.ndarray, experts: int, m: int, cache: int) -> float:
    """The superseded definition: each non-overlapping segment's ``cache`` most used experts."""
    n = ids.shape[0] // m
    seg = np.repeat(np.arange(n), m * ids.shape[1])
    counts = np.bincount(seg * experts + ids[: n * m].ravel(), minlength=n * experts).reshape(n, experts)
    return float(np.sort(counts, axis=1)[:, -cache:].sum() / counts.sum())


def main() -> None:
    args = sys.argv[1:]
    src = Path(args[args.index("--upstream") + 1]) if "--upstream" in args else None
    rest = [a for i, a in enumerate(args) if a != "--upstream" and (i == 0 or args[i - 1] != "--upstream")]
    tokens = int(rest[0]) if rest else 2048
    sch_ref = upstream_sch(src) if src else None
    rows = []
    for preset, m in SHAPES:
        model = ModelSpec.preset(preset)
        trace = synthesize(model, SyntheticTraffic(tokens=tokens, locality=0.5, segment=32, seed=3))
        st, ids, e, k, nl = TraceStats.of(trace), trace.expert_ids.astype(np.int64), trace.num_experts, trace.top_k, \
            trace.num_layers
        cache = 2 * k
        t0 = time.perf_counter()
        srp_model = st.srp(m)
        t_srp = time.perf_counter() - t0
        t0 = time.perf_counter()
        sch_model = st.sch(m, cache)
        t_sch = time.perf_counter() - t0
        sch_layers = [st.sch(m, cache, [layer]) for layer in range(nl)]
        old_layers = [first_version_sch(ids[:, layer], e, m, cache) for layer in range(nl)]
        row = {"model": preset, "shape": f"{tokens}×{nl}×{e}×top{k}", "window": m, "cache_per_layer": cache,
               "srp_model": srp_model, "sch_model": sch_model, "first_version_sch_model": float(np.mean(old_layers)),
               "first_version_max_layer_gap": float(np.max(np.abs(np.array(old_layers) - sch_layers))),
               "srp_s": t_srp, "sch_model_s": t_sch}
        if sch_ref is not None:
            ref_layers = [float(sch_ref(ids[:, layer], e, m)[cache - 1]) for layer in range(nl)]
            pooled = np.concatenate([ids[:, layer] + layer * e for layer in range(nl)], axis=1)
            ref_model = float(sch_ref(pooled, e * nl, m)[cache * nl - 1])
            parts = [upstream_srp(ids[:, layer], e, m) for layer in range(nl)]
            mt, pt, at = (sum(p[i] for p in parts) for i in range(3))
            ref_srp = float((2 * mt / (pt + at)).max())
            row |= {"upstream_sch_model": ref_model, "upstream_srp_model": ref_srp,
                    "max_sch_layer_diff": float(np.max(np.abs(np.array(ref_layers) - sch_layers))),
                    "sch_model_diff": abs(ref_model - sch_model), "srp_model_diff": abs(ref_srp - srp_model)}
        rows.append(row)
        print(json.dumps(row))
    out = Path(__file__).parent / "results" / "consistency.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
