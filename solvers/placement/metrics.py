"""Placement quality on a routing trace, vectorised with numpy.

* **balancedness** = Σ_layers max device load / Σ_layers mean device load (1 = perfectly even),
  where a device's load is the token-choices of its experts, a replicated expert's split by
  ``replica_share``.
* **devices touched** per token per layer: the distinct devices a token's top-k choices go to;
  **nodes touched** likewise for nodes.
* **top-1 hops**: per layer transition, the fraction of tokens whose top-1 expert runs on another
  device at layer l+1 than at layer l.

Replicas are handled two ways (``mode``): ``"share"`` (default) takes the expectation when each
token-choice goes to replica r of its expert with probability ``replica_share`` (the Placement's
routing), ``"primary"`` sends every choice to the expert's largest-share replica. Traces longer
than ``max_tokens`` are evaluated on an evenly spaced sample of that many tokens, and the result
says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeplan.errors import InputError
from moeplan.plan import Placement
from moeplan.stats import TraceStats
from moeplan.trace import RoutingTrace

MAX_TOKENS = 200_000
MODES = ("share", "primary")


def device_loads(placement: Placement, load: np.ndarray) -> np.ndarray:
    """[layers, devices] token-choices served by each device, from ``load`` [layers, experts]."""
    return np.einsum("le,led->ld", np.asarray(load, dtype=np.float64), placement.expert_device_share())


def balancedness(placement: Placement, load: np.ndarray) -> float:
    """Σ_layers max device load / Σ_layers mean device load."""
    dl = device_loads(placement, load)
    return float(dl.max(axis=1).sum() / max(dl.mean(axis=1).sum(), 1e-300))


def layer_balancedness(placement: Placement, load: np.ndarray) -> np.ndarray:
    """[layers] max device load / mean device load."""
    dl = device_loads(placement, load)
    return dl.max(axis=1) / np.maximum(dl.mean(axis=1), 1e-300)


def _replicas(share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From [experts, units] shares, each expert's units with nonzero share and those shares,
    largest first: ([experts, R] unit ids, [experts, R] shares; padded with share 0)."""
    r = max(int((share > 0).sum(axis=1).max()), 1)
    order = np.argsort(-share, axis=1, kind="stable")[:, :r]
    return order, np.take_along_axis(share, order, axis=1)


