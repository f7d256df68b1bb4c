"""The profiler run: what is measured, in which order, on which rank.

Rank 0 measures its own device and host link (sections ``device``: matmul, copy, launch overhead;
``experts``; ``attention``; ``host``), every point once per pass (``Sizes.passes``: two, so each
curve point's spread covers two passes apart in time), while the other ranks wait on a CPU barrier; then every rank
measures the collectives. A point that fails on rank 0 (out of memory, a kernel this torch lacks)
is recorded under ``skipped`` with the reason and the run goes on; collectives fail loudly, since
one rank cannot drop out of a collective alone.
"""
from __future__ import annotations

import datetime
import socket
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch.distributed as dist

from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.profiler.attention_ops import AttentionShape
from moeplan.profiler.collectives import GROUP_TIMEOUT, Comm, collective_points, measure_collective
from moeplan.profiler.cpu_base import slug
from moeplan.profiler.device import Accelerator, host_free_bytes
from moeplan.profiler.ops import build_op
from moeplan.profiler.raw import Measurement, RawProfile, datasheet_figures
from moeplan.profiler.sizes import GEMM_MAX_FLOPS, GEMM_MAX_WEIGHT_ELEMS, Sizes
from moeplan.profiler.timing import measure


@dataclass(frozen=True)
class Request:
    """What to measure: expert and attention shapes of ``models``; ``sections`` (of sizes.SECTIONS);
    ``quick`` plan; ``base``: the profile whose datasheet figures the results are compared with."""

    models: tuple[ModelSpec, ...]
    sections: tuple[str, ...]
    quick: bool
    base: HardwareProfile


@dataclass(frozen=True)
class Step:
    """One measured point of rank 0: a label for the progress bar and the measurement to take."""

    section: str
    label: str
    kind: str
    params: dict[str, Any]
    x: float
    key: dict[str, Any]


def tool_version() -> str:
    try:
        return metadata.version("moeplan")
    except metadata.PackageNotFoundError:
        return "unknown"


