"""ParallelMapping and ParallelLayout: how attention and MoE layers are spread over the GPUs.

:class:`ParallelMapping` is the cost model's view: attention layers on ``tp × cp × dp × pp``,
MoE layers on ``etp × ep × edp × pp`` over the same GPUs (MoE Parallel Folding,
NVIDIA/Megatron-LM ``megatron/core/transformer/moe/README.md``). :class:`ParallelLayout` is the
``parallel`` section of a :class:`~moeplan.plan.Plan`: the mapping plus the schedule and
serving settings the plan was solved for. In a plan file it reads::

    {
      "attention": {"tp": int, "cp": int, "dp": int, "pp": int},  # attention / dense layers
      "moe":       {"etp": int, "ep": int, "edp": int},           # MoE layers (optional "pp" = attention pp)
      "vpp": int,                   # optional: virtual pipeline stages per pipeline rank (1 = none)
      "micro_batch": int,           # optional: sequences per micro-batch per DP rank
      "global_batch": int,          # optional: sequences per optimizer step
      "recompute": bool,            # optional: full activation recomputation of every layer
      "distributed_optimizer": bool,# optional: shard optimizer state over DP
      "seq_len": int,               # optional: tokens per sequence (Megatron --seq-length)
      "sequence_parallel": bool,    # optional: default tp > 1 (MoE with TP needs it)
      "mode": "train" | "serve"     # optional: what the folding solver optimised for
    }

Rank order (NVIDIA/Megatron-LM ``megatron/core/parallel_state.py::initialize_model_parallel``,
default order "tp-cp-ep-dp-pp"; RankGenerator keeps CP only in the dense generator and EP only
in the expert one): dense rank = tp + TP·(cp + CP·(dp + DP·pp)), expert rank = etp + ETP·(ep +
EP·(edp + EDP·pp)). The innermost dimensions hold contiguous ranks, so they stay inside a node;
:func:`group_spans` says how many nodes each kind of group touches.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from moeplan.io import Fields

ATTENTION_KEYS = ("tp", "cp", "dp", "pp")
MOE_KEYS = ("etp", "ep", "edp", "pp")
TOP_KEYS = ("attention", "moe", "vpp", "micro_batch", "global_batch", "recompute", "distributed_optimizer",
            "seq_len", "sequence_parallel", "mode")
MODES = ("train", "serve")


@dataclass(frozen=True)
class ParallelMapping:
    """Attention layers on ``tp × cp × dp × pp``, MoE layers on ``etp × ep × edp × pp`` (same PP);
    ``vpp`` virtual pipeline stages per pipeline rank (interleaved 1F1B)."""

    tp: int
    cp: int
    dp: int
    pp: int
    etp: int
    ep: int
    edp: int
    vpp: int = 1

    @property
    def world(self) -> int:
        """GPUs the attention layers span (TP·CP·DP·PP)."""
        return self.tp * self.cp * self.dp * self.pp

    @property
    def expert_world(self) -> int:
        """GPUs the MoE layers span (ETP·EP·EDP·PP); equals ``world`` in a valid mapping."""
        return self.etp * self.ep * self.edp * self.pp

    def label(self) -> str:
        return (f"TP{self.tp}·CP{self.cp}·DP{self.dp}·PP{self.pp} | ETP{self.etp}·EP{self.ep}·EDP{self.edp}"
                + (f" | VPP{self.vpp}" if self.vpp > 1 else ""))


@dataclass(frozen=True)
class ParallelLayout(ParallelMapping):
    """A plan's ``parallel`` section (module docstring): the mapping plus its schedule and
    serving settings. ``micro_batch``, ``global_batch`` and ``seq_len`` are None when unset."""

    micro_batch: int | None = None
    global_batch: int | None = None
    recompute: bool = False
    distributed_optimizer: bool = False
    seq_len: int | None = None
    sequence_parallel: bool = False
    mode: str = "train"

    @property
    def mapping(self) -> ParallelMapping:
        """The group sizes alone, as the cost model prices them."""
        return ParallelMapping(self.tp, self.cp, self.dp, self.pp, self.etp, self.ep, self.edp, self.vpp)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"attention": {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp},
                             "moe": {"etp": self.etp, "ep": self.ep, "edp": self.edp}, "vpp": self.vpp}
        for key in ("micro_batch", "global_batch", "seq_len"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        d.update(recompute=self.recompute, distributed_optimizer=self.distributed_optimizer,
                 sequence_parallel=self.sequence_parallel, mode=self.mode)
        return d

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "ParallelLayout":
        f = Fields(data, source, "parallel.")
        _no_unknown(f, TOP_KEYS)
        att, moe = f.sub("attention"), f.sub("moe")
        _no_unknown(att, ATTENTION_KEYS)
        _no_unknown(moe, MOE_KEYS)
        pp = att.int("pp", 1, minimum=1)
        if moe.has("pp") and moe.int("pp", minimum=1) != pp:
            raise moe.fail("pp", f"is {moe.int('pp')}, attention pp is {pp}: both layer kinds share the pipeline")
        tp = att.int("tp", 1, minimum=1)
        layout = cls(tp=tp, cp=att.int("cp", 1, minimum=1), dp=att.int("dp", 1, minimum=1), pp=pp,
                     etp=moe.int("etp", 1, minimum=1), ep=moe.int("ep", 1, minimum=1),
                     edp=moe.int("edp", 1, minimum=1), vpp=f.int("vpp", 1, minimum=1),
                     micro_batch=f.int("micro_batch", minimum=1) if f.has("micro_batch") else None,
                     global_batch=f.int("global_batch", minimum=1) if f.has("global_batch") else None,
                     recompute=f.bool("recompute", False),
                     distributed_optimizer=f.bool("distributed_optimizer", False),
                     seq_len=f.int("seq_len", minimum=1) if f.has("seq_len") else None,
                     sequence_parallel=f.bool("sequence_parallel", tp > 1),
                     mode=f.str("mode", "train", choices=MODES))
        if layout.expert_world != layout.world:
            raise f.fail("moe", f"etp×ep×edp×pp = {layout.etp}×{layout.ep}×{layout.edp}×{pp} differs from "
                                f"attention tp×cp×dp×pp = {layout.world}",
                         "MoE and attention layers fold onto the same ranks")
        return layout


def _no_unknown(f: Fields, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(f.data) - set(allowed))
    if unknown:
        raise f.fail(unknown[0], "unknown key", f"allowed here: {', '.join(allowed)}")


@dataclass(frozen=True)
class GroupSpan:
    """One kind of process group: ``size`` ranks; ``nodes`` the most nodes any one group spans."""

    size: int
    nodes: int

    @property
    def scope(self) -> str:
        """``intra_node`` when every group stays inside one node's NVLink domain, else ``inter_node``."""
        return "intra_node" if self.nodes <= 1 else "inter_node"


