"""DeepSeek's EPLB (github.com/deepseek-ai/EPLB, ``eplb.py``), reimplemented in numpy.

``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)`` follows the
reference step by step:

* hierarchical policy when ``num_groups % num_nodes == 0``: pack expert groups (contiguous id
  blocks) onto nodes with :func:`balanced_packing`, replicate the hottest experts inside each node
  by the highest load per replica (:func:`replicate_experts`), then pack each node's physical
  experts onto its GPUs;
* otherwise the global policy, which is the hierarchical one with one group and one node.

Physical slots are GPU-major: GPU g owns slots ``[g·P/G, (g+1)·P/G)``, node n owns GPUs
``[n·G/N, (n+1)·G/N)``. The reference sorts ``weight.float()`` with torch's default (unstable) sort;
here loads are sorted as float32 too, descending, ties to the lower index (a stable sort). Replicas of one expert
always tie, and torch orders ties by its implementation, so the outputs equal the reference's run with
``sort(..., stable=True)`` (tested on 24 random cases, ``tests/test_eplb_reference.py``); with torch's default
sort the balance is the same and the slot order of tied experts may differ. Replicas of one expert share its
tokens equally, as the runtimes do.
"""
from __future__ import annotations

import time

import numpy as np

from moeplan.errors import InputError
from moeplan.plan import Placement

from .options import SolverOptions
from .problem import PlacementProblem
from .result import SolveResult, finish


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the n items of each row of ``weight`` [X, n] into ``num_packs`` packs of n/num_packs
    items each, heaviest item first into the lightest pack that still has room.

    Returns ``pack_index`` and ``rank_in_pack``, both int64 [X, n]."""
    rows, n = weight.shape
    if n % num_packs:
        raise InputError(f"{n} items do not split into {num_packs} equal packs", field="num_packs")
    per_pack = n // num_packs
    if per_pack == 1:
        return np.broadcast_to(np.arange(n), (rows, n)).copy(), np.zeros((rows, n), dtype=np.int64)
    pack_index = np.full((rows, n), -1, dtype=np.int64)
    rank_in_pack = np.full((rows, n), -1, dtype=np.int64)
    for i in range(rows):
        pack_weight = np.zeros(num_packs)
        pack_items = np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight[i].astype(np.float32), kind="stable"):
            pack = int(np.where(pack_items < per_pack, pack_weight, np.inf).argmin())
            pack_index[i, item] = pack
            rank_in_pack[i, item] = pack_items[pack]
            pack_weight[pack] += weight[i, item]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each row's ``num_physical − n`` extra slots, one at a time, to the expert with the
    highest load per replica. Returns ``phy2log`` [X, num_physical], ``rank`` [X, num_physical]
    (replica index of each physical expert) and ``logcnt`` [X, n] (replicas per expert)."""
    rows, n = weight.shape
    if num_physical < n:
        raise InputError(f"{num_physical} physical experts cannot hold {n} logical ones", field="num_replicas")
    phy2log = np.zeros((rows, num_physical), dtype=np.int64)
    phy2log[:, :n] = np.arange(n)
    rank = np.zeros((rows, num_physical), dtype=np.int64)
    logcnt = np.ones((rows, n), dtype=np.int64)
    r = np.arange(rows)
    for i in range(n, num_physical):
        redundant = (weight / logcnt).argmax(axis=1)
        phy2log[:, i] = redundant
        rank[:, i] = logcnt[r, redundant]
        logcnt[r, redundant] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int,
                                   num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hierarchical policy (module docstring). Returns ``phy2log`` [L, P], ``phyrank`` [L, P]
    and ``logcnt`` [L, E]."""
    layers, e = weight.shape
    for ok, what in ((e % num_groups == 0, f"{num_groups} groups do not divide {e} experts"),
                     (num_groups % num_nodes == 0, f"{num_nodes} nodes do not divide {num_groups} groups"),
                     (num_gpus % num_nodes == 0, f"{num_nodes} nodes do not divide {num_gpus} GPUs"),
                     (num_physical % num_gpus == 0, f"{num_gpus} GPUs do not divide {num_physical} physical experts")):
        if not ok:
            raise InputError(what, field="eplb")
    group_size = e // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical // num_gpus

    tokens_per_group = weight.reshape(layers, num_groups, group_size).sum(axis=-1)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(layers, e)
    mlog2log = _inverse(log2mlog)

    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=1).reshape(layers * num_nodes, e // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical // num_nodes)

    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, axis=1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack_index * phy_per_gpu + rank_in_pack)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1)
                 + np.arange(0, e, e // num_nodes)[None, :, None]).reshape(layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point: ``weight`` [layers, experts] load → ``phy2log`` [L, num_replicas],
    ``log2phy`` [L, E, max replicas] (physical ids by replica rank, −1 padded) and ``logcnt``
    [L, E]."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise InputError(f"weight must be [layers, experts], got shape {w.shape}", field="weight")
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(w, num_replicas, 1, 1, num_gpus)
    layers, e = w.shape
    maxlogcnt = int(logcnt.max())
    log2phy = np.full((layers, e * maxlogcnt), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * maxlogcnt + phyrank,
                      np.broadcast_to(np.arange(num_replicas), (layers, num_replicas)), axis=1)
    return phy2log, log2phy.reshape(layers, e, maxlogcnt), logcnt


def solve_eplb(problem: PlacementProblem, options: SolverOptions) -> SolveResult:
    """EPLB on the problem's load, with its node count and expert groups."""
    t0 = time.perf_counter()
    d, s = problem.num_devices, problem.slots_per_device
    phy2log, _, _ = rebalance_experts(problem.load, d * s, problem.n_group, problem.num_nodes, d)
    placement = Placement.from_slots(phy2log.reshape(problem.num_layers, d, s), problem.num_experts,
                                     problem.devices_per_node)
    policy = "hierarchical" if problem.n_group % problem.num_nodes == 0 else "global"
    return finish(problem, placement, "eplb", t0,
                  [f"DeepSeek EPLB, {policy} policy ({problem.n_group} groups, {problem.num_nodes} nodes); "
                   "equal token shares among replicas"])
