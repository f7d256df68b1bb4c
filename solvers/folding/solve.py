"""Rank the valid mappings of a FoldingProblem with the one cost model and say why each loses.

Training is ranked by predicted step time (:func:`moeplan.parallel_step.train_step`), serving by
time per output token at the requested concurrency (:func:`moeplan.parallel_step.serve_step`,
which prices with :class:`moeplan.serving.ServePredictor`, the model ``moeplan plan serve`` uses). A candidate that does not fit in memory (training) or whose
KV cache cannot hold the concurrent sequences (serving) is infeasible.

Search: every valid layout (TP, CP, DP, PP, ETP, EP, EDP) is priced. When the problem has at
most ``EXHAUSTIVE_LIMIT`` valid candidates every one is priced; beyond that a layout is first
probed at one schedule (the smallest micro-batch, the deepest interleaving, recompute only if it
must) and only the ``BEAM`` best layouts get every micro-batch / VPP / recompute choice. The
forward pass of a (layout, micro-batch) is priced once and shared by its VPP/recompute variants.

Each layout appears once in the ranking, with its best schedule; the reason a runner-up loses
is the part of its step that grows most against the winner's (e.g. "EP all-to-all crosses
nodes (EP16 over 2 nodes): +23 ms"). Equal scores (within TIE_TOLERANCE) go to the mapping
with less model parallelism; candidates whose every predicted part equals an earlier one's
(e.g. CP2 with micro-batch 1 and CP4 with micro-batch 2) are listed as its ``equivalents``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from moeplan.solvers.folding.enumerate import raw_layouts, schedules, valid_layouts, valid_schedules
from moeplan.solvers.folding.problem import Candidate, FoldingProblem
from moeplan.solvers.folding.rules import violations

from moeplan.parallel_step import PassCost, ServeStep, TrainStep, serve_step, train_passes, train_step
from moeplan.errors import InputError
from moeplan.plan import Plan

EXHAUSTIVE_LIMIT = 20_000
BEAM = 48
TIE_TOLERANCE = 1e-4      # relative score difference below which two candidates tie
PART_NAMES = {
    "attention": "attention compute", "moe_compute": "MoE compute", "other_compute": "dense FFN / head compute",
    "tp_comm": "TP/SP collectives", "cp_ring": "CP ring exchange", "ep_all_to_all": "EP all-to-all",
    "etp_comm": "expert-TP collectives", "recompute": "activation recompute", "pp_p2p": "pipeline sends",
    "pipeline_bubble": "pipeline bubble", "dp_grad_sync": "DP/EDP gradient sync", "optimizer_step": "optimizer step",
    "experts": "routed experts", "other": "shared experts / dense FFN / head", "ep_comm": "EP dispatch/combine",
    "overhead": "kernel gaps and per-step framework time",
}


@dataclass
class Ranked:
    """One priced candidate: ``score`` is seconds (training step, or serving time per output
    token; lower is better); ``reason`` says why it loses to the winner (empty for the winner)."""

    candidate: Candidate
    result: TrainStep | ServeStep
    score: float
    fits: bool
    reason: str = ""
    equivalents: list[Candidate] = field(default_factory=list)

    @property
    def breakdown(self) -> dict[str, float]:
        r = self.result
        return r.breakdown if isinstance(r, TrainStep) else r.decode

    def summary(self, problem: FoldingProblem) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.candidate.label(), "parallel": problem.parallel(self.candidate).to_dict(),
                               "score_s": self.score, "fits": self.fits, "reason": self.reason,
                               "memory_peak_bytes": self.result.memory.peak,
                               "equivalents": [c.label() for c in self.equivalents]}
        if isinstance(self.result, TrainStep):
            out.update(step_s=self.result.step, mfu=self.result.mfu)
        else:
            out.update(tpot_s=self.result.tpot, decode_tokens_per_s=self.result.decode_tokens_per_s,
                       ttft_s=self.result.ttft, kv_capacity_tokens=self.result.kv_capacity_tokens)
        return out


@dataclass
class FoldingResult:
    """The ranking (feasible layouts, best first, each with its best schedule), counts, the
    search used and its wall time; ``infeasible`` holds the best-scoring layouts that did not fit."""

    problem: FoldingProblem
    ranked: list[Ranked]
    infeasible: list[Ranked]
    counts: dict[str, int]
    search: str
    seconds: float
    invalid_examples: dict[str, str] = field(default_factory=dict)

    @property
    def best(self) -> Ranked:
        return self.ranked[0]

    def to_plan(self, top: int = 10) -> Plan:
        """The winning mapping as a Plan; runner-ups and their reasons travel in ``predicted``."""
        p, best = self.problem, self.best
        predicted = best.result.to_dict()
        predicted.update(objective=("train_step_s" if p.mode == "train" else "tpot_s"), score_s=best.score,
                         runner_ups=[r.summary(p) for r in self.ranked[1:top]],
                         hardware_note=p.hardware.provenance_note())
        solver = {"name": "folding", "search": self.search, "seconds": self.seconds, "objective": best.score,
                  "tp_comm_overlap": p.tp_comm_overlap and p.mode == "train", **self.counts}
        return Plan(model=p.model, hardware=p.hardware.ref(), devices_per_node=p.devices_per_node,
                    nodes=p.hardware.nodes, parallel=p.parallel(best.candidate), cost_options=p.cost.opt,
                    solver=solver, predicted=predicted).validate()


class _Pricer:
    """Prices candidates, sharing the forward and backward passes of a (layout, micro-batch)."""

    def __init__(self, problem: FoldingProblem) -> None:
        self.problem = problem
        self.cm = problem.cost
        self._passes: dict[tuple[tuple[int, ...], int], tuple[PassCost, PassCost]] = {}
        self.priced = 0

    def price(self, c: Candidate) -> Ranked:
        self.priced += 1
        p = self.problem
        if p.mode == "train":
            setup = p.train_setup(c)
            key = (c.layout, c.micro_batch)
            if key not in self._passes:
                self._passes[key] = train_passes(self.cm, c.mapping, setup)
            r = train_step(self.cm, c.mapping, setup, self._passes[key])
            return Ranked(c, r, r.step, r.memory.fits)
        s = serve_step(self.cm, c.mapping, p.serve_setup(c))
        return Ranked(c, s, s.tpot, s.fits)


def _simplicity(c: Candidate) -> tuple[int, ...]:
    """Tie-break among equal scores: less model parallelism first (Megatron's MoE guide,
    "Guideline 1: Minimize Model Parallelism, Maximize Data Parallelism"), then the plainer schedule."""
    t = c.mapping
    return (t.tp * t.cp * t.pp, t.cp, t.etp, t.ep, t.vpp, c.micro_batch, int(c.recompute))


def _ordered(priced: list[Ranked]) -> list[Ranked]:
    """Best first: score within TIE_TOLERANCE counts as equal and falls to :func:`_simplicity`."""
    if not priced:
        return []
    floor = min(r.score for r in priced)
    return sorted(priced, key=lambda r: (round(r.score / floor / TIE_TOLERANCE), _simplicity(r.candidate)))


def _merge_ties(ordered: list[Ranked]) -> list[Ranked]:
    """Fold each candidate whose prediction equals an earlier one's (every part within
    TIE_TOLERANCE of the score) into that one's ``equivalents``."""
    kept: list[Ranked] = []
    for r in ordered:
        same = next((k for k in kept if abs(k.score - r.score) <= TIE_TOLERANCE * k.score and all(
            abs(v - k.breakdown.get(part, 0.0)) <= TIE_TOLERANCE * k.score for part, v in r.breakdown.items())), None)
        if same is None:
            kept.append(r)
        else:
            same.equivalents.append(r.candidate)
    return kept


