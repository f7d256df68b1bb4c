"""Dispatch models: how a runtime splits one logical expert's token-choices over its replicas.

A placement's balance is only what the runtime that serves it makes of it. Every part of moeplan
that solves, scores, predicts, simulates, exports or runs a placement takes the token shares
from here (:func:`realised_share`), so the figure it reports is the one the runtime realises:

* ``weighted``: the plan's own ``replica_share`` (any split); only moeplan's runtime
  (:mod:`moeplan.runtime.routing`) honours it.
* ``even``: every replica gets ``1 / replicas`` of its expert's tokens — what DeepSeek's EPLB
  assumes when it balances ``weight / logcnt`` and what vLLM's EPLB does (it spreads an
  expert's token-choices over its replicas by position).
* ``sglang-static``: SGLang's static dispatch, ``compute_logical_to_rank_dispatch_physical_map``
  in ``python/sglang/srt/eplb/expert_location.py`` (sgl-project/sglang @
  ``01fec5c2e61f9568c41a6e1d4fd5ac46c88504f1``): for every decoder layer (dense rows included)
  and logical expert in order, each rank that holds replicas dispatches to the first of them
  (lowest physical id); the remaining ranks get ``_fair_choices(candidates, k=remaining)`` from
  one ``random.Random(42)`` stream — each candidate ``remaining // replicas`` times plus a
  ``sample`` of the rest, shuffled. Each rank then sends all its tokens for that expert to its
  one replica. With every rank originating the same share of tokens (EP/DP attention spreads
  requests over ranks), a replica serves (ranks that dispatch to it) / ranks of the expert's
  tokens. When an expert's replicas sit on distinct ranks and their count divides the rank
  count this equals ``even`` exactly; otherwise some replicas get one rank more.

Shares are float64 ``[moe_layers, devices, slots]`` fractions of the expert's token-choices,
summing to 1 over each expert's replicas (the layout of :class:`moeplan.plan.Placement`).
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np

from moeplan.errors import InputError

if TYPE_CHECKING:
    from moeplan.model import ModelSpec
    from moeplan.plan import Placement, Plan

RUNTIME_DISPATCH = {"sglang": "sglang-static", "eplb": "even", "vllm": "even"}
"""The dispatch model each export format's runtime applies."""
SGLANG_SEED = 42


def even_share(slot_expert: np.ndarray, num_experts: int) -> np.ndarray:
    """[layers, devices, slots] ``1 / replicas`` of each slot's expert."""
    se = np.asarray(slot_expert, dtype=np.int64)
    nl = se.shape[0]
    flat = (se.reshape(nl, -1) + (np.arange(nl) * num_experts)[:, None])
    counts = np.bincount(flat.ravel(), minlength=nl * num_experts)
    return (1.0 / counts[flat]).reshape(se.shape)


