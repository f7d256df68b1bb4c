"""The profiler: a real 2-rank gloo run under torchrun (CPU, --quick, collectives included) and
the profile it writes; a faked two-node run (inter-node scope) merged into it; the HCCL path with a
mocked torch_npu; nccl-tests bus-bandwidth conventions; merge provenance; bad input → exit 2."""
from __future__ import annotations

import itertools
import json
import math
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from moeplan.cost import CostModel, CostOptions, attention_signature  # noqa: E402
from moeplan.gemms import attention_gemms  # noqa: E402
from moeplan.hardware import HardwareProfile, merge_profiles  # noqa: E402
from moeplan.model import ModelSpec  # noqa: E402
from moeplan.profiler import collectives  # noqa: E402
from moeplan.profiler.assemble import measured_profile  # noqa: E402
from moeplan.profiler.attention_ops import AttentionShape, decode_op, prefill_op, train_op  # noqa: E402
from moeplan.profiler.collectives import Topology, bus_factor, skewed_splits  # noqa: E402
from moeplan.profiler.command import base_for  # noqa: E402
from moeplan.profiler.cpu_base import cpu_profile, cpu_profile_name  # noqa: E402
from moeplan.profiler.compute_ops import expert_op, matmul_op  # noqa: E402
from moeplan.profiler.device import Accelerator  # noqa: E402
from moeplan.profiler.raw import Measurement, RawProfile, datasheet_figures  # noqa: E402
from moeplan.profiler.timing import Effort, Op, measure, rotation_sets  # noqa: E402
from moeplan.profiler.timing import MIN_QUEUE_AHEAD_S, queue_ahead_seconds  # noqa: E402
from moeplan.runtime.timing import measure as runtime_measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_GQA = {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
            "intermediate_size": 128, "vocab_size": 100}
TINY_MLA = {"model_type": "deepseek_v3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "n_routed_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 128, "moe_intermediate_size": 32,
            "vocab_size": 100, "kv_lora_rank": 32, "q_lora_rank": 0, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
            "v_head_dim": 16, "first_k_dense_replace": 1, "n_shared_experts": 1}