def _best(priced: list[Ranked]) -> Ranked:
    """The best feasible candidate, else the one needing the least memory."""
    feasible = [r for r in priced if r.fits]
    if feasible:
        return _ordered(feasible)[0]
    return min(priced, key=lambda r: (r.result.memory.peak, r.score))


def _probe(options: list[Candidate]) -> list[Candidate]:
    """The one or two schedules a layout is probed at in the pruned search."""
    mbs = min(c.micro_batch for c in options)
    first = [c for c in options if c.micro_batch == mbs]
    deepest = max(c.mapping.vpp for c in first)
    return [c for c in first if c.mapping.vpp == deepest]


def solve(problem: FoldingProblem, top: int = 10) -> FoldingResult:
    """Rank the valid mappings of ``problem`` (see the module docstring). Raises InputError
    when no mapping is valid or none fits, naming the rule or the memory it needs."""
    problem.validate()
    start = time.perf_counter()
    raw = list(raw_layouts(problem))
    layouts = valid_layouts(problem)
    options = {layout: valid_schedules(problem, layout) for layout in layouts}
    options = {k: v for k, v in options.items() if v}
    total = sum(len(v) for v in options.values())
    if not options:
        raise InputError(f"no valid parallel mapping for {problem.model.name} on {problem.world} GPUs "
                         f"({_why_none(problem, raw)})", field="gpus",
                         fix="change the GPU count, the sequence length or the batch sizes")
    pricer = _Pricer(problem)
    search = "exhaustive" if total <= EXHAUSTIVE_LIMIT else "pruned"
    if search == "pruned":
        probes = {k: _best([pricer.price(c) for c in _probe(v)]) for k, v in options.items()}
        keep = sorted(probes, key=lambda k: (not probes[k].fits, probes[k].score))[:BEAM]
        options = {k: options[k] for k in keep}
    per_layout = [_best([pricer.price(c) for c in v]) for v in options.values()]
    fitting = [r for r in per_layout if r.fits]
    feasible = _merge_ties(_ordered(fitting))
    infeasible = _ordered([r for r in per_layout if not r.fits])
    if not feasible:
        closest = min(infeasible, key=lambda r: r.result.memory.peak)
        raise InputError(
            f"no mapping fits: the smallest footprint ({closest.candidate.label()}) needs "
            f"{closest.result.memory.peak / 2**30:.1f} GiB per GPU of {closest.result.memory.capacity / 2**30:.1f} GiB"
            + (" or its KV cache cannot hold the concurrent sequences" if problem.mode == "serve" else ""),
            field="gpus", fix="use more GPUs, a smaller batch or shorter sequences")
    for r in feasible[1:]:
        r.reason = why_loses(problem, r, feasible[0])
    counts = {"raw_layouts": len(raw), "valid_layouts": len(layouts), "valid_candidates": total,
              "priced": pricer.priced, "feasible_layouts": len(fitting)}
    return FoldingResult(problem, feasible[:max(top, 1)], infeasible[:max(top, 1)], counts, search,
                         time.perf_counter() - start, _invalid_examples(problem, raw, set(layouts), top))


