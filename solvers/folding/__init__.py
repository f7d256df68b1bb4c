"""Parallel folding planner: choose the attention (TP × CP × DP × PP) and MoE (ETP × EP × EDP ×
PP) parallel mappings of a MoE model on a cluster, for training (Megatron-Core MoE Parallel
Folding) or serving (DP attention with wide EP), priced by :mod:`moeplan.cost` section 6.

- :mod:`.problem` — FoldingProblem (model, cluster, workload) and Candidate (a mapping + knobs);
- :mod:`.rules` — the validity rules with their sources, ``violations`` / ``explain_invalid``;
- :mod:`.enumerate` — every layout and schedule, valid or not;
- :mod:`.solve` — ranking, pruned search for large problems, why each runner-up loses, Plan.
"""
from moeplan.solvers.folding.enumerate import divisors, raw_layouts, valid_candidates, valid_layouts, valid_schedules
from moeplan.solvers.folding.problem import Candidate, FoldingProblem
from moeplan.solvers.folding.rules import RULES, Rule, explain_invalid, violations
from moeplan.solvers.folding.solve import FoldingResult, Ranked, price, solve, why_loses

__all__ = [
           "RULES",
           "Candidate",
           "FoldingProblem",
           "FoldingResult",
           "Ranked",
           "Rule",
           "divisors",
           "explain_invalid",
           "price",
           "raw_layouts",
           "solve",
           "valid_candidates",
           "valid_layouts",
           "valid_schedules",
           "violations",
           "why_loses",
]
