"""Baseline placements: what runtimes do by default, and greedy LPT.

* ``contiguous``: expert e on device ⌊e·D/E⌋ (e // (E/D) when D divides E: the runtime default of
  SGLang, vLLM "linear" and Megatron); the extra slots hold replicas of the hottest experts (EPLB's
  replica rule), each on the least loaded device with room.
* ``round_robin``: expert e on device e mod D (vLLM's "round_robin"); extra slots as above.
* ``lpt``: replicas by EPLB's rule, then longest processing time first: the heaviest replica
  (load / replicas) to the least loaded device with room.

Replicas split their expert's tokens equally, as the runtimes do.
"""
from __future__ import annotations

import time

import numpy as np

from moeplan.plan import Placement

from .options import SolverOptions
from .problem import PlacementProblem
from .replication import SlotPacker, pack_lpt, replica_counts
from .result import SolveResult, finish


def _fixed_primaries(problem: PlacementProblem, primary_device: np.ndarray, name: str, rule: str) -> SolveResult:
    t0 = time.perf_counter()
    e, d, s = problem.num_experts, problem.num_devices, problem.slots_per_device
    layers = []
    for load in problem.load:
        counts = replica_counts(load, d * s, d)
        packer = SlotPacker(e, d, s)
        for expert in range(e):
            packer.put(expert, float(load[expert] / counts[expert]), int(primary_device[expert]))
        layers.append(pack_lpt(load / counts, counts - 1, d, s, packer))
    placement = Placement.from_slots(np.stack(layers), e, problem.devices_per_node)
    return finish(problem, placement, name, t0,
                  [f"{rule}; extra slots hold replicas of the hottest experts; equal token shares"])


def solve_contiguous(problem: PlacementProblem, options: SolverOptions) -> SolveResult:
    """The runtime default (module docstring)."""
    e, d = problem.num_experts, problem.num_devices
    return _fixed_primaries(problem, np.arange(e) * d // e, "contiguous", "expert e on device ⌊e·D/E⌋")


def solve_round_robin(problem: PlacementProblem, options: SolverOptions) -> SolveResult:
    """Expert e on device e mod D (module docstring)."""
    return _fixed_primaries(problem, np.arange(problem.num_experts) % problem.num_devices, "round_robin",
                            "expert e on device e mod D")


def solve_lpt(problem: PlacementProblem, options: SolverOptions) -> SolveResult:
    """Greedy LPT with EPLB's replica rule (module docstring)."""
    t0 = time.perf_counter()
    d, s = problem.num_devices, problem.slots_per_device
    layers = []
    for load in problem.load:
        counts = replica_counts(load, d * s, d)
        layers.append(pack_lpt(load / counts, counts, d, s))
    placement = Placement.from_slots(np.stack(layers), problem.num_experts, problem.devices_per_node)
    return finish(problem, placement, "lpt", t0,
                  ["replicas by highest load per replica; heaviest replica to the least loaded device; "
                   "equal token shares"])