def _invalid_examples(problem: FoldingProblem, raw: list, valid: set, limit: int) -> dict[str, str]:
    """One invalid layout per broken rule (up to ``limit``), with the rule's explanation."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for m in raw:
        if m in valid:
            continue
        rule = violations(problem, m)[0]
        if rule.id not in seen:
            seen.add(rule.id)
            out[m.label()] = rule.describe(problem, Candidate(m))
        if len(out) == limit:
            break
    return out


def _why_none(problem: FoldingProblem, raw: list) -> str:
    """Up to three distinct rules that the raw candidates break, with an example each."""
    seen: dict[str, str] = {}
    for layout in raw:
        for c in schedules(problem, layout):
            broken = violations(problem, c)
            if broken and broken[0].id not in seen:
                seen[broken[0].id] = f"e.g. {c.label()}: {broken[0].describe(problem, c)}"
            break
        if len(seen) == 3:
            break
    return "; ".join(seen.values()) or "the GPU count leaves nothing to try"


def why_loses(problem: FoldingProblem, loser: Ranked, winner: Ranked) -> str:
    """The one or two parts of ``loser``'s step that grow most against ``winner``'s, in words."""
    lb, wb = loser.breakdown, winner.breakdown
    deltas = sorted(((lb[k] - wb.get(k, 0.0), k) for k in lb), reverse=True)
    grown = [(d, k) for d, k in deltas if d > 0][:2]
    if not grown:
        return "ties with the winner, which uses less model parallelism"
    unit = "" if problem.mode == "train" else " per decode step"
    return "; ".join(f"{_part_label(k, loser, winner)}: +{_seconds(d)}{unit}" for d, k in grown)


def _part_label(part: str, loser: Ranked, winner: Ranked) -> str:
    c, spans = loser.candidate, loser.result.spans
    t = c.mapping
    name = PART_NAMES.get(part, part)
    if part == "dp_grad_sync":
        dense, expert = spans["dp_cp"], spans["edp"]
        return (f"{name} (DP·CP {dense.size} over {dense.nodes} node{'s' if dense.nodes > 1 else ''}, "
                f"EDP {expert.size} over {expert.nodes} node{'s' if expert.nodes > 1 else ''})")
    group = {"ep_all_to_all": "ep", "tp_comm": "tp", "etp_comm": "etp", "cp_ring": "cp"}.get(part)
    if group:
        size, nodes = spans[group].size, spans[group].nodes
        if nodes > 1 and winner.result.spans[group].nodes <= 1:
            return f"{name} crosses nodes ({group.upper()}{size} over {nodes} nodes)"
        return f"{name} ({group.upper()}{size}{'' if nodes <= 1 else f' over {nodes} nodes'})"
    if part == "pipeline_bubble":
        m = loser.result.microbatches if isinstance(loser.result, TrainStep) else 0
        return f"{name} (PP{t.pp}, VPP{t.vpp}, {m} micro-batches)"
    if part == "recompute":
        return f"{name} (needed to fit {loser.result.memory.capacity / 2**30:.0f} GiB)"
    return name


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def price(problem: FoldingProblem, candidate: Candidate) -> Ranked:
    """Price one candidate (valid or not: check it with :func:`explain_invalid` first)."""
    return _Pricer(problem).price(candidate)