def _expected_distinct(units: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per row of ``units``/``probs`` [rows, M] (a unit and the probability a choice lands on it),
    Σ over distinct units of P(some choice lands there) = 1 − Π (1 − p)."""
    rows, m = units.shape
    order = np.argsort(units, axis=1, kind="stable")
    u = np.take_along_axis(units, order, axis=1)
    p = np.take_along_axis(probs, order, axis=1)
    starts = np.ones((rows, m), dtype=bool)
    starts[:, 1:] = u[:, 1:] != u[:, :-1]
    group = (np.cumsum(starts, axis=1) - 1 + (np.arange(rows) * m)[:, None]).ravel()
    certain = p.ravel() >= 1.0 - 1e-12
    log_miss = np.log(np.where(certain, 1.0, 1.0 - p.ravel()))
    miss = np.exp(np.bincount(group, weights=log_miss, minlength=rows * m))
    hit = np.where(np.bincount(group, weights=certain, minlength=rows * m) > 0, 1.0, 1.0 - miss)
    return hit.reshape(rows, m).sum(axis=1)


def _distinct(units: np.ndarray) -> np.ndarray:
    """Distinct values per row of ``units`` [rows, k]."""
    s = np.sort(units, axis=1)
    return 1 + (s[:, 1:] != s[:, :-1]).sum(axis=1)


def _unit_share(placement: Placement, level: str) -> np.ndarray:
    """[layers, experts, units] share of each expert's tokens per device or per node."""
    share = placement.expert_device_share()
    if level == "device":
        return share
    nl, e, d = share.shape
    return share.reshape(nl, e, d // placement.devices_per_node, placement.devices_per_node).sum(axis=3)


def touched(placement: Placement, expert_ids: np.ndarray, level: str = "device", mode: str = "share") -> np.ndarray:
    """[layers] mean distinct devices (``level="device"``) or nodes (``"node"``) a token's top-k
    choices go to, from ``expert_ids`` [tokens, layers, top_k]."""
    unit_share = _unit_share(placement, level)
    out = np.zeros(expert_ids.shape[1])
    for layer in range(expert_ids.shape[1]):
        ids = expert_ids[:, layer, :].astype(np.int64)
        units, probs = _replicas(unit_share[layer])
        if mode == "primary" or units.shape[1] == 1:
            out[layer] = _distinct(units[:, 0][ids]).mean()
            continue
        t = ids.shape[0]
        out[layer] = _expected_distinct(units[ids].reshape(t, -1), probs[ids].reshape(t, -1)).mean()
    return out


def top1_hops(placement: Placement, expert_ids: np.ndarray, level: str = "device", mode: str = "share") -> np.ndarray:
    """[layers-1] fraction of tokens whose top-1 expert runs on another device (or node) at
    layer l+1 than at layer l (expected over replicas in ``"share"`` mode)."""
    unit_share = _unit_share(placement, level)
    nl = expert_ids.shape[1]
    out = np.zeros(max(nl - 1, 0))
    for layer in range(nl - 1):
        a = expert_ids[:, layer, 0].astype(np.int64)
        b = expert_ids[:, layer + 1, 0].astype(np.int64)
        ua, pa = _replicas(unit_share[layer])
        ub, pb = _replicas(unit_share[layer + 1])
        if mode == "primary":
            out[layer] = float((ua[a, 0] != ub[b, 0]).mean())
            continue
        same = (ua[a][:, :, None] == ub[b][:, None, :]) * pa[a][:, :, None] * pb[b][:, None, :]
        out[layer] = 1.0 - float(same.sum(axis=(1, 2)).mean())
    return out


@dataclass
class PlacementMetrics:
    """The metrics of one placement on one trace (module docstring); per-layer arrays and means."""

    balancedness: float
    layer_balancedness: np.ndarray
    devices_touched: np.ndarray
    nodes_touched: np.ndarray
    top1_device_hops: np.ndarray
    top1_node_hops: np.ndarray
    tokens: int
    sampled_from: int
    mode: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def mean(a: np.ndarray) -> float:
            return float(a.mean()) if a.size else float("nan")

        return {"balancedness": self.balancedness, "worst_layer_balancedness": float(self.layer_balancedness.max()),
                "devices_touched_per_token_layer": mean(self.devices_touched),
                "nodes_touched_per_token_layer": mean(self.nodes_touched),
                "top1_device_hops_per_transition": mean(self.top1_device_hops),
                "top1_node_hops_per_transition": mean(self.top1_node_hops),
                "tokens": self.tokens, "sampled_from": self.sampled_from, "replica_mode": self.mode,
                "notes": list(self.notes)}


def sample_tokens(expert_ids: np.ndarray, max_tokens: int) -> np.ndarray:
    """At most ``max_tokens`` evenly spaced tokens of ``expert_ids`` (all of them if fewer)."""
    t = expert_ids.shape[0]
    if t <= max_tokens:
        return expert_ids
    return expert_ids[np.linspace(0, t - 1, max_tokens).astype(np.int64)]


def evaluate(placement: Placement, trace: RoutingTrace, mode: str = "share", max_tokens: int = MAX_TOKENS,
             stats: TraceStats | None = None) -> PlacementMetrics:
    """All metrics of ``placement`` on ``trace`` (balancedness on every token, the per-token
    metrics on at most ``max_tokens``)."""
    if mode not in MODES:
        raise InputError(f"unknown replica mode '{mode}'", field="mode", fix=f"use one of: {', '.join(MODES)}")
    if trace.num_layers != placement.num_layers or trace.num_experts != placement.num_experts:
        raise InputError(f"trace has {trace.num_layers} layers × {trace.num_experts} experts, the placement "
                         f"{placement.num_layers} × {placement.num_experts}", field="trace")
    load = (stats or TraceStats.of(trace)).load
    ids = sample_tokens(trace.expert_ids, max_tokens)
    notes = []
    if ids.shape[0] < trace.num_tokens:
        notes.append(f"per-token metrics on {ids.shape[0]:,} evenly spaced tokens of {trace.num_tokens:,}")
    return PlacementMetrics(
        balancedness=balancedness(placement, load), layer_balancedness=layer_balancedness(placement, load),
        devices_touched=touched(placement, ids, "device", mode), nodes_touched=touched(placement, ids, "node", mode),
        top1_device_hops=top1_hops(placement, ids, "device", mode), top1_node_hops=top1_hops(placement, ids, "node", mode),
        tokens=int(ids.shape[0]), sampled_from=trace.num_tokens, mode=mode, notes=notes)
