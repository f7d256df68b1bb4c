"""ExFlow-style affinity placement: keep a token where its last expert ran.

With context-coherent execution (ExFlow, Yao et al. 2024) a token's next layer is dispatched
from where the token is after this layer (the problem's flow model: its top-1 expert's device, or
its k experts' devices), so experts that tokens chain through in consecutive layers belong on the
same device, or at least the same node. Within a layer, experts chosen together belong together
too: the token then touches fewer devices.

Per layer, with its neighbours' placements fixed (the first sweep sees only the layer before):

1. **Replicas** by EPLB's rule (the hottest experts get the extra slots; at most one per device).
2. **Greedy packing**, heaviest replica first, into the device with the highest affinity score
   among those with a free slot and load below (1 + slack) × mean. The score of expert e on
   device d, in seconds saved, is ``intra · g[e, d] + (inter − intra) · g_node[e, node(d)]``, where
   g counts the tokens e exchanges with the neighbours' experts on d (the problem's layer-to-layer
   flows) plus ``coactivation`` × the tokens that chose e together with the replicas already on d;
   g_node sums g over the node.
3. **Local search**: while a device is above the cap, the best-scoring swap that lowers it; then
   pairwise swaps of replicas between devices that raise the total score and keep both devices'
   loads within the cap, until a pass finds none.
4. **Token split** among replicas by an LP (:func:`.layer.balance_shares`): even device loads,
   then the least traffic.

Further sweeps repeat 3–4 from the current placement with both neighbours fixed.
"""
from __future__ import annotations

import time

import numpy as np

from moeplan.plan import Placement

from .layer import balance_shares, layer_device_share, neighbour_affinity, unit_costs
from .options import SolverOptions
from .problem import PlacementProblem, layer_flows
from .replication import SlotPacker, replica_counts
from .result import SolveResult, finish


