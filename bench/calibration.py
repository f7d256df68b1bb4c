"""Calibration judged on runs it never saw (issue 26), from the committed JSON of several H200 machines.

Inputs (bench/results/gpu/): per machine, named by its file prefix P (``--machines h200f,h200g`` or
``h100i,h200j``; a run of single letters such as ``fg`` means ``h200f,h200g``): ``P-forward.json``
(forward steps: "calibration" and "judged" sets), ``P-runtime.json[.gz]`` (per-device replay) and its
profile: ``P-profile-pass1.yaml`` and ``-pass2.yaml`` (machines h200a–c: bench/gpu_session4.sh, two
profiler runs) or ``P-profile.yaml`` with its raw ``P-profile.json[.gz]`` (machines h200f, g:
bench/gpu_session5.sh, one profiler run that measures every point in two passes; sync-free MoE layers,
decode replayed from a CUDA graph). The first machine named is the one corrections are fitted on.

What is fitted and what is judged:

* **Forward step**: corrections fitted on machine A's calibration steps (other batch/sequence
  shapes of the same models) plus A's replay; judged on the 12 judged steps of A, B and C,
  predicted from A's pass-1 profile before and after calibration; and each machine calibrated on
  its own calibration steps, judged on its own judged steps ("own machine"). Also ``scope=all`` (one
  correction per phase for every model) fitted on OLMoE's calibration steps only and judged on
  Qwen1.5-MoE's judged steps (transfer to a model it never saw).
* **Per-device replay**: expert corrections fitted on A's replay with Zipf-shuffled and balanced
  traffic; judged on the "zipf1.2-ranked" traffic rows (never fitted) of A, B and C. One
  configuration = model × traffic × devices × batch × kernel × placement; its figure is the
  straggler's expert compute summed over the replayed layers.
* **Profile agreement**: each expert / routing / attention point of one pass against the other
  pass's [min, max] over repeats, on each machine and across machines.

Each judged replay configuration's error is also written per configuration (``replay_configs_after``).

    python bench/calibration.py [--machines fg | --machines h100i,h200j] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from moeplan.calibration import RunFile, calibrate, load_run, relative_errors
from moeplan.cost import CostModel, CostOptions
from moeplan.hardware import HardwareProfile
from moeplan.io import read_json, write_json
from moeplan.model import ModelSpec
from moeplan.profiler.raw import RawProfile

GPU = Path(__file__).parent / "results" / "gpu"
JUDGED_TRAFFIC = "zipf1.2-ranked"
AGREEMENT_KINDS = ("expert_ffn", "moe_routing", "attention_prefill", "attention_decode")


def summary(errors: np.ndarray) -> dict[str, float]:
    a = np.abs(np.asarray(errors))
    return {"n": int(a.size), "median_abs": float(np.median(a)), "worst_abs": float(a.max())}


def forward_rows(path: Path, judged: bool) -> list[dict[str, Any]]:
    return [r for r in read_json(path)["rows"] if (r["set"] == "judged") == judged]


def step_errors(rows: list[dict[str, Any]], hw: HardwareProfile) -> np.ndarray:
    out = []
    for r in rows:
        cost = CostModel(ModelSpec.from_dict(r["model_spec"]), hw, CostOptions(kernel=r["kernel"]))
        pred = cost.forward_time(r["tokens"], r["context"], r["phase"], np.asarray(r["expert_counts"])).total
        out.append((pred - r["measured_s"]) / r["measured_s"])
    return np.array(out)


def replay_configs(path: Path, judged: bool) -> list[tuple[dict[str, Any], str]]:
    return [(r, p) for r in read_json(path)["replay"] if (r["traffic"] == JUDGED_TRAFFIC) == judged
            for p in ("contiguous", "balanced")]


def replay_errors(configs: list[tuple[dict[str, Any], str]], hw: HardwareProfile) -> np.ndarray:
    """Straggler expert compute summed over layers, predicted vs measured, per configuration."""
    out = []
    for row, placement in configs:
        rep = row[placement]["replay"]
        cost = CostModel(ModelSpec.from_dict(row["model_spec"]), hw, CostOptions(kernel=row["kernel"]))
        pred = cost.device_compute(np.asarray(rep["slot_tokens"], dtype=np.float64)).max(axis=1).sum()
        meas = np.array([[c["median_s"] for c in layer] for layer in rep["times"]]).max(axis=1).sum()
        out.append((pred - meas) / meas)
    return np.array(out)


def config_name(row: dict[str, Any], placement: str) -> str:
    return f"{row['model']} {row['devices']} dev {row['batch']} {row['kernel']} {placement}"


def train_replay(path: Path) -> RunFile:
    run = load_run(path)
    return replace(run, compute=tuple(o for o in run.compute if o.tags["traffic"] != JUDGED_TRAFFIC))


def agreement(a: HardwareProfile, b: HardwareProfile) -> dict[str, Any]:
    """Share of b's measured points whose median lies inside a's [min, max] at the same x, and
    the median / worst relative gap between the two medians."""
    inside, gaps = [], []
    for cb in (c for c in b.curves if c.kind in AGREEMENT_KINDS and c.prov.run in b.runs
               and c.prov.run not in a.runs):
        ca = a.find_curve(cb.kind, **cb.key)
        if ca is None or not ca.y_min:
            continue
        for x, y in zip(cb.x, cb.y):
            if x in ca.x:
                i = ca.x.index(x)
                inside.append(ca.y_min[i] <= y <= ca.y_max[i])
                gaps.append(abs(y - ca.y[i]) / ca.y[i])
    g = np.array(gaps)
    return {"points": len(inside), "inside_spread": float(np.mean(inside)), "median_gap": float(np.median(g)),
            "p90_gap": float(np.quantile(g, 0.9)), "worst_gap": float(g.max())}


def two_pass_agreement(raw: RawProfile) -> dict[str, Any]:
    """Within one profiler run that measured every point twice: share of second-pass medians inside
    the first pass's [min, max], and the gaps between the two medians."""
    first: dict[tuple, Any] = {}
    inside, gaps = [], []
    for m in (m for m in raw.measurements if m.kind in AGREEMENT_KINDS):
        point = (m.kind, tuple(sorted((k, str(v)) for k, v in m.key.items())), m.x)
        if point not in first:
            first[point] = m
            continue
        a = first[point]
        inside.append(a.min <= m.median <= a.max)
        gaps.append(abs(m.median - a.median) / a.median)
    g = np.array(gaps)
    return {"points": len(inside), "inside_spread": float(np.mean(inside)), "median_gap": float(np.median(g)),
            "p90_gap": float(np.quantile(g, 0.9)), "worst_gap": float(g.max())}


