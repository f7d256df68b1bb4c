"""How long a step takes when experts come over the host link: the cache's counts turned into
seconds, with transfers on their own stream overlapping compute.

Per MoE layer l of a step, in time order (one compute stream, one FIFO copy stream):

1. ``pre[l]`` seconds of compute up to the layer's routing point (attention, norms, router);
   there the runtime learns which experts the layer needs;
2. it queues the layer's demand loads (its misses), then the prefetch of layer l+1's predicted
   experts, on the copy stream; each expert takes ``copy_seconds``;
3. ``post[l]`` seconds of compute that need no routed expert (shared experts);
4. the layer waits for its demand loads and, if it uses an expert prefetched at this step, for
   that prefetch batch (the *stall*), then computes its routed experts (``expert[:, l]``).

A step ends when both streams are idle. Steps are independent, so :func:`step_times` runs the
recurrence vectorised over steps, looping over layers. :func:`separable_stall` is the per-layer
approximation the sizing solver optimises: each layer as if the copy stream were idle when the
previous layer issued its prefetch batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplan.cost import CostModel
from moeplan.solvers.cache.simulate import CacheRun
from moeplan.solvers.cache.steps import chunk_steps, iter_counts
from moeplan.trace import RoutingTrace


@dataclass(frozen=True)
class LayerTimes:
    """Seconds per step outside the cache's control: ``pre``/``post`` [layers] (before the
    routing point / overlapping the loads), ``expert`` [steps, layers] routed-expert compute,
    ``tail`` after the last layer (output head), ``copy_seconds`` one expert host → device."""

    pre: np.ndarray
    post: np.ndarray
    expert: np.ndarray
    tail: float
    copy_seconds: float

    def window(self) -> np.ndarray:
        """[steps, layers] compute between issuing a layer's prefetch (at the previous layer's
        routing point) and the layer's own routing point: the previous layer's post + experts and
        this layer's pre (0 for layer 0, which is never prefetched)."""
        w = np.zeros_like(self.expert)
        w[:, 1:] = self.post[None, :-1] + self.expert[:, :-1] + self.pre[None, 1:]
        return w

    def overlap(self) -> np.ndarray:
        """[steps, layers] all the compute a layer's prefetch can hide behind: :meth:`window` and
        the layer's post."""
        return self.window() + self.post[None, :]

    def resident_step(self) -> np.ndarray:
        """[steps] seconds of a step with every expert resident (nothing to wait for)."""
        return self.pre.sum() + self.post.sum() + self.expert.sum(axis=1) + self.tail


@dataclass
class StepTimes:
    """``total`` [steps] seconds; ``stall`` [steps, layers] seconds waiting for transfers;
    ``copy_busy`` [steps] seconds the copy stream worked."""

    total: np.ndarray
    stall: np.ndarray
    copy_busy: np.ndarray

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return tokens_per_step * self.total.size / float(self.total.sum())


def expert_seconds(cost: CostModel, trace: RoutingTrace, index: np.ndarray) -> np.ndarray:
    """[steps, layers] routed-expert compute of each step, from the cost model's kernel time on
    each step's token-choices per expert (every expert resident)."""
    out = np.zeros((index.shape[0], trace.num_layers))
    chunk = chunk_steps(trace.num_layers, trace.num_experts)
    for start, counts in iter_counts(trace.expert_ids, index, trace.num_experts, chunk):
        out[start:start + counts.shape[0]] = cost.device_compute(counts)
    return out


def model_layer_times(cost: CostModel, trace: RoutingTrace, index: np.ndarray, phase: str, context: int) -> LayerTimes:
    """The whole model on one device: attention, dense layers, norms and router before each MoE
    layer's routing point (spread evenly over the MoE layers), shared experts overlapping the
    loads, the output head at the end; ``context`` tokens attended to."""
    m = cost.model
    tokens = index.shape[1]
    step = cost.forward_time(tokens, context, phase, np.zeros((m.num_moe_layers, m.num_experts)))
    shared = step.shared_experts / m.num_moe_layers
    pre = (step.total - step.experts - step.shared_experts - step.head) / m.num_moe_layers
    return LayerTimes(np.full(m.num_moe_layers, pre), np.full(m.num_moe_layers, shared),
                      expert_seconds(cost, trace, index), step.head, cost.host_copy_time(m.expert_bytes()))


def stack_layer_times(cost: CostModel, trace: RoutingTrace, index: np.ndarray) -> LayerTimes:
    """The MoE layer stack the offload executor runs (no attention, no head): shared experts
    overlapping the loads, then the routed experts."""
    m = cost.model
    shared = float(cost.shared_expert_time(index.shape[1]))
    return LayerTimes(np.zeros(m.num_moe_layers), np.full(m.num_moe_layers, shared),
                      expert_seconds(cost, trace, index), 0.0, cost.host_copy_time(m.expert_bytes()))


def step_times(run: CacheRun, times: LayerTimes) -> StepTimes:
    """Per-step seconds of ``run`` (one lane per layer, in layer order) under the module's timeline."""
    tau = times.copy_seconds
    steps, layers = run.loads.shape
    t = np.zeros(steps)                 # compute stream
    f = np.zeros(steps)                 # copy stream tail
    prefetch_end = np.zeros(steps)      # end of the prefetch batch issued for the current layer
    stall = np.zeros((steps, layers))
    busy = np.zeros(steps)
    for layer in range(layers):
        t = t + times.pre[layer]
        m = run.loads[:, layer].astype(np.float64)
        demand_end = np.maximum(f, t) + m * tau
        f = np.where(m > 0, demand_end, f)
        nxt = run.prefetched[:, layer + 1].astype(np.float64) if layer + 1 < layers else np.zeros(steps)
        next_prefetch_end = np.maximum(f, t) + nxt * tau
        f = np.where(nxt > 0, next_prefetch_end, f)
        busy += (m + nxt) * tau
        t1 = t + times.post[layer]
        ready = np.where(m > 0, np.maximum(t1, demand_end), t1)
        ready = np.where(run.prefetch_used[:, layer] > 0, np.maximum(ready, prefetch_end), ready)
        stall[:, layer] = ready - t1
        t = ready + times.expert[:, layer]
        prefetch_end = next_prefetch_end
    return StepTimes(np.maximum(t, f) + times.tail, stall, busy)


def separable_stall(run: CacheRun, times: LayerTimes) -> np.ndarray:
    """[lanes] mean stall per step of each lane alone, the copy stream idle when the previous
    layer issued this layer's prefetch batch: what is left of that batch at the routing point,
    then the demand loads, less the post compute they overlap; or, with no demand load but a
    prefetched expert in use, what the batch outlasts the layer's whole window."""
    tau = times.copy_seconds
    m = run.loads.astype(np.float64) * tau
    p = run.prefetched.astype(np.float64) * tau
    window = times.window()[:, run.lane_layer]
    post = times.post[run.lane_layer][None, :]
    backlog = np.maximum(p - window, 0.0)
    stall = np.where(run.loads > 0, np.maximum(backlog + m - post, 0.0),
                     np.where(run.prefetch_used > 0, np.maximum(backlog - post, 0.0), 0.0))
    return stall.mean(axis=0)
