"""Cached calls into moeplan for the dashboard: every number the pages show comes from here, and
each function here is one call to the library (model presets, hardware profiles, the synthetic
generator, TraceStats, the placement solvers and their metrics, the simulator, the cost model's
memory report, the folding, cache and elastic planners) under a cache keyed on its inputs
(:mod:`moeplan.dashboard.keys`).

Large objects (traces, statistics, placement problems, solve results) are cached with
``st.cache_resource`` (no copy per hit: treat them as read-only), small tables with
``st.cache_data``. The slow placement solvers (ExFlow, ILP) run in the background
(:mod:`moeplan.dashboard.jobs`) and their results are then cached like any other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import dataclasses

import numpy as np
import pandas as pd
import streamlit as st
from moeplan.solvers.cache import CacheProblem, CacheSizing, StepShape, cache_table
from moeplan.solvers.cache import solve as solve_cache
from moeplan.solvers.elastic.autoscale import autoscale_frame, summary_frame
from moeplan.solvers.elastic.study import AutoscaleStudy, prepare, run_all
from moeplan.solvers.folding import FoldingProblem, FoldingResult
from moeplan.solvers.folding import solve as solve_folding
from moeplan.solvers.placement import PlacementProblem, SolveResult, SolverOptions, rebalance_experts, solve
from moeplan.solvers.placement.exflow import traffic_report
from moeplan.solvers.placement.metrics import PlacementMetrics, balancedness, device_loads, evaluate
from moeplan.solvers.placement.pipeline import placement_plan, placement_quality, plan_from_loads
from moeplan.solvers.placement.problem import check_memory, default_slots_per_device

from moeplan.cost import CostModel, MemoryReport
from moeplan.dashboard import jobs
from moeplan.dashboard.jobs import Job
from moeplan.dashboard.keys import (BACKGROUND, CacheChoice, ElasticChoice, FoldingChoice, LoadFile, LoadsKey,
                                    ModelChoice, ProblemKey, Setup, SolveKey, TrafficChoice)
from moeplan.dashboard.uploads import upload_path
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile
from moeplan.loads import Workloads, read_loads
from moeplan.model import ModelSpec
from moeplan.plan import Placement, Plan
from moeplan.simulate import SimResult, Workload, simulate
from moeplan.stats import TraceStats
from moeplan.synth import synthesize
from moeplan.trace import RoutingTrace


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
    """(SRP, SCH) for windows of ``segment`` tokens and a cache of ``cache_size`` experts per layer; SCH over the
    trace's first tokens, as the summary (:meth:`TraceStats.head_for_sch`)."""
    stats = trace_stats(model, traffic)
    return stats.srp(segment), stats.head_for_sch().sch(segment, cache_size)


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
    return PlacementProblem.build(cost_model(s), trace_stats(s.model, s.traffic), key.slots, key.tokens_per_device,
                                  key.flows)


@st.cache_resource(show_spinner=False, max_entries=64)
def solution(key: SolveKey) -> SolveResult:
    """The solver's result; a slow solver's comes from its finished background :func:`job`."""
    if key.solver in BACKGROUND:
        return job(key).result()
    return solve(problem(key.problem), key.solver, key.options)


def job(key: SolveKey) -> Job:
    """The background solve of ``key`` (ExFlow, ILP), started on first request; stopping the page
    leaves it running to its end and its result is kept."""
    built = problem(key.problem)
    return jobs.submit(key, lambda: solve(built, key.solver, key.options))


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
    return simulate(cost_model(s).with_options(exflow=exflow), solution(key).placement, trace(s.model, s.traffic),
                    Workload(tokens_per_device=key.problem.tokens_per_device))


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
def plan(key: SolveKey) -> Plan:
    """The Plan of these inputs through the CLI's pipeline (:func:`placement_plan`), judged on the
    whole trace the dashboard fits (the page says so). The plan the export page offers is served
    under SGLang's static dispatch: its shares and balance figures are what SGLang realises."""
    s, p = key.problem.setup, key.problem
    result = solution(key)
    served = dataclasses.replace(problem(p), dispatch="sglang-static")
    return placement_plan(served, cost_model(s), result.placement, result.report(), trace(s.model, s.traffic),
                          p.tokens_per_device, judged_on="the fitted tokens (the dashboard holds nothing out)",
                          stats=trace_stats(s.model, s.traffic))


# ---- placement from recorded loads ----------------------------------------------------------
@st.cache_resource(show_spinner="Reading the recorded loads…", max_entries=8)
def workloads(model: ModelChoice, files: tuple[LoadFile, ...]) -> Workloads:
    """The files as workloads of the model, read as ``--load`` reads them (:func:`read_loads`)."""
    return read_loads([upload_path(f.upload) if f.upload else Path(f.path) for f in files], model_spec(model))


