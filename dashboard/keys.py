"""The inputs of every what-if, as small frozen dataclasses: Streamlit hashes them field by field
to key its caches (:mod:`moeplan.dashboard.compute`), so a cached result is reused exactly when
every input it depends on is the same. Uploaded files appear by their digest
(:mod:`moeplan.dashboard.uploads`), not their bytes."""
from __future__ import annotations

from dataclasses import dataclass

from moeplan.solvers.placement import SolverOptions

from moeplan.synth import SyntheticTraffic

SOLVER_NAMES = ("contiguous", "eplb", "lpt", "exflow", "ilp")
BACKGROUND = ("exflow", "ilp")  # slow solvers: solved in a background thread with progress shown
SOLVER_LABELS = {"contiguous": "contiguous", "eplb": "EPLB", "lpt": "LPT", "exflow": "ExFlow", "ilp": "ILP"}
SOLVER_HELP = {"contiguous": "expert e on GPU ⌊e·D/E⌋, the runtimes' default; spare slots replicate hot experts",
               "eplb": "DeepSeek's EPLB: hierarchical packing of expert groups onto nodes, then GPUs",
               "lpt": "greedy longest-processing-time: heaviest replica to the least loaded GPU",
               "exflow": "ExFlow affinity: experts that tokens chain through across layers share a GPU or node",
               "ilp": "MoETuner-style ILP per layer (CP-SAT), warm-started from the best heuristic"}


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


@dataclass(frozen=True)
class LoadFile:
    """One recorded-load file (:func:`moeplan.loads.read_load`): an upload (``upload``: its digest,
    ``name``: the file's name) or a path on the dashboard's machine (``path``)."""

    path: str = ""
    upload: str = ""
    name: str = ""


@dataclass(frozen=True)
class LoadsKey:
    """A placement planned from recorded loads alone (``moeplan plan placement --load``): the
    set-up's model and cluster, the workloads, slots and tokens per GPU, the runtime's dispatch
    model, the robust objective and whether to judge leave-one-out."""

    setup: Setup
    files: tuple[LoadFile, ...]
    slots: int
    tokens_per_device: int = 4096
    dispatch: str = "sglang-static"
    robust: str = "mean"
    leave_one_out: bool = False


@dataclass(frozen=True)
class FoldingChoice:
    """A parallel-folding question: the set-up's model and cluster with a workload."""

    setup: Setup
    mode: str = "serve"
    seq_len: int = 4096
    global_batch: int = 256
    micro_batch: int | None = None
    tp_comm_overlap: bool = False


@dataclass(frozen=True)
class CacheChoice:
    """An expert-cache question: the set-up's model, trace and one GPU of its hardware profile,
    serving ``batch`` sequences per decode step (or ``batch``-token prefill chunks) with
    ``context`` tokens of KV cache each, within ``budget_bytes`` (None: the profile's memory × 0.9)."""

    setup: Setup
    policy: str = "prefetch"
    phase: str = "decode"
    batch: int = 1
    context: int = 4096
    budget_bytes: float | None = None


@dataclass(frozen=True)
class ElasticChoice:
    """An autoscaling question: the set-up's model, trace load and hardware, running at any of
    ``sizes`` GPUs, under a traffic ``shape`` (seed ``seed``) and a scaling ``policy``."""

    setup: Setup
    sizes: tuple[int, ...]
    shape: str = "diurnal"
    policy: str = "threshold"
    seed: int = 0