class Profiler:
    """Runs a :class:`Request` on this rank's accelerator (``comm`` None for a single process)."""

    def __init__(self, request: Request, acc: Accelerator, comm: Comm | None) -> None:
        self.request = request
        self.acc = acc
        self.comm = comm
        ranks_on_host = comm.topology.per_node if comm else 1
        self.sizes = Sizes.choose(not acc.is_cpu, request.quick, host_free_bytes(), ranks_on_host)
        self.skipped: list[dict[str, str]] = []
        self._steps: list[Step] | None = None
        self._prefill_impls: dict[str, str | None] = {}
        self._gloo = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT) if comm else None

    @property
    def rank(self) -> int:
        return self.comm.rank if self.comm else 0

    # ---- the plan ---------------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        """Rank 0's points, in order (planned once; measured ``sizes.passes`` times over)."""
        if self._steps is None:
            self._steps = self._plan()
        return self._steps

    def _plan(self) -> list[Step]:
        want = self.request.sections
        s = self.sizes
        out: list[Step] = []
        if "device" in want:
            dtypes = ["bf16"] + (["fp8"] if self.acc.supports_fp8() else [])
            if "fp8" not in dtypes:
                self.skipped.append({"what": "fp8 matmul", "why": f"no fp8 matmul support on {self.acc.name()}"})
            out += [Step("device", f"matmul {d} {s.matmul_n}³", "matmul", {"dtype": d}, s.matmul_n, {}) for d in dtypes]
            out.append(Step("device", f"HBM copy {s.copy_bytes / 2**20:.0f} MiB", "copy", {}, s.copy_bytes, {}))
            out.append(Step("device", "launch overhead", "launch", {}, 1, {}))
        if "gemm" in want:
            out += self._gemm_steps()
        if "experts" in want:
            out += self._expert_steps()
        if "routing" in want:
            out += self._routing_steps()
        if "attention" in want:
            out += self._attention_steps()
        if "host" in want:
            if self.acc.is_cpu:
                self.skipped.append({"what": "host copies", "why": "the CPU has no host link"})
            else:
                out += self._host_steps()
        return out

    def _gemm_steps(self) -> list[Step]:
        """The dense GEMM grid: every (k, n) of the plan under GEMM_MAX_WEIGHT_ELEMS, at each token
        count up to GEMM_MAX_FLOPS (the first token count always)."""
        s = self.sizes
        out = []
        for k in s.gemm_k:
            for n in s.gemm_n:
                if k * n > GEMM_MAX_WEIGHT_ELEMS:
                    continue
                key = {"k": k, "n": n, "dtype": "bf16"}
                tokens = [m for i, m in enumerate(s.gemm_tokens) if i == 0 or 2.0 * m * k * n <= GEMM_MAX_FLOPS]
                out += [Step("gemm", f"gemm {k}→{n} @ {m} tok", "gemm", dict(key), m, key) for m in tokens]
        return out

    def _expert_shapes(self) -> dict[tuple[int, int], list[str]]:
        shapes: dict[tuple[int, int], list[str]] = {}
        for m in self.request.models:
            shapes.setdefault((m.hidden_size, m.expert_ffn), []).append(m.name)
        return shapes

    def _expert_steps(self) -> list[Step]:
        out = []
        for (h, f), names in self._expert_shapes().items():
            base = {"hidden": h, "ffn": f, "dtype": "bf16"}
            kernels: list[dict[str, Any]] = [{"kernel": "loop"}]
            kernels += [{"kernel": "grouped", "experts": g} for g in self.sizes.grouped_experts]
            for k in kernels:
                key = {**base, **k}
                params = {**key, "models": names}
                label = f"expert {h}×{f} {k['kernel']}" + (f" G={k['experts']}" if "experts" in k else "")
                out += [Step("experts", f"{label} @ {n} tok", "expert_ffn", params, n, key)
                        for n in self.sizes.expert_tokens]
        return out

    def _routing_steps(self) -> list[Step]:
        """Routing and permutation around the experts, per (hidden, experts, top-k) of the models,
        at the total tokens a device routes (the expert-token sizes × top-k cover 1 … 16k × k)."""
        out = []
        shapes: dict[tuple[int, int, int], list[str]] = {}
        for m in self.request.models:
            shapes.setdefault((m.hidden_size, m.num_experts, m.top_k), []).append(m.name)
        for (h, e, k), names in shapes.items():
            key = {"hidden": h, "experts": e, "top_k": k}
            out += [Step("routing", f"routing {h}×{e} top-{k} @ {n} tok", "moe_routing", {**key, "models": names}, n, key)
                    for n in self.sizes.expert_tokens]
        return out

    def _attention_steps(self) -> list[Step]:
        out = []
        seen: dict[str, list[str]] = {}
        shapes: dict[str, AttentionShape] = {}
        for m in self.request.models:
            shape = AttentionShape.of(m)
            seen.setdefault(shape.signature, []).append(m.name)
            shapes[shape.signature] = shape
        s = self.sizes
        for sig, shape in shapes.items():
            for kind, xs, batch in (("attention_prefill", s.prefill_seqs, s.prefill_batch),
                                    ("attention_train", s.prefill_seqs, s.prefill_batch),
                                    ("attention_decode", s.decode_contexts, s.decode_batch)):
                key = {"signature": sig, "batch": batch}
                params = {**key, "shape": shape.to_dict(), "models": seen[sig]}
                out += [Step("attention", f"{kind.split('_')[1]} {sig} @ {x}", kind, params, x, key) for x in xs]
        return out

    def _host_steps(self) -> list[Step]:
        experts: dict[int, list[str]] = {}
        for m in self.request.models:
            experts.setdefault(int(m.expert_bytes()) // 2 * 2, []).append(m.name)
        sizes = sorted(set(self.sizes.host_bytes) | set(experts))
        out = []
        for direction in ("h2d", "d2h"):
            for memory in ("pinned", "pageable"):
                key = {"direction": direction, "memory": memory}
                out += [Step("host", f"{direction} {memory} {b / 2**20:.2f} MiB", "host_copy",
                             {**key, **({"expert_of": experts[b]} if b in experts else {})}, b, key) for b in sizes]
        return out

    def collective_count(self) -> int:
        if self.comm is None or "collectives" not in self.request.sections:
            return 0
        return sum(1 for _ in collective_points(self.comm, self.sizes.collective_bytes))

    # ---- running ----------------------------------------------------------------------------------
    def run(self, advance: Callable[[str, str], None]) -> RawProfile | None:
        """Measure everything; returns the raw measurements on rank 0 (None on the others).
        ``advance(section, label)`` is called after each point on rank 0."""
        started = datetime.datetime.now(datetime.timezone.utc)
        measurements: list[Measurement] = []
        if self.rank == 0:
            for _ in range(self.sizes.passes):
                for step in self.steps():
                    point = self._measure_step(step)
                    if point is not None:
                        measurements.append(point)
                    advance(step.section, step.label)
        if self._gloo is not None:
            dist.barrier(group=self._gloo)
        if "collectives" in self.request.sections:
            if self.comm is None:
                self.skipped.append({"what": "collectives", "why": "one rank: run under torchrun with ≥ 2 ranks; "
                                                                   "datasheet link figures kept"})
            else:
                for scope, op, nbytes, pairs in collective_points(self.comm, self.sizes.collective_bytes):
                    point = measure_collective(self.acc, self.comm, self.sizes.effort, scope, op, nbytes, pairs)
                    if self.rank == 0:
                        measurements.append(point)
                        advance("collectives", f"{op} {scope} {nbytes / 2**20:.2f} MiB")
        if self.rank != 0:
            return None
        run_id, run = self.run_record(started)
        return RawProfile(run_id, run, self.request.base.name, datasheet_figures(self.request.base), measurements,
                          self.skipped)

    def _measure_step(self, step: Step) -> Measurement | None:
        params = dict(step.params)
        if step.kind == "attention_prefill":
            impl = self._prefill_impl(params)
            if impl is None:
                return None
            params["impl"] = impl
        try:
            op = build_op(self.acc, step.kind, params, step.x)
            effort = self.sizes.gemm_effort if step.kind == "gemm" and self.sizes.gemm_effort else self.sizes.effort
            timing = measure(self.acc, op, effort)
        except (RuntimeError, TypeError, ValueError, AttributeError) as exc:   # out of memory, an op this build lacks
            self.acc.empty_cache()
            skip = {"what": step.label, "why": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            if skip not in self.skipped:                                     # once, not once per pass
                self.skipped.append(skip)
            return None
        if op.set_bytes > 2**28:
            self.acc.empty_cache()
        return Measurement(step.kind, step.key, params, float(step.x), timing.samples, op.work, op.impl)

    def _prefill_impl(self, params: dict[str, Any]) -> str | None:
        """The first prefill variant that runs for this shape (probed once at the smallest length)."""
        cache = self._prefill_impls
        sig = params["signature"]
        if sig not in cache:
            cache[sig] = None
            errors = []
            for impl in ("sdpa", "sdpa-padded"):
                try:
                    op = build_op(self.acc, "attention_prefill", {**params, "impl": impl}, self.sizes.prefill_seqs[0])
                    op.run(op.make())
                    self.acc.synchronize()
                except (RuntimeError, TypeError, ValueError) as exc:
                    errors.append(f"{impl}: {str(exc).splitlines()[0][:200]}")
                    continue
                cache[sig] = impl
                break
            if cache[sig] is None:
                self.skipped.append({"what": f"attention prefill {sig}", "why": "; ".join(errors)})
        return cache[sig]

    # ---- provenance -------------------------------------------------------------------------------
    def run_record(self, started: datetime.datetime) -> tuple[str, dict[str, Any]]:
        """The run's id and record: date, tool, device, versions, host, device count, what ran."""
        acc = self.acc
        host = socket.gethostname()
        name = acc.name()
        run_id = f"{slug(name)[:32]}-{started:%Y%m%dT%H%M%SZ}"
        topo = self.comm.topology if self.comm else None
        run: dict[str, Any] = {
            "date": started.isoformat(timespec="seconds"), "tool": f"moeplan profile {tool_version()}",
            "gpu": name, **acc.versions(), "host": host,
            "gpu_count": self.comm.world if self.comm else 1, "gpus_on_host": acc.count(),
            "nodes": topo.nodes if topo else 1, "devices_per_node": topo.per_node if topo else 1,
            "backend": acc.backend, "quick": self.request.quick, "sections": list(self.request.sections),
            "models": [m.name for m in self.request.models],
            "links": ("measured: " + ", ".join(f"{s} ({n} ranks)" for s, n in topo.scopes())) if topo and
                     "collectives" in self.request.sections else "not measured (datasheet link figures kept)",
        }
        if self.comm and len(set(self.comm.hosts)) > 1:
            run["hosts"] = sorted(set(self.comm.hosts))
        run["device_memory_bytes"] = acc.memory_bytes()     # a CPU's is the host memory
        return run_id, run

