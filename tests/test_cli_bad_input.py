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


@pytest.mark.parametrize("command", ["simulate", "plan placement"])
def test_device_pair_traffic_too_large_for_memory_exits_2(trace: Path, tmp_path: Path, command: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 GPUs pass --gpus (≤ 131,072) but their [devices, devices] traffic arrays need
    hundreds of GiB: refused with the estimate (was a MemoryError, exit 1, or the OOM killer)."""
    import moeplan.errors
    monkeypatch.setattr(moeplan.errors, "available_memory", lambda: 16 * 2**30)
    args = [*command.split(), "--model", MODEL, "--trace", trace, "--gpus", "100000"]
    if command != "simulate":
        args += ["--solver", "even", "-o", tmp_path / "plan.json"]
    _expect_2(args, "GiB of memory, 16.0 GiB are free", tmp_path)


@pytest.mark.parametrize("value", ["inf", "nan", "1e300", "-1"])
def test_plan_cache_budget_must_be_finite_and_positive(trace: Path, tmp_path: Path, value: str) -> None:
    _expect_2(["plan", "cache", "--model", MODEL, "--trace", trace, "--policy", "lru", "--budget-gb", value,
               "-o", tmp_path / "c.json"], "--budget-gb", tmp_path)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_infinite_bandwidth_in_a_profile_is_refused(tmp_path: Path, value: str) -> None:
    text = HardwareProfile.bundled()["h100-sxm"].read_text()
    path = tmp_path / "p.yaml"
    path.write_text(text.replace("hbm_bytes_per_s: {value: 3.35e12", f"hbm_bytes_per_s: {{value: {value}"))
    code, out = run("hardware", path)
    assert code == 2 and "finite" in out and "hbm_bytes_per_s" in out, out


numbers = st.one_of(st.integers(-10**15, 10**15).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.sampled_from(["0", "-1", "1e9", "nan", "inf", "-inf", "x", "", "1.5", "[1]", "1000000000000"]))


def _exit_0_or_2(*args: object) -> None:
    code, out = run(*args)
    assert code in (0, 2), out
    assert "Traceback" not in out and "internal error" not in out, out


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hypothesis-out")


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(option=st.sampled_from(["--gpus", "--nodes", "--tokens-per-device", "--context"]), value=numbers)
def test_hypothesis_simulate_options_exit_0_or_2(trace: Path, option: str, value: str) -> None:
    _exit_0_or_2("simulate", "--model", MODEL, "--trace", trace, option, value)


@FUZZ
@given(option=st.sampled_from(["--gpus", "--nodes", "--slots", "--time-limit", "--gap", "--balance-cap",
                               "--tokens-per-device", "--judge-fraction"]), value=numbers,
       solver=st.sampled_from(["even", "lpt", "round_robin"]))
def test_hypothesis_plan_placement_options_exit_0_or_2(trace: Path, out_dir: Path, option: str, value: str,
                                                       solver: str) -> None:
    gpus = [] if option == "--gpus" else ["--gpus", "8"]
    _exit_0_or_2("plan", "placement", "--model", MODEL, "--trace", trace, "--solver", solver, *gpus, option, value,
                 "-o", out_dir / "plan.json")


@FUZZ
@given(option=st.sampled_from(["--budget-gb", "--batch", "--request-tokens", "--context", "--latency-ms",
                               "--stage-slots", "--fit-fraction", "--max-steps"]), value=numbers,
       policy=st.sampled_from(["lru", "lfu", "prefetch"]))
def test_hypothesis_plan_cache_options_exit_0_or_2(trace: Path, out_dir: Path, option: str, value: str,
                                                   policy: str) -> None:
    _exit_0_or_2("plan", "cache", "--model", MODEL, "--trace", trace, "--policy", policy, option, value,
                 "-o", out_dir / "cache.json")


def _choices(seed: int, tokens: int, layers: int, k: int) -> np.ndarray:
    """[tokens, layers, k] distinct experts of Mixtral's 8 per token and layer."""
    return np.argsort(np.random.default_rng(seed).random((tokens, layers, 8)), axis=-1)[..., :k]


cells = st.one_of(st.integers(-3, 12).map(str), st.sampled_from(["", "x", "1.5", "nan", "1e30", "-0", " 3"]))
csv_headers = st.sampled_from(["token,layer,expert_0,expert_1", "token,layer,expert_0,expert_1,weight_0,weight_1",
                               "token,layer,expert_0", "layer,token,expert_1,expert_0", "token,expert_0,expert_1",
                               "token,layer,expert_0,expert_0", ""])


@FUZZ
@given(header=csv_headers, tokens=st.integers(0, 6), layers=st.sampled_from([32, 31, 1]), seed=st.integers(0, 99),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 5), cells), max_size=3),
       extra=st.lists(st.lists(cells, max_size=7), max_size=3))