def sglang_rank_dispatch(phy2log: np.ndarray, ep_size: int, seed: int = SGLANG_SEED) -> np.ndarray:
    """int64 [ep_size, rows, experts]: the physical expert each rank dispatches each logical expert
    to, for SGLang's full ``physical_to_logical_map`` [num_hidden_layers, E + R] (module docstring)."""
    rows, num_physical = phy2log.shape
    num_experts = int(phy2log.max()) + 1
    local = num_physical // ep_size
    r = random.Random(seed)
    out = np.full((ep_size, rows, num_experts), -1, dtype=np.int64)
    for layer in range(rows):
        candidates_of: list[list[int]] = [[] for _ in range(num_experts)]
        for physical, logical in enumerate(phy2log[layer].tolist()):
            candidates_of[logical].append(physical)
        for logical, candidates in enumerate(candidates_of):
            column = out[:, layer, logical]
            for physical in reversed(candidates):
                column[physical // local] = physical
            remaining = np.flatnonzero(column == -1)
            column[remaining] = _fair_choices(candidates, len(remaining), r)
    return out


def _fair_choices(candidates: list[int], k: int, r: random.Random) -> list[int]:
    """SGLang's ``_fair_choices``: each candidate ``k // n`` times plus a sample of the rest, shuffled."""
    quotient, remainder = divmod(k, len(candidates))
    picked = candidates * quotient + r.sample(candidates, k=remainder)
    r.shuffle(picked)
    return picked


def sglang_static_share(phy2log: np.ndarray, ep_size: int) -> np.ndarray:
    """float64 [rows, E + R]: share of its expert's tokens each physical expert serves under SGLang's
    static dispatch, every rank originating the same share of tokens."""
    rows, num_physical = phy2log.shape
    chosen = sglang_rank_dispatch(phy2log, ep_size)
    share = np.zeros((rows, num_physical))
    for layer in range(rows):
        share[layer] = np.bincount(chosen[:, layer].ravel(), minlength=num_physical) / ep_size
    return share


def sglang_full_map(slot_expert: np.ndarray, model: "ModelSpec") -> np.ndarray:
    """[num_hidden_layers, E + R] map SGLang loads for MoE rows ``slot_expert`` [moe_layers, devices,
    slots]: dense rows as :func:`moeplan.export.sglang.dense_row`."""
    from moeplan.export.sglang import dense_row

    nl = slot_expert.shape[0]
    moe_rows = np.asarray(slot_expert, dtype=np.int64).reshape(nl, -1)
    out = np.tile(dense_row(moe_rows.shape[1], model.num_experts), (model.num_layers, 1))
    out[list(model.moe_layers)] = moe_rows
    return out


def realised_share(slot_expert: np.ndarray, dispatch: str, model: "ModelSpec",
                   replica_share: np.ndarray | None = None) -> np.ndarray:
    """[layers, devices, slots] shares the ``dispatch`` model realises for ``slot_expert``
    [moe_layers, devices, slots] of ``model`` (``weighted`` returns ``replica_share``)."""
    if dispatch == "weighted":
        if replica_share is None:
            raise InputError("a weighted placement needs its replica shares", field="placement.replica_share")
        return np.asarray(replica_share, dtype=np.float64)
    if dispatch == "even":
        return even_share(slot_expert, model.num_experts)
    if dispatch == "sglang-static":
        devices = slot_expert.shape[1]
        full = sglang_static_share(sglang_full_map(slot_expert, model), devices)
        return full[list(model.moe_layers)].reshape(slot_expert.shape)
    from moeplan.plan import DISPATCH_MODELS
    raise InputError(f"unknown dispatch model {dispatch!r}", field="dispatch", fix=f"use one of: {', '.join(DISPATCH_MODELS)}")


def realise(placement: "Placement", dispatch: str, model: "ModelSpec") -> "Placement":
    """``placement`` served under ``dispatch``: same slots, the shares that runtime realises."""
    from moeplan.plan import Placement

    share = realised_share(placement.slot_expert, dispatch, model, placement.replica_share)
    return Placement(placement.slot_expert.copy(), share, placement.num_experts, placement.devices_per_node, dispatch)


def shares_match(placement: "Placement", dispatch: str, model: "ModelSpec", atol: float = 1e-6) -> bool:
    """True when ``dispatch`` realises ``placement``'s own shares."""
    realised = realised_share(placement.slot_expert, dispatch, model, placement.replica_share)
    return bool(np.allclose(realised, placement.replica_share, atol=atol))


def check_export(plan: "Plan", fmt: str) -> None:
    """Refuse (InputError, exit 2) to export a ``weighted`` plan to format ``fmt`` when that
    runtime's dispatch realises other shares than the plan's, naming the balancedness it would
    realise (``predicted.realised_balancedness``, recorded at planning time)."""
    placement, target = plan.placement, RUNTIME_DISPATCH.get(fmt)
    if placement is None or target is None or placement.dispatch != "weighted":
        return
    if shares_match(placement, target, plan.model):
        return
    realised = plan.predicted.get("realised_balancedness", {})
    said = plan.predicted.get("balancedness")
    figure = (f"{fmt} would balance it at {realised[target]:.4f}" if target in realised else
              f"{fmt}'s balance was not recorded in the plan")
    claim = f" (the plan reports {said:.4f} under its own shares)" if isinstance(said, (int, float)) else ""
    raise InputError(f"the plan's replica shares assume weighted dispatch, which {fmt} cannot honour: {figure} "
                     f"under {target} dispatch{claim}", field="placement.dispatch",
                     fix=f"re-solve with --dispatch {target} (moeplan plan placement / moeplan plan)")
