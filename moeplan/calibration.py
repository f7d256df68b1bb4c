"""Calibration: fold runtime measurements back into a hardware profile as measured corrections.

The profiler measures kernels one at a time; the runtime runs them in sequence, with its own
host work between them. ``moeplan calibrate`` closes the loop (DESIGN's "measurements →
calibration of the cost model" arrow): it reads what the runtime measured, prices the very same
work with the profile's :class:`~moeplan.cost.CostModel`, and stores what it missed as
:class:`~moeplan.hardware.Correction` figures with provenance (a ``runs`` entry naming every
input file and the GPU it was measured on). Predictions from the calibrated profile apply them.

Observations it reads (every field typed here, nothing parsed by its consumers):

* :class:`ComputeObservation` — one device of one MoE layer of a per-device replay: tokens per
  slot [slots] and measured seconds of the expert kernel. From ``moeplan run --replay -o``
  reports and the ``replay`` rows of ``bench/gpu_runtime.py``. Fitted into an
  ``expert_compute`` correction per (hidden, ffn, kernel): measured ≈ a · predicted + b · weight
  passes + c · active slots + d (:class:`~moeplan.hardware.ExpertTerms`), every coefficient ≥ 0,
  least squares on relative error. The replays showed why (bench/RESULTS.md, issue 26): the
  grouped kernel's time steps with 128-row tiles per expert (Mixtral's expert: ~157 µs up to 128
  tokens, ~280 µs from 129 to 256), the loop kernel pays a per-expert launch cost the profile's
  single-expert points price at another floor, and one factor per tokens-per-slot bin follows
  neither.
* :class:`StepObservation` — one whole forward step on one device: phase, tokens, context, the
  expert token counts per MoE layer and measured seconds. From ``bench/gpu_forward.py``
  (``"kind": "forward_step"``); rows marked ``"set": "judged"`` are held out and never fitted.
  Fitted into a ``forward_step`` correction per (model, phase), or per phase for every model
  (``scope="all"``): measured ≈ scale · predicted + offset per layer · layers, weighted least
  squares on relative error (a ratio alone when one step is all there is).

Expert corrections are fitted first; steps are then priced with them, so the step correction
only takes what the expert correction left. Units: seconds, tokens.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moeplan.cost import CostModel, CostOptions
from moeplan.errors import InputError
from moeplan.hardware import Correction, ExpertTerms, HardwareProfile, Provenance
from moeplan.io import Fields, guarded_load, read_json
from moeplan.model import ModelSpec

SCOPES = ("model", "all")


@dataclass(frozen=True)
class ComputeObservation:
    """One device of one MoE layer: ``slot_tokens`` [slots] token-choices per local slot, the
    expert kernel's measured median ``measured_s`` (seconds); ``tags`` say where it came from."""

    model: ModelSpec
    kernel: str
    slot_tokens: tuple[int, ...]
    measured_s: float
    tags: dict[str, Any] = field(default_factory=dict)

    def predicted_s(self, cost: CostModel) -> float:
        """The prediction of ``cost`` (this observation's model and kernel) for this device."""
        return float(cost.device_compute(np.asarray(self.slot_tokens, dtype=np.float64)[None, :])[0])


@dataclass(frozen=True)
class StepObservation:
    """One forward step on one device holding every expert: ``tokens`` new tokens attending to
    ``context``; ``expert_counts`` [moe layers][experts] token-choices; measured median seconds."""

    model: ModelSpec
    phase: str
    tokens: int
    context: int
    kernel: str
    expert_counts: tuple[tuple[int, ...], ...]
    measured_s: float
    tags: dict[str, Any] = field(default_factory=dict)

    def predicted_s(self, cost: CostModel) -> float:
        """The prediction of ``cost`` (this observation's model and kernel) for this step."""
        return cost.forward_time(self.tokens, self.context, self.phase, np.asarray(self.expert_counts)).total


@dataclass(frozen=True)
class RunFile:
    """The observations of one input file, with what the provenance record keeps of it."""

    path: str
    digest: str
    gpu: str
    compute: tuple[ComputeObservation, ...]
    steps: tuple[StepObservation, ...]
    held_out: int

    def record(self) -> dict[str, Any]:
        return {"file": self.path, "sha256": self.digest, "gpu": self.gpu, "compute_observations": len(self.compute),
                "step_observations": len(self.steps), "held_out_rows": self.held_out}


def load_run(path: str | Path) -> RunFile:
    """Read one measurement file: a ``moeplan run --replay`` report, ``bench/gpu_runtime.py``
    output or ``bench/gpu_forward.py`` output (InputError naming the file otherwise)."""
    source = str(path)
    raw = Path(path).read_bytes()
    data = read_json(path)
    return guarded_load(lambda: _parse_run(data, source, hashlib.sha256(raw).hexdigest()[:16]), source)


