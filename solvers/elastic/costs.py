"""What moving weights costs: point-to-point transfers, host-to-device loads and restarts.

* **P2P** (a device sends one buffer to another): the profile's measured ``send_recv`` collective
  curve of the link's scope when it has one, else latency + bytes / datasheet link bandwidth
  (:meth:`moeplan.cost.CostModel.collective_time`). Two devices on one physical node use the
  intra-node link (NVLink), others the inter-node link (one NIC per GPU).
* **H2D** (a device loads weights from host memory): the measured pinned ``host_copy`` curve for
  h2d when present, else bytes / the datasheet host-link bandwidth.
* **Restart overhead**: what a restart costs besides moving weights — process start, runtime and
  communicator initialisation, graph capture and warm-up. No profile measures it, so it is an
  assumption (default :data:`DEFAULT_RESTART_OVERHEAD` seconds) that every report states; the
  benchmark also shows the baselines without it.

Units: bytes and seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.hardware import Curve, HardwareProfile

DEFAULT_RESTART_OVERHEAD = 60.0   # seconds; assumed (see the module docstring)


@dataclass(frozen=True)
class TransferCosts:
    """Seconds to move bytes on one hardware profile (see the module docstring).

    Attributes:
        cost: the cost model (its profile's links and curves).
        devices_per_node: physical devices per node.
        restart_overhead: seconds a restart or a new replica spends besides loading weights.
    """

    cost: CostModel
    devices_per_node: int
    restart_overhead: float = DEFAULT_RESTART_OVERHEAD

    @classmethod
    def of(cls, cost: CostModel, restart_overhead: float = DEFAULT_RESTART_OVERHEAD) -> TransferCosts:
        if restart_overhead < 0:
            raise InputError(f"must be ≥ 0 seconds, got {restart_overhead}", field="restart-overhead")
        return cls(cost, cost.hw.devices_per_node, float(restart_overhead))

    @property
    def hardware(self) -> HardwareProfile:
        return self.cost.hw

    def scope(self, src: int, dst: int) -> str:
        """``intra_node`` when both devices sit on one physical node, else ``inter_node``."""
        same = src // self.devices_per_node == dst // self.devices_per_node
        return "intra_node" if same else "inter_node"

    def p2p(self, nbytes: float, scope: str) -> float:
        """Seconds for one device to send ``nbytes`` to another over ``scope``."""
        return self.cost.collective_time("send_recv", nbytes, 2, scope)

    def _h2d_curve(self) -> Curve | None:
        return self.hardware.find_curve("host_copy", direction="h2d", memory="pinned")

    def h2d(self, nbytes: float) -> float:
        """Seconds for one device to load ``nbytes`` from pinned host memory."""
        return self.cost.host_copy_time(nbytes) if nbytes > 0 else 0.0

    def switch(self, devices: int) -> float:
        """Seconds of the all-ranks commit: one small all-reduce over ``devices`` devices."""
        scope = "intra_node" if devices <= self.devices_per_node else "inter_node"
        return self.cost.collective_time("all_reduce", 4.0, devices, scope)

    def provenance(self) -> list[str]:
        """Which of the numbers used are measured, one line each."""
        hw = self.hardware
        p2p = {c.key.get("scope") for c in hw.curves_of("collective")
               if c.key.get("op") == "send_recv" and c.prov.measured}
        lines = [f"P2P {scope}: " + ("measured send_recv curve" if scope in p2p else
                                     f"datasheet {getattr(hw, scope).bandwidth.value / 1e9:.0f} GB/s")
                 for scope in ("intra_node", "inter_node")]
        curve = self._h2d_curve()
        lines.append("H2D: " + ("measured pinned host_copy curve" if curve is not None and curve.prov.measured else
                                f"{hw.device.h2d_bandwidth.prov.source} {hw.device.h2d_bandwidth.value / 1e9:.0f} GB/s"))
        lines.append(f"restart overhead: assumed {self.restart_overhead:g} s (process start, runtime and communicator "
                     "init, graph capture, warm-up)")
        return lines


@dataclass(frozen=True)
class Baseline:
    """One way to reach the new size without live scaling.

    Attributes:
        name: "restart" or "new replica".
        seconds: from the decision until the new capacity serves.
        load_seconds: the part spent loading weights (``seconds`` − restart overhead).
        downtime: seconds during which nothing is served.
        bytes: weight bytes loaded onto devices.
        devices_after: devices serving once done.
    """

    name: str
    seconds: float
    load_seconds: float
    downtime: float
    bytes: float
    devices_after: int

    def to_dict(self) -> dict[str, float | int | str]:
        return {"name": self.name, "seconds": self.seconds, "load_seconds": self.load_seconds,
                "downtime_s": self.downtime, "bytes": self.bytes, "devices_after": self.devices_after}


def device_weight_bytes(non_expert_bytes: float, expert_bytes: float, layers: int, slots: int) -> float:
    """Bytes one device holds: the replicated non-expert weights and its expert slots."""
    return non_expert_bytes + layers * slots * expert_bytes


def restart_baseline(costs: TransferCosts, non_expert_bytes: float, expert_bytes: float, layers: int,
                     devices: int, slots: int) -> Baseline:
    """Stop, restart at ``devices`` devices with ``slots`` slots each, every device loading its
    weights from host memory in parallel; nothing is served meanwhile."""
    per = device_weight_bytes(non_expert_bytes, expert_bytes, layers, slots)
    load = costs.h2d(per)
    total = costs.restart_overhead + load
    return Baseline("restart", total, load, total, per * devices, devices)


def replica_baseline(costs: TransferCosts, non_expert_bytes: float, expert_bytes: float, layers: int,
                     devices: int, slots: int) -> Baseline:
    """Start a whole new replica of the current deployment (``devices`` more devices, each loading
    its weights from host memory) while the old one keeps serving."""
    per = device_weight_bytes(non_expert_bytes, expert_bytes, layers, slots)
    load = costs.h2d(per)
    return Baseline("new replica", costs.restart_overhead + load, load, 0.0, per * devices, 2 * devices)


def p2p_seconds(costs: TransferCosts, nbytes: float, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Seconds of each transfer of ``nbytes`` from ``src[i]`` to ``dst[i]``."""
    intra = costs.p2p(nbytes, "intra_node")
    inter = costs.p2p(nbytes, "inter_node")
    same = np.asarray(src) // costs.devices_per_node == np.asarray(dst) // costs.devices_per_node
    return np.where(same, intra, inter)
