"""The offload executor: a MoE layer stack on one device whose routed experts live in (pinned)
host memory, with a fixed cache of expert slots per layer on the device.

Each layer owns ``size`` slots of preallocated weight buffers (never re-allocated) and the
stack owns ``stage`` staging slots for the misses a layer cannot keep. Every decision — hit,
load, eviction, prefetch — comes from :class:`moeplan.solvers.cache.state.CacheState`, the
object the simulator runs, so the executor's counts equal the simulation's step for step.

Per step (B tokens) and MoE layer l, ``h ← h + moe(rms_norm(h))``:

1. the host waits until the device has finished layer l−1 (a real runtime must read layer l's
   router output there; this stack takes the routing from a trace);
2. it queues layer l's misses on the **copy stream** (host → slot, or → staging), then the
   prefetch of layer l+1's predicted experts (``prefetch`` policy), each batch closed by an event;
3. on the compute stream: the shared expert, then a wait for the events of the batches whose
   experts the layer uses (the *stall*, timed by device events), then the routed experts (the
   chosen kernel over the cache's slots, and the staged experts in rounds through staging);
   the gated sum of a token's k results is taken in choice order, in float32.

At the end of a step the compute stream waits for the copy stream (a step ends with its
transfers, as :mod:`moeplan.solvers.cache.steptime` models it). On a CPU the same logic runs
with synchronous copies (no streams); the "stall" is then the time spent copying.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.plan import Plan
from moeplan.runtime.footprint import free_device_bytes, offload_footprint
from moeplan.runtime.kernels import ExpertKernel
from moeplan.runtime.stack import rms_norm
from moeplan.runtime.timing import synchronize
from moeplan.runtime.weights import INPUT, SHARED, materialise_expert, seeded_generator
from moeplan.cache_config import CacheConfig
from moeplan.solvers.cache.predict import TransitionPredictor
from moeplan.solvers.cache.simulate import RECORDS, CacheRun, simulate
from moeplan.solvers.cache.sizing import evaluation_steps
from moeplan.solvers.cache.state import CacheState
from moeplan.solvers.cache.steptime import stack_layer_times, step_times
from moeplan.trace import RoutingTrace

RUNNABLE = ("lru", "lfu", "prefetch")   # belady needs the future: simulation only


@dataclass
class HostExperts:
    """Every routed expert in host memory, per MoE layer: ``w13[l]`` [E, 2·ffn, hidden] and
    ``w2[l]`` [E, hidden, ffn]; page-locked (pinned) when ``pinned``."""

    w13: list[torch.Tensor]
    w2: list[torch.Tensor]
    pinned: bool

    @classmethod
    def materialise(cls, model: ModelSpec, seed: int, dtype: torch.dtype, pinned: bool,
                    source: torch.device) -> "HostExperts":
        """The deterministic weights (:func:`~moeplan.runtime.weights.materialise_expert`), made on
        ``source`` (a GPU makes them fast) and copied expert by expert into host buffers."""
        e, h, f = model.num_experts, model.hidden_size, model.expert_ffn
        w13, w2 = [], []
        for layer in range(model.num_moe_layers):
            a = torch.empty(e, 2 * f, h, dtype=dtype, pin_memory=pinned)
            b = torch.empty(e, h, f, dtype=dtype, pin_memory=pinned)
            for x in range(e):
                g, d = materialise_expert(seed, layer, x, h, f, dtype, source)
                a[x].copy_(g)
                b[x].copy_(d)
            w13.append(a)
            w2.append(b)
        return cls(w13, w2, pinned)

    @property
    def expert_bytes(self) -> int:
        return (self.w13[0][0].numel() + self.w2[0][0].numel()) * self.w13[0].element_size()


class _Slots:
    """Fixed device buffers for ``n`` experts, and which expert each holds (-1: none)."""

    def __init__(self, n: int, ffn: int, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        self.w13 = torch.empty(n, 2 * ffn, hidden, dtype=dtype, device=device)
        self.w2 = torch.empty(n, hidden, ffn, dtype=dtype, device=device)
        self.expert = np.full(n, -1, dtype=np.int64)
        self.ready: list[Any] = [None] * n          # the event closing the copy into each slot


@dataclass
class OffloadRun:
    """A timed run: ``counts`` what the caches did (same fields as a simulation), ``seconds``
    wall time of the timed steps, ``stall_seconds`` time the compute waited for transfers,
    ``bytes_moved`` host → device, ``tokens`` tokens computed."""

    counts: CacheRun
    seconds: float
    stall_seconds: float
    bytes_moved: float
    tokens: int
    device: str
    dtype: str
    kernel: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def to_dict(self, expert_bytes: float) -> dict[str, Any]:
        s = self.counts.summary(expert_bytes)
        return {"tokens_per_s": self.tokens_per_s, "seconds": self.seconds, "steps": s["steps"],
                "tokens": self.tokens, "hit_rate": s["hit_rate"], "stall_s": self.stall_seconds,
                "stall_s_per_step": self.stall_seconds / max(s["steps"], 1), "bytes_moved": self.bytes_moved,
                "loads": s["loads"], "staged": s["staged"], "prefetched": s["prefetched"],
                "prefetch_used": s["prefetch_used"], "device": self.device, "dtype": self.dtype,
                "kernel": self.kernel}


class OffloadStack:
    """The MoE layers of ``model`` with experts in ``host`` and ``sizes[l]`` device slots per
    layer under ``policy``; ``predictor`` drives the prefetch policy (see the module docstring)."""

    def __init__(self, model: ModelSpec, host: HostExperts, sizes: list[int] | np.ndarray, policy: str,
                 stage_slots: int, device: torch.device, dtype: torch.dtype, kernel: str = "grouped",
                 predictor: TransitionPredictor | None = None, seed: int = 0) -> None:
        if policy not in RUNNABLE:
            raise InputError(f"the executor runs {', '.join(RUNNABLE)}; {policy!r} needs the future",
                             field="cache.policy", fix="simulate Belady with 'moeplan plan cache'; run another policy")
        if policy == "prefetch" and predictor is None:
            raise InputError("the prefetch policy needs a predictor fitted on past tokens", field="cache.policy")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        if self.sizes.size != model.num_moe_layers or stage_slots < 1:
            raise InputError(f"need {model.num_moe_layers} cache sizes and ≥ 1 staging slot", field="cache.sizes")
        self.model, self.host, self.policy, self.predictor = model, host, policy, predictor
        self.device, self.dtype = device, dtype
        self.cuda = device.type == "cuda"
        h, f = model.hidden_size, model.expert_ffn
        self.kernel = ExpertKernel(kernel, device, dtype, h, f)
        self.caches = [_Slots(int(s), f, h, dtype, device) for s in self.sizes]
        self.stage = _Slots(stage_slots, f, h, dtype, device)
        self.shared = ({i: materialise_expert(seed, i, SHARED, h, model.shared_ffn, dtype, device)
                        for i in range(model.num_moe_layers)} if model.shared_ffn else {})
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.width = (np.minimum(predictor.width, self.sizes) if policy == "prefetch" and predictor is not None
                      else np.zeros_like(self.sizes))
        self.reset()

    @property
    def slot_bytes(self) -> int:
        """Device bytes of the cache and staging slots."""
        return int(self.sizes.sum() + self.stage.expert.size) * self.host.expert_bytes

    def reset(self) -> None:
        """Empty every cache (the buffers stay)."""
        self.state = CacheState(self.sizes, self.model.num_experts, self.policy)
        for slots in [*self.caches, self.stage]:
            slots.expert[:] = -1
            slots.ready = [None] * slots.expert.size
        self._done: Any = None
        self._stalls: list[tuple[Any, Any]] = []
        self.stall_cpu = 0.0
        self.copies = 0

    def preload(self) -> None:
        """Fill every cache with its layer's lowest-numbered experts (a warm start; with sizes = E
        every expert is resident) and wait for the copies."""
        for layer, size in enumerate(self.sizes.tolist()):
            want = np.zeros((1, self.model.num_experts), dtype=bool)
            want[0, :size] = True
            before = self.state.held[layer].copy()
            self.state.prefetch(want, -1, lanes=np.array([layer]))
            self._load(layer, *self._install(layer, before))
        synchronize(self.device)

    # ---- transfers ------------------------------------------------------------------------------
    def _copy(self, layer: int, expert: int, slots: _Slots, slot: int) -> None:
        """Queue host → device of ``expert`` of ``layer`` into ``slots[slot]``."""
        slots.w13[slot].copy_(self.host.w13[layer][expert], non_blocking=self.host.pinned)
        slots.w2[slot].copy_(self.host.w2[layer][expert], non_blocking=self.host.pinned)
        slots.expert[slot] = expert
        self.copies += 1

    def _close(self) -> Any:
        """An event after the copies queued so far (None on a CPU)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.copy_stream)
        return ev

    def _install(self, layer: int, before: np.ndarray) -> tuple[list[int], list[int]]:
        """Put the experts the state admitted to ``layer``'s cache into free slots (those of
        evicted experts first, lowest slot first); returns (experts, slots) to copy."""
        cache = self.caches[layer]
        after = self.state.held[layer]
        gone = np.flatnonzero(before & ~after)
        cache.expert[np.isin(cache.expert, gone)] = -1
        new = np.flatnonzero(after & ~before)
        free = np.flatnonzero(cache.expert < 0)[: new.size]
        return new.tolist(), free.tolist()

    def _load(self, layer: int, experts: list[int], slots: list[int]) -> None:
        """Copy ``experts`` into ``layer``'s cache slots on the copy stream, one event closing the batch."""
        if not experts:
            return
        cache = self.caches[layer]
        start = time.perf_counter()
        with torch.cuda.stream(self.copy_stream) if self.cuda else nullcontext():
            for e, s in zip(experts, slots):
                self._copy(layer, e, cache, s)
            ev = self._close()
        for s in slots:
            cache.ready[s] = ev
        if not self.cuda:
            self.stall_cpu += time.perf_counter() - start

    # ---- one step -------------------------------------------------------------------------------
    def step(self, t: int, x: torch.Tensor, ids: np.ndarray, gates: torch.Tensor, record: dict[str, np.ndarray],
             row: int) -> torch.Tensor:
        """Step ``t`` (the caches' clock): tokens ``x`` [B, hidden] routed by ``ids`` [B, layers, k]
        with ``gates`` [B, layers, k] (float32, on the device); counts go into ``record``'s ``row``."""
        nl, e = self.model.num_moe_layers, self.model.num_experts
        want = (self.predictor.predicted(ids[None], np.arange(nl), self.width)[0]
                if self.policy == "prefetch" and self.predictor is not None else None)
        prefetched = np.zeros((nl, e), dtype=bool)
        h = x
        for layer in range(nl):
            if self._done is not None:
                self._done.synchronize()                 # layer l's routing is known once l−1 is done
            choices = ids[:, layer].ravel()
            need = np.zeros(e, dtype=bool)
            need[choices] = True
            normed = rms_norm(h)
            out = self._shared(layer, normed)
            per_choice = torch.empty(choices.size, self.model.hidden_size, dtype=normed.dtype, device=self.device)
            cache = self.caches[layer]
            before, slot_before = self.state.held[layer].copy(), self._slot_of(cache)
            hits, loads = self.state.demand(need[None], t, lanes=np.array([layer]))
            leaving = np.flatnonzero(hits[0] & ~self.state.held[layer])
            if leaving.size:                             # hits displaced by misses (more needed than the cache
                self._run(normed, choices, leaving, slot_before, cache, per_choice)   # holds): run them first
                if self.cuda:
                    self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            self._load(layer, *self._install(layer, before))
            staged = np.flatnonzero(loads[0] & ~self.state.held[layer])
            rounds = [staged[i:i + self.stage.expert.size] for i in range(0, staged.size, self.stage.expert.size)]
            first = self._stage(layer, rounds[0], after_compute=False) if rounds else None
            if want is not None and layer + 1 < nl:
                before = self.state.held[layer + 1].copy()
                prefetched[layer + 1] = self.state.prefetch(want[layer + 1][None], t, lanes=np.array([layer + 1]))[0]
                self._load(layer + 1, *self._install(layer + 1, before))
            counts = {"requests": need.sum(), "hits": hits.sum(), "loads": loads.sum(), "staged": staged.size,
                      "prefetched": prefetched[layer].sum(), "prefetch_used": (prefetched[layer] & need).sum()}
            for name, value in counts.items():
                record[name][row, layer] = value
            slot_of = self._slot_of(cache)
            self._run(normed, choices, np.flatnonzero(need & (slot_of >= 0)), slot_of, cache, per_choice)
            for i, experts in enumerate(rounds):
                ready = first if i == 0 else self._stage(layer, experts, after_compute=True)
                self._run_staged(normed, choices, experts, ready, per_choice)
            per = per_choice.view(ids.shape[0], -1, self.model.hidden_size)
            g = gates[:, layer]
            for j in range(per.shape[1]):
                out += g[:, j:j + 1] * per[:, j].float()
            h = h + out.to(h.dtype)
            self._done = self._mark()
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self._done = self._mark()
        return h

    def _mark(self) -> Any:
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def _shared(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """float32 [tokens, hidden]: the layer's shared expert (zeros when it has none)."""
        out = torch.zeros(normed.shape[0], self.model.hidden_size, dtype=torch.float32, device=self.device)
        if layer in self.shared:
            w13, w2 = self.shared[layer]
            half = w13.shape[0] // 2
            sh = normed @ w13.T
            out += ((F.silu(sh[:, :half]) * sh[:, half:]) @ w2.T).float()
        return out

    def _slot_of(self, slots: _Slots) -> np.ndarray:
        """[experts] the slot holding each expert, -1 if none."""
        out = np.full(self.model.num_experts, -1, dtype=np.int64)
        held = slots.expert >= 0
        out[slots.expert[held]] = np.flatnonzero(held)
        return out

    def _run(self, normed: torch.Tensor, choices: np.ndarray, experts: np.ndarray, slot_of: np.ndarray,
             slots: _Slots, per_choice: torch.Tensor) -> None:
        """Wait for ``experts``' copies (the stall), then run their choices from ``slots``."""
        used = slot_of[experts]
        self._wait({slots.ready[s] for s in used})
        for s in used:
            slots.ready[s] = None                        # waited for once: resident from now on
        self._experts(normed, choices, np.flatnonzero(np.isin(choices, experts)), slot_of, slots, per_choice)

    def _experts(self, normed: torch.Tensor, choices: np.ndarray, rows: np.ndarray, slot_of: np.ndarray,
                 slots: _Slots, per_choice: torch.Tensor) -> None:
        """Run the experts of ``rows`` (choice indices) from ``slots`` with the kernel."""
        if rows.size == 0:
            return
        slot = slot_of[choices[rows]]
        order = rows[np.argsort(slot, kind="stable")]
        counts = np.bincount(slot, minlength=slots.expert.size).tolist()
        k = self.model.top_k
        idx = torch.from_numpy(order).to(self.device)
        y = self.kernel(normed[idx // k], self.kernel.groups(counts), slots.w13, slots.w2)
        per_choice[idx] = y

    def _stage(self, layer: int, experts: np.ndarray, after_compute: bool) -> Any:
        """Queue ``experts`` (misses the cache does not keep) into the staging slots; after the
        compute queued so far when an earlier round still uses them. The closing event."""
        start = time.perf_counter()
        with torch.cuda.stream(self.copy_stream) if self.cuda else nullcontext():
            if self.cuda and after_compute:
                self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            for s, e in enumerate(experts.tolist()):
                self._copy(layer, e, self.stage, s)
            ev = self._close()
        if not self.cuda:
            self.stall_cpu += time.perf_counter() - start
        return ev

    def _run_staged(self, normed: torch.Tensor, choices: np.ndarray, experts: np.ndarray, ready: Any,
                    per_choice: torch.Tensor) -> None:
        """Wait for a staging round's copies, then run its experts' choices."""
        self._wait({ready})
        slot_of = np.full(self.model.num_experts, -1, dtype=np.int64)
        slot_of[experts] = np.arange(experts.size)
        self._experts(normed, choices, np.flatnonzero(np.isin(choices, experts)), slot_of, self.stage, per_choice)

    def _wait(self, events: set[Any]) -> None:
        """Make the compute stream wait for ``events``, timing the wait with device events."""
        events.discard(None)
        if not events or not self.cuda:
            return
        stream = torch.cuda.current_stream(self.device)
        a = torch.cuda.Event(enable_timing=True)
        z = torch.cuda.Event(enable_timing=True)
        a.record(stream)
        for ev in events:
            stream.wait_event(ev)
        z.record(stream)
        self._stalls.append((a, z))

    # ---- a run ----------------------------------------------------------------------------------
    def run(self, trace: RoutingTrace, index: np.ndarray, warmup: int = 2, seed: int = 0,
            cold: bool = True) -> tuple[OffloadRun, torch.Tensor]:
        """Serve the steps ``index`` [steps, B] of ``trace`` after ``warmup`` untimed steps, from
        cold caches (emptied after the warm-up) unless ``cold`` is False. Returns the run and the
        last step's output."""
        nl = self.model.num_moe_layers
        steps = index.shape[0]
        with torch.inference_mode():
            scratch = {k: np.zeros((max(warmup, 1), nl), dtype=np.int16) for k in RECORDS}
            for t in range(warmup):
                self.step(t, *self._inputs(trace, index, t % steps, seed), scratch, t)
            synchronize(self.device)
            clock = 0 if cold else warmup
            if cold:
                self.reset()
            else:
                self._stalls, self.stall_cpu, self.copies = [], 0.0, 0
            record = {k: np.zeros((steps, nl), dtype=np.int16) for k in RECORDS}
            start = time.perf_counter()
            out = torch.empty(0)
            for t in range(steps):
                out = self.step(clock + t, *self._inputs(trace, index, t, seed), record, t)
            synchronize(self.device)
            seconds = time.perf_counter() - start
        stall = sum(a.elapsed_time(z) for a, z in self._stalls) / 1e3 if self.cuda else self.stall_cpu
        counts = CacheRun(self.policy, np.arange(nl), self.sizes.copy(), **record)
        run = OffloadRun(counts, seconds, stall, self.copies * self.host.expert_bytes, steps * index.shape[1],
                         str(self.device), str(self.dtype).replace("torch.", ""), self.kernel.impl)
        return run, out

    def _inputs(self, trace: RoutingTrace, index: np.ndarray, t: int,
                seed: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """Step ``t``'s activations (seeded by the step), routing and gates."""
        rows = index[t]
        gen = seeded_generator(seed, INPUT, t, self.device)
        x = torch.randn(rows.size, self.model.hidden_size, generator=gen, device=self.device).to(self.dtype)
        ids = trace.expert_ids[rows].astype(np.int64)
        g = (trace.gate_weights[rows].astype(np.float32) if trace.gate_weights is not None
             else np.full(ids.shape, 1.0 / trace.top_k, dtype=np.float32))
        return x, ids, torch.from_numpy(g).to(self.device)


def measure_offload(plan: Plan, config: CacheConfig, trace: RoutingTrace, hardware: HardwareProfile, steps: int,
                    warmup: int, kernel: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                    source: str = "plan") -> dict[str, Any]:
    """Run ``plan``'s cache on this device over the first ``steps`` held-out steps of ``trace``
    and set the measurement beside the prediction for the same steps: the simulation (whose
    counts the executor must reproduce) through the step timeline, with the stack's compute
    from the cost model and the transfers from ``hardware``'s host link. InputError before any
    allocation when the estimated memory (:func:`~moeplan.runtime.footprint.offload_footprint`)
    exceeds what the host or the device has free."""
    m = plan.model
    trace.check_model(m.num_experts, m.num_moe_layers, m.top_k, "trace")
    config.check_budget(m, source)
    offload_footprint(m, config, dtype.itemsize).check(free_device_bytes(device))
    fit, held, index = evaluation_steps(trace, config.shape, config.fit_fraction, steps)
    predictor = (TransitionPredictor.fit(fit, config.shape).limited(np.array(config.prefetch_width),
                                                                     np.array(config.min_probability))
                 if config.prefetch else None)
    host = HostExperts.materialise(m, seed, dtype, device.type == "cuda", device)
    stack = OffloadStack(m, host, list(config.sizes), config.policy, config.stage_slots, device, dtype, kernel,
                         predictor, seed)
    run, _ = stack.run(held, index, warmup, seed)
    sim = simulate(held, index, np.array(config.sizes), config.policy, predictor)
    cost = CostModel(m, hardware, replace(plan.cost_options, kernel=kernel))
    predicted = step_times(sim, stack_layer_times(cost, held, index))
    expert_bytes = host.expert_bytes
    all_experts = m.num_moe_layers * m.num_experts * expert_bytes
    return {
        "model": m.name, "policy": config.policy, "sizes": list(config.sizes), "stage_slots": config.stage_slots,
        "phase": config.phase, "batch": config.batch, "steps": int(index.shape[0]), "warmup": warmup,
        "hardware": hardware.name, "profile_note": hardware.provenance_note(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "measured": run.to_dict(expert_bytes),
        "predicted": {"tokens_per_s": predicted.tokens_per_s(index.shape[1]),
                      "stall_s_per_step": float(predicted.stall.sum(axis=1).mean()),
                      "step_s": float(predicted.total.mean()), "hit_rate": sim.summary(expert_bytes)["hit_rate"],
                      "bytes_moved": sim.summary(expert_bytes)["bytes_moved"]},
        "counts_match_simulation": all(np.array_equal(getattr(run.counts, k), getattr(sim, k)) for k in RECORDS),
        "memory": {"cache_bytes": stack.slot_bytes, "all_experts_bytes": all_experts,
                   "saved_bytes": all_experts - stack.slot_bytes},
    }
