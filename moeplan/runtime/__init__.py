"""The live torch MoE runtime: an expert-parallel MoE layer stack that runs a Plan, re-places
experts while serving, and measures what the cost model predicts.

Modules, each owning one thing:

* :mod:`~moeplan.runtime.weights` — deterministic expert weights (seed, layer, expert) and checksums;
* :mod:`~moeplan.runtime.kernels` — local expert compute, loop or grouped;
* :mod:`~moeplan.runtime.routing` — replica choice by the plan's shares (integer hash, reproducible);
* :mod:`~moeplan.runtime.comm` — the process group (all-to-all, status all-reduce, point-to-point);
* :mod:`~moeplan.runtime.batches` — deterministic batches, trace-driven or router-driven;
* :mod:`~moeplan.runtime.stack` — the expert-parallel MoE layer stack;
* :mod:`~moeplan.runtime.migration` — live re-placement (diff, transfers, commit or roll back);
* :mod:`~moeplan.runtime.ledger` — the batch ledger; :mod:`~moeplan.runtime.serving` — the loop;
* :mod:`~moeplan.runtime.timing` — device-event timing with warm-up and medians;
* single-device modes: :mod:`~moeplan.runtime.local_stack` (every expert local, per layer),
  :mod:`~moeplan.runtime.replay` (per-device replay of a plan), :mod:`~moeplan.runtime.host_moves`.

Multi-rank: ``torchrun --nproc-per-node N -m moeplan.runtime --plan p.json``; one device:
``moeplan run``. Needs torch; nothing outside this package and the profiler imports it.
"""