OPS = ("all_to_all", "all_to_all_skewed", "all_gather", "reduce_scatter", "all_reduce", "send_recv")
CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _configs(root: Path) -> tuple[Path, Path]:
    paths = []
    for name, cfg in (("tiny-gqa", TINY_GQA), ("tiny-mla", TINY_MLA)):
        (root / name).mkdir(exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(cfg))
        paths.append(root / name / "config.json")
    return paths[0], paths[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run: torchrun, 2 gloo ranks on the CPU, --quick, every section, no --base (a CPU
    starts from a profile of its own)."""
    d = tmp_path_factory.mktemp("profile")
    gqa, mla = _configs(d)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "moeplan.profiler", "--quick", "--models", f"{gqa},{mla}",
           "--out", str(d / "p.yaml"), "--json", str(d / "p.json")]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=CPU_ENV, cwd=d)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "wrote" in proc.stdout
    return d


# ---- the end-to-end CPU run ---------------------------------------------------------------------------
def test_cpu_run_writes_a_measured_profile_with_runs(cpu_run: Path) -> None:
    prof = HardwareProfile.load(cpu_run / "p.yaml")
    assert prof.is_measured and len(prof.runs) == 1
    run_id, run = next(iter(prof.runs.items()))
    for field in ("date", "tool", "gpu", "torch", "host", "gpu_count", "backend"):
        assert field in run
    assert run["tool"].startswith("moeplan profile ") and run["gpu_count"] == 2 and run["backend"] == "gloo"
    assert prof.curves and all(c.prov.measured and c.prov.run == run_id for c in prof.curves)
    d = prof.device
    assert d.matmul_flops["bf16"].prov.run == run_id and d.hbm_bandwidth.prov.measured
    assert d.launch_overhead.prov.measured
    assert "fp8" not in d.matmul_flops                                # no fp8 on a CPU, none borrowed from a GPU
    assert d.h2d_bandwidth.prov.source == "assumed"                  # no host link on a CPU
    assert prof.intra_node.bandwidth.prov.measured and prof.inter_node.bandwidth.prov.source == "assumed"
    assert prof.links_measured


def test_cpu_run_is_named_after_the_cpu_it_measured(cpu_run: Path) -> None:
    prof = HardwareProfile.load(cpu_run / "p.yaml")
    run = next(iter(prof.runs.values()))
    assert run["gpu"].startswith("CPU") and prof.name == cpu_profile_name(run["gpu"]) and prof.name.startswith("cpu-")
    assert prof.device.name == run["gpu"] and prof.device.backend == "gloo" and prof.device.vendor == "cpu"
    assert prof.device.memory.prov.measured and prof.device.memory.value == run["device_memory_bytes"]
    assert "H100" not in (cpu_run / "p.yaml").read_text()
    assert (prof.devices_per_node, prof.nodes) == (2, 1)


def test_cpu_run_curves_feed_the_cost_model(cpu_run: Path) -> None:
    prof = HardwareProfile.load(cpu_run / "p.yaml")
    gqa = ModelSpec.resolve(str(cpu_run / "tiny-gqa" / "config.json"))
    mla = ModelSpec.resolve(str(cpu_run / "tiny-mla" / "config.json"))
    for m in (gqa, mla):
        grouped = [c for c in prof.curves_of("expert_ffn") if c.key.get("kernel") == "grouped"
                   and c.key["hidden"] == m.hidden_size and c.key["ffn"] == m.expert_ffn]
        assert sorted(c.key["experts"] for c in grouped) == [1, 4]
        assert [len(c.x) for c in grouped] == [3, 3] and all(c.x == (1.0, 8.0, 64.0) for c in grouped)
        for kernel in ("loop", "grouped"):
            assert CostModel(m, prof, CostOptions(kernel=kernel)).compute_measured
        for kind in ("attention_prefill", "attention_train", "attention_decode"):
            curve = prof.find_curve(kind, signature=attention_signature(m))
            assert curve is not None and curve.y_min and all(a <= b for a, b in zip(curve.y_min, curve.y_max))
        prefill = prof.find_curve("attention_prefill", signature=attention_signature(m))
        cm = CostModel(m, prof)
        assert cm.attention_core_time(128, 128, "prefill") == pytest.approx(prefill.y[-1])
        projections = float(cm.gemms_time(128, attention_gemms(m, 1)))       # from the run's gemm grid
        assert cm.gemms_measured and projections > 0
        assert cm.attention_time(128, 128, "prefill") == pytest.approx(prefill.y[-1] + projections)
    grid = {(int(c.key["k"]), int(c.key["n"])) for c in prof.curves_of("gemm")}
    assert grid == {(k, n) for k in (16, 64) for n in (16, 64)}
    ops = {c.key["op"] for c in prof.curves_of("collective")}
    assert ops == set(OPS)
    assert all(c.key["scope"] == "intra_node" and c.key["ranks"] == 2 for c in prof.curves_of("collective"))


def test_cpu_run_measures_every_point_in_two_passes_and_the_curve_spans_both(cpu_run: Path) -> None:
    raw = RawProfile.load(cpu_run / "p.json")
    experts = raw.of_kind("expert_ffn")
    by_point: dict[tuple, list] = {}
    for m in experts:
        by_point.setdefault((tuple(sorted(m.key.items())), m.x), []).append(m)
    assert by_point and all(len(ms) == 2 for ms in by_point.values())      # one measurement per pass
    profile = HardwareProfile.load(cpu_run / "p.yaml")
    for (key, x), ms in by_point.items():
        curve = profile.find_curve("expert_ffn", **dict(key))
        i = curve.x.index(x)
        assert curve.y_min[i] == min(m.min for m in ms) and curve.y_max[i] == max(m.max for m in ms)


def test_cpu_run_raw_json_follows_nccl_tests_conventions(cpu_run: Path) -> None:
    raw = RawProfile.load(cpu_run / "p.json")
    coll = raw.of_kind("collective")
    assert {m.key["op"] for m in coll} == set(OPS)
    for m in coll:
        r = m.rates()
        assert r["algbw"] == pytest.approx(m.x / m.median)
        assert r["busbw"] == pytest.approx(r["algbw"] * bus_factor(m.key["op"], m.key["ranks"]))
    for m in raw.measurements:
        assert len(m.samples_s) >= 3 and m.min <= m.median <= m.max
    assert {s["what"] for s in raw.skipped} == {"fp8 matmul", "host copies"}
    data = json.loads((cpu_run / "p.json").read_text())
    assert data["measurements"][0]["samples_s"] and "busbw" in data["measurements"][-1]


def test_plain_loop_reference_and_markdown_table(cpu_run: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from moeplan.profiler import reference
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import profile_table
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert reference.main([str(cpu_run / "p.json"), "--out", str(cpu_run / "ref.json"), "--repeats", "3"]) == 0
    finally:
        torch.set_num_threads(threads)
    ref = json.loads((cpu_run / "ref.json").read_text())
    assert len(ref["figures"]) >= 10 and all(f["reference_median_s"] > 0 for f in ref["figures"])
    capsys.readouterr()
    assert profile_table.main([str(cpu_run / "p.json"), "--reference", str(cpu_run / "ref.json")]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]
    assert any(r.startswith("| matmul bf16") for r in rows) and any("all_to_all intra_node" in r for r in rows)
    compute_rows = [r for r in rows if "busbw" not in r]
    assert all(r.split("|")[4].strip() != "–" for r in compute_rows)   # every compute row has its ratio


def test_fake_two_nodes_measure_inter_node_and_merge_keeps_provenance(cpu_run: Path, tmp_path: Path) -> None:
    """LOCAL_WORLD_SIZE=1 makes two ranks two 'nodes': the inter-node scope is measured, and
    --merge folds it into the first run's profile without losing that run's figures."""
    port = str(_free_port())
    out = tmp_path / "merged.yaml"
    procs = []
    for rank in (0, 1):
        env = {**CPU_ENV, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, "-m", "moeplan.profiler", "--quick", "--only", "collectives",
               "--merge", str(cpu_run / "p.yaml"), "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
    first = HardwareProfile.load(cpu_run / "p.yaml")
    merged = HardwareProfile.load(out)
    assert set(merged.runs) > set(first.runs) and len(merged.runs) == 2
    new_run = (set(merged.runs) - set(first.runs)).pop()
    assert merged.runs[new_run]["nodes"] == 2 and merged.runs[new_run]["sections"] == ["collectives"]
    inter = [c for c in merged.curves_of("collective") if c.key["scope"] == "inter_node"]
    assert {c.key["op"] for c in inter} == set(OPS) and all(c.prov.run == new_run for c in inter)
    old_run = next(iter(first.runs))
    intra = [c for c in merged.curves_of("collective") if c.key["scope"] == "intra_node"]
    assert len(intra) == len(OPS) and all(c.prov.run == old_run for c in intra)
    assert merged.inter_node.bandwidth.prov.run == new_run
    assert merged.intra_node.bandwidth.prov.run == old_run
    assert merged.device.matmul_flops["bf16"].prov.run == old_run
    assert len(merged.curves_of("expert_ffn")) == len(first.curves_of("expert_ffn"))


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--base", "no-such-gpu"], "unknown hardware profile"),
    (["--base", "h100-sxm", "--merge", "/nonexistent/profile.yaml"], "file not found"),
    (["--base", "h100-sxm", "--only", "device,bogus"], "bogus"),
    (["--base", "h100-sxm", "--models", "no-such-model"], "unknown model preset"),
])
def test_bad_input_exits_2_through_the_cli(args: list[str], needle: str) -> None:
    from moeplan.cli import app
    result = CliRunner().invoke(app, ["profile", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output


def test_merge_into_another_devices_profile_exits_2(tmp_path: Path) -> None:
    from moeplan.cli import app
    other = measured_profile(HardwareProfile.resolve("h100-sxm"), _raw("run-h100", [
        Measurement("matmul", {}, {"dtype": "bf16"}, 1024.0, (1e-3,), {"flops": 2.0 * 1024**3})]))
    other.save(tmp_path / "h100.yaml")
    result = CliRunner().invoke(app, ["profile", "--merge", str(tmp_path / "h100.yaml"), "--only", "device"])
    assert result.exit_code == 2 and "measured on NVIDIA H100" in result.output


CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees only the CPU")


@CPU_ONLY
@pytest.mark.parametrize("base", ["h100-sxm", "h200", "measured/h100-sxm"])
def test_gpu_base_on_a_cpu_exits_2_with_the_fix(base: str, tmp_path: Path) -> None:
    """A CPU measured against a GPU's profile would write CPU figures under the GPU's name."""
    from moeplan.cli import app
    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(app, ["profile", "--base", base, "--quick", "--only", "device", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "no GPU" in result.output and ("H100" in result.output or "H200" in result.output)
    assert "drop --base/--merge to write a CPU profile" in result.output and not out.exists()


@CPU_ONLY
def test_merge_onto_a_gpu_profile_on_a_cpu_exits_2(tmp_path: Path) -> None:
    """A GPU profile with no runs yet (a datasheet copy) is refused too, and left as it was."""
    target = tmp_path / "gpu.yaml"
    HardwareProfile.resolve("h100-sxm").save(target)
    before = target.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "moeplan.profiler", "--quick", "--only", "device", "--merge",
                           str(target)], check=False, capture_output=True, text=True, timeout=120, env=CPU_ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "write CPU figures into the NVIDIA H100" in proc.stderr and target.read_bytes() == before


def test_a_cpu_profile_is_refused_as_base_of_a_gpu_run() -> None:
    from moeplan.profiler.cpu_base import check_base
    cpu = cpu_profile("CPU AMD EPYC 9654 96-Core Processor", 2, 1)
    assert cpu.name == "cpu-amd-epyc-9654-96-core-processor" and cpu.device.backend == "gloo"
    assert all(q.prov.source == "assumed" for q in (cpu.device.hbm_bandwidth, cpu.device.matmul_flops["bf16"]))
    check_base(cpu, "CPU AMD EPYC", True, "cpu.yaml")
    with pytest.raises(Exception, match="is a profile of a CPU"):
        check_base(cpu, "NVIDIA H100 80GB HBM3", False, "cpu.yaml")


def test_bad_base_exits_2_as_a_module(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "moeplan.profiler", "--base", "nope", "--out", str(tmp_path / "x.yaml")],
                          check=False, capture_output=True, text=True, timeout=60, env=CPU_ENV)
    assert proc.returncode == 2 and "unknown hardware profile" in proc.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_base_is_chosen_from_the_gpu_name() -> None:
    assert base_for("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert base_for("NVIDIA H200") == "h200-sxm"
    assert base_for("Ascend910B3") == "ascend-910b"
    with pytest.raises(Exception, match="--base"):
        base_for("CPU AMD EPYC")


# ---- conventions and provenance by hand -----------------------------------------------------------------
def test_bus_factors_by_hand() -> None:
    # 8 ranks: all-reduce 2·7/8, the others 7/8; point-to-point 1
    assert bus_factor("all_reduce", 8) == 1.75
    for op in ("all_gather", "reduce_scatter", "all_to_all", "all_to_all_skewed"):
        assert bus_factor(op, 8) == 0.875
    assert bus_factor("send_recv", 2) == 1.0
    assert bus_factor("all_reduce", 2) == 1.0 and bus_factor("all_to_all", 2) == 0.5
    # 1 GiB all-reduce over 8 ranks in 10 ms: algbw 107.374 GB/s, busbw 187.905 GB/s
    m = Measurement("collective", {"op": "all_reduce", "scope": "intra_node", "ranks": 8}, {}, float(2**30),
                    (0.010, 0.010, 0.011), {"bytes": float(2**30), "bus_factor": 1.75})
    assert m.rates()["algbw"] / 1e9 == pytest.approx(107.374, abs=1e-3)
    assert m.rates()["busbw"] / 1e9 == pytest.approx(187.905, abs=1e-3)


def test_skewed_all_to_all_splits() -> None:
    splits = skewed_splits(4, 1000)
    assert all(sum(row) == 1000 for row in splits)
    assert splits[0][0] > splits[0][1] > splits[0][2] > splits[0][3]   # 1, 1/2, 1/3, 1/4 of 25/12
    assert abs(splits[0][1] - 1000 * 0.5 / (25 / 12)) < 1 and splits[0][0] >= 480


def test_topology_groups_and_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    t = Topology.detect(8, ["a"] * 4 + ["b"] * 4)
    assert (t.per_node, t.nodes) == (4, 2)
    assert t.intra_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert t.inter_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert t.scopes() == [("intra_node", 4), ("inter_node", 2)]
    intra = t.pairs("intra_node")
    assert len(intra) == 6 and intra[0] == [(0, 1), (4, 5)]          # every local pair, on both nodes at once
    assert t.pairs("inter_node") == [[(0, 4), (1, 5), (2, 6), (3, 7)]]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert Topology.detect(8, ["a"] * 4 + ["b"] * 4).scopes() == [("intra_node", 8)]


def _raw(run_id: str, measurements: list[Measurement]) -> RawProfile:
    base = HardwareProfile.resolve("h100-sxm")
    return RawProfile(run_id, {"date": "2026-01-01T00:00:00+00:00", "tool": "moeplan profile test", "gpu": "NVIDIA H100",
                               "backend": "nccl"}, base.name, datasheet_figures(base), measurements)


def test_merge_keeps_provenance() -> None:
    base = HardwareProfile.resolve("h100-sxm")
    loop = [Measurement("expert_ffn", {"hidden": 64, "ffn": 32, "dtype": "bf16", "kernel": "loop"}, {}, float(x),
                        (1e-5 * x, 1.1e-5 * x), {"flops": 1.0}) for x in (1, 8)]
    a2a_a = [Measurement("collective", {"op": "all_to_all", "scope": "intra_node", "ranks": 8}, {}, float(x),
                         (1e-4 * x / 65536,) * 3, {"bytes": float(x), "bus_factor": 0.875}) for x in (65536, 2**20)]
    mm = Measurement("matmul", {}, {"dtype": "bf16"}, 1024.0, (1e-3,), {"flops": 2.0 * 1024**3})
    first = measured_profile(base, _raw("run-a", [*loop, *a2a_a, mm]))
    a2a_b = [Measurement("collective", {"op": "all_to_all", "scope": "intra_node", "ranks": 8}, {}, float(x),
                         (2e-4 * x / 65536,) * 3, {"bytes": float(x), "bus_factor": 0.875}) for x in (65536, 2**20)]
    second = measured_profile(base, _raw("run-b", a2a_b))
    merged = merge_profiles(first, second)
    assert set(merged.runs) == {"run-a", "run-b"}
    assert merged.find_curve("expert_ffn", kernel="loop").prov.run == "run-a"
    coll = merged.curves_of("collective")
    assert len(coll) == 1 and coll[0].prov.run == "run-b" and coll[0].y[0] == pytest.approx(2e-4)
    assert merged.device.matmul_flops["bf16"].prov.run == "run-a"
    assert merged.device.matmul_flops["bf16"].value == pytest.approx(2.0 * 1024**3 / 1e-3)
    assert merged.device.h2d_bandwidth.prov.source == "datasheet"
    # link figures: bandwidth = busbw at the largest size; latency = small-size time minus its bytes
    bw = 2**20 / (2e-4 * 16) * 0.875
    assert merged.intra_node.bandwidth.value == pytest.approx(bw) and merged.intra_node.bandwidth.prov.run == "run-b"
    assert merged.intra_node.latency.value == pytest.approx(2e-4 - 65536 * 0.875 / bw)
    merged.validate()


# ---- timing: events, rotation, every rank in step -------------------------------------------------------
class _FakeSync:
    def __init__(self, agreed: int) -> None:
        self.barriers = 0
        self.agreed = agreed

    def barrier(self) -> None:
        self.barriers += 1

    def agree_max(self, value: float) -> float:
        return max(value, self.agreed)

    def slowest(self, samples: list[float]) -> list[float]:
        return [s + 1.0 for s in samples]


def test_measure_syncs_every_repeat_and_takes_the_slowest_rank() -> None:
    acc = Accelerator("cpu")
    runs = []
    op = Op(make=lambda: torch.randn(4), run=lambda t: runs.append(float(t.sum())), set_bytes=16)
    sync = _FakeSync(agreed=7)
    timing = measure(acc, op, Effort(warmup=2, min_reps=3, max_reps=5, target_s=1e-9, max_sets=4), sync=sync)
    assert timing.repeats == 7                        # the ranks' agreed count, over the local choice
    assert sync.barriers == len(runs)                 # one barrier before every run, warm-up included
    assert all(s > 1.0 for s in timing.samples)       # the slowest rank's times were taken
    assert len(set(runs)) > 1                         # rotated sets of fresh random data


class _RecordingAccelerator(Accelerator):
    """A CPU accelerator that records each busy wait it is asked for."""

    waits: list[float]

    def queue_ahead(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_queued_ahead_ops_wait_twice_the_host_enqueue_time_before_every_repeat() -> None:
    acc = _RecordingAccelerator("cpu")
    object.__setattr__(acc, "waits", [])
    op = Op(make=lambda: torch.randn(4), run=lambda t: time.sleep(0.002), set_bytes=16, queue_ahead=True)
    timing = measure(acc, op, Effort(warmup=1, min_reps=3, max_reps=3, target_s=1e-9, max_sets=1))
    probe, *before_repeats = acc.waits
    assert probe == MIN_QUEUE_AHEAD_S and len(before_repeats) == timing.repeats == 3
    assert len(set(before_repeats)) == 1 and before_repeats[0] >= 2 * 0.002
    assert queue_ahead_seconds(0.0) == MIN_QUEUE_AHEAD_S and queue_ahead_seconds(1e-3) == 2e-3


def test_runtime_measure_in_device_time_times_every_repeat_on_a_cpu() -> None:
    runs: list[int] = []
    timing = runtime_measure(runs.append, torch.device("cpu"), warmup=2, repeats=4, device_time=True)
    assert timing.repeats == 4 and runs == [0, 1, 2, 3, 4, 5]     # no probe run where nothing is queued


def test_rotation_sets_exceed_the_cache_within_memory() -> None:
    assert rotation_sets(17 * 2**20, 50 * 2**20, 80 * 2**30, 32) == 9
    assert rotation_sets(2**30, 50 * 2**20, 80 * 2**30, 32) == 1
    assert rotation_sets(2**20, 50 * 2**20, 80 * 2**30, 32) == 32
    assert rotation_sets(2**20, 50 * 2**20, 8 * 2**20, 32) == 2      # a quarter of 8 MiB free


def test_ops_make_fresh_random_data_and_match_a_reference() -> None:
    acc = Accelerator("cpu")
    a, _ = matmul_op(acc, 32, "bf16").make()
    assert bool((a != 0).all()) and not torch.equal(a, matmul_op(acc, 32, "bf16").make()[0])
    for kernel, experts in (("loop", 1), ("loop", 3), ("grouped", 3)):
        op = expert_op(acc, 64, 32, 8, experts, kernel)
        assert "moeplan.runtime.kernels" in op.impl       # the runtime's own kernel is what is timed
        x, groups, w13, w2 = op.make()
        assert groups.counts == [8] * experts
        got = op.run((x, groups, w13, w2)).float()
        for e in range(experts):
            h = x[e * 8:(e + 1) * 8].float() @ w13[e].float().T
            ref = (torch.nn.functional.silu(h[:, :32]) * h[:, 32:]) @ w2[e].float().T
            assert torch.allclose(got[e * 8:(e + 1) * 8], ref, rtol=0.1, atol=0.05)
    shape = AttentionShape.of(ModelSpec.from_hf_dict(TINY_MLA, "tiny-mla"))
    assert (shape.decode_kv_heads, shape.decode_qk_dim, shape.decode_v_dim) == (1, 40, 32)
    _, k, v = decode_op(acc, shape, 16, 2).make()
    assert v.data_ptr() == k.data_ptr()                # MLA decode reads one latent cache
    out = prefill_op(acc, shape, 16, 1, "sdpa").run(prefill_op(acc, shape, 16, 1, "sdpa").make())
    assert out.shape == (1, 4, 16, 16) and bool(torch.isfinite(out).all())


def test_attention_train_op_returns_the_query_gradient_of_causal_gqa() -> None:
    """Forward + backward with native GQA: dq equals autograd's through KV heads expanded by hand."""
    acc = Accelerator("cpu")
    shape = AttentionShape.of(ModelSpec.from_hf_dict(TINY_GQA, "tiny-gqa"))
    assert shape.prefill_kv_heads < shape.heads
    op = train_op(acc, shape, 16, 1)
    q, k, v, grad = op.make()
    dq = op.run((q, k, v, grad))
    group = shape.heads // shape.prefill_kv_heads
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qr, kr.repeat_interleave(group, 1),
                                                           vr.repeat_interleave(group, 1), is_causal=True)
    ref.backward(grad.float())
    assert dq.shape == q.shape and torch.allclose(dq.float(), qr.grad, rtol=0.1, atol=0.05)
    assert op.work["flops"] == pytest.approx(3.5 * prefill_op(acc, shape, 16, 1, "sdpa").work["flops"])


