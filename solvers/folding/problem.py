"""FoldingProblem: what the folding planner is asked, and Candidate: one answer it weighs.

A problem is a model on a cluster (a HardwareProfile already shaped to the GPU count) with a
workload: training (``seq_len``-token sequences, ``global_batch`` of them per step,
``micro_batch`` fixed or searched; the distributed optimizer and Megatron's --tp-comm-overlap
on or off) or serving (requests of ``seq_len`` tokens, ``global_batch``
of them decoding concurrently, ``micro_batch`` prompts per prefill step per attention replica).
A candidate is a parallel mapping (:class:`moeplan.cost.ParallelMapping`) with the training
knobs that go with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from moeplan.cost import CostModel, ParallelMapping, ServeSetup, TrainSetup
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec

MODES = ("train", "serve")
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
    def from_parallel(cls, parallel: dict[str, Any]) -> Candidate:
        """The candidate a ``Plan.parallel`` record describes (the inverse of
        :meth:`FoldingProblem.parallel`), e.g. to re-price a saved plan."""
        a, m = parallel["attention"], parallel["moe"]
        mapping = ParallelMapping(a["tp"], a["cp"], a["dp"], a["pp"], m["etp"], m["ep"], m["edp"],
                                  parallel.get("vpp", 1))
        return cls(mapping, parallel.get("micro_batch", 1), bool(parallel.get("recompute", False)),
                   bool(parallel.get("sequence_parallel", a["tp"] > 1)) or parallel.get("mode") == "serve")


@dataclass(frozen=True)
class FoldingProblem:
    """Plan the attention/MoE parallel mapping of ``model`` on ``hardware`` (whose cluster shape
    gives the GPU count and GPUs per node). See the module docstring for the workload fields."""

    model: ModelSpec
    hardware: HardwareProfile
    mode: str = "train"
    seq_len: int = 4096
    global_batch: int = 1024
    micro_batch: int | None = None
    distributed_optimizer: bool = True
    tp_comm_overlap: bool = False

    def validate(self) -> FoldingProblem:
        if self.mode not in MODES:
            raise InputError(f"mode must be train or serve, got {self.mode!r}", field="mode",
                             fix="use --mode train or --mode serve")
        for name in ("seq_len", "global_batch"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be ≥ 1, got {getattr(self, name)}", field=name)
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

    @cached_property
    def cost_model(self) -> CostModel:
        return CostModel(self.model, self.hardware)

    def micro_batch_choices(self) -> tuple[int, ...]:
        """Micro-batch sizes the search tries (the fixed one when given)."""
        if self.micro_batch is not None:
            return (self.micro_batch,)
        return MICRO_BATCH_CHOICES if self.mode == "train" else (1,)

    def train_setup(self, candidate: Candidate) -> TrainSetup:
        return TrainSetup(self.seq_len, self.global_batch, candidate.micro_batch, candidate.recompute,
                          self.distributed_optimizer, self.tp_comm_overlap)

    def serve_setup(self, candidate: Candidate) -> ServeSetup:
        return ServeSetup(self.seq_len, self.global_batch, candidate.micro_batch)

    def parallel(self, candidate: Candidate) -> dict[str, Any]:
        """The ``Plan.parallel`` record of a candidate."""
        m = candidate.mapping
        return {"attention": {"tp": m.tp, "cp": m.cp, "dp": m.dp, "pp": m.pp},
                "moe": {"etp": m.etp, "ep": m.ep, "edp": m.edp}, "vpp": m.vpp,
                "micro_batch": candidate.micro_batch, "global_batch": self.global_batch,
                "seq_len": self.seq_len, "recompute": candidate.recompute,
                "distributed_optimizer": self.distributed_optimizer and self.mode == "train",
                "sequence_parallel": candidate.sequence_parallel and m.tp > 1 and self.mode == "train",
                "mode": self.mode}