def _parse_run(data: Any, source: str, digest: str) -> RunFile:
    f = Fields(data, source)
    if f.has("replay") and isinstance(f.raw("replay"), list):            # bench/gpu_runtime.py
        gpu = Fields(f.raw("env", {}), source, "env.").str("device_name", "unknown")
        compute = []
        for i, row in enumerate(f.list("replay")):
            r = Fields(row, source, f"replay[{i}].")
            model = ModelSpec.from_dict(r.raw("model_spec"), source=f"{source}: replay[{i}].model_spec")
            tags = {"traffic": r.str("traffic"), "devices": r.int("devices"), "batch": r.str("batch")}
            for placement in ("contiguous", "balanced"):
                rep = r.sub(placement).sub("replay")
                compute += _replay_cells(model, r.str("kernel"), rep.raw("slot_tokens"), rep.raw("times"),
                                         {**tags, "placement": placement}, source)
        return RunFile(source, digest, gpu, tuple(compute), (), 0)
    if f.has("mode"):                                                    # moeplan run --replay -o
        if f.str("mode") != "replay":
            raise f.fail("mode", "only per-device replay reports (moeplan run --replay -o) hold per-device "
                                 "expert times", "run moeplan run --replay -o FILE")
        model = ModelSpec.from_dict(f.raw("model_spec"), source=f"{source}: model_spec")
        per_device = f.list("per_device")
        times = [[{"median_s": Fields(c, source, "per_device.").sub("measured").float("median_s")} for c in layer]
                 for layer in per_device]
        cells = _replay_cells(model, f.str("kernel"), f.raw("slot_tokens"), times, {"placement": "plan"}, source)
        return RunFile(source, digest, f.str("device_name", "unknown"), tuple(cells), (), 0)
    if f.str("kind", "") == "forward_step":                              # bench/gpu_forward.py
        steps, held = [], 0
        for i, row in enumerate(f.list("rows")):
            r = Fields(row, source, f"rows[{i}].")
            if r.str("set", "calibration") == "judged":
                held += 1
                continue
            model = ModelSpec.from_dict(r.raw("model_spec"), source=f"{source}: rows[{i}].model_spec")
            counts = tuple(tuple(int(c) for c in layer) for layer in r.list("expert_counts"))
            steps.append(StepObservation(model, r.str("phase", choices=("prefill", "decode")), r.int("tokens", minimum=1),
                                         r.int("context", minimum=1), r.str("kernel", "grouped"), counts,
                                         r.float("measured_s", positive=True), {"batch": r.int("batch")}))
        return RunFile(source, digest, f.str("gpu", "unknown"), (), tuple(steps), held)
    raise InputError("not a measurement file moeplan calibrate reads", source=source, field="(top level)",
                     fix="give moeplan run --replay -o reports, bench/gpu_runtime.py or bench/gpu_forward.py output")


def _replay_cells(model: ModelSpec, kernel: str, slot_tokens: Any, times: Any, tags: dict[str, Any],
                  source: str) -> list[ComputeObservation]:
    """Per (layer, device) observations of a replay: slot_tokens [layers, devices, slots] and
    times[layer][device] {median_s}; devices with no tokens are left out."""
    counts = np.asarray(slot_tokens, dtype=np.int64)
    if counts.ndim != 3 or len(times) != counts.shape[0]:
        raise InputError(f"slot_tokens must be [layers, devices, slots] matching times, got shape {counts.shape}",
                         source=source, field="slot_tokens")
    out = []
    for layer in range(counts.shape[0]):
        for d in range(counts.shape[1]):
            if counts[layer, d].sum() > 0:
                out.append(ComputeObservation(model, kernel, tuple(int(c) for c in counts[layer, d]),
                                              float(times[layer][d]["median_s"]), tags))
    return out


