"""What a single-device ``moeplan run`` will allocate, estimated from the model and the options
before any tensor exists, and the check that refuses a run this machine cannot hold.

The estimate counts the tensors the runtime keeps (expert weights as :class:`LocalExperts` /
:class:`~moeplan.runtime.offload.HostExperts` stack them, routers, shared experts, the rotated
input batches) plus one layer's forward working set over ``rows = tokens × top_k`` token-choices:
the dispatched rows and their copies (about 6 × rows × hidden), the gate/up output and its SwiGLU
(3 × rows × ffn), and the float32 normalisation and gated sum (4 × tokens × hidden × 4 bytes).
The padded-bmm kernel can need more when one expert takes most of the tokens. Units: bytes.
Imports no torch: the figures come from the model; the free device memory is read by the caller.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moeplan.cache_config import CacheConfig
from moeplan.errors import check_memory
from moeplan.model import ModelSpec

ROTATED_INPUTS = 3   # input batches the timed runs cycle through (runtime.replay.ROTATE)


@dataclass(frozen=True)
class Footprint:
    """Estimated peak bytes of one run.

    Attributes:
        what: the run, as the refusal names it ("the layer stack of DeepSeek-V3, 1 MoE layer, …").
        device_bytes: on the device that computes (host memory too when that device is the CPU).
        host_bytes: in host memory besides (``--offload``'s pinned experts).
        fix: what to change when it does not fit.
    """

    what: str
    device_bytes: int
    host_bytes: int
    fix: str

    def check(self, device_free: int | None) -> None:
        """InputError (exit 2) naming the estimate, the free memory and :attr:`fix` unless the run
        fits: ``device_free`` is the CUDA device's free bytes, None when the device is the CPU
        (then device and host bytes both come out of the host's available memory)."""
        if device_free is None:
            check_memory(self.device_bytes + self.host_bytes, self.what, self.fix)
            return
        check_memory(self.host_bytes, f"{self.what} (host memory)", self.fix)
        check_memory(self.device_bytes, f"{self.what} (device memory)", self.fix, free=device_free)


def layer_weight_bytes(model: ModelSpec, element: int, experts: int | None = None) -> int:
    """One MoE layer's weights on one device: ``experts`` routed experts (default all), the
    router and the shared expert, ``element`` bytes per weight."""
    n = model.num_experts if experts is None else experts
    return (n * model.expert_params() + model.router_params() + model.shared_params()) * element


def working_bytes(model: ModelSpec, tokens: int, element: int) -> int:
    """The rotated inputs and one layer's forward working set over ``tokens`` tokens (see the module docstring)."""
    h, f, k = model.hidden_size, model.expert_ffn, model.top_k
    rows = tokens * k
    inputs = ROTATED_INPUTS * tokens * h * element + tokens * h * 4
    forward = rows * (6 * h + 3 * f) * element + 4 * tokens * h * 4 + tokens * 2 * model.shared_ffn * element
    return inputs + forward


def stack_footprint(model: ModelSpec, layers: Sequence[int], tokens: int, element: int) -> Footprint:
    """``moeplan run``: the world-size-1 stack, every expert of each of ``layers`` resident."""
    nl = len(layers)
    return Footprint(f"the layer stack of {model.name} ({nl} MoE layer{'s' * (nl != 1)} × {model.num_experts} "
                     f"experts, {tokens:,} tokens)", nl * layer_weight_bytes(model, element)
                     + working_bytes(model, tokens, element), 0,
                     "run fewer layers (--layers 0), fewer tokens (--tokens-per-device), a smaller model, or on "
                     "a device with more memory")


def replay_footprint(model: ModelSpec, slots_per_device: int, max_rows: int, element: int) -> Footprint:
    """``moeplan run --replay``: one plan device's slots at a time, over at most ``max_rows``
    token-choices (the busiest device of the busiest layer)."""
    h, f = model.hidden_size, model.expert_ffn
    weights = slots_per_device * model.expert_params() * element
    work = ROTATED_INPUTS * max_rows * h * element + max_rows * (2 * h + 3 * f) * element
    return Footprint(f"replaying {model.name} ({slots_per_device} expert slots of one device, up to {max_rows:,} "
                     "token-choices)", weights + work, 0,
                     "replay fewer tokens (--tokens-per-device), a smaller model, or on a device with more memory")


def offload_footprint(model: ModelSpec, config: CacheConfig, element: int) -> Footprint:
    """``moeplan run --offload``: every routed expert of every MoE layer in host memory; the
    cache and staging slots, the shared experts and the batch's working set on the device."""
    nl = model.num_moe_layers
    host = nl * model.num_experts * model.expert_params() * element
    slots = (sum(config.sizes) + config.stage_slots) * model.expert_params() * element
    device = slots + nl * model.shared_params() * element + working_bytes(model, config.batch, element)
    return Footprint(f"offloading {model.name} ({nl} MoE layers × {model.num_experts} experts in host memory, "
                     f"{sum(config.sizes)} cached + {config.stage_slots} staging on the device)", device, host,
                     "plan a smaller model, or run on a host with more memory (the host holds every expert)")


def free_device_bytes(device: object) -> int | None:
    """Free bytes of a CUDA ``device`` (``torch.cuda.mem_get_info``); None for the CPU, whose
    memory is the host's (:func:`moeplan.errors.available_memory`)."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch
    return int(torch.cuda.mem_get_info(device)[0])