@st.cache_resource(show_spinner="Planning from the recorded loads…", max_entries=8)
def loads_plan(key: LoadsKey) -> tuple[Plan, SolveResult]:
    """The Plan ``moeplan plan placement --load`` writes for these inputs (:func:`plan_from_loads`,
    the equal-split solver under ``key.dispatch``)."""
    options = SolverOptions(robust=key.robust).validate()
    _, plan, result = plan_from_loads(cost_model(key.setup), workloads(key.setup.model, key.files), key.slots,
                                      key.tokens_per_device, key.dispatch, "even", options, key.leave_one_out)
    return plan, result


@st.cache_data(show_spinner=False, max_entries=8)
def loads_eplb(key: LoadsKey) -> dict[str, float]:
    """EPLB global (one group, one node) fitted on the pooled workloads, each workload's
    balancedness under ``even`` (what EPLB's tensors mean): the runtime's own balancer, beside."""
    cm, w = cost_model(key.setup), workloads(key.setup.model, key.files)
    d = cm.hw.num_devices
    phy2log, _, _ = rebalance_experts(w.pooled(), d * key.slots, 1, 1, d)
    placed = Placement.from_slots(phy2log.reshape(w.loads.shape[1], d, key.slots), cm.model.num_experts,
                                  cm.hw.devices_per_node, dispatch="even")
    return {name: balancedness(placed, load) for name, load in zip(w.names, w.loads)}


def plan_cost(plan: Plan) -> CostModel:
    """The cost model a saved plan is priced with: its own hardware profile (checked by digest),
    cluster and cost options — what ``moeplan run``, ``compare`` and ``plan scale`` use."""
    return CostModel(plan.model, plan.cluster_hardware(), plan.cost_options)


def price_plan(plan: Plan, judged: RoutingTrace, tokens_per_device: int) -> dict[str, Any]:
    """A saved plan's placement on ``judged`` tokens, priced by :func:`plan_cost` (the row
    ``moeplan compare`` prints for it)."""
    if plan.placement is None:
        raise InputError("the plan has no placement to price", field="placement")
    return placement_quality(plan_cost(plan), plan.placement, judged, tokens_per_device)


# ---- parallel folding ------------------------------------------------------------------------
@st.cache_resource(show_spinner="Ranking every valid parallel mapping…", max_entries=8)
def folding(choice: FoldingChoice) -> FoldingResult:
    s = choice.setup
    return solve_folding(FoldingProblem(cost_model(s), choice.mode,
                                        choice.seq_len, choice.global_batch, choice.micro_batch,
                                        tp_comm_overlap=choice.tp_comm_overlap).validate(), top=20)


# ---- expert cache (offloading) ---------------------------------------------------------------
@st.cache_resource(show_spinner="Sizing every layer's expert cache…", max_entries=4)
def cache_sizing(choice: CacheChoice) -> CacheSizing:
    s = choice.setup
    return solve_cache(CacheProblem(CostModel(model_spec(s.model), profile(s.hardware)), trace(s.model, s.traffic),
                                    StepShape(choice.phase, choice.batch), choice.policy, choice.context,
                                    choice.budget_bytes))


@st.cache_data(show_spinner=False, max_entries=4)
def cache_view(choice: CacheChoice) -> dict[str, Any]:
    """:func:`cache_table` of the sizing: per layer and size the hit rate, stall, tokens/s and memory
    freed; the throughput curve over total slots and its knee."""
    return cache_table(cache_sizing(choice))


# ---- elastic scaling -------------------------------------------------------------------------
@st.cache_resource(show_spinner="Pricing latency at every size and the scaling steps between them…", max_entries=4)
def elastic_study(setup: Setup, sizes: tuple[int, ...]) -> AutoscaleStudy:
    """:func:`moeplan.solvers.elastic.study.prepare` for the set-up at these sizes."""
    return prepare(CostModel(model_spec(setup.model), profile(setup.hardware)),
                   trace_stats(setup.model, setup.traffic).load, sizes)


@st.cache_data(show_spinner="Simulating autoscaling…", max_entries=8)
def elastic_runs(choice: ElasticChoice) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(:func:`autoscale_frame`: load, devices and latency over time; :func:`summary_frame`) of
    every strategy under the policy."""
    runs = run_all(elastic_study(choice.setup, choice.sizes), (choice.shape,), (choice.seed,), (choice.policy,))
    return autoscale_frame(runs), summary_frame(runs)