def machine_prefixes(spec: str) -> list[str]:
    """File prefixes of ``--machines``: comma-separated prefixes, or single letters of H200 machines."""
    if spec.isalpha():
        return [f"h200{m}" for m in spec]
    return [p for p in spec.split(",") if p]


def existing(prefix: str, *names: str) -> Path:
    """The first of ``prefix + name`` present in bench/results/gpu/ (SystemExit naming them otherwise)."""
    for name in names:
        if (GPU / f"{prefix}{name}").exists():
            return GPU / f"{prefix}{name}"
    raise SystemExit(f"none of {', '.join(prefix + n for n in names)} in {GPU}")


def load_profiles(m: str) -> tuple[HardwareProfile, HardwareProfile | RawProfile]:
    """Machine ``m``'s profile and what its second pass is checked against: the second profiler run
    (machines h200a–c) or the raw two-pass measurements of its one run."""
    profile = existing(m, "-profile.yaml", "-profile-pass1.yaml")
    if profile.name.endswith("-pass1.yaml"):
        return HardwareProfile.load(profile), HardwareProfile.load(existing(m, "-profile-pass2.yaml"))
    return HardwareProfile.load(profile), RawProfile.load(existing(m, "-profile.json.gz", "-profile.json"))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--machines", default="fg", help="file prefixes, comma-separated (h100i,h200j), or H200 "
                                                    "machine letters (fg); the first is fitted on")
    p.add_argument("--out", help="JSON written (default bench/results/calibration-<machines>.json)")
    args = p.parse_args(argv)
    machines = machine_prefixes(args.machines)
    out = args.out or str(Path(__file__).parent / "results" / f"calibration-{'-'.join(machines)}.json")
    loaded = {m: load_profiles(m) for m in machines}
    prof = {m: loaded[m][0] for m in machines}
    prof2 = {m: loaded[m][1] for m in machines}
    fwd = {m: existing(m, "-forward.json") for m in machines}
    rt = {m: existing(m, "-runtime.json", "-runtime.json.gz") for m in machines}
    fit = machines[0]
    base = prof[fit]
    own = {m: calibrate(prof[m], [load_run(fwd[m]), train_replay(rt[m])]) for m in machines}
    cal = own[fit]
    olmoe_only = load_run(fwd[fit])
    olmoe_only = replace(olmoe_only, steps=tuple(s for s in olmoe_only.steps if s.model.name.startswith("OLMoE")))
    cal_all = calibrate(base, [olmoe_only, train_replay(rt[fit])], scope="all")
    res: dict[str, Any] = {"fitted_on": f"machine {fit.upper()}: forward calibration steps + replay traffic "
                                        "zipf1.2, balanced",
                           "corrections": [c.to_dict() for c in cal.corrections]}
    table = []
    for m in machines:
        judged = forward_rows(fwd[m], judged=True)
        qwen = [r for r in judged if r["model"].startswith("Qwen")]
        entry = {"forward_before_own_profile": summary(step_errors(judged, prof[m])),
                 "forward_before": summary(step_errors(judged, base)),
                 "forward_after": summary(step_errors(judged, cal)),
                 "forward_after_own_machine_calibration": summary(step_errors(judged, own[m])),
                 "forward_qwen_before": summary(step_errors(qwen, base)),
                 "forward_qwen_after_scope_all_fit_on_olmoe": summary(step_errors(qwen, cal_all)),
                 "replay_before": summary(replay_errors(replay_configs(rt[m], True), base)),
                 "replay_after": summary(replay_errors(replay_configs(rt[m], True), cal)),
                 "replay_after_own_machine_calibration": summary(replay_errors(replay_configs(rt[m], True), own[m])),
                 "replay_per_cell_after": summary(relative_errors(
                     [o for o in load_run(rt[m]).compute if o.tags["traffic"] == JUDGED_TRAFFIC], cal))}
        configs = replay_configs(rt[m], True)
        entry["replay_configs_after"] = {config_name(r, p): float(e)
                                         for (r, p), e in zip(configs, replay_errors(configs, cal))}
        if m == fit:
            entry["replay_fitted_configs_after"] = summary(replay_errors(replay_configs(rt[m], False), cal))
        res[f"judged_on_{m}"] = entry
        for name, s in entry.items():
            if "n" in s:
                table.append((m.upper(), name, s))
    res["profile_agreement"] = {
        **{f"{m}_pass2_vs_pass1": (two_pass_agreement(prof2[m]) if isinstance(prof2[m], RawProfile)
                                   else agreement(prof[m], prof2[m])) for m in machines},
        **{f"{m}_vs_{fit}": agreement(prof[fit], prof[m]) for m in machines[1:]}}
    write_json(out, res)
    print(f"{'machine':7} {'figure':44} {'n':>4} {'median':>8} {'worst':>8}")
    for m, name, s in table:
        print(f"{m:7} {name:44} {s['n']:4d} {100 * s['median_abs']:7.1f}% {100 * s['worst_abs']:7.1f}%")
    for name, a in res["profile_agreement"].items():
        print(f"{name:20} {a['points']} points: {100 * a['inside_spread']:.0f}% inside the other pass's min–max, "
              f"gap median {100 * a['median_gap']:.1f}% p90 {100 * a['p90_gap']:.1f}% worst {100 * a['worst_gap']:.0f}%")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
