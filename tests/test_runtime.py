"""The live torch MoE runtime on CPU (gloo): expert-parallel outputs against an independent
float64 reference, live re-placement with output equality, a forced transfer failure that
rolls back, the batch ledger, the single-device modes and the ``moeplan run`` CLI."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from moeplan.cli.apps import app  # noqa: E402
from moeplan.cache_config import CacheConfig  # noqa: E402
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec  # noqa: E402
from moeplan.plan import Placement, Plan  # noqa: E402
from moeplan.runtime.batches import BatchSource  # noqa: E402
from moeplan.runtime.comm import Comm  # noqa: E402
from moeplan.runtime.footprint import layer_weight_bytes, offload_footprint, stack_footprint, working_bytes  # noqa: E402
from moeplan.runtime.host_moves import time_host_moves  # noqa: E402
from moeplan.runtime.kernels import ExpertKernel  # noqa: E402
from moeplan.runtime.ledger import BatchLedger, LedgerError  # noqa: E402
from moeplan.runtime.local_stack import local_placement, time_local_stack  # noqa: E402
from moeplan.moves import diff_moves  # noqa: E402
from moeplan.runtime.replay import replay_devices, replay_slot_tokens, trace_window  # noqa: E402
from moeplan.runtime.serving import Migrate, serve  # noqa: E402
from moeplan.runtime.stack import MoEStack  # noqa: E402
from moeplan.runtime.weights import SHARED, materialise_expert, materialise_router  # noqa: E402
from moeplan.synth import SyntheticTraffic, synthesize  # noqa: E402
from moeplan.trace import RoutingTrace  # noqa: E402

SEED = 7
TOKENS_PER_RANK = 20
CPU = torch.device("cpu")
BATCHES = 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny shapes run faster without OpenMP contention on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model() -> ModelSpec:
    """8 experts, top-2, 3 MoE layers, hidden 16, expert FFN 24, a shared expert of 8."""
    return dataclasses.replace(ModelSpec.preset("deepseek-v2-lite"), name="tiny-moe", num_layers=3,
                               moe_layers=(0, 1, 2), hidden_size=16, expert_ffn=24, num_experts=8, top_k=2,
                               shared_ffn=8, num_shared_experts=1, n_group=1, topk_group=1).validate()


def tiny_trace(model: ModelSpec) -> RoutingTrace:
    return synthesize(model, SyntheticTraffic(tokens=600, zipf=1.0, seed=3))


def placements(world: int) -> tuple[Placement, Placement]:
    """An old placement with replicas, and a new one where layer 0's devices rotate (transfers),
    layer 1's slots reverse on each device (local copies) and layer 2 stays."""
    slots = 8 // world + 2
    flat = list(range(8)) + [e % 8 for e in range(world * slots - 8)]
    old = np.tile(np.array(flat).reshape(world, slots), (3, 1, 1))
    new = old.copy()
    new[0] = np.roll(old[0], 1, axis=0)
    new[1] = old[1][:, ::-1]
    return Placement.from_slots(old, 8, world), Placement.from_slots(new, 8, world)


# ---- an independent reference: float64, token by token -----------------------------------------
def reference(model: ModelSpec, trace: RoutingTrace | None, batch_id: int, tokens: int) -> torch.Tensor:
    """The stack's output for the whole batch, computed per expert in float64 on one process."""
    batch = BatchSource(model.hidden_size, tokens, 0, 1, SEED, CPU, torch.float32, trace).batch(batch_id)
    h = batch.x.double()
    for layer in range(model.num_moe_layers):
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        if trace is not None:
            ids, gates = batch.expert_ids[:, layer], batch.gates[:, layer].double()
        else:
            probs = torch.softmax(x @ materialise_router(SEED, layer, 16, 8, torch.float32, CPU).double().T, -1)
            gates, ids = torch.topk(probs, model.top_k, dim=-1)
            gates = gates / gates.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for e in range(model.num_experts):
            w13, w2 = (w.double() for w in materialise_expert(SEED, layer, e, 16, 24, torch.float32, CPU))
            y = (F.silu(x @ w13[:24].T) * (x @ w13[24:].T)) @ w2.T
            out += (gates * (ids == e)).sum(-1, keepdim=True) * y
        w13, w2 = (w.double() for w in materialise_expert(SEED, layer, SHARED, 16, 8, torch.float32, CPU))
        out += (F.silu(x @ w13[:8].T) * (x @ w13[8:].T)) @ w2.T
        h = h + out
    return h


