"""Cached calls into moeplan for the dashboard: every number the pages show comes from here, and
everything here is one call to the library (model presets, hardware profiles, the synthetic
generator, TraceStats, the placement solvers and their metrics, the simulator, the cost model's
memory report, the folding planner, the exporters) under a cache keyed on the inputs.

Keys are small frozen dataclasses (:class:`Setup`, :class:`ProblemKey`, :class:`SolveKey`) that Streamlit
hashes field by field. Uploaded files are kept once in :func:`upload_store` under their SHA-256,
so a key carries a digest, not the bytes. Large objects (traces, statistics, placement problems,
solve results) are cached with ``st.cache_resource`` (no copy per hit: treat them as read-only);
small tables with ``st.cache_data``.

The slow solvers (ExFlow, ILP) run in a background thread (:func:`job`) so the page shows their
progress and Streamlit's stop button stops the page while the solve finishes on its own (the ILP
within its time limit); the result is then cached like any other.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st
from moeplan.solvers.folding import FoldingProblem, FoldingResult
from moeplan.solvers.folding import solve as solve_folding
from moeplan.solvers.placement import PlacementProblem, SolveResult, SolverOptions, solve
from moeplan.solvers.placement.exflow import traffic_report
from moeplan.solvers.placement.metrics import PlacementMetrics, device_loads, evaluate
from moeplan.solvers.placement.predict import predict_moe_step
from moeplan.solvers.placement.problem import check_memory, default_slots_per_device

from moeplan.cost import CostModel, CostOptions, MemoryReport
from moeplan.errors import InputError
from moeplan.export.common import hf_model_path, require_placement, shell_command
from moeplan.export.eplb import EplbTensors
from moeplan.export.megatron import export_megatron
from moeplan.export.sglang import export_sglang, launch_args
from moeplan.export.vllm import export_vllm
from moeplan.io import write_text
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.plan import Plan
from moeplan.simulate import SimResult, Workload, simulate
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize
from moeplan.trace import RoutingTrace

UPLOAD_DIR = Path(tempfile.gettempdir()) / "moeplan-dashboard"
SOLVER_NAMES = ("contiguous", "eplb", "lpt", "exflow", "ilp")
BACKGROUND = ("exflow", "ilp")  # slow solvers: solved in a background thread with progress shown
SOLVER_LABELS = {"contiguous": "contiguous", "eplb": "EPLB", "lpt": "LPT", "exflow": "ExFlow", "ilp": "ILP"}
SOLVER_HELP = {"contiguous": "expert e on GPU ⌊e·D/E⌋, the runtimes' default; spare slots replicate hot experts",
               "eplb": "DeepSeek's EPLB: hierarchical packing of expert groups onto nodes, then GPUs",
               "lpt": "greedy longest-processing-time: heaviest replica to the least loaded GPU",
               "exflow": "ExFlow affinity: experts that tokens chain through across layers share a GPU or node",
               "ilp": "MoETuner-style ILP per layer (CP-SAT), warm-started from the best heuristic"}


# ---- inputs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelChoice:
    """A bundled preset (``preset``, a slug) or an uploaded config (``upload``: its digest in the
    upload store, ``upload_name``: the file's name)."""

    preset: str = "deepseek-v3"
    upload: str = ""
    upload_name: str = ""


@dataclass(frozen=True)
class TrafficChoice:
    """Synthetic traffic knobs (:class:`moeplan.synth.SyntheticTraffic`), or an uploaded trace."""

    tokens: int = 8192
    zipf: float = 0.6
    affinity: float = 0.4
    locality: float = 0.3
    segment: int = 64
    seed: int = 0
    upload: str = ""
    upload_name: str = ""

    def knobs(self) -> SyntheticTraffic:
        return SyntheticTraffic(tokens=self.tokens, zipf=self.zipf, affinity=self.affinity, locality=self.locality,
                                segment=self.segment, seed=self.seed)


@dataclass(frozen=True)
class Setup:
    """The set-up panel: model, hardware profile, cluster (``nodes`` None = filled from the
    profile's devices per node) and traffic."""

    model: ModelChoice
    hardware: str
    gpus: int
    nodes: int | None
    traffic: TrafficChoice


@dataclass(frozen=True)
class ProblemKey:
    """A placement problem: the set-up, physical expert slots per GPU, tokens per GPU per step
    (for the objective, the memory check and the simulated workload) and the flow model."""

    setup: Setup
    slots: int
    tokens_per_device: int = 4096
    flows: str = "top1"


@dataclass(frozen=True)
class SolveKey:
    """One solver on one problem with its options."""

    problem: ProblemKey
    solver: str
    options: SolverOptions


def solve_key(problem_key: ProblemKey, solver: str, balance_cap: float | None, ilp_time_limit: float) -> SolveKey:
    """The key of ``solver`` on ``problem_key``; the time limit is the ILP's (the other solvers
    ignore it, so it stays out of their keys)."""
    limit = ilp_time_limit if solver == "ilp" else SolverOptions.time_limit
    return SolveKey(problem_key, solver, SolverOptions(time_limit=limit, balance_cap=balance_cap).validate())


# ---- uploads ---------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def upload_store() -> dict[str, tuple[str, bytes]]:
    """Uploaded files by SHA-256: (file name, bytes)."""
    return {}


def register_upload(name: str, data: bytes) -> str:
    """Keep an uploaded file; returns its digest."""
    digest = hashlib.sha256(data).hexdigest()
    upload_store()[digest] = (name, data)
    return digest


def upload_path(digest: str) -> Path:
    """The uploaded file on disk under its own name (the library's loaders read paths)."""
    name, data = upload_store()[digest]
    path = UPLOAD_DIR / digest[:16] / Path(name).name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def error_text(exc: InputError) -> str:
    """The error as the CLI prints it, naming an uploaded file by its own name."""
    text = str(exc)
    for digest, (name, _) in upload_store().items():
        text = text.replace(str(UPLOAD_DIR / digest[:16] / Path(name).name), name)
    return text


# ---- set-up objects --------------------------------------------------------------------------
@st.cache_data(show_spinner=False)
def preset_labels() -> dict[str, str]:
    """Preset slug → the model's name."""
    return {slug: ModelSpec.preset(slug).name for slug in ModelSpec.preset_names()}


@st.cache_data(show_spinner=False)
def hardware_labels() -> dict[str, str]:
    """Bundled profile name → "name (measured)" or "name (datasheet)"."""
    return {name: f"{name} ({'measured' if HardwareProfile.load(path).is_measured else 'datasheet'})"
            for name, path in HardwareProfile.bundled().items()}


@st.cache_resource(show_spinner=False, max_entries=8)
def model_spec(choice: ModelChoice) -> ModelSpec:
    if choice.upload:
        stem = Path(choice.upload_name).stem
        return ModelSpec.from_hf_config(upload_path(choice.upload), name=stem if stem != "config" else "uploaded model")
    return ModelSpec.preset(choice.preset)


@st.cache_resource(show_spinner=False, max_entries=8)
def profile(name: str) -> HardwareProfile:
    """A bundled hardware profile, in its own cluster shape."""
    return HardwareProfile.resolve(name)


@st.cache_resource(show_spinner=False, max_entries=8)
def hardware(name: str, gpus: int, nodes: int | None) -> HardwareProfile:
    """The profile shaped to the cluster (:meth:`HardwareProfile.with_cluster`)."""
    return profile(name).with_cluster(devices=gpus, nodes=nodes)


@st.cache_resource(show_spinner="Synthesising the routing trace…", max_entries=4)
def trace(model: ModelChoice, traffic: TrafficChoice) -> RoutingTrace:
    """The uploaded trace (checked against the model) or a synthetic one."""
    spec = model_spec(model)
    if traffic.upload:
        loaded = RoutingTrace.load(upload_path(traffic.upload))
        loaded.check_model(spec.num_experts, spec.num_moe_layers, spec.top_k, traffic.upload_name)
        return loaded
    return synthesize(spec, traffic.knobs())


@st.cache_resource(show_spinner=False, max_entries=4)
def trace_stats(model: ModelChoice, traffic: TrafficChoice) -> TraceStats:
    return TraceStats.of(trace(model, traffic))


@st.cache_data(show_spinner=False, max_entries=8)
def trace_summary(model: ModelChoice, traffic: TrafficChoice) -> dict[str, float]:
    return trace_stats(model, traffic).summary()


@st.cache_data(show_spinner=False, max_entries=16)
def consistency(model: ModelChoice, traffic: TrafficChoice, segment: int, cache_size: int) -> tuple[float, float]:
    """(SRP, SCH) for segments of ``segment`` tokens and a cache of ``cache_size`` experts."""
    return trace_stats(model, traffic).consistency(segment, cache_size)


@st.cache_data(show_spinner=False, max_entries=16)
def transitions(model: ModelChoice, traffic: TrafficChoice, layer: int) -> np.ndarray:
    """P(expert j at MoE layer+1 | expert i at MoE layer)."""
    return trace_stats(model, traffic).transitions(layer)


def cost_model(setup: Setup) -> CostModel:
    return _cost_model(setup.model, setup.hardware, setup.gpus, setup.nodes)


@st.cache_resource(show_spinner=False, max_entries=8)
def _cost_model(model: ModelChoice, name: str, gpus: int, nodes: int | None) -> CostModel:
    return CostModel(model_spec(model), hardware(name, gpus, nodes))


# ---- placement -------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=16)
def slot_range(setup: Setup, tokens_per_device: int) -> tuple[int, int, int]:
    """(fewest, default, most) slots per GPU: every expert once; the CLI's default
    (:func:`default_slots_per_device`); the most that fit in memory at ``tokens_per_device``
    tokens per GPU (at most one replica of an expert per GPU). Raises InputError when the experts
    do not fit at all."""
    cm = cost_model(setup)
    spec, d = cm.model, cm.hw.num_devices
    fewest = -(-spec.num_experts // d)
    check_memory(cm, fewest, d, tokens_per_device)
    default = default_slots_per_device(cm, spec.num_experts, d, tokens_per_device)
    most = default
    while most < spec.num_experts and cm.memory(most + 1, d, batch_tokens_per_device=tokens_per_device).fits:
        most += 1
    return fewest, default, most


@st.cache_resource(show_spinner="Reading the trace's traffic…", max_entries=2)
def problem(key: ProblemKey) -> PlacementProblem:
    s = key.setup
    return PlacementProblem.build(model_spec(s.model), hardware(s.hardware, s.gpus, s.nodes),
                                  trace_stats(s.model, s.traffic), key.slots, key.tokens_per_device, cost_model(s),
                                  key.flows)


@st.cache_resource(show_spinner=False, max_entries=64)
def solution(key: SolveKey) -> SolveResult:
    """The solver's result; a slow solver's comes from its finished background :func:`job`."""
    if key.solver in BACKGROUND:
        return job(key).result()
    return solve(problem(key.problem), key.solver, key.options)


class Job:
    """A solve running in the background: its future, and when it started running (monotonic
    seconds; None while queued behind another)."""

    def __init__(self, executor: ThreadPoolExecutor, run: Callable[[], SolveResult]) -> None:
        self.started: float | None = None
        self.future: Future[SolveResult] = executor.submit(self._timed, run)

    def _timed(self, run: Callable[[], SolveResult]) -> SolveResult:
        self.started = time.monotonic()
        return run()

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> SolveResult:
        return self.future.result()

    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started


@st.cache_resource(show_spinner=False)
def _jobs() -> tuple[ThreadPoolExecutor, dict[SolveKey, Job]]:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeplan-solve"), {}


def job(key: SolveKey) -> Job:
    """The background solve of ``key`` (ExFlow, ILP), started on first request. Stopping the page
    leaves it running to its end (the ILP within its time limit); its result is kept."""
    executor, jobs = _jobs()
    if key not in jobs:
        built = problem(key.problem)
        jobs[key] = Job(executor, lambda: solve(built, key.solver, key.options))
    return jobs[key]


@st.cache_resource(show_spinner=False, max_entries=64)
def metrics(key: SolveKey, metric_tokens: int) -> PlacementMetrics:
    """:func:`evaluate` of the placement on the trace: balancedness on every token, the per-token
    metrics on at most ``metric_tokens`` evenly spaced tokens."""
    s = key.problem.setup
    return evaluate(solution(key).placement, trace(s.model, s.traffic), max_tokens=metric_tokens,
                    stats=trace_stats(s.model, s.traffic))


@st.cache_data(show_spinner=False, max_entries=64)
def traffic(key: SolveKey) -> dict[str, float]:
    """Cross-device/-node hops and all-to-all bytes (:func:`traffic_report`)."""
    return traffic_report(problem(key.problem), solution(key).placement)


@st.cache_resource(show_spinner=False, max_entries=64)
def simulation(key: SolveKey, exflow: bool) -> SimResult:
    """:func:`simulate` of the placement at the problem's tokens per GPU, standard expert
    parallelism or context-coherent (ExFlow) execution."""
    s = key.problem.setup
    return simulate(model_spec(s.model), hardware(s.hardware, s.gpus, s.nodes), solution(key).placement,
                    trace(s.model, s.traffic), Workload(tokens_per_device=key.problem.tokens_per_device),
                    CostOptions(exflow=exflow))


@st.cache_data(show_spinner=False, max_entries=64)
def device_load(key: SolveKey) -> np.ndarray:
    """[MoE layers, GPUs] token-choices each GPU serves (:func:`device_loads`)."""
    s = key.problem.setup
    return device_loads(solution(key).placement, trace_stats(s.model, s.traffic).load)


def memory(key: ProblemKey, slots: int, kv_tokens_per_device: float) -> MemoryReport:
    """Bytes per GPU (:meth:`CostModel.memory`) with ``slots`` expert slots per MoE layer."""
    cm = cost_model(key.setup)
    return cm.memory(slots, cm.hw.num_devices, kv_tokens_per_device=kv_tokens_per_device,
                     batch_tokens_per_device=key.tokens_per_device)


@st.cache_resource(show_spinner="Predicting the MoE step (standard EP and ExFlow)…", max_entries=16)
def plan(key: SolveKey, metric_tokens: int) -> Plan:
    """The Plan ``moeplan plan placement`` writes for these inputs: the placement, the solver's
    report, and predicted = the metrics shown, :func:`predict_moe_step` and :func:`traffic_report`."""
    s, p = key.problem.setup, key.problem
    spec, hw = model_spec(s.model), hardware(s.hardware, s.gpus, s.nodes)
    result = solution(key)
    predicted = {**metrics(key, metric_tokens).summary(),
                 **predict_moe_step(spec, hw, result.placement, trace(s.model, s.traffic), p.tokens_per_device),
                 **traffic(key)}
    return Plan(model=spec, hardware=hw.name, devices_per_node=hw.devices_per_node, nodes=hw.nodes,
                placement=result.placement, solver={**result.report(), "flows": p.flows, "slots_per_device": p.slots},
                predicted=predicted).validate()


# ---- parallel folding ------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldingChoice:
    """A parallel-folding question: the set-up's model and cluster with a workload."""

    setup: Setup
    mode: str = "serve"
    seq_len: int = 4096
    global_batch: int = 256
    micro_batch: int | None = None
    tp_comm_overlap: bool = False


@st.cache_resource(show_spinner="Ranking every valid parallel mapping…", max_entries=8)
def folding(choice: FoldingChoice) -> FoldingResult:
    s = choice.setup
    return solve_folding(FoldingProblem(model_spec(s.model), hardware(s.hardware, s.gpus, s.nodes), choice.mode,
                                        choice.seq_len, choice.global_batch, choice.micro_batch,
                                        tp_comm_overlap=choice.tp_comm_overlap).validate(), top=20)


# ---- export ----------------------------------------------------------------------------------
EXPORT_FORMATS = ("plan", "sglang", "eplb", "vllm", "megatron")


@dataclass(frozen=True)
class Exported:
    """What an exporter produced: file name → bytes, the command line, its notes."""

    files: dict[str, bytes]
    command: str
    notes: tuple[str, ...]


def export(plan_: Plan, fmt: str) -> Exported:
    """Run the named exporter on ``plan_`` in a scratch folder and read its files back: ``plan``
    (the Plan JSON, as :meth:`Plan.save` writes it), ``sglang`` (the expert-location file and the
    launch command naming it beside you), ``eplb`` (EPLB tensors JSON), ``vllm`` (launch script and
    placement), ``megatron`` (argument file and torchrun line)."""
    with tempfile.TemporaryDirectory(prefix="moeplan-export-") as tmp:
        out = Path(tmp)
        if fmt == "plan":
            plan_.save(out / "plan.json")
            return Exported(_read(out), "", ())
        if fmt == "sglang":
            result = export_sglang(plan_, out / "expert_location.json")
            command = shell_command(launch_args(plan_, "expert_location.json", hf_model_path(plan_.model), None))
            return Exported(_read(out), command, tuple(result.notes))
        if fmt == "eplb":
            tensors = EplbTensors.from_placement(require_placement(plan_, "eplb"), plan_.model.moe_layers)
            write_text(out / "eplb.json", json.dumps(tensors.to_json(), separators=(",", ":")) + "\n")
            return Exported(_read(out), "", ("JSON with phy2log, log2phy, logcnt over the MoE layers (layer_ids); "
                                             "`moeplan export --format eplb` also writes the .pt with torch",))
        if fmt == "vllm":
            result = export_vllm(plan_, out / "vllm")
            return Exported(_read(out / "vllm"), result.command, tuple(result.notes))
        if fmt == "megatron":
            result = export_megatron(plan_, out / "megatron_args.sh")
            return Exported(_read(out), result.command, tuple(result.notes))
    raise InputError(f"unknown export format '{fmt}'", field="format", fix=f"use one of: {', '.join(EXPORT_FORMATS)}")


def _read(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
