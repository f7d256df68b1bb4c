"""The profile a CPU measurement starts from, and the check that keeps one device type per profile.

A CPU is not any bundled GPU: measuring it against ``h100-sxm`` would write CPU figures under
the H100's name and keep the H100's unmeasured ones beside them. A CPU run instead starts from
:func:`cpu_profile`, named after the CPU it measures (``cpu-<model>``), whose figures are all
``assumed`` order-of-magnitude placeholders until the run replaces them (units: FLOP/s, bytes,
bytes/s, seconds).
"""
from __future__ import annotations

import re

from moeplan.errors import InputError
from moeplan.hardware import DeviceSpec, HardwareProfile, Link, Provenance, Quantity

GPU_BACKENDS = ("nccl", "hccl", "rccl")


def slug(text: str) -> str:
    """Lower-case ``text`` with every run of other characters turned into one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def cpu_profile_name(device: str) -> str:
    """``cpu-<model>`` for a CPU device name such as ``CPU AMD EPYC 9654 96-Core Processor``."""
    model = slug(device)
    return model if model.startswith("cpu") else f"cpu-{model}"


def cpu_profile(device: str, ranks_per_host: int, hosts: int) -> HardwareProfile:
    """The starting profile of a CPU run: named after ``device`` (the CPU model), one device per
    rank, backend gloo, every figure an assumed placeholder that a measured section replaces."""
    def assumed(value: float, what: str) -> Quantity:
        return Quantity(value, Provenance("assumed", f"placeholder for a CPU ({what}); replaced where this "
                                                     "run measures it"))

    memory_bw = assumed(1e11, "order of a server's DRAM bandwidth")
    device_spec = DeviceSpec(
        name=device, vendor="cpu", backend="gloo", memory=assumed(2.0**36, "64 GiB of host memory"),
        matmul_flops={"bf16": assumed(1e12, "order of a server CPU's bf16 matmul rate")},
        hbm_bandwidth=memory_bw,
        h2d_bandwidth=assumed(1e11, "a CPU's device memory is host memory: no host link, a copy runs at "
                                    "memory bandwidth"),
        d2h_bandwidth=assumed(1e11, "a CPU's device memory is host memory: no host link, a copy runs at "
                                    "memory bandwidth"),
        launch_overhead=assumed(1e-6, "an eager CPU op's dispatch"))
    return HardwareProfile(
        name=cpu_profile_name(device), description=f"{device}, measured by moeplan profile (gloo ranks)",
        device=device_spec, devices_per_node=max(ranks_per_host, 1), nodes=max(hosts, 1),
        intra_node=Link("gloo over shared memory", assumed(1e10, "gloo on one host"), assumed(1e-5, "gloo on one host")),
        inter_node=Link("gloo over TCP", assumed(1.25e9, "10 Gb/s Ethernet"), assumed(5e-5, "a TCP round trip")),
    ).validate()


def check_base(base: HardwareProfile, device: str, is_cpu: bool, source: str) -> None:
    """InputError unless ``base`` is a profile of the same kind of device as the one measured:
    CPU figures never go into a GPU's profile (or GPU figures into a CPU's)."""
    gpu_base = base.device.backend in GPU_BACKENDS
    if is_cpu and gpu_base:
        raise InputError(f"this machine has no GPU (torch sees only the CPU, {device}); measuring it would "
                         f"write CPU figures into the {base.device.name} profile '{base.name}'", source=source,
                         field="base", fix="run moeplan profile on a machine with that GPU (torch.cuda.is_available() "
                                           "true), or drop --base/--merge to write a CPU profile of its own")
    if not is_cpu and not gpu_base:
        raise InputError(f"'{base.name}' is a profile of a CPU ({base.device.name}), but this run measures "
                         f"{device}", source=source, field="base",
                         fix="drop --base to start from the bundled profile of this GPU, or pass that profile")
