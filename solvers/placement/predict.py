"""Predicted MoE time per step of a placement: the trace-driven simulator
(:func:`moeplan.simulate.simulate`, which prices every layer with ``CostModel.moe_layer``), under
standard expert parallelism and under context-coherent (ExFlow) execution."""
from __future__ import annotations

from typing import Any

from moeplan.cost import CostModel
from moeplan.plan import Placement
from moeplan.simulate import Workload, simulate
from moeplan.trace import RoutingTrace


def predict_moe_step(cost: CostModel, placement: Placement, trace: RoutingTrace,
                     tokens_per_device: int) -> dict[str, Any]:
    """MoE seconds per step (all MoE layers) at ``tokens_per_device`` tokens per device, priced
    with ``cost`` (its model, hardware and options but for ExFlow):
    ``moe_seconds_ep`` (dispatch from and combine to each token's home device) and
    ``moe_seconds_exflow`` (dispatch from the previous layer's top-1 device), with the
    simulator's notes on what is unmeasured. A trace too short for one step at
    ``tokens_per_device`` is replayed as one smaller step, and the result says which size it used."""
    tokens_per_device = max(1, min(tokens_per_device, trace.num_tokens // placement.num_devices))  # what one step can hold
    work = Workload(tokens_per_device=tokens_per_device)
    ep = simulate(cost.with_options(exflow=False), placement, trace, work)
    coherent = simulate(cost.with_options(exflow=True), placement, trace, work)
    s_ep, s_cc = ep.summary(), coherent.summary()
    return {"tokens_per_device": tokens_per_device, "moe_seconds_ep": s_ep["moe_seconds"],
            "moe_seconds_exflow": s_cc["moe_seconds"], "step_seconds_ep": s_ep["step_seconds"],
            "cross_device_fraction_ep": s_ep["cross_device_fraction"],
            "cross_device_fraction_exflow": s_cc["cross_device_fraction"], "batches": s_ep["batches"],
            "notes": ep.notes}