class AffinityScore:
    """Affinity of every expert with every device and node, kept up to date as replicas move.

    ``gd[e, d]`` = neighbour flow of e with device d + Σ over replicas f on d of share_f ·
    coactivation[e, f]; ``gn[e, n]`` = the same summed over node n's devices.
    """

    def __init__(self, affinity: np.ndarray, coact: np.ndarray, devices_per_node: int) -> None:
        self.coact = coact
        self.per = devices_per_node
        self.gd = affinity.copy()
        e, d = affinity.shape
        self.gn = self.gd.reshape(e, d // devices_per_node, devices_per_node).sum(axis=2)

    @classmethod
    def of(cls, affinity: np.ndarray, coact: np.ndarray, devices_per_node: int, item_expert: np.ndarray,
           item_device: np.ndarray, item_share: np.ndarray) -> "AffinityScore":
        """The score with the given replicas (items) placed."""
        placed = np.zeros((item_expert.shape[0], affinity.shape[1]))
        placed[np.arange(item_expert.shape[0]), item_device] = item_share
        return cls(affinity + coact[:, item_expert] @ placed, coact, devices_per_node)

    def add(self, expert: int, share: float, device: int, sign: float = 1.0) -> None:
        col = (sign * share) * self.coact[:, expert]
        self.gd[:, device] += col
        self.gn[:, device // self.per] += col


def _construct(load: np.ndarray, counts: np.ndarray, score: AffinityScore, devices: int, slots: int,
               w_dev: float, w_node: float, cap: float) -> np.ndarray:
    """Step 2 of the module docstring; returns [devices, slots]."""
    node = np.arange(devices) // score.per
    packer = SlotPacker(load.shape[0], devices, slots)
    experts = np.repeat(np.arange(load.shape[0]), counts)
    shares = 1.0 / counts[experts]
    weights = load[experts] * shares
    for i in np.argsort(-weights, kind="stable"):
        e, w = int(experts[i]), float(weights[i])
        ok = packer.allowed(e)
        if not ok.any():
            packer.put_by_swap(e, w)
            continue
        fits = ok & (packer.load + w <= cap)
        if fits.any():
            gain = np.where(fits, w_dev * score.gd[e] + w_node * score.gn[e, node], -np.inf)
            best = gain.max()
            near = gain >= best - 1e-12 * max(abs(best), 1e-300)
            device = int(np.where(near, packer.load, np.inf).argmin())
        else:
            device = int(np.where(ok, packer.load, np.inf).argmin())
        packer.put(e, w, device)
        score.add(e, float(shares[i]), device)
    return packer.slot_expert()


class SwapSearch:
    """Replicas (items: expert, device, share, tokens) of one layer and the swaps between devices
    that step 3 of the module docstring makes; ``score`` must count every item."""

    def __init__(self, item_expert: np.ndarray, item_device: np.ndarray, item_share: np.ndarray,
                 item_weight: np.ndarray, score: AffinityScore, devices: int, w_dev: float, w_node: float) -> None:
        self.expert, self.device, self.share, self.weight = item_expert, item_device, item_share, item_weight
        self.score, self.w_dev, self.w_node = score, w_dev, w_node
        self.node = np.arange(devices) // score.per
        self.load = np.bincount(item_device, weights=item_weight, minlength=devices)
        self.holds = np.zeros((score.gd.shape[0], devices), dtype=bool)
        self.holds[item_expert, item_device] = True
        self.tol = 1e-9 * (abs(w_dev) + abs(w_node)) * max(float(item_weight.mean()), 1e-12)

    def gains(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Score gained by swapping item ``i`` with each item, and which swaps are allowed (other
        device, no expert twice on one device)."""
        gd, gn, fe, fs, fd = self.score.gd, self.score.gn, self.expert, self.share, self.device
        e, d1, se = fe[i], fd[i], fs[i]
        n1, fn = self.node[d1], self.node[fd]
        pair = 2.0 * se * fs * self.score.coact[e, fe]
        dev = se * (gd[e, fd] - gd[e, d1]) + fs * (gd[fe, d1] - gd[fe, fd]) - pair
        nod = se * (gn[e, fn] - gn[e, n1]) + fs * (gn[fe, n1] - gn[fe, fn]) - pair
        delta = self.w_dev * dev + self.w_node * np.where(fn != n1, nod, 0.0)
        return delta, (fd != d1) & ~self.holds[e, fd] & ~self.holds[fe, d1]

    def swap(self, i: int, j: int) -> None:
        e, f, d1, d2 = self.expert[i], self.expert[j], self.device[i], self.device[j]
        for expert, share, old, new in ((e, self.share[i], d1, d2), (f, self.share[j], d2, d1)):
            self.score.add(expert, share, old, -1.0)
            self.score.add(expert, share, new)
        moved = self.weight[i] - self.weight[j]
        self.load[d1] -= moved
        self.load[d2] += moved
        self.holds[e, d1] = self.holds[f, d2] = False
        self.holds[e, d2] = self.holds[f, d1] = True
        self.device[i], self.device[j] = d2, d1

    def improve(self, cap: float, passes: int) -> int:
        """Best-partner swaps that raise the score and keep both devices within ``cap`` (or within
        their current loads where those are higher), heaviest item first; returns the swaps made."""
        swaps = 0
        order = np.argsort(-self.weight, kind="stable")
        for _ in range(passes):
            moved = 0
            for i in order:
                delta, ok = self.gains(i)
                d1, we = self.device[i], self.weight[i]
                limit = np.maximum(cap, np.maximum(self.load[d1], self.load[self.device]))
                ok &= ((delta > self.tol) & (self.load[d1] - we + self.weight <= limit)
                       & (self.load[self.device] + we - self.weight <= limit))
                if ok.any():
                    self.swap(int(i), int(np.where(ok, delta, -np.inf).argmax()))
                    moved += 1
            swaps += moved
            if not moved:
                break
        return swaps

    def rebalance(self, cap: float) -> int:
        """While the busiest device exceeds ``cap``, swap one of its replicas for a lighter one:
        the best-scoring swap that brings both devices within ``cap`` if there is one, else the
        swap that lowers the larger of the two loads most. Returns the swaps made."""
        swaps = 0
        for _ in range(self.expert.shape[0]):
            top = int(self.load.argmax())
            peak = self.load[top]
            if peak <= cap:
                break
            best: tuple[int, float] = (-1, 0.0)
            pick = None
            for i in np.flatnonzero(self.device == top):
                delta, ok = self.gains(int(i))
                moved = self.weight[i] - self.weight
                worst = np.maximum(self.load[self.device] + moved, peak - moved)
                ok &= (moved > 0) & (worst < peak)
                if not ok.any():
                    continue
                within = ok & (worst <= cap)
                if within.any():
                    j = int(np.where(within, delta, -np.inf).argmax())
                    key = (1, float(delta[j]))
                else:
                    j = int(np.where(ok, worst, np.inf).argmin())
                    key = (0, -float(worst[j]))
                if key > best:
                    best, pick = key, (int(i), j)
            if pick is None:
                break
            self.swap(*pick)
            swaps += 1
        return swaps


def _items(slot_expert: np.ndarray, replica_share: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, s = slot_expert.shape
    return slot_expert.ravel().astype(np.int64), np.repeat(np.arange(d), s), replica_share.ravel().copy()


def place_layer(problem: PlacementProblem, layer: int, shares: list[np.ndarray | None], options: SolverOptions,
                current: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Place one layer with its placed neighbours fixed (steps 1–4; steps 3–4 from ``current``
    (slot_expert, replica_share) when given). Returns slot_expert, replica_share, swaps."""
    d, s = problem.num_devices, problem.slots_per_device
    load = problem.load[layer]
    w = problem.weights
    w_dev, w_node = w.intra_node, w.inter_node - w.intra_node
    a_in, a_out = neighbour_affinity(problem, layer, shares)
    coact = problem.coactivation[layer] * options.coactivation
    cap = (1.0 + options.slack) * float(load.sum()) / d
    if current is None:
        counts = replica_counts(load, d * s, d)
        slot_expert = _construct(load, counts, AffinityScore(a_in + a_out, coact, problem.devices_per_node), d, s,
                                 w_dev, w_node, cap)
        replica_share = 1.0 / counts[slot_expert]
    else:
        slot_expert, replica_share = current
    item_expert, item_device, item_share = _items(slot_expert, replica_share)
    score = AffinityScore.of(a_in + a_out, coact, problem.devices_per_node, item_expert, item_device, item_share)
    search = SwapSearch(item_expert, item_device, item_share, load[item_expert] * item_share, score, d, w_dev, w_node)
    swaps = search.rebalance(cap) + search.improve(cap, options.passes)
    slot_expert = item_expert[np.lexsort((item_expert, item_device))].reshape(d, s).astype(np.int32)
    replica_share = balance_shares(slot_expert, load, unit_costs(problem, layer, a_in, a_out), w.compute,
                                   options.balance_cap)
    return slot_expert, replica_share, swaps


def traffic_report(problem: PlacementProblem, placement: Placement) -> dict[str, float]:
    """Expected cross-device and cross-node hops per token per layer transition (each of a token's
    top-k rows that leaves the device it comes from counts one hop, under the problem's flow model)
    and the all-to-all bytes per step, summed over devices and MoE layers, of context-coherent
    execution (the first layer dispatched from the home device, then layer to layer; combines onto
    the top-1 device are not counted) against standard expert parallelism (dispatched from and
    combined back to the home device, homes spread evenly), with the same placement."""
    share = placement.expert_device_share()
    d, k, t, nl = problem.num_devices, problem.top_k, problem.tokens, problem.num_layers
    flows = layer_flows(problem, share)
    node = problem.node_of
    cross_dev = float(flows.sum() - np.trace(flows, axis1=1, axis2=2).sum())
    cross_node = float((flows * (node[:, None] != node[None, :])[None]).sum())
    transitions = max(nl - 1, 1) * t
    home_rows = (1.0 - 1.0 / d) * k * t
    ep_rows = 2.0 * home_rows * nl
    coherent_rows = home_rows + cross_dev
    per_step = problem.row_bytes * problem.weights.step_scale
    return {"cross_device_hops_per_token_layer": cross_dev / transitions,
            "cross_node_hops_per_token_layer": cross_node / transitions,
            "alltoall_bytes_per_step_ep": ep_rows * per_step,
            "alltoall_bytes_per_step_coherent": coherent_rows * per_step,
            "alltoall_bytes_saved_per_step": (ep_rows - coherent_rows) * per_step}


def solve_exflow(problem: PlacementProblem, options: SolverOptions) -> SolveResult:
    """Affinity placement (module docstring)."""
    t0 = time.perf_counter()
    nl, e = problem.num_layers, problem.num_experts
    shares: list[np.ndarray | None] = [None] * nl
    layers: list[tuple[np.ndarray, np.ndarray] | None] = [None] * nl
    swaps = 0
    for _ in range(options.sweeps):
        for layer in range(nl):
            se, rs, n = place_layer(problem, layer, shares, options, layers[layer])
            layers[layer] = (se, rs)
            shares[layer] = layer_device_share(se, rs, e)
            swaps += n
    placement = Placement(np.stack([x[0] for x in layers]), np.stack([x[1] for x in layers]), e,
                          problem.devices_per_node)
    notes = [f"greedy affinity packing + swap search, {options.sweeps} sweep(s) over the layers with the "
             f"neighbours fixed; co-activation weight {options.coactivation}; token split by LP"
             + (f" holding max/mean device load ≤ {options.balance_cap} where the replicas allow"
                if options.balance_cap else "")]
    return finish(problem, placement, "exflow", t0, notes, {"swaps": swaps, **traffic_report(problem, placement)})
