"""FoldingProblem: what the folding planner is asked, and Candidate: one answer it weighs.

A problem is a cost model (a model on a cluster: its HardwareProfile already shaped to the GPU
count, with the caller's CostOptions) and a workload: training (``seq_len``-token sequences, ``global_batch`` of them per step,
``micro_batch`` fixed or searched; the distributed optimizer and Megatron's --tp-comm-overlap
on or off) or serving (requests of ``seq_len`` prompt tokens and ``osl`` output tokens, ``global_batch``
of them in flight, in ``precision`` on ``backend``, priced by :mod:`moeplan.serving` as
``moeplan plan serve`` prices them).
A candidate is a parallel mapping (:class:`moeplan.parallel.ParallelMapping`) with the training
knobs that go with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from moeplan.cost import CostModel, PricedProblem
from moeplan.errors import InputError
from moeplan.parallel import MODES, ParallelLayout, ParallelMapping
from moeplan.parallel_step import ServeSetup, TrainSetup
from moeplan.precision import Precision

MICRO_BATCH_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Candidate:
    """A mapping with its knobs: ``micro_batch`` sequences per micro-batch (serving: prompts
    per prefill step), full activation ``recompute``, ``sequence_parallel`` (meaningful with TP > 1)."""

    mapping: ParallelMapping
    micro_batch: int = 1
    recompute: bool = False
    sequence_parallel: bool = True

    @property
    def layout(self) -> tuple[int, ...]:
        """The group sizes without the schedule knobs: (tp, cp, dp, pp, etp, ep, edp)."""
        m = self.mapping
        return (m.tp, m.cp, m.dp, m.pp, m.etp, m.ep, m.edp)

    def label(self) -> str:
        return (f"{self.mapping.label()} | mbs{self.micro_batch}"
                + (" | recompute" if self.recompute else ""))

    @classmethod
    def from_layout(cls, layout: ParallelLayout) -> Candidate:
        """The candidate a plan's ``parallel`` section describes (the inverse of
        :meth:`FoldingProblem.parallel`), e.g. to re-price a saved plan."""
        return cls(layout.mapping, layout.micro_batch or 1, layout.recompute,
                   layout.sequence_parallel or layout.mode == "serve")


@dataclass(frozen=True)
class FoldingProblem(PricedProblem):
    """Plan the attention/MoE parallel mapping of ``cost.model`` on ``cost.hw`` (whose cluster
    shape gives the GPU count and GPUs per node). See the module docstring for the workload fields."""

    cost: CostModel
    mode: str = "train"
    seq_len: int = 4096
    global_batch: int = 1024
    micro_batch: int | None = None
    distributed_optimizer: bool = True
    tp_comm_overlap: bool = False
    osl: int = 1024
    precision: Precision = field(default_factory=Precision)
    backend: str = "sglang"

    def validate(self) -> FoldingProblem:
        if self.mode not in MODES:
            raise InputError(f"mode must be train or serve, got {self.mode!r}", field="mode",
                             fix="use --mode train or --mode serve")
        for name in ("seq_len", "global_batch"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be ≥ 1, got {getattr(self, name)}", field=name)
        if self.mode == "serve" and self.micro_batch not in (None, 1):
            raise InputError(f"serving prices one prompt per prefill (got micro-batch {self.micro_batch})",
                             field="micro_batch", fix="leave --mbs out in serve mode")
        if self.osl < 1:
            raise InputError(f"osl must be ≥ 1, got {self.osl}", field="osl")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise InputError(f"micro_batch must be ≥ 1, got {self.micro_batch}", field="micro_batch")
        if self.mode == "train" and self.micro_batch is not None and self.global_batch % self.micro_batch:
            raise InputError(f"global batch {self.global_batch} is not a multiple of micro-batch {self.micro_batch}",
                             field="global_batch", fix="choose a global batch divisible by the micro-batch")
        return self

    @property
    def world(self) -> int:
        """GPUs in the cluster."""
        return self.hardware.num_devices

    @property
    def devices_per_node(self) -> int:
        return self.hardware.devices_per_node

    def micro_batch_choices(self) -> tuple[int, ...]:
        """Micro-batch sizes the search tries (the fixed one when given)."""
        if self.micro_batch is not None:
            return (self.micro_batch,)
        return MICRO_BATCH_CHOICES if self.mode == "train" else (1,)

    def train_setup(self, candidate: Candidate) -> TrainSetup:
        return TrainSetup(self.seq_len, self.global_batch, candidate.micro_batch, candidate.recompute,
                          self.distributed_optimizer, self.tp_comm_overlap)

    def serve_setup(self, candidate: Candidate) -> ServeSetup:
        return ServeSetup(self.seq_len, self.global_batch, self.osl, self.precision, self.backend)

    def parallel(self, candidate: Candidate) -> ParallelLayout:
        """A plan's ``parallel`` section for a candidate."""
        m = candidate.mapping
        return ParallelLayout(m.tp, m.cp, m.dp, m.pp, m.etp, m.ep, m.edp, m.vpp,
                              micro_batch=candidate.micro_batch, global_batch=self.global_batch,
                              recompute=candidate.recompute,
                              distributed_optimizer=self.distributed_optimizer and self.mode == "train",
                              seq_len=self.seq_len,
                              sequence_parallel=candidate.sequence_parallel and m.tp > 1 and self.mode == "train",
                              mode=self.mode)
