"""Bad command-line input, as a new user types it: every probe exits 2 with one line naming the
option, file or field, never a traceback or an internal error; nothing is written on refusal.
A hypothesis suite drives the CLI itself with such arguments."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.hardware import HardwareProfile

MODEL = "mixtral-8x7b"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "t.npz"
    code, out = run("trace", "synth", "--model", MODEL, "--tokens", "400", "-o", path)
    assert code == 0, out
    return path


def _expect_2(args: list[object], names: str, tmp_path: Path) -> None:
    before = sorted(tmp_path.rglob("*"))
    code, out = run(*args)
    assert code == 2, out
    assert names in out, out
    assert "Traceback" not in out and "internal error" not in out
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("extra, names", [
    (["--gpus", "0"], "--gpus"), (["--tokens-per-device", "0"], "--tokens-per-device"),
    (["--nodes", "-1"], "--nodes"), (["--gpus", "1000000000000"], "--gpus"),
])
def test_simulate_refuses_a_zero_it_would_have_replaced(trace: Path, tmp_path: Path, extra: list[str],
                                                        names: str) -> None:
    _expect_2(["simulate", "--model", MODEL, "--trace", trace, *extra], names, tmp_path)


@pytest.mark.parametrize("extra, names", [
    (["--tokens-per-device", "0"], "--tokens-per-device"), (["--balance-cap", "-3"], "--balance-cap"),
    (["--balance-cap", "0.5"], "--balance-cap"), (["--time-limit", "0"], "--time-limit"),
    (["--gap", "nan"], "--gap"), (["--slots", "0"], "--slots"),
])
def test_plan_placement_checks_options_before_solving(trace: Path, tmp_path: Path, extra: list[str],
                                                      names: str) -> None:
    _expect_2(["plan", "placement", "--model", MODEL, "--trace", trace, "--solver", "eplb", *extra,
               "-o", tmp_path / "plan.json"], names, tmp_path)


def test_plan_end_to_end_refuses_one_token_and_unknown_export(tmp_path: Path) -> None:
    _expect_2(["plan", "--model", MODEL, "--gpus", "8", "--tokens", "1", "--out", tmp_path / "o"], "--tokens",
              tmp_path)
    _expect_2(["plan", "--model", MODEL, "--gpus", "8", "--export", "foo", "--out", tmp_path / "o"], "export",
              tmp_path)


@pytest.mark.parametrize("case", ["folder", "under_file", "proc", "brackets_missing"])
def test_output_path_mistakes_exit_2_naming_the_path(tmp_path: Path, case: str) -> None:
    (tmp_path / "file").write_text("x")
    target = {"folder": tmp_path, "under_file": tmp_path / "file" / "t.npz", "proc": Path("/proc/moeplan/t.npz"),
              "brackets_missing": tmp_path / "run[" / "x]" / "t.npz"}[case]
    code, out = run("trace", "synth", "--model", MODEL, "--tokens", "50", "-o", target)
    if case == "brackets_missing":  # a missing folder is created; the odd name is printed as typed
        assert code == 0, out
        assert str(target) in out
        return
    assert code == 2, out
    assert str(target) in out and "Traceback" not in out


def test_messages_keep_square_brackets(tmp_path: Path) -> None:
    bad = tmp_path / "run[1].npz"
    bad.write_bytes(b"not an archive")
    code, out = run("trace", "stats", bad)
    assert code == 2 and "run[1].npz" in out, out
    np.savez(tmp_path / "obj.npz", expert_ids=np.array([{"a": 1}], dtype=object))
    code, out = run("trace", "stats", tmp_path / "obj.npz")
    assert code == 2 and "pickled Python objects" in out and "allow_pickle" not in out, out


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_infinite_bandwidth_in_a_profile_is_refused(tmp_path: Path, value: str) -> None:
    text = HardwareProfile.bundled()["h100-sxm"].read_text()
    path = tmp_path / "p.yaml"
    path.write_text(text.replace("hbm_bytes_per_s: {value: 3.35e12", f"hbm_bytes_per_s: {{value: {value}"))
    code, out = run("hardware", path)
    assert code == 2 and "finite" in out and "hbm_bytes_per_s" in out, out


numbers = st.one_of(st.integers(-10**15, 10**15).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.sampled_from(["0", "-1", "1e9", "nan", "inf", "-inf", "x", "", "1.5", "[1]", "1000000000000"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(["--gpus", "--nodes", "--tokens-per-device", "--context"]), value=numbers)
def test_hypothesis_simulate_options_exit_0_or_2(trace: Path, option: str, value: str) -> None:
    code, out = run("simulate", "--model", MODEL, "--trace", trace, option, value)
    assert code in (0, 2), out
    assert "Traceback" not in out and "internal error" not in out, out


@settings(max_examples=40, deadline=None)
@given(option=st.sampled_from(["--zipf", "--affinity", "--locality", "--segment", "--seed", "--tokens"]),
       value=numbers)
def test_hypothesis_trace_synth_options_exit_0_or_2(option: str, value: str) -> None:
    if option == "--tokens":  # small enough to run, or so large the memory check must refuse it
        try:
            n = float(value)
            if 400 < n < 10**11:
                value = "400"
        except ValueError:
            pass
    args = ["trace", "synth", "--model", MODEL, "-o", "/tmp/moeplan-hypothesis-t.npz"]
    if option != "--tokens":
        args += ["--tokens", "200"]
    code, out = run(*args, option, value)
    assert code in (0, 2), out
    assert "Traceback" not in out and "internal error" not in out, out
