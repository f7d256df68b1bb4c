"""Every parallel mapping of a FoldingProblem: the raw grid, and the valid ones.

The raw grid takes TP, CP, PP, ETP and EP from the divisors of the GPU count and derives
DP = world / (TP·CP·PP) and EDP = world / (ETP·EP·PP) where they divide (so the two world
rules hold by construction); each layout then takes every micro-batch, VPP and recompute choice.
A candidate is valid when it breaks no rule of :mod:`moeplan.solvers.folding.rules`: the
enumeration filters with those same rules, so "valid" and "explained" never disagree.
"""
from __future__ import annotations

from collections.abc import Iterator

from moeplan.solvers.folding.problem import Candidate, FoldingProblem
from moeplan.solvers.folding.rules import rules_for

from moeplan.parallel import ParallelMapping


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n``, ascending."""
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def raw_layouts(problem: FoldingProblem) -> Iterator[ParallelMapping]:
    """Every (TP, CP, PP, ETP, EP) from the divisors of the GPU count with DP and EDP filling
    the rest (vpp 1); serving fixes CP = 1."""
    world = problem.world
    cps = divisors(world) if problem.mode == "train" else [1]
    for pp in divisors(world):
        for tp in divisors(world // pp):
            for cp in cps:
                if (world // pp) % (tp * cp):
                    continue
                dp = world // (pp * tp * cp)
                for ep in divisors(world // pp):
                    for etp in divisors(world // (pp * ep)):
                        yield ParallelMapping(tp, cp, dp, pp, etp, ep, world // (pp * ep * etp))


def valid_layouts(problem: FoldingProblem) -> list[ParallelMapping]:
    """Layouts that break no layout rule."""
    rules = rules_for(problem, "layout")
    return [m for m in raw_layouts(problem) if all(r.holds(problem, Candidate(m)) for r in rules)]


def schedules(problem: FoldingProblem, layout: ParallelMapping) -> Iterator[Candidate]:
    """Every (micro-batch, VPP, recompute) choice for one layout, valid or not."""
    recompute = (False, True) if problem.mode == "train" else (False,)
    vpps = divisors(problem.model.num_layers // layout.pp) if problem.mode == "train" and layout.pp > 1 else [1]
    for mbs in problem.micro_batch_choices():
        for vpp in vpps:
            mapping = ParallelMapping(layout.tp, layout.cp, layout.dp, layout.pp, layout.etp, layout.ep, layout.edp, vpp)
            for rc in recompute:
                yield Candidate(mapping, mbs, rc, True)


def valid_schedules(problem: FoldingProblem, layout: ParallelMapping) -> list[Candidate]:
    """The candidates of a valid layout that break no schedule rule."""
    rules = rules_for(problem, "schedule")
    return [c for c in schedules(problem, layout) if all(r.holds(problem, c) for r in rules)]


def valid_candidates(problem: FoldingProblem) -> list[Candidate]:
    """Every valid candidate of the problem."""
    return [c for layout in valid_layouts(problem) for c in valid_schedules(problem, layout)]