# ---- HCCL (Ascend) with a mocked torch_npu ----------------------------------------------------------------
def test_hccl_path_with_mocks(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = itertools.count()
    seen: dict[str, object] = {}

    class FakeEvent:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing
            self.t = 0

        def record(self) -> None:
            self.t = next(clock)

        def elapsed_time(self, other: FakeEvent) -> float:
            return float(other.t - self.t)                 # milliseconds

    props = types.SimpleNamespace(total_memory=64 * 2**30, L2_cache_size=192 * 2**20)
    npu = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 8, set_device=lambda i: seen.setdefault("device", i),
        Event=FakeEvent, synchronize=lambda i=None: None, get_device_name=lambda i: "Ascend910B3",
        get_device_properties=lambda i: props, mem_get_info=lambda i: (60 * 2**30, 64 * 2**30),
        empty_cache=lambda: None)
    monkeypatch.setitem(sys.modules, "torch_npu", types.SimpleNamespace(__version__="2.5.1"))
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    acc = Accelerator.detect(local_rank=3)
    assert (acc.kind, acc.index, acc.backend, seen["device"]) == ("npu", 3, "hccl", 3)
    assert acc.versions()["torch_npu"] == "2.5.1" and acc.cache_bytes() == 192 * 2**20
    assert base_for(acc.name()) == "ascend-910b"
    timing = measure(acc, Op(make=lambda: None, run=lambda s: None, set_bytes=2**30),
                     Effort(warmup=1, min_reps=3, max_reps=3, target_s=1.0, max_sets=1))
    assert timing.samples == (1e-3, 1e-3, 1e-3)        # device events, not the host clock

    calls: dict[str, object] = {}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(collectives.dist, "init_process_group", lambda **kw: calls.update(kw))
    monkeypatch.setattr(collectives.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(collectives.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(collectives.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj] * 2))
    comm = collectives.Comm(acc)
    assert calls["backend"] == "hccl" and "device_id" not in calls
    assert comm.topology.scopes() == [("intra_node", 2)] and comm.groups["intra_node"] is collectives.dist.group.WORLD


# ---- on a GPU -------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_quick_profile(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "moeplan.profiler", "--quick", "--only", "device,experts,host",
           "--models", "deepseek-v2-lite", "--out", str(tmp_path / "p.yaml"), "--json", str(tmp_path / "p.json")]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prof = HardwareProfile.load(tmp_path / "p.yaml")
    assert prof.device.matmul_flops["bf16"].prov.measured and prof.device.h2d_bandwidth.prov.measured
    assert math.isfinite(prof.device.hbm_bandwidth.value)
    assert {c.key["memory"] for c in prof.curves_of("host_copy")} == {"pinned", "pageable"}
