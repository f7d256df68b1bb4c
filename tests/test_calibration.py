"""moeplan calibrate: corrections fitted from runtime measurements, stored with provenance,
applied by the cost model, and judged on observations they were not fitted on."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from moeplan.calibration import (ComputeObservation, StepObservation, calibrate, fit_compute, fit_steps, load_run,
                                 predictions, relative_errors)
from moeplan.cli import app
from moeplan.cost import CostModel, CostOptions
from moeplan.errors import InputError
from moeplan.hardware import Correction, ExpertTerms, HardwareProfile, Provenance, merge_profiles
from moeplan.model import ModelSpec

RUN = "calibration-test"
PROV = Provenance("measured", "test", RUN)


def hw() -> HardwareProfile:
    base = HardwareProfile.resolve("h100-sxm")
    return replace(base, runs={**base.runs, RUN: {"tool": "test"}})


def model() -> ModelSpec:
    return ModelSpec.preset("olmoe-1b-7b")


def steps(m: ModelSpec, phase: str, shapes: list[tuple[int, int]], truth: HardwareProfile | None = None,
          scale: float = 1.0, offset: float = 0.0) -> list[StepObservation]:
    """Steps whose 'measured' time is scale × the uncorrected prediction + offset per layer."""
    rng = np.random.default_rng(0)
    out = []
    for tokens, context in shapes:
        counts = rng.multinomial(tokens * m.top_k, np.ones(m.num_experts) / m.num_experts, size=m.num_moe_layers)
        obs = StepObservation(m, phase, tokens, context, "grouped", tuple(map(tuple, counts.tolist())), 1.0)
        pred = float(predictions([obs], truth or hw())[0])
        out.append(replace(obs, measured_s=scale * pred + offset * m.num_layers))
    return out


def test_step_correction_recovers_scale_and_offset_and_judges_unseen_steps() -> None:
    m = model()
    fit = steps(m, "decode", [(16, 512), (48, 1536), (96, 512), (192, 1024)], scale=0.7, offset=4e-4)
    (corr,) = fit_steps(fit, hw(), PROV)
    assert corr.key == {"model": m.name, "phase": "decode"}
    assert corr.scale == pytest.approx(0.7, rel=1e-6) and corr.offset_per_layer_s == pytest.approx(4e-4, rel=1e-6)
    calibrated = replace(hw(), corrections=(corr,))
    judged = steps(m, "decode", [(32, 1024), (64, 2048), (128, 1024)], scale=0.7, offset=4e-4)
    assert np.abs(relative_errors(judged, hw())).min() > 0.1            # uncorrected: far off
    assert np.abs(relative_errors(judged, calibrated)).max() < 1e-6      # corrected: exact on unseen steps
    step = CostModel(m, calibrated).forward_time(32, 1024, "decode", np.asarray(judged[0].expert_counts))
    assert step.overheads != 0 and step.total == pytest.approx(judged[0].measured_s)
    # prefill has no correction: untouched
    assert CostModel(m, calibrated).forward_time(512, 512, "prefill", np.asarray(judged[0].expert_counts)).overheads == 0


def test_one_step_gives_a_ratio_and_scope_all_fits_every_model() -> None:
    m = model()
    (corr,) = fit_steps(steps(m, "prefill", [(1024, 1024)], scale=1.3), hw(), PROV)
    assert corr.scale == pytest.approx(1.3) and corr.offset_per_layer_s == 0.0
    (every,) = fit_steps(steps(m, "prefill", [(1024, 1024), (4096, 4096)], scale=1.3), hw(), PROV, scope="all")
    assert every.key == {"model": "*", "phase": "prefill"}
    other = ModelSpec.preset("qwen1.5-moe-a2.7b")
    assert CostModel(other, replace(hw(), corrections=(every,))).step_correction("prefill") is every
    with pytest.raises(InputError):
        fit_steps([], hw(), PROV, scope="layer")


def compute_obs(m: ModelSpec, kernel: str, loads: list[list[int]], truth: ExpertTerms) -> list[ComputeObservation]:
    """Devices whose 'measured' expert time is ``truth`` applied to the uncorrected prediction."""
    cost = CostModel(m, hw(), CostOptions(kernel=kernel))
    out = []
    for load in loads:
        slots = np.array(load, dtype=float)[None, :]
        measured = float(truth.apply(cost.device_compute(slots), slots)[0])
        out.append(ComputeObservation(m, kernel, tuple(load), measured))
    return out


def test_compute_correction_recovers_passes_slots_and_scale_and_judges_unseen_loads() -> None:
    m = model()
    truth = ExpertTerms(0.8, 20e-6, 5e-6, 30e-6)
    fitted = [[rows] * active + [0] * (8 - active) for rows in (3, 100, 128, 129, 700, 4096) for active in (1, 4, 8)]
    (corr,) = fit_compute(compute_obs(m, "grouped", fitted, truth), hw(), PROV)
    assert corr.key == {"hidden": m.hidden_size, "ffn": m.expert_ffn, "kernel": "grouped"}
    got = corr.terms
    assert (got.scale, got.per_pass_s, got.per_slot_s, got.fixed_s) == pytest.approx(
        (0.8, 20e-6, 5e-6, 30e-6), rel=1e-6) and corr.residual < 1e-9
    judged = compute_obs(m, "grouped", [[5000, 1, 0, 0, 300, 0, 0, 2], [129, 128, 127, 0, 0, 0, 0, 0]], truth)
    assert np.abs(relative_errors(judged, hw())).min() > 0.05            # uncorrected: off
    assert np.abs(relative_errors(judged, replace(hw(), corrections=(corr,)))).max() < 1e-9
    calibrated = CostModel(m, replace(hw(), corrections=(corr,)), CostOptions(kernel="grouped"))
    one, two = calibrated.device_compute(np.array([[128.0] + [0] * 7, [129.0] + [0] * 7]))
    raw_one, raw_two = CostModel(m, hw(), CostOptions(kernel="grouped")).device_compute(
        np.array([[128.0] + [0] * 7, [129.0] + [0] * 7]))
    assert two - one == pytest.approx(20e-6 + 0.8 * (raw_two - raw_one))   # the 129th token opens a second pass
    assert calibrated.device_compute(np.zeros((1, 8)))[0] == 0.0            # an idle device stays idle
    slots = np.array([[4, 4, 4, 4, 0, 0, 0, 0]], dtype=float)
    assert CostModel(m, replace(hw(), corrections=(corr,)), CostOptions(kernel="loop")).device_compute(slots)[0] == \
        pytest.approx(CostModel(m, hw(), CostOptions(kernel="loop")).device_compute(slots)[0])   # other kernel


def test_coefficients_stay_nonnegative() -> None:
    m = model()
    # measured is a constant: no negative scale may trade against a positive per-pass cost
    obs = [replace(o, measured_s=1e-4) for o in compute_obs(m, "loop", [[n] * 4 + [0] * 4 for n in (1, 64, 512, 4096)],
                                                              ExpertTerms(1.0, 0.0, 0.0, 0.0))]
    (corr,) = fit_compute(obs, hw(), PROV)
    t = corr.terms
    assert min(t.scale, t.per_pass_s, t.per_slot_s, t.fixed_s) >= 0.0
    assert corr.residual < 0.5


def test_profiles_with_the_binned_form_are_still_read_and_applied(tmp_path: Path) -> None:
    m = model()
    legacy = Correction("expert_compute", {"hidden": m.hidden_size, "ffn": m.expert_ffn, "kernel": "grouped"}, PROV,
                        8, 0.0, x=(4.0, 5000.0), factor=(2.0, 0.8))
    data = replace(hw(), corrections=(legacy,)).to_dict()
    assert "terms" not in data["corrections"][0] and data["corrections"][0]["factor"] == [2.0, 0.8]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(data))
    back = HardwareProfile.load(tmp_path / "old.yaml")
    assert back.corrections == (legacy,)
    slots = np.array([[4, 4, 4, 4, 0, 0, 0, 0]], dtype=float)
    base = CostModel(m, hw(), CostOptions(kernel="grouped")).device_compute(slots)[0]
    assert CostModel(m, back, CostOptions(kernel="grouped")).device_compute(slots)[0] == pytest.approx(2.0 * base)


def forward_file(tmp: Path, rows: list[StepObservation], judged: list[StepObservation]) -> Path:
    def row(o: StepObservation, which: str) -> dict:
        return {"set": which, "model": o.model.name, "model_spec": o.model.to_dict(), "phase": o.phase,
                "batch": 1, "tokens": o.tokens, "context": o.context, "kernel": o.kernel,
                "expert_counts": [list(c) for c in o.expert_counts], "measured_s": o.measured_s}
    path = tmp / "forward.json"
    path.write_text(json.dumps({"kind": "forward_step", "gpu": "test GPU",
                                "rows": [row(o, "calibration") for o in rows] + [row(o, "judged") for o in judged]}))
    return path


def test_calibrate_keeps_provenance_round_trips_and_holds_judged_rows_out(tmp_path: Path) -> None:
    m = model()
    fit = steps(m, "decode", [(16, 512), (96, 512)], scale=0.8, offset=3e-4)
    judged = steps(m, "decode", [(64, 2048)], scale=5.0)             # would spoil the fit if used
    run = load_run(forward_file(tmp_path, fit, judged))
    assert len(run.steps) == 2 and run.held_out == 1 and run.gpu == "test GPU"
    out = calibrate(hw(), [run])
    (corr,) = out.corrections
    assert corr.scale == pytest.approx(0.8, rel=1e-6)
    record = out.runs[corr.prov.run]
    assert record["tool"] == "moeplan calibrate" and record["inputs"][0]["held_out_rows"] == 1
    assert record["inputs"][0]["sha256"]
    out.save(tmp_path / "cal.yaml")
    back = HardwareProfile.load(tmp_path / "cal.yaml")
    assert back.corrections == out.corrections and back.digest() == out.digest()
    assert merge_profiles(back, hw()).corrections == ()                # a new measurement drops stale fits


def test_bad_corrections_and_files_are_refused(tmp_path: Path) -> None:
    out = calibrate(hw(), [load_run(forward_file(tmp_path, steps(model(), "decode", [(16, 512)]), []))])
    data = out.to_dict()
    data["corrections"][0]["run"] = "nowhere"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="corrections"):
        HardwareProfile.load(tmp_path / "bad.yaml")
    data["corrections"] = [Correction("expert_compute", {"hidden": 1}, PROV, 1, 0.0, x=(2.0, 1.0),
                                      factor=(1.0, 1.0)).to_dict()]
    data["runs"][RUN] = {"tool": "test"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="increasing"):
        HardwareProfile.load(tmp_path / "bad.yaml")
    data["corrections"] = [Correction("expert_compute", {"hidden": 1}, PROV, 1, 0.0,
                                      terms=ExpertTerms(1.0, 0.0, 0.0, 0.0)).to_dict()]
    data["corrections"][0]["terms"]["per_pass_s"] = -1e-6
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="per_pass_s"):
        HardwareProfile.load(tmp_path / "bad.yaml")
    data["corrections"][0]["terms"].update(scale=0.0, per_pass_s=0.0)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="terms"):
        HardwareProfile.load(tmp_path / "bad.yaml")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(InputError, match="not a measurement file"):
        load_run(tmp_path / "other.json")


def test_cli_calibrate_writes_the_profile_and_exits_2_on_bad_input(tmp_path: Path) -> None:
    fwd = forward_file(tmp_path, steps(model(), "decode", [(16, 512), (96, 512)], scale=0.8), [])
    out = tmp_path / "cal.yaml"
    result = CliRunner().invoke(app, ["calibrate", str(fwd), "--profile", "h100-sxm", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "forward_step" in result.output and HardwareProfile.load(out).corrections
    result = CliRunner().invoke(app, ["calibrate", str(tmp_path / "missing.json"), "--profile", "h100-sxm",
                                      "-o", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2 and "missing.json" in result.output and not (tmp_path / "x.yaml").exists()
    result = CliRunner().invoke(app, ["calibrate", str(fwd), "--profile", "h100-sxm", "-o", str(out),
                                      "--scope", "layer"])
    assert result.exit_code == 2 and "scope" in result.output


def test_profile_says_how_many_measured_points_are_noisy() -> None:
    from moeplan.hardware import NOISY_SPREAD, Curve
    steady = Curve("expert_ffn", {"hidden": 8}, (1.0, 2.0), (1.0, 2.0), PROV, (0.95, 1.9), (9.0, 9.0))
    noisy = Curve("expert_ffn", {"hidden": 9}, (1.0, 2.0), (1.0, 2.0), PROV, (0.5, 1.9), (1.1, 2.1))
    assert steady.spread() == pytest.approx((0.05, 0.05))        # a slow outlier repeat (max) is not noise
    assert noisy.spread()[0] > NOISY_SPREAD
    profile = replace(hw(), curves=(steady, noisy))
    assert profile.noisy_points() == (1, 4)
    assert "1 of 4 measured points" in profile.provenance_note()
    assert "calibrated" in replace(profile, corrections=fit_steps(steps(model(), "decode", [(16, 512)]), hw(),
                                                                  PROV)).provenance_note()
