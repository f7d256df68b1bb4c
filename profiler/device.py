"""The accelerator a profiler rank measures: CUDA GPU (NCCL), Ascend NPU (HCCL, through
``torch_npu``) or the CPU (gloo), with its timers, its name, memory, cache size and the software
versions a measured profile records.

Timers: device events on a GPU or NPU (``Event(enable_timing=True)`` recorded on the current
stream, read after one synchronisation); ``time.perf_counter`` on the CPU, where every op is
synchronous. Units: seconds, bytes.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeplan.runtime.timing import queue_ahead

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
DEFAULT_CACHE_BYTES = 64 * 2**20     # when the device does not report its last-level cache


class Timer:
    """Start/stop pairs on one device; :meth:`seconds` reads them all after a synchronisation."""

    def __init__(self, events: Any) -> None:
        self._events = events          # torch.cuda / torch.npu (has .Event), or None for the CPU clock
        self._pairs: list[tuple[Any, Any]] = []
        self._open: Any = None

    def start(self) -> None:
        self._open = self._stamp()

    def stop(self) -> None:
        self._pairs.append((self._open, self._stamp()))

    def _stamp(self) -> Any:
        if self._events is None:
            return time.perf_counter()
        ev = self._events.Event(enable_timing=True)
        ev.record()
        return ev

    def seconds(self) -> list[float]:
        """Seconds of every start/stop pair (call after the device is synchronised)."""
        if self._events is None:
            return [b - a for a, b in self._pairs]
        return [a.elapsed_time(b) / 1e3 for a, b in self._pairs]


@dataclass(frozen=True)
class Accelerator:
    """One rank's device. kind: "cuda", "npu" or "cpu"; index: device ordinal (LOCAL_RANK)."""

    kind: str
    index: int = 0

    @classmethod
    def detect(cls, local_rank: int = 0) -> Accelerator:
        """An Ascend NPU when ``torch_npu`` imports and sees one, else a CUDA GPU, else the CPU."""
        try:
            import torch_npu  # noqa: F401  (registers torch.npu)
        except ImportError:
            pass
        else:
            npu = getattr(torch, "npu", None)
            if npu is not None and npu.is_available():
                acc = cls("npu", local_rank % max(npu.device_count(), 1))
                npu.set_device(acc.index)
                return acc
        if torch.cuda.is_available():
            acc = cls("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(acc.index)
            return acc
        return cls("cpu")

    # ---- what it is -----------------------------------------------------------------------------
    @property
    def module(self) -> Any:
        """torch.cuda or torch.npu; None for the CPU."""
        return None if self.kind == "cpu" else getattr(torch, self.kind)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.kind == "cpu" else torch.device(self.kind, self.index)

    @property
    def backend(self) -> str:
        """torch.distributed backend for this kind: nccl, hccl or gloo."""
        return BACKENDS[self.kind]

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    def name(self) -> str:
        if self.module is not None:
            return str(self.module.get_device_name(self.index))
        return _cpu_model()

    def count(self) -> int:
        """Devices of this kind on this host (1 for the CPU)."""
        return int(self.module.device_count()) if self.module is not None else 1

    def memory_bytes(self) -> int:
        """Device memory (bytes); host memory for the CPU."""
        if self.module is not None:
            return int(self.module.get_device_properties(self.index).total_memory)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def free_bytes(self) -> int:
        """Free device memory (bytes); available host memory for the CPU."""
        if self.module is not None:
            return int(self.module.mem_get_info(self.index)[0])
        return host_free_bytes()

    def cache_bytes(self) -> int:
        """The device's last-level cache (GPU L2; CPU L3), the size input rotation must exceed."""
        if self.module is not None:
            size = getattr(self.module.get_device_properties(self.index), "L2_cache_size", 0)
            return int(size) or DEFAULT_CACHE_BYTES
        return host_cache_bytes()

    def supports_fp8(self) -> bool:
        """True where an fp8 matmul (``torch._scaled_mm``) has hardware support: CUDA sm_89 and newer."""
        return (self.kind == "cuda" and hasattr(torch, "_scaled_mm")
                and torch.cuda.get_device_capability(self.index) >= (8, 9))

    # ---- timing -----------------------------------------------------------------------------------
    def synchronize(self) -> None:
        if self.module is not None:
            self.module.synchronize(self.index)

    def timer(self) -> Timer:
        return Timer(self.module)

    def queue_ahead(self, seconds: float) -> None:
        """Keep the device busy for at least ``seconds`` (:func:`moeplan.runtime.timing.queue_ahead`;
        CUDA only, nothing elsewhere), so that what the host enqueues next (a start event, the op,
        a stop event) waits in the queue and the events time the device's work alone, not the
        host's launch latency."""
        queue_ahead(self.device, seconds)

    def empty_cache(self) -> None:
        """Return cached device memory (after a failed or large measurement)."""
        if self.module is not None:
            self.module.empty_cache()

    # ---- provenance -------------------------------------------------------------------------------
    def versions(self) -> dict[str, str]:
        """Software versions for the run record: torch and, per kind, driver/CUDA/NCCL or torch_npu/CANN."""
        out = {"torch": str(torch.__version__)}
        if self.kind == "cuda":
            out["driver"] = _nvidia_driver()
            out["cuda"] = str(torch.version.cuda or getattr(torch.version, "hip", "") or "unknown")
            nccl = getattr(torch.cuda, "nccl", None)
            version = nccl.version() if nccl is not None else "unknown"
            out["nccl"] = ".".join(str(p) for p in version) if isinstance(version, tuple) else str(version)
        elif self.kind == "npu":
            import torch_npu  # noqa: F401  (registers torch.npu)
            out["torch_npu"] = str(getattr(torch_npu, "__version__", "unknown"))
            out["cann"] = str(getattr(torch.version, "cann", "unknown"))
        return out


def host_free_bytes() -> int:
    """Available host memory (bytes), from /proc/meminfo where there is one."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def host_cache_bytes() -> int:
    """The CPU's last-level cache (bytes), from sysfs, else a 64 MiB guess."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = []
    for f in root.glob("index*/size") if root.exists() else ():
        text = f.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    return "CPU " + (platform.processor() or platform.machine())


def _nvidia_driver() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return "unknown"
    return out.splitlines()[0].strip() if out.strip() else "unknown"