def test_hypothesis_trace_import_csv_exit_0_or_2(out_dir: Path, header: str, tokens: int, layers: int, seed: int,
                                                 edits: list[tuple[int, int, str]], extra: list[list[str]]) -> None:
    """Rows of a well-formed Mixtral routing table (token, layer, two experts, two weights), then a
    few cells edited to odd values and odd rows appended."""
    ids = _choices(seed, tokens, layers, 2)
    rows = [[str(t), str(layer), *map(str, ids[t, layer]), "0.6", "0.4"] for t in range(tokens) for layer in range(layers)]
    for row_at, col, cell in edits:
        if rows:
            row = rows[row_at % len(rows)]
            row[col % len(row)] = cell
    width = len(header.split(",")) if header else 0
    lines = [header, *(",".join(r[:width]) for r in rows), *(",".join(r) for r in extra)]
    src = out_dir / "routing.csv"
    src.write_text("\n".join(lines) + "\n")
    _exit_0_or_2("trace", "import", src, "--model", MODEL, "-o", out_dir / "imported.npz")


@FUZZ
@given(tokens=st.integers(0, 20), layers=st.sampled_from([32, 31, 1, 0]), k=st.sampled_from([2, 1, 3]),
       seed=st.integers(0, 99), dtype=st.sampled_from(["int64", "int16", "uint8", "float32", "float64", "bool", "U2"]),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from([-1, 8, 2**15 - 1, 0, 7])), max_size=3),
       gates=st.sampled_from(["none", "same", "wrong_shape", "nan"]),
       layer_ids=st.sampled_from(["none", "all", "reversed", "short", "negative"]))
def test_hypothesis_trace_import_npz_exit_0_or_2(out_dir: Path, tokens: int, layers: int, k: int, seed: int, dtype: str,
                                                 edits: list[tuple[int, int]], gates: str, layer_ids: str) -> None:
    """A plain NPZ of Mixtral routing (expert_ids, gate_weights, layer_ids), valid or edited: other
    shapes, dtypes, out-of-range ids, gates of the wrong shape or NaN, layer ids short or negative."""
    ids = _choices(seed, tokens, layers, min(k, 8)).astype(np.int64)
    flat = ids.reshape(-1)
    for at, value in edits:
        if flat.size:
            flat[at % flat.size] = value
    arrays = {"expert_ids": ids.astype(dtype)}
    if gates != "none":
        shape = ids.shape if gates != "wrong_shape" else (tokens + 1, layers, k)
        arrays["gate_weights"] = np.full(shape, np.nan if gates == "nan" else 1.0 / k, dtype=np.float32)
    if layer_ids != "none":
        arrays["layer_ids"] = {"all": np.arange(layers), "reversed": np.arange(layers)[::-1],
                               "short": np.arange(max(layers - 1, 0)), "negative": np.arange(layers) - 1}[layer_ids]
    src = out_dir / "routing.npz"
    np.savez(src, **arrays)
    _exit_0_or_2("trace", "import", src, "--model", MODEL, "-o", out_dir / "imported.npz")


@FUZZ
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