def group_spans(mapping: ParallelMapping, devices_per_node: int) -> dict[str, GroupSpan]:
    """Where each process group lands under Megatron's default rank order (module docstring):
    ``tp``, ``cp``, ``dp``, ``dp_cp`` (dense gradient group), ``pp``, ``etp``, ``ep``, ``edp``."""
    m = mapping
    return _group_spans((m.tp, m.cp, m.dp, m.pp, m.etp, m.ep, m.edp), devices_per_node)


def _group_spans(dims: tuple[int, ...], devices_per_node: int) -> dict[str, GroupSpan]:
    tp, cp, dp, pp, etp, ep, edp = dims
    world = tp * cp * dp * pp
    # A group is an arithmetic progression of ranks: (stride, size) from the rank formulas above.
    return {"tp": _span(1, tp, world, devices_per_node), "cp": _span(tp, cp, world, devices_per_node),
            "dp": _span(tp * cp, dp, world, devices_per_node), "dp_cp": _span(tp, cp * dp, world, devices_per_node),
            "pp": _span(tp * cp * dp, pp, world, devices_per_node), "etp": _span(1, etp, world, devices_per_node),
            "ep": _span(etp, ep, world, devices_per_node), "edp": _span(etp * ep, edp, world, devices_per_node)}


@lru_cache(maxsize=4096)
def _span(stride: int, size: int, world: int, devices_per_node: int) -> GroupSpan:
    """The groups {r, r + stride, …, r + (size−1)·stride} that tile ``world`` ranks: the most
    nodes one of them touches."""
    ranks = np.arange(world).reshape(world // (stride * size), size, stride)
    nodes = ranks // devices_per_node
    return GroupSpan(size, int((1 + (np.diff(nodes, axis=1) != 0).sum(axis=1)).max()))
