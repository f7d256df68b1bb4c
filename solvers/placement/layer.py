"""One MoE layer with its neighbours fixed: the MoETuner-style layer model and token shares.

With layers l−1 and l+1 placed, the objective's part that depends on layer l is linear in the
tokens ``y[e, d]`` of expert e served on device d:

    compute · max_d Σ_e y[e, d]  +  Σ_{e,d} unit_cost[e, d] · y[e, d]

where ``unit_cost[e, d]`` is the traffic (seconds, per device) of one of e's token-choices served
on d: the tokens reach e from the devices of their experts at l−1 (``a_in``) and leave for the
devices of their experts at l+1 (``a_out``). :func:`layer_model` writes this as a linear model over
candidate (expert, device) pairs: binary ``x`` (the pair holds a replica), tokens ``y`` and the
max load; :func:`balance_shares` solves it with the replicas fixed (an LP) to set the token split
among replicas (``replica_share``), optionally capping the max load at ``cap`` × mean.
"""
from __future__ import annotations

import numpy as np

from .milp import LinearModel, solve_lp
from .problem import PlacementProblem


def neighbour_affinity(problem: PlacementProblem, layer: int, shares: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """``a_in[e, d]``: tokens reaching expert e of ``layer`` from device d (their experts at
    layer−1); ``a_out[e, d]``: tokens leaving e for device d at layer+1. ``shares[l]`` is layer l's
    [experts, devices] device share, or None while unplaced (that side then counts nothing)."""
    e, d = problem.num_experts, problem.num_devices
    a_in = np.zeros((e, d))
    a_out = np.zeros((e, d))
    if layer > 0 and shares[layer - 1] is not None:
        a_in = problem.flows[layer - 1].T @ shares[layer - 1]
    if layer < problem.num_layers - 1 and shares[layer + 1] is not None:
        a_out = problem.flows[layer] @ shares[layer + 1]
    return a_in, a_out


def unit_costs(problem: PlacementProblem, layer: int, a_in: np.ndarray, a_out: np.ndarray) -> np.ndarray:
    """[experts, devices] seconds (per device of the all-to-all) per token-choice of expert e
    served on device d, given the neighbours' affinities."""
    w = problem.link_matrix()
    load = problem.load[layer]
    traffic = a_in @ w + a_out @ w.T
    return np.divide(traffic, load[:, None] * problem.num_devices, out=np.zeros_like(traffic),
                     where=load[:, None] > 0)


def layer_model(load: np.ndarray, pair_expert: np.ndarray, pair_device: np.ndarray, pair_cost: np.ndarray,
                devices: int, slots: int, lmax_weight: float, lmax_upper: float,
                integer: bool) -> tuple[LinearModel, np.ndarray, np.ndarray, int]:
    """The layer model over candidate pairs (module docstring).

    Args:
        load: [experts] token-choices (integers when ``integer``).
        pair_expert, pair_device: the candidate (expert, device) pairs.
        pair_cost: objective coefficient of one token-choice on each pair.
        lmax_weight: objective coefficient of the max device load; lmax_upper: its upper bound.
        integer: binary placement variables ``x`` with the slot and coverage rows (the MILP);
            otherwise every pair holds a replica and only the split is free (the LP).

    Returns the model and the indices of ``x`` (empty for the LP), ``y`` and the max load.
    """
    e = load.shape[0]
    n = pair_expert.shape[0]
    m = LinearModel()
    ix = m.add_vars(n, 0, 1, True) if integer else np.zeros(0, dtype=np.int64)
    iy = m.add_vars(n, 0, load[pair_expert], integer, cost=pair_cost)
    il = int(m.add_vars(1, 0, lmax_upper, integer, cost=lmax_weight)[0])
    pairs = np.arange(n)
    m.add_rows(pair_expert, iy, 1.0, e, load, load)
    m.add_rows(np.concatenate([pair_device, np.arange(devices)]), np.concatenate([iy, np.full(devices, il)]),
               np.concatenate([np.ones(n), -np.ones(devices)]), devices, -np.inf, 0.0)
    if integer:
        m.add_rows(pair_expert, ix, 1.0, e, 1.0, np.inf)
        m.add_rows(pair_device, ix, 1.0, devices, -np.inf, float(slots))
        m.add_rows(np.concatenate([pairs, pairs]), np.concatenate([iy, ix]),
                   np.concatenate([np.ones(n), -load[pair_expert]]), n, -np.inf, 0.0)
    return m, ix, iy, il


def balance_shares(slot_expert: np.ndarray, load: np.ndarray, unit_cost: np.ndarray | None, compute: float,
                   cap: float | None) -> np.ndarray:
    """Token shares [devices, slots] for one layer's fixed replicas: the split that minimises
    ``compute`` · max load + traffic (``unit_cost`` [experts, devices], or None for balance only),
    with the max load held to ``cap`` × mean where the replicas allow it (else the least max load
    they allow). Duplicate slots of one expert on one device split that device's part equally."""
    d, s = slot_expert.shape
    e = load.shape[0]
    dev = np.repeat(np.arange(d), s)
    key = np.unique(slot_expert.ravel().astype(np.int64) * d + dev)
    pe, pd = key // d, key % d
    ld = load.astype(np.float64)
    total = float(ld.sum())
    mean = total / d if total > 0 else 1.0
    scale = 1.0 / mean
    cost = np.zeros(pe.shape[0]) if unit_cost is None else unit_cost[pe, pd] / compute

    def run(pair_cost: np.ndarray, upper: float) -> np.ndarray | None:
        model, _, iy, _ = layer_model(ld * scale, pe, pd, pair_cost, d, s, 1.0, upper, integer=False)
        sol = solve_lp(model)
        return None if sol.values is None else sol.values[iy] / scale

    y = run(cost, cap * mean * scale if cap is not None else np.inf)
    if y is None:  # the cap is out of reach: the least max load first, then the cheapest split at it
        least = run(np.zeros_like(cost), np.inf)
        if least is None:
            raise RuntimeError("share LP failed")
        peak = float(np.bincount(pd, weights=least, minlength=d).max()) * scale
        y = run(cost, peak * (1 + 1e-9))
    if y is None:
        raise RuntimeError("share LP failed")
    pair_share = np.divide(y, ld[pe], out=np.zeros_like(y), where=ld[pe] > 0)
    pair_share = np.where(ld[pe] > 0, pair_share, 1.0 / np.bincount(pe, minlength=e)[pe])
    share_of = np.zeros(e * d)
    share_of[key] = pair_share
    slot_key = slot_expert.ravel().astype(np.int64) * d + dev
    per_slot = (share_of[slot_key] / np.bincount(slot_key, minlength=e * d)[slot_key]).reshape(d, s)
    sums = np.bincount(slot_expert.ravel(), weights=per_slot.ravel(), minlength=e)
    return per_slot / sums[slot_expert]


def layer_device_share(slot_expert: np.ndarray, replica_share: np.ndarray, num_experts: int) -> np.ndarray:
    """[experts, devices] share of each expert's tokens served on each device, for one layer."""
    d, s = slot_expert.shape
    out = np.zeros((num_experts, d))
    np.add.at(out, (slot_expert.ravel(), np.repeat(np.arange(d), s)), replica_share.ravel())
    return out


def layer_objective(compute: float, load: np.ndarray, device_share: np.ndarray, unit_cost: np.ndarray) -> float:
    """The layer's part of the objective with its neighbours fixed, in seconds per trace (multiply
    by the step scale for seconds per step)."""
    y = load[:, None] * device_share
    return float(compute * y.sum(axis=0).max() + (y * unit_cost).sum())