# ---- fitting ------------------------------------------------------------------------------------
def fit_compute(observations: Sequence[ComputeObservation], hw: HardwareProfile,
                prov: Provenance) -> list[Correction]:
    """One ``expert_compute`` correction per (hidden, ffn, kernel) present (see the module docstring)."""
    groups: dict[tuple[int, int, str], list[ComputeObservation]] = {}
    for o in observations:
        groups.setdefault((o.model.hidden_size, o.model.expert_ffn, o.kernel), []).append(o)
    out = []
    for (hidden, ffn, kernel), obs in groups.items():
        measured = np.array([o.measured_s for o in obs])
        slots = np.zeros((len(obs), max(len(o.slot_tokens) for o in obs)))
        for i, o in enumerate(obs):
            slots[i, :len(o.slot_tokens)] = o.slot_tokens
        predicted = predictions(obs, hw)
        a = ExpertTerms.features(predicted, slots) / measured[:, None]
        terms = ExpertTerms(*(float(c) for c in _nonnegative_lstsq(a, np.ones_like(measured))))
        resid = np.abs(terms.apply(predicted, slots) / measured - 1.0)
        out.append(Correction("expert_compute", {"hidden": hidden, "ffn": ffn, "kernel": kernel}, prov, len(obs),
                              float(np.median(resid)), terms=terms))
    return out


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ‖a·c − b‖ over c ≥ 0 for a [rows, k] with few columns: the best unconstrained fit on
    every subset of columns whose coefficients are all ≥ 0 (exact; 2^k small solves)."""
    k = a.shape[1]
    best, best_err = np.zeros(k), float(np.sum(b ** 2))
    for mask in range(1, 2 ** k):
        cols = [j for j in range(k) if mask >> j & 1]
        c, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        err = float(np.sum((a[:, cols] @ c - b) ** 2))
        if (c >= 0).all() and err < best_err:
            best, best_err = np.zeros(k), err
            best[cols] = c
    return best


def fit_steps(observations: Sequence[StepObservation], hw: HardwareProfile, prov: Provenance,
              scope: str = "model") -> list[Correction]:
    """One ``forward_step`` correction per (model, phase), or per phase with model "*" when
    ``scope`` is "all" (see the module docstring)."""
    if scope not in SCOPES:
        raise InputError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}", field="scope")
    groups: dict[tuple[str, str], list[StepObservation]] = {}
    for o in observations:
        groups.setdefault((o.model.name if scope == "model" else "*", o.phase), []).append(o)
    out = []
    for (model, phase), obs in groups.items():
        measured = np.array([o.measured_s for o in obs])
        predicted = predictions(obs, hw)
        layers = np.array([float(o.model.num_layers) for o in obs])
        scale, offset = _affine(predicted, layers, measured)
        corrected = np.maximum(scale * predicted + offset * layers, 0.0)
        out.append(Correction("forward_step", {"model": model, "phase": phase}, prov, len(obs),
                              float(np.median(np.abs(corrected - measured) / measured)), scale=scale,
                              offset_per_layer_s=offset))
    return out


def _affine(predicted: np.ndarray, layers: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """(scale, offset per layer) minimising the squared relative error of scale·p + offset·L;
    the median ratio with no offset when fewer than two distinct predictions exist or the fit
    would give a scale ≤ 0."""
    ratio_only = (float(np.median(measured / predicted)), 0.0)
    if len(np.unique(np.round(predicted, 12))) < 2:
        return ratio_only
    a = np.stack([predicted / measured, layers / measured], axis=1)
    (scale, offset), *_ = np.linalg.lstsq(a, np.ones_like(measured), rcond=None)
    return (float(scale), float(offset)) if scale > 0 else ratio_only


def calibrate(hw: HardwareProfile, runs: Sequence[RunFile], scope: str = "model",
              when: datetime.datetime | None = None) -> HardwareProfile:
    """``hw`` with corrections fitted on ``runs`` (any corrections it had are replaced: each fit
    starts from the uncorrected profile) and a ``runs`` entry recording the inputs."""
    compute = [o for r in runs for o in r.compute]
    steps = [o for r in runs for o in r.steps]
    if not compute and not steps:
        raise InputError("the measurement files hold nothing to fit", source=", ".join(r.path for r in runs),
                         field="rows", fix="give per-device replay or forward-step measurements")
    when = when or datetime.datetime.now(datetime.timezone.utc)
    run_id = f"calibration-{when:%Y%m%dT%H%M%SZ}"
    prov = Provenance("measured", f"moeplan calibrate on {len(compute)} per-device replay and {len(steps)} "
                                  f"forward-step observations from {len(runs)} file(s)", run_id)
    base = replace(hw, corrections=())
    record = {"date": when.isoformat(timespec="seconds"), "tool": "moeplan calibrate", "scope": scope,
              "inputs": [r.record() for r in runs], "gpus": sorted({r.gpu for r in runs})}
    base = replace(base, runs={**hw.runs, run_id: record})
    with_compute = replace(base, corrections=tuple(fit_compute(compute, base, prov)))
    return replace(with_compute, corrections=with_compute.corrections
                   + tuple(fit_steps(steps, with_compute, prov, scope))).validate()


def predictions(observations: Sequence[ComputeObservation | StepObservation], hw: HardwareProfile) -> np.ndarray:
    """Seconds ``hw`` predicts for each observation (one cost model per model and kernel)."""
    costs: dict[tuple[str, str], CostModel] = {}
    out = []
    for o in observations:
        key = (json.dumps(o.model.to_dict(), sort_keys=True), o.kernel)
        if key not in costs:
            costs[key] = CostModel(o.model, hw, CostOptions(kernel=o.kernel))
        out.append(o.predicted_s(costs[key]))
    return np.array(out)


def relative_errors(observations: Sequence[ComputeObservation | StepObservation], hw: HardwareProfile) -> np.ndarray:
    """(predicted − measured) / measured of each observation under ``hw``."""
    return predictions(observations, hw) / np.array([o.measured_s for o in observations]) - 1.0
