"""RoutingTrace: which experts each token chose, layer by layer.

``expert_ids[tokens, moe_layers, top_k]`` (int16, column 0 the router's first choice) plus
optional ``gate_weights`` of the same shape, the model's name, its expert count, and a
provenance record (synthetic with its knobs, collected with the model and text, imported).
Saved as compressed NPZ. Nothing derived is stored: statistics live in :mod:`moeplan.stats`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeplan.errors import InputError
from moeplan.io import read_npz, write_npz

FORMAT = "moeplan-trace-v1"


@dataclass(frozen=True)
class RoutingTrace:
    """Top-k expert choices per token per MoE layer.

    Attributes:
        expert_ids: int16 array [tokens, moe_layers, top_k].
        num_experts: routed experts per layer (ids lie in 0..num_experts-1).
        model: the model name the trace belongs to.
        gate_weights: optional float array [tokens, moe_layers, top_k] (the router's weights).
        provenance: where it came from: {"source": "synthetic"|"collected"|"imported", ...}.
    """

    expert_ids: np.ndarray
    num_experts: int
    model: str
    gate_weights: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    def validate(self, source: str = "trace") -> "RoutingTrace":
        ids = self.expert_ids
        if not isinstance(ids, np.ndarray) or ids.ndim != 3:
            raise InputError(f"expert_ids must be a 3-d array [tokens, layers, top_k], got shape "
                             f"{getattr(ids, 'shape', None)}", source=source, field="expert_ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"expert_ids must be integers, got {ids.dtype}", source=source, field="expert_ids")
        if min(ids.shape) < 1:
            raise InputError(f"expert_ids is empty (shape {ids.shape})", source=source, field="expert_ids")
        if self.num_experts < 1 or self.num_experts > np.iinfo(np.int16).max:
            raise InputError(f"num_experts must lie in 1..32767, got {self.num_experts}", source=source,
                             field="num_experts")
        if self.top_k > self.num_experts:
            raise InputError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}", source=source,
                             field="expert_ids")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.num_experts:
            raise InputError(f"expert ids must lie in 0..{self.num_experts - 1}, found {lo}..{hi}", source=source,
                             field="expert_ids", fix="check num_experts matches the model")
        if self.top_k > 1:
            s = np.sort(ids, axis=2)
            if np.any(s[:, :, 1:] == s[:, :, :-1]):
                raise InputError("a token chose the same expert twice in one layer", source=source,
                                 field="expert_ids")
        if self.gate_weights is not None:
            g = self.gate_weights
            if not isinstance(g, np.ndarray) or g.shape != ids.shape:
                raise InputError(f"gate_weights shape {getattr(g, 'shape', None)} differs from expert_ids {ids.shape}",
                                 source=source, field="gate_weights")
            if not np.issubdtype(g.dtype, np.floating) or not np.all(np.isfinite(g)):
                raise InputError("gate_weights must be finite floats", source=source, field="gate_weights")
        return self

    def check_model(self, num_experts: int, num_moe_layers: int, top_k: int, source: str = "trace") -> None:
        """Raise unless this trace fits a model with these numbers."""
        if self.num_experts != num_experts or self.num_layers != num_moe_layers or self.top_k != top_k:
            raise InputError(
                f"trace has {self.num_layers} MoE layers × {self.num_experts} experts, top-{self.top_k}; "
                f"the model has {num_moe_layers} × {num_experts}, top-{top_k}", source=source, field="expert_ids",
                fix="synthesise or collect a trace for this model")

    def split(self, fraction: float) -> tuple["RoutingTrace", "RoutingTrace"]:
        """The first ``fraction`` of tokens (fit) and the rest (held out), in time order."""
        if not 0 < fraction < 1:
            raise InputError(f"split fraction must lie in (0, 1), got {fraction}", field="holdout")
        if self.num_tokens < 2:
            raise InputError(f"a trace of {self.num_tokens} token cannot be split into a fitted and a judged part",
                             field="tokens", fix="use at least 2 tokens (thousands for meaningful figures)")
        cut = max(1, min(self.num_tokens - 1, int(round(self.num_tokens * fraction))))
        return self.slice(0, cut), self.slice(cut, self.num_tokens)

    def slice(self, start: int, stop: int) -> "RoutingTrace":
        g = None if self.gate_weights is None else self.gate_weights[start:stop]
        return RoutingTrace(self.expert_ids[start:stop], self.num_experts, self.model, g,
                            {**self.provenance, "slice": [int(start), int(stop)]})

    def save(self, path: str | os.PathLike[str]) -> None:
        self.validate(str(path))
        arrays: dict[str, np.ndarray] = {
            "expert_ids": self.expert_ids.astype(np.int16, copy=False),
            "meta": np.array(json.dumps({"format": FORMAT, "num_experts": self.num_experts, "model": self.model,
                                         "provenance": self.provenance})),
        }
        if self.gate_weights is not None:
            arrays["gate_weights"] = self.gate_weights.astype(np.float16, copy=False)
        write_npz(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RoutingTrace":
        src = str(path)
        data = read_npz(path)
        if "expert_ids" not in data:
            raise InputError("no 'expert_ids' array", source=src, field="expert_ids",
                             fix="write traces with 'moeplan trace synth' or 'moeplan trace collect'")
        if "meta" not in data:
            raise InputError("no 'meta' record", source=src, field="meta", fix="re-save the trace with moeplan")
        try:
            meta = json.loads(str(data["meta"]))
        except (json.JSONDecodeError, ValueError) as exc:
            raise InputError(f"meta is not JSON ({exc})", source=src, field="meta") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InputError(f"unknown trace format {meta.get('format') if isinstance(meta, dict) else meta!r}",
                             source=src, field="meta.format", fix=f"expected {FORMAT}")
        n = meta.get("num_experts")
        if isinstance(n, bool) or not isinstance(n, int):
            raise InputError(f"num_experts must be an integer, got {n!r}", source=src, field="meta.num_experts")
        prov = meta.get("provenance", {})
        trace = cls(
            expert_ids=data["expert_ids"], num_experts=n, model=str(meta.get("model", "")),
            gate_weights=data.get("gate_weights"), provenance=prov if isinstance(prov, dict) else {},
        )
        trace.validate(src)
        if trace.expert_ids.dtype != np.int16:
            trace = cls(trace.expert_ids.astype(np.int16), trace.num_experts, trace.model, trace.gate_weights,
                        trace.provenance)
        return trace