# ---- the distributed scenarios (one spawn per world size) ---------------------------------------
def _worker(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    comm = Comm(rank, world, CPU)
    model = tiny_model()
    trace = tiny_trace(model)
    old, new = placements(world)
    traced = BatchSource(16, TOKENS_PER_RANK, rank, world, SEED, CPU, torch.float32, trace)
    routed = BatchSource(16, TOKENS_PER_RANK, rank, world, SEED, CPU, torch.float32, None)
    res: dict[str, Any] = {}
    for kernel in ("loop", "grouped"):
        stack = MoEStack(model, old, comm, kernel, SEED)
        res[f"trace_{kernel}"] = stack.forward(traced.batch(0))[0]
        res[f"router_{kernel}"] = stack.forward(routed.batch(1))[0]

    stack = MoEStack(model, old, comm, "grouped", SEED)
    served = serve(stack, traced, range(BATCHES), Migrate(new, after=1, experts_per_step=2), keep_outputs=True)
    served.ledger.check(range(BATCHES), comm)
    res["move"] = {
        "state": served.migration.state, "report": served.migration.report().to_dict(),
        "entries": served.ledger.entries, "version": stack.version,
        "placement_is_new": np.array_equal(stack.placement.slot_expert, new.slot_expert),
        "mismatches": stack.weight_mismatches(),
        "equal": [torch.equal(stack.forward(traced.batch(b))[0], served.outputs[b]) for b in range(BATCHES)],
    }

    stack = MoEStack(model, old, comm, "loop", SEED)
    served = serve(stack, traced, range(BATCHES), Migrate(new, after=0, experts_per_step=2, fault_at_step=1),
                   keep_outputs=True)
    served.ledger.check(range(BATCHES), comm)
    res["rollback"] = {
        "state": served.migration.state, "failure": served.migration.failure, "version": stack.version,
        "steps_done": served.migration.steps_done, "entries": served.ledger.entries,
        "placement_is_old": stack.placement is old, "mismatches": stack.weight_mismatches(),
        "equal": [torch.equal(stack.forward(traced.batch(b))[0], served.outputs[b]) for b in range(BATCHES)],
    }
    torch.save(res, Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def distributed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict]]:
    world = request.param
    folder = tmp_path_factory.mktemp(f"ep{world}")
    mp.start_processes(_worker, args=(world, _free_port(), str(folder)), nprocs=world, start_method="spawn")
    return world, [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
def test_expert_parallel_equals_single_process_reference(distributed, kernel) -> None:
    world, ranks = distributed
    model, trace = tiny_model(), tiny_trace(tiny_model())
    for name, tr, batch_id in (("trace", trace, 0), ("router", None, 1)):
        got = torch.cat([r[f"{name}_{kernel}"] for r in ranks])
        want = reference(model, tr, batch_id, TOKENS_PER_RANK * world)
        assert got.shape == (TOKENS_PER_RANK * world, 16)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_live_replacement_moves_experts_and_keeps_outputs_exact(distributed) -> None:
    world, ranks = distributed
    old, new = placements(world)
    transfers = [m for m in diff_moves(old, new, 1.0, [0, 1, 2]) if m.src != m.dst]
    for r in ranks:
        mv = r["move"]
        assert mv["state"] == "committed" and mv["version"] == 1 and mv["placement_is_new"]
        assert mv["report"]["transfers"] == len(transfers) > 0 and mv["report"]["local_copies"] > 0
        assert mv["mismatches"] == []                # received weights equal the experts' own
        assert all(mv["equal"])                      # every batch, before and after the move, bit for bit
        versions = [v for _, v in mv["entries"]]
        assert [b for b, _ in mv["entries"]] == list(range(BATCHES))
        assert versions[0] == 0 and versions[-1] == 1 and versions == sorted(versions)
    assert sum(r["move"]["report"]["bytes_received"] for r in ranks) == sum(r["move"]["report"]["bytes_sent"]
                                                                            for r in ranks) > 0


def test_forced_transfer_failure_rolls_back_everywhere(distributed) -> None:
    _, ranks = distributed
    for r in ranks:
        rb = r["rollback"]
        assert rb["state"] == "rolled_back" and rb["steps_done"] == 1 and rb["version"] == 0
        assert rb["failure"]
        assert rb["placement_is_old"] and rb["mismatches"] == []
        assert all(rb["equal"])
        assert rb["entries"] == [(b, 0) for b in range(BATCHES)]
    assert any("checksum mismatch" in r["rollback"]["failure"] for r in ranks)


def test_ledger_rejects_duplicate_and_lost_batches() -> None:
    ledger = BatchLedger()
    ledger.record(0, 0)
    ledger.record(1, 0)
    with pytest.raises(LedgerError, match="twice"):
        ledger.record(1, 1)
    with pytest.raises(LedgerError, match="lost \\[2\\]"):
        ledger.check(range(3), Comm.single(CPU))
    ledger.check(range(2), Comm.single(CPU))


# ---- kernels and routing ------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [16, 18])
def test_kernels_agree_including_empty_slots(hidden: int) -> None:
    gen = torch.Generator().manual_seed(0)
    counts = [5, 0, 9, 1]
    x = torch.randn(sum(counts), hidden, generator=gen)
    w13 = torch.randn(4, 2 * 12, hidden, generator=gen)
    w2 = torch.randn(4, hidden, 12, generator=gen)
    loop = ExpertKernel("loop", CPU, torch.float32, hidden, 12)
    grouped = ExpertKernel("grouped", CPU, torch.float32, hidden, 12)
    assert grouped.impl == ("torch._grouped_mm" if hidden == 16 else "bmm")
    by_loop = loop(x, loop.groups(counts), w13, w2)
    torch.testing.assert_close(grouped(x, grouped.groups(counts), w13, w2), by_loop, rtol=1e-5, atol=1e-5)
    seg = x[5:14]                                            # slot 2 (slot 1 is empty)
    want = (F.silu(seg @ w13[2, :12].T) * (seg @ w13[2, 12:].T)) @ w2[2].T
    torch.testing.assert_close(by_loop[5:14], want)


@pytest.mark.parametrize("hidden", [16, 18])
def test_groups_built_on_the_device_match_the_host_counts(hidden: int) -> None:
    gen = torch.Generator().manual_seed(1)
    counts = [3, 0, 7, 2, 0]                                 # an empty slot inside and one at the end
    slot_sorted = torch.repeat_interleave(torch.arange(5), torch.tensor(counts))
    x = torch.randn(sum(counts), hidden, generator=gen)
    w13 = torch.randn(5, 2 * 12, hidden, generator=gen)
    w2 = torch.randn(5, hidden, 12, generator=gen)
    for kernel in ("grouped", "loop"):
        k = ExpertKernel(kernel, CPU, torch.float32, hidden, 12)
        on_device = k.sorted_groups(slot_sorted, 5)
        assert on_device.rows == sum(counts)
        if k.impl == "torch._grouped_mm":
            assert on_device.counts is None and on_device.offs.tolist() == [3, 3, 10, 12, 12]
        else:
            assert on_device.counts == counts
        torch.testing.assert_close(k(x, on_device, w13, w2), k(x, k.groups(counts), w13, w2))


def test_replica_shares_split_tokens_deterministically() -> None:
    model = tiny_model()
    se = np.tile(np.array([[0, 1, 2, 3, 1], [4, 5, 6, 7, 0]]), (3, 1, 1))
    share = np.ones(se.shape)
    share[:, 0, 0], share[:, 1, 4] = 0.25, 0.75            # expert 0: a quarter on device 0, the rest on 1
    share[:, 0, 1], share[:, 0, 4] = 0.5, 0.5              # expert 1: two replicas on device 0
    placement = Placement.from_slots(se, 8, 2, share).validate()
    ids, index = trace_window(synthesize(model, SyntheticTraffic(tokens=4000, zipf=0.0, seed=1)), 4000)
    counts = replay_slot_tokens(placement, ids, index)
    assert np.array_equal(counts, replay_slot_tokens(placement, ids, index))
    assert counts.sum(axis=(1, 2)).tolist() == [4000 * 2] * 3
    for expert, slots, shares in ((0, [(0, 0), (1, 4)], [0.25, 0.75]), (1, [(0, 1), (0, 4)], [0.5, 0.5])):
        chosen = (ids == expert).sum(axis=(0, 2))
        for (d, s), want in zip(slots, shares):
            np.testing.assert_allclose(counts[:, d, s] / chosen, want, atol=0.04)


# ---- single-device modes ------------------------------------------------------------------------
def test_replay_runs_every_device_on_cpu() -> None:
    model = tiny_model()
    placement, _ = placements(3)
    ids, index = trace_window(tiny_trace(model), 3 * 40)
    slot_tokens = replay_slot_tokens(placement, ids, index)
    for kernel in ("loop", "grouped"):
        result = replay_devices(model, placement, slot_tokens, [0, 2], kernel, CPU, torch.float32, warmup=1, repeats=2)
        med = result.medians()
        assert med.shape == (2, 3) and np.all(med > 0)
        assert result.slot_tokens.sum() == 2 * 3 * 40 * model.top_k
        assert np.all(result.straggler_ratio() >= 1.0)


def test_local_stack_and_host_moves_run_on_cpu() -> None:
    model = tiny_model()
    timing = time_local_stack(model, tiny_trace(model), 32, None, "loop", CPU, torch.float32, warmup=1, repeats=3)
    assert [t.repeats for t in timing.per_layer] == [3, 3, 3]
    assert all(0 < t.min <= t.median <= t.max for t in timing.per_layer)
    assert timing.slot_tokens.shape == (3, 1, 8) and timing.slot_tokens.sum() == 3 * 32 * 2
    moves = time_host_moves(model, 0, [0, 5], CPU, torch.float32, warmup=1, repeats=2)
    assert moves.intact and moves.expert_bytes == 3 * 16 * 24 * 4 and len(moves.move) == 2


# ---- the CLI ------------------------------------------------------------------------------------
@pytest.fixture
def tiny_files(tmp_path: Path) -> tuple[Path, Path]:
    model = tiny_model()
    placement, _ = placements(2)
    plan = tmp_path / "plan.json"
    Plan(model, HardwareProfile.resolve("h100-sxm").ref(), 2, 1, placement).save(plan)
    trace = tmp_path / "trace.npz"
    tiny_trace(model).save(trace)
    return plan, trace


def test_run_cli_writes_measurements_beside_predictions(tiny_files, tmp_path: Path) -> None:
    plan, trace = tiny_files
    out = tmp_path / "replay.json"
    res = CliRunner().invoke(app, ["run", "--plan", str(plan), "--trace", str(trace), "--replay", "--device", "cpu",
                                   "--tokens-per-device", "16", "--repeats", "2", "--warmup", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["mode"] == "replay" and len(data["per_device"]) == 3 and len(data["per_device"][0]) == 2
    cell = data["per_device"][0][0]
    assert cell["measured"]["median_s"] > 0 and cell["predicted_s"] > 0
    assert len(data["straggler"]["measured_ratio"]) == 3

    # the closed loop: the replay report calibrates the profile it was predicted with
    from moeplan.calibration import load_run, relative_errors
    calibrated = tmp_path / "calibrated.yaml"
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "replay.json"), "--profile", "h100-sxm",
                                   "-o", str(calibrated)])
    assert res.exit_code == 0, res.output
    cal = HardwareProfile.load(calibrated)
    model = tiny_model()
    assert cal.find_correction("expert_compute", hidden=model.hidden_size, ffn=model.expert_ffn, kernel="grouped")
    cells = load_run(tmp_path / "replay.json").compute
    assert len(cells) == 6
    before = np.median(np.abs(relative_errors(cells, HardwareProfile.resolve("h100-sxm"))))
    assert np.median(np.abs(relative_errors(cells, cal))) < before      # fitted data: closer after

    out = tmp_path / "stack.json"
    res = CliRunner().invoke(app, ["run", "--plan", str(plan), "--trace", str(trace), "--kernel", "loop",
                                   "--device", "cpu", "--layers", "0,2", "--tokens-per-device", "16",
                                   "--repeats", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["mode"] == "stack" and [p["layer"] for p in data["per_layer"]] == [0, 2]
    res = CliRunner().invoke(app, ["calibrate", str(out), "--profile", "h100-sxm", "-o", str(tmp_path / "x.yaml")])
    assert res.exit_code == 2 and "mode" in res.output                  # per-layer stack reports are not fitted


def test_run_cli_bad_input_exits_2(tiny_files, tmp_path: Path) -> None:
    plan, trace = tiny_files
    res = CliRunner().invoke(app, ["run", "--plan", str(tmp_path / "missing.json"), "--trace", str(trace)])
    assert res.exit_code == 2
    res = CliRunner().invoke(app, ["run", "--plan", str(plan), "--trace", str(trace), "--replay",
                                   "--tokens-per-device", "5000", "--device", "cpu"])
    assert res.exit_code == 2 and "lower --tokens-per-device" in res.output
    assert not (tmp_path / "out.json").exists()


def test_gpu_benchmark_script_runs_its_tiny_config_on_cpu(tmp_path: Path, capsys) -> None:
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_runtime.py"
    spec = importlib.util.spec_from_file_location("gpu_runtime_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    assert bench.main([str(tmp_path), "--tiny"]) == 0
    data = json.loads((tmp_path / "gpu_runtime.json").read_text())
    assert len(data["replay"]) == 2 * len(bench.TRAFFIC) * 2 * 2 * 2  # shapes × traffic × devices × batches × kernels
    row = data["replay"][0]
    assert row["contiguous"]["straggler_measured_s"] > 0 and row["balanced"]["straggler_predicted_s"] > 0
    assert row["cut_tokens"] > 1.0                           # skewed prefill: LPT relieves the straggler
    assert {s["kernel"] for s in data["stack"]} == {"loop", "grouped"}
    assert all(m["intact"] for m in data["host_moves"])
    assert "headline" in capsys.readouterr().out


def test_torchrun_entry_point_migrates_with_two_ranks(tiny_files, tmp_path: Path) -> None:
    import subprocess

    plan, trace = tiny_files
    _, new = placements(2)
    new_plan = tmp_path / "new.json"
    Plan(tiny_model(), HardwareProfile.resolve("h100-sxm").ref(), 2, 1, new).save(new_plan)
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "moeplan.runtime", "--plan", str(plan), "--trace", str(trace), "--new-plan", str(new_plan),
           "--batches", "5", "--tokens-per-rank", "16", "--experts-per-step", "3", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["world"] == 2 and data["outputs_equal"] and data["weight_mismatches"] == 0
    assert [m["state"] for m in data["migration"]] == ["committed", "committed"]
    assert data["ledger"]["served"] == 5


# ---- memory estimated before allocating -----------------------------------------------------------
def test_stack_footprint_counts_the_weights_the_stack_allocates() -> None:
    model = tiny_model()
    stack = MoEStack(model, local_placement(model), Comm.single(CPU), "loop", SEED, [0, 2], dtype=torch.float32)
    held = sum(ex.w13.nbytes + ex.w2.nbytes for ex in stack.experts.values())
    held += sum(r.nbytes for r in stack.routers.values()) + sum(a.nbytes + b.nbytes for a, b in stack.shared.values())
    assert held == 2 * layer_weight_bytes(model, 4)
    fp = stack_footprint(model, [0, 2], 32, 4)
    assert fp.device_bytes == held + working_bytes(model, 32, 4) and fp.host_bytes == 0


def test_deepseek_v3_footprints_are_the_sizes_the_issue_reports() -> None:
    """One DeepSeek-V3 layer: 256 experts × 44 M weights ≈ 22.5 GB in bf16, 23.6 GB with the router,
    the shared expert and 1,024 tokens of activations (the "30 GB for one layer" `run` used to ask for
    piecemeal); --offload keeps all 58 × 256 experts in host memory."""
    m = ModelSpec.preset("deepseek-v3")
    one = stack_footprint(m, [0], 1024, 2)
    assert 23e9 < one.device_bytes < 24e9
    cache = CacheConfig(tuple([8] * m.num_moe_layers), "lru", 1e12)
    off = offload_footprint(m, cache, 2)
    assert off.host_bytes == 58 * 256 * m.expert_params() * 2 and 1.3e12 < off.host_bytes < 1.4e12
    assert off.device_bytes == ((58 * 8 + 2) * m.expert_params() + 58 * m.shared_params()) * 2 + working_bytes(m, 1, 2)


def test_run_refuses_before_allocating_what_the_host_cannot_hold(tiny_files, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With (pretended) 100 bytes free, stack, replay and offload runs end with exit 2 naming the
    estimate, the free memory and the fix; nothing is written."""
    import moeplan.errors
    plan, trace = tiny_files
    monkeypatch.setattr(moeplan.errors, "available_memory", lambda: 100)
    out = tmp_path / "out.json"
    common = ["--plan", str(plan), "--trace", str(trace), "--device", "cpu", "--tokens-per-device", "16", "-o", str(out)]
    for extra, needle in (([], "the layer stack of tiny-moe (3 MoE layers × 8 experts, 16 tokens)"),
                          (["--replay"], "replaying tiny-moe (6 expert slots of one device")):
        res = CliRunner().invoke(app, ["run", *common, *extra])
        assert res.exit_code == 2, res.output
        assert needle in res.output and "GiB are free" in res.output and "fewer tokens" in res.output
        assert "Traceback" not in res.output and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: the host holds the weights")
def test_run_deepseek_v3_layer_on_this_host_is_refused_with_the_estimate(tmp_path: Path) -> None:
    """A real DeepSeek-V3 plan: one layer in float32 on the CPU needs ~42 GiB; refused up front
    unless this host really has that much available."""
    from moeplan.errors import available_memory
    m = ModelSpec.preset("deepseek-v3")
    need = stack_footprint(m, [0], 16, 4).device_bytes
    if need <= available_memory():
        pytest.skip("this host has the memory for one DeepSeek-V3 layer")
    slots = np.tile(np.arange(256).reshape(8, 32), (m.num_moe_layers, 1, 1))
    plan = tmp_path / "plan.json"
    Plan(m, HardwareProfile.resolve("h100-sxm").ref(), 8, 1, Placement.from_slots(slots, 256, 8)).save(plan)
    trace = tmp_path / "t.npz"
    synthesize(m, SyntheticTraffic(tokens=64, seed=1)).save(trace)
    res = CliRunner().invoke(app, ["run", "--plan", str(plan), "--trace", str(trace), "--device", "cpu",
                                   "--layers", "0", "--tokens-per-device", "16"])
    assert res.exit_code == 2, res.output
    assert f"needs about {need / 2**30:.1f} GiB of memory" in res.output and "--layers 0" in res.output
