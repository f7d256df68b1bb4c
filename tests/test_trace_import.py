"""moeplan trace import: plain NPZ arrays, SGLang per-token recorder dumps of several ranks, CSV and
Parquet become traces of the model's MoE layers; bad files exit 2 naming the file and field."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.errors import InputError
from moeplan.model import ModelSpec
from moeplan.trace import RoutingTrace
from moeplan.trace_import import import_trace

MODEL = "qwen3-30b-a3b"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _choices(rng: np.random.Generator, tokens: int, layers: int, experts: int, k: int) -> np.ndarray:
    return np.argsort(rng.random((tokens, layers, experts)), axis=2)[:, :, :k]


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.preset(MODEL)


def test_plain_npz_imports_and_plans(tmp_path: Path, spec: ModelSpec) -> None:
    rng = np.random.default_rng(0)
    ids = _choices(rng, 600, spec.num_moe_layers, spec.num_experts, spec.top_k).astype(np.int32)
    gates = rng.random(ids.shape).astype(np.float32)
    np.savez(tmp_path / "raw.npz", expert_ids=ids, gate_weights=gates)
    out = tmp_path / "trace.npz"
    code, text = run("trace", "import", str(tmp_path / "raw.npz"), "--model", MODEL, "-o", str(out))
    assert code == 0, text
    trace = RoutingTrace.load(out)
    assert np.array_equal(trace.expert_ids, ids) and trace.provenance["source"] == "imported"
    assert np.allclose(trace.gate_weights, gates, atol=1e-3)
    plan = tmp_path / "plan.json"
    code, text = run("plan", "placement", "--model", MODEL, "--trace", str(out), "--solver", "eplb",
                     "--gpus", "8", "-o", str(plan))
    assert code == 0, text
    assert plan.exists()


def test_sglang_dump_plans(tmp_path: Path, spec: ModelSpec) -> None:
    rng = np.random.default_rng(6)
    p2l = np.tile(np.arange(spec.num_experts), (spec.num_layers, 1))
    for rank in range(2):
        passes = [(pid, _choices(rng, 150, spec.num_layers, spec.num_experts, spec.top_k).transpose(1, 0, 2)
                   .astype(np.int32)) for pid in range(2)]
        _sglang_dump(tmp_path / f"rec_{rank}.pt", rank, passes, p2l)
    out = tmp_path / "trace.npz"
    code, text = run("trace", "import", str(tmp_path / "rec_0.pt"), str(tmp_path / "rec_1.pt"), "--model", MODEL,
                     "-o", str(out))
    assert code == 0, text
    assert RoutingTrace.load(out).num_tokens == 600
    code, text = run("plan", "placement", "--model", MODEL, "--trace", str(out), "--solver", "eplb", "--gpus", "8",
                     "-o", str(tmp_path / "plan.json"))
    assert code == 0, text


def _sglang_dump(path: Path, rank: int, passes: list[tuple[int, np.ndarray]], p2l: np.ndarray) -> None:
    torch = pytest.importorskip("torch")
    records = [{"forward_pass_id": pid, "rank": rank, "gatherer_key": "primary", "forward_mode": 1,
                "input_ids": list(range(ids.shape[1])), "topk_ids_of_layer": torch.from_numpy(ids),
                "misc_objects": []} for pid, ids in passes]
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)}, path)


def test_sglang_per_token_dumps_of_two_ranks_merge_in_token_order(tmp_path: Path) -> None:
    """DeepSeek-V3: 61 model layers (3 dense), physical ids mapped back through the recorded map."""
    spec = ModelSpec.preset("deepseek-v3")
    rng = np.random.default_rng(1)
    layers, e, k = spec.num_layers, spec.num_experts, spec.top_k
    p2l = np.concatenate([np.tile(np.arange(e), (layers, 1)), rng.integers(0, e, (layers, 32))], axis=1)  # 32 redundant
    logical = {(pid, rank): _choices(rng, 5 + pid + rank, layers, e, k) for pid in range(3) for rank in range(2)}
    dumps = []
    for rank in range(2):
        passes = []
        for pid in range(3):
            lg = logical[(pid, rank)]
            ph = lg.copy()
            # route some choices through a redundant physical slot holding the same logical expert
            for layer in range(layers):
                slots = np.flatnonzero(p2l[layer, e:] >= 0) + e
                for slot in slots[:4]:
                    ph[:, layer][lg[:, layer] == p2l[layer, slot]] = slot
            ph[:, list(spec.dense_layers)] = -1
            passes.append((pid, ph.transpose(1, 0, 2).astype(np.int32)))
        path = tmp_path / f"expert_distribution_recorder_1700000000.0_{rank}.pt"
        _sglang_dump(path, rank, passes, p2l)
        dumps.append(str(path))
    out = tmp_path / "trace.npz"
    code, text = run("trace", "import", *dumps[::-1], "--model", "deepseek-v3", "-o", str(out))
    assert code == 0, text
    trace = RoutingTrace.load(out)
    expected = np.concatenate([logical[(pid, rank)] for pid in range(3) for rank in range(2)])
    assert np.array_equal(trace.expert_ids, expected[:, list(spec.moe_layers)])
    assert trace.provenance["format"] == "sglang-pass"


def test_sglang_tensor_parallel_duplicates_are_kept_once(tmp_path: Path, spec: ModelSpec) -> None:
    rng = np.random.default_rng(2)
    ids = _choices(rng, 7, spec.num_layers, spec.num_experts, spec.top_k).transpose(1, 0, 2).astype(np.int32)
    p2l = np.tile(np.arange(spec.num_experts), (spec.num_layers, 1))
    for rank in range(2):
        _sglang_dump(tmp_path / f"d_{rank}.pt", rank, [(0, ids)], p2l)
    trace = import_trace([tmp_path / "d_0.pt", tmp_path / "d_1.pt"], "auto", spec)
    assert trace.num_tokens == 7


def test_sglang_count_only_dump_is_refused(tmp_path: Path, spec: ModelSpec) -> None:
    torch = pytest.importorskip("torch")
    torch.save({"records": [{"forward_pass_id": 0, "rank": 0, "global_physical_count": torch.zeros(3, 4)}]},
               tmp_path / "stat_0.pt")
    with pytest.raises(InputError, match="per_token"):
        import_trace([tmp_path / "stat_0.pt"], "sglang-pass", spec)


def test_csv_and_parquet_rows_per_token_and_layer(tmp_path: Path, spec: ModelSpec) -> None:
    rng = np.random.default_rng(3)
    ids = _choices(rng, 40, spec.num_moe_layers, spec.num_experts, spec.top_k)
    rows = [(t, layer, *ids[t, layer]) for t in range(40) for layer in range(spec.num_moe_layers)]
    order = rng.permutation(len(rows))
    header = ["token", "layer"] + [f"expert_{j}" for j in range(spec.top_k)]
    lines = [",".join(header)] + [",".join(map(str, rows[i])) for i in order]
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    trace = import_trace([tmp_path / "r.csv"], "auto", spec)
    assert np.array_equal(trace.expert_ids, ids)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({name: [rows[i][c] for i in order] for c, name in enumerate(header)})
    pq.write_table(table, tmp_path / "r.parquet")
    assert np.array_equal(import_trace([tmp_path / "r.parquet"], "auto", spec).expert_ids, ids)


def test_model_layer_ids_drop_dense_layers(tmp_path: Path) -> None:
    spec = ModelSpec.preset("deepseek-v3")
    rng = np.random.default_rng(4)
    ids = _choices(rng, 10, spec.num_layers, spec.num_experts, spec.top_k)
    np.savez(tmp_path / "all.npz", expert_ids=ids)
    trace = import_trace([tmp_path / "all.npz"], "npz", spec)
    assert np.array_equal(trace.expert_ids, ids[:, 3:])


@pytest.mark.parametrize("case, field", [
    ("no_ids", "expert_ids"), ("float_ids", "expert_ids"), ("wrong_layers", "expert_ids"),
    ("out_of_range", "expert_ids"), ("wrong_k", "expert_ids"), ("csv_missing_col", "expert_0"),
    ("csv_text", "expert_1"), ("csv_missing_layer", "layer"), ("suffix", ""),
])
def test_bad_files_exit_2_naming_file_and_field(tmp_path: Path, spec: ModelSpec, case: str, field: str) -> None:
    rng = np.random.default_rng(5)
    good = _choices(rng, 5, spec.num_moe_layers, spec.num_experts, spec.top_k)
    path = tmp_path / ("bad.csv" if case.startswith("csv") else "bad.txt" if case == "suffix" else "bad.npz")
    if case == "no_ids":
        np.savez(path, routing=good)
    elif case == "float_ids":
        np.savez(path, expert_ids=good.astype(float))
    elif case == "wrong_layers":
        np.savez(path, expert_ids=good[:, :5])
    elif case == "out_of_range":
        np.savez(path, expert_ids=good + spec.num_experts)
    elif case == "wrong_k":
        np.savez(path, expert_ids=good[:, :, :2])
    elif case == "csv_missing_col":
        path.write_text("token,layer,choice\n0,0,1\n")
    elif case == "csv_text":
        path.write_text("token,layer,expert_0,expert_1\n0,0,1,x\n")
    elif case == "csv_missing_layer":
        path.write_text("token,layer,expert_0,expert_1\n0,0,1,2\n0,1,1,2\n1,0,3,4\n")
    else:
        path.write_text("x")
    code, text = run("trace", "import", str(path), "--model", MODEL, "-o", str(tmp_path / "t.npz"))
    assert code == 2, text
    assert str(path) in text and f"'{field}'" in text if field else str(path) in text
    assert "Traceback" not in text and not (tmp_path / "t.npz").exists()


def _pass_dump(path: Path, rank: int, counts: list[np.ndarray], p2l: np.ndarray) -> None:
    """An SGLang ``per_pass`` dump: one ``global_physical_count`` [layers, physical] per pass."""
    torch = pytest.importorskip("torch")
    records = [{"forward_pass_id": pid, "rank": rank, "gatherer_key": "primary",
                "global_physical_count": torch.from_numpy(c)} for pid, c in enumerate(counts)]
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)}, path)


def test_per_pass_dumps_of_two_ranks_are_one_load_through_the_physical_map(tmp_path: Path) -> None:
    """DeepSeek-V3 with 32 redundant slots: counts on a redundant slot go to its logical expert,
    ranks and passes sum, dense rows drop; a directory of rank files is one workload."""
    from moeplan.loads import read_loads

    spec = ModelSpec.preset("deepseek-v3")
    rng = np.random.default_rng(7)
    e, layers = spec.num_experts, spec.num_layers
    p2l = np.concatenate([np.tile(np.arange(e), (layers, 1)), rng.integers(0, e, (layers, 32))], axis=1)
    expected = np.zeros((layers, e), dtype=np.int64)
    (tmp_path / "ranks").mkdir()
    for rank in range(2):
        counts = []
        for _ in range(3):
            c = rng.integers(0, 50, (layers, p2l.shape[1])).astype(np.int64)
            c[list(spec.dense_layers)] = 0
            counts.append(c)
            np.add.at(expected, (np.repeat(np.arange(layers), p2l.shape[1]), p2l.ravel()), c.ravel())
        _pass_dump(tmp_path / "ranks" / f"expert_distribution_recorder_1.0_{rank}.pt", rank, counts, p2l)
    w = read_loads([tmp_path / "ranks", tmp_path / "ranks" / "expert_distribution_recorder_1.0_0.pt"], spec)
    assert w.count == 2
    assert np.array_equal(w.loads[0], expected[list(spec.moe_layers)])
    assert 0 < w.loads[1].sum() < w.loads[0].sum()
    bad = tmp_path / "dense.pt"
    c = np.ones((layers, p2l.shape[1]), dtype=np.int64)
    _pass_dump(bad, 0, [c], p2l)
    with pytest.raises(InputError, match="dense layer 0"):
        read_loads([bad], spec)


def test_per_token_dump_is_a_load_counted_from_the_trace_reader(tmp_path: Path, spec: ModelSpec) -> None:
    from moeplan.loads import read_loads

    rng = np.random.default_rng(8)
    p2l = np.tile(np.arange(spec.num_experts), (spec.num_layers, 1))
    ids = _choices(rng, 40, spec.num_layers, spec.num_experts, spec.top_k)
    _sglang_dump(tmp_path / "tok_0.pt", 0, [(0, ids.transpose(1, 0, 2).astype(np.int32))], p2l)
    w = read_loads([tmp_path / "tok_0.pt"], spec)
    expected = np.stack([np.bincount(ids[:, layer].ravel(), minlength=spec.num_experts)
                         for layer in spec.moe_layers])
    assert np.array_equal(w.loads[0], expected)
    code, text = run("plan", "placement", "--model", MODEL, "--load", str(tmp_path / "tok_0.pt"), "--gpus", "8",
                     "--solver", "eplb", "-o", str(tmp_path / "plan.json"))
    assert code == 0, text
