"""ModelSpec: the architecture of a Mixture-of-Experts transformer, as planning needs it.

Presets for real models live in ``moeplan/presets/*.json``: each holds the model's
published Hugging Face ``config.json`` (verbatim, with the address it was read from)
and the published parameter totals. One parser, :meth:`ModelSpec.from_hf_dict`,
reads presets and user configs alike, for the Mixtral, DeepSeek-V2/V3, Qwen2-MoE,
Qwen3-MoE, OLMoE, DBRX and GPT-OSS families.

Units: parameters are counts; bytes are bytes; FLOPs count a multiply-add as 2.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from moeplan.errors import InputError
from moeplan.io import Fields, guarded_load, read_json

# Sane maxima for a model's shape, far above any real model (DeepSeek-V3: 61 layers, hidden 7168, 256
# experts, vocab 129,280; the widest published FFNs are tens of thousands). A config.json beyond them
# is a typo or a corrupt file, and would make per-layer loops endless or allocations (trace synthesis,
# placement tables) impossibly large, so it is refused naming the field.
MAX_LAYERS = 10_000
MAX_EXPERTS = 65_536
MAX_HIDDEN = 1_048_576
MAX_FFN = 4_194_304
MAX_VOCAB = 10_000_000
LIMIT_FIX = "check the config.json (a typo or a corrupt file?): moeplan takes models up to {} {}"
DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "float8_e4m3fn": 1.0, "fp8": 1.0, "bf16": 2.0}


@dataclass(frozen=True)
class AttentionSpec:
    """Attention shape of one layer.

    kind: "gqa" (multi-head, grouped-query or multi-query) or "mla" (DeepSeek's multi-head latent attention).
    For GQA: num_heads, num_kv_heads, head_dim. For MLA additionally q_lora_rank (0 = no
    query compression), kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim.
    """

    kind: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    bias: bool = False
    o_bias: bool = False
    qk_norm_params: int = 0
    sinks: bool = False

    @property
    def qk_head_dim(self) -> int:
        """Width of one query/key head (nope + rope for MLA)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.kind == "mla" else self.head_dim

    @property
    def v_dim(self) -> int:
        """Width of one value head."""
        return self.v_head_dim if self.kind == "mla" else self.head_dim

    def params(self, hidden: int) -> int:
        """Weights of the attention block of one layer: projections, their biases (q/k/v when ``bias``, o when
        ``o_bias``: GPT-OSS), MLA's latent norms, the q/k norms (``qk_norm_params``: Qwen3 2 × head_dim, OLMoE
        hidden + KV width) and one attention sink per head (``sinks``: GPT-OSS)."""
        if self.kind == "mla":
            h, nq = hidden, self.num_heads
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nq * self.qk_head_dim
            else:
                q = h * nq * self.qk_head_dim
            kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                  + self.kv_lora_rank * nq * (self.qk_nope_head_dim + self.v_head_dim))
            o = nq * self.v_head_dim * h
            return q + kv + o
        q = hidden * self.num_heads * self.head_dim
        kv = 2 * hidden * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * hidden
        b = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.bias else 0
        b += hidden if self.o_bias else 0
        return q + kv + o + b + self.qk_norm_params + (self.num_heads if self.sinks else 0)

    def kv_cache_elems_per_token(self) -> int:
        """Cached elements per token per layer: K and V heads for GQA, the latent + rope key for MLA."""
        if self.kind == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class ModelSpec:
    """A MoE transformer's shape.

    Attributes:
        name: display name.
        num_layers: transformer layers.
        hidden_size: residual width (elements).
        vocab_size: vocabulary (tokens).
        attention: the attention shape.
        moe_layers: indices of the layers whose FFN is a MoE block; the others are dense.
        num_experts: routed experts per MoE layer.
        top_k: routed experts each token activates per MoE layer.
        expert_ffn: intermediate width of one routed expert (gated, 3 matrices).
        dense_ffn: intermediate width of a dense layer's FFN (0 if there is none).
        shared_ffn: total intermediate width of the shared expert(s) of a MoE layer (0 if none).
        num_shared_experts: how many shared experts make up ``shared_ffn``.
        n_group, topk_group: grouped routing (DeepSeek-V3): experts in n_group groups, a token
            picks topk_group groups first, then its top_k experts inside them. 1, 1 when ungrouped.
        expert_bias: experts have biases (GPT-OSS).
        tie_embeddings: the output head shares the input embedding.
        sliding_window, sliding_layers: layers whose attention sees only the last
            ``sliding_window`` tokens (Hugging Face ``layer_types`` "sliding_attention": GPT-OSS).
        linear_layers: layers of linear attention (``layer_types`` "linear_attention": Qwen3.5's
            Gated DeltaNet), which keep a fixed-size recurrent state, no per-token KV cache; their
            projections are costed with the ``attention`` shape (an approximation).
        weight_bytes: bytes per weight element as deployed (2 for bf16).
        family: the Hugging Face ``model_type`` it came from.
        source: where the numbers were read.
        published: published parameter totals {"total", "active", "active_excludes_input_embedding", "source"}.
    """

    name: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    attention: AttentionSpec
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    expert_ffn: int
    dense_ffn: int = 0
    shared_ffn: int = 0
    num_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    expert_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int = 0
    sliding_layers: tuple[int, ...] = ()
    linear_layers: tuple[int, ...] = ()
    weight_bytes: float = 2.0
    family: str = ""
    source: str = ""
    published: dict[str, Any] = field(default_factory=dict, compare=False)

    # ---- validation -------------------------------------------------------------------------
    def validate(self, source: str = "") -> "ModelSpec":
        """Check internal consistency; raise InputError naming the field."""
        def bad(fld: str, msg: str, fix: str = "") -> InputError:
            return InputError(msg, source=source or self.name, field=fld, fix=fix)

        for fld in ("num_layers", "hidden_size", "vocab_size", "num_experts", "top_k", "expert_ffn"):
            if getattr(self, fld) < 1:
                raise bad(fld, f"must be ≥ 1, got {getattr(self, fld)}")
        for fld, most in (("num_layers", MAX_LAYERS), ("hidden_size", MAX_HIDDEN), ("vocab_size", MAX_VOCAB),
                          ("num_experts", MAX_EXPERTS), ("expert_ffn", MAX_FFN), ("dense_ffn", MAX_FFN),
                          ("shared_ffn", MAX_FFN * max(1, self.num_shared_experts))):
            if getattr(self, fld) > most:
                raise bad(fld, f"must be ≤ {most}, got {getattr(self, fld)}", LIMIT_FIX.format(most, fld))
        if self.top_k > self.num_experts:
            raise bad("top_k", f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if not self.moe_layers:
            raise bad("moe_layers", "no MoE layer", "check first_k_dense_replace / decoder_sparse_step")
        if min(self.moe_layers) < 0 or max(self.moe_layers) >= self.num_layers:
            raise bad("moe_layers", f"indices must lie in 0..{self.num_layers - 1}")
        if len(self.dense_layers) and self.dense_ffn < 1:
            raise bad("dense_ffn", "dense layers exist but their FFN width is 0", "set intermediate_size")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise bad("n_group", f"{self.n_group} groups do not divide {self.num_experts} experts")
        if not 1 <= self.topk_group <= self.n_group:
            raise bad("topk_group", f"must lie in 1..n_group={self.n_group}, got {self.topk_group}")
        if self.n_group > 1 and self.topk_group * (self.num_experts // self.n_group) < self.top_k:
            raise bad("topk_group", "the chosen groups hold fewer experts than top_k")
        a = self.attention
        if a.num_heads < 1 or a.num_kv_heads < 1 or a.num_heads % a.num_kv_heads:
            raise bad("attention.num_kv_heads", f"{a.num_kv_heads} KV heads must divide {a.num_heads} heads")
        if a.kind == "mla" and (a.kv_lora_rank < 1 or a.v_head_dim < 1 or a.qk_nope_head_dim + a.qk_rope_head_dim < 1):
            raise bad("attention", "MLA needs kv_lora_rank, qk_nope/rope_head_dim and v_head_dim")
        if a.kind == "gqa" and a.head_dim < 1:
            raise bad("attention.head_dim", "must be ≥ 1")
        if self.weight_bytes <= 0:
            raise bad("weight_bytes", "must be > 0")
        for fld in ("sliding_layers", "linear_layers"):
            if any(not 0 <= i < self.num_layers for i in getattr(self, fld)):
                raise bad(fld, f"indices must lie in 0..{self.num_layers - 1}")
        if set(self.sliding_layers) & set(self.linear_layers):
            raise bad("linear_layers", "a layer cannot be both sliding-window and linear attention")
        if self.sliding_layers and self.sliding_window < 1:
            raise bad("sliding_window", "sliding-window layers need a window ≥ 1", "set sliding_window")
        return self

    # ---- derived shape ----------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group

    def expert_params(self) -> int:
        """Weights of one routed expert: gate, up and down projections (+ biases for GPT-OSS)."""
        p = 3 * self.hidden_size * self.expert_ffn
        if self.expert_bias:
            p += 2 * self.expert_ffn + self.hidden_size
        return p

    def expert_bytes(self) -> float:
        """Bytes of one routed expert's weights at ``weight_bytes`` per element."""
        return self.expert_params() * self.weight_bytes

    def shared_params(self) -> int:
        """Weights of a MoE layer's shared expert(s)."""
        return 3 * self.hidden_size * self.shared_ffn

    def router_params(self) -> int:
        """Weights of one MoE layer's router (plus GPT-OSS's router bias)."""
        return self.hidden_size * self.num_experts + (self.num_experts if self.expert_bias else 0)

    def dense_ffn_params(self) -> int:
        return 3 * self.hidden_size * self.dense_ffn

    def embedding_params(self) -> int:
        """Input embedding table."""
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """Output projection (0 extra when tied to the embedding)."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    def attention_params(self) -> int:
        return self.num_layers * self.attention.params(self.hidden_size)

    def non_expert_params(self) -> int:
        """Everything but the routed experts: what every device of an EP group replicates."""
        return (self.attention_params() + len(self.dense_layers) * self.dense_ffn_params()
                + self.num_moe_layers * (self.shared_params() + self.router_params())
                + self.embedding_params() + self.head_params() + self.norm_params())

    def total_params(self) -> int:
        """All weights, counting tied embeddings once."""
        return self.non_expert_params() + self.num_moe_layers * self.num_experts * self.expert_params()

    def active_params(self, include_input_embedding: bool | None = None) -> int:
        """Weights one token uses: non-expert weights plus top_k routed experts per MoE layer.

        Publishers differ on the input embedding (a table lookup, not a matmul): Mixtral, Qwen,
        OLMoE and DBRX count it, GPT-OSS and DeepSeek do not; the preset records which
        (``published["active_excludes_input_embedding"]``), and the default (None) follows it, so every
        view shows the same figure. True/False force one convention.
        """
        if include_input_embedding is None:
            include_input_embedding = not self.published.get("active_excludes_input_embedding", False)
        active = self.non_expert_params() + self.num_moe_layers * self.top_k * self.expert_params()
        if not include_input_embedding:
            active -= self.embedding_params()
            if self.tie_embeddings:
                active += self.embedding_params()  # the tied table is still the output head
        return active

    def matmul_params_per_token(self) -> int:
        """Weights that take part in a matmul for one token (active, minus the embedding lookup)."""
        return self.active_params(include_input_embedding=False) - self.norm_params()

    def attention_layer_contexts(self, context: float) -> tuple[tuple[int, float], ...]:
        """(layers, tokens each attends to) per kind of attention layer with ``context`` tokens of
        history: full-attention layers all of them, sliding-window layers at most
        ``sliding_window``, linear-attention layers none (no KV cache to read)."""
        full = self.num_layers - len(self.sliding_layers) - len(self.linear_layers)
        groups = ((full, float(context)), (len(self.sliding_layers), float(min(context, self.sliding_window))),
                  (len(self.linear_layers), 0.0))
        return tuple(g for g in groups if g[0])

    def attended_tokens(self, context: float) -> float:
        """Σ over layers of the tokens one token attends to at ``context`` tokens of history."""
        return sum(n * ctx for n, ctx in self.attention_layer_contexts(context))

    def attention_flops_per_token(self, context: int) -> float:
        """Score and value FLOPs of attention for one token attending to ``context`` tokens, all layers."""
        a = self.attention
        return 2.0 * a.num_heads * (a.qk_head_dim + a.v_dim) * self.attended_tokens(context)

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs for one token: 2 per matmul weight, plus attention over ``context`` tokens."""
        return 2.0 * self.matmul_params_per_token() + self.attention_flops_per_token(context)

    def expert_flops_per_token(self) -> float:
        """Forward FLOPs of one routed expert for one token."""
        return 2.0 * 3 * self.hidden_size * self.expert_ffn

    def kv_cache_bytes_per_token(self, kv_bytes: float | None = None) -> float:
        """KV-cache bytes per token over the layers that keep one (all but linear-attention
        layers; ``kv_bytes`` per element, default weight_bytes)."""
        per = self.weight_bytes if kv_bytes is None else kv_bytes
        return (self.num_layers - len(self.linear_layers)) * self.attention.kv_cache_elems_per_token() * per

    def summary(self) -> dict[str, Any]:
        """One row for tables: the shape and the derived totals."""
        return {
            "name": self.name, "layers": self.num_layers, "moe_layers": self.num_moe_layers,
            "hidden": self.hidden_size, "experts": self.num_experts, "top_k": self.top_k,
            "expert_ffn": self.expert_ffn, "shared": self.num_shared_experts,
            "attention": self.attention.kind, "total_params": self.total_params(),
            "active_params": self.active_params(not self.published.get("active_excludes_input_embedding", False)),
            "expert_bytes": self.expert_bytes(),
        }

    def with_weight_bytes(self, weight_bytes: float) -> "ModelSpec":
        return replace(self, weight_bytes=weight_bytes).validate()

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("moe_layers", "sliding_layers", "linear_layers"):
            d[key] = list(getattr(self, key))
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model") -> "ModelSpec":
        """Inverse of :meth:`to_dict` (as embedded in plans)."""
        def build() -> ModelSpec:
            f = Fields(data, source)
            att = f.sub("attention")
            spec = cls(
                name=f.str("name"), num_layers=f.int("num_layers", minimum=1, maximum=MAX_LAYERS, fix=LIMIT_FIX.format(MAX_LAYERS, "layers")),
                hidden_size=f.int("hidden_size", minimum=1, maximum=MAX_HIDDEN),
                vocab_size=f.int("vocab_size", minimum=1, maximum=MAX_VOCAB),
                attention=AttentionSpec(
                    kind=att.str("kind", choices=("gqa", "mla")), num_heads=att.int("num_heads", minimum=1),
                    num_kv_heads=att.int("num_kv_heads", minimum=1), head_dim=att.int("head_dim", minimum=0),
                    q_lora_rank=att.int("q_lora_rank", 0, minimum=0), kv_lora_rank=att.int("kv_lora_rank", 0, minimum=0),
                    qk_nope_head_dim=att.int("qk_nope_head_dim", 0, minimum=0),
                    qk_rope_head_dim=att.int("qk_rope_head_dim", 0, minimum=0),
                    v_head_dim=att.int("v_head_dim", 0, minimum=0), bias=att.bool("bias", False),
                    o_bias=att.bool("o_bias", False), qk_norm_params=att.int("qk_norm_params", 0, minimum=0),
                    sinks=att.bool("sinks", False)),
                moe_layers=tuple(int(x) for x in f.list("moe_layers")),
                num_experts=f.int("num_experts", minimum=1, maximum=MAX_EXPERTS), top_k=f.int("top_k", minimum=1),
                expert_ffn=f.int("expert_ffn", minimum=1, maximum=MAX_FFN),
                dense_ffn=f.int("dense_ffn", 0, minimum=0, maximum=MAX_FFN),
                shared_ffn=f.int("shared_ffn", 0, minimum=0), num_shared_experts=f.int("num_shared_experts", 0, minimum=0),
                n_group=f.int("n_group", 1, minimum=1), topk_group=f.int("topk_group", 1, minimum=1),
                expert_bias=f.bool("expert_bias", False), tie_embeddings=f.bool("tie_embeddings", False),
                sliding_window=f.int("sliding_window", 0, minimum=0),
                sliding_layers=tuple(int(x) for x in f.list("sliding_layers", [])),
                linear_layers=tuple(int(x) for x in f.list("linear_layers", [])),
                weight_bytes=f.float("weight_bytes", 2.0, positive=True), family=f.str("family", ""),
                source=f.str("source", ""), published=f.raw("published", {}),
            )
            return spec.validate(source)
        return guarded_load(build, source)

    @classmethod
    def from_hf_config(cls, path: str | os.PathLike[str], name: str | None = None) -> "ModelSpec":
        """Read a Hugging Face ``config.json`` (any supported MoE family)."""
        data = read_json(path)
        return cls.from_hf_dict(data, name=name or Path(path).parent.name or Path(path).stem, source=str(path))

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], name: str, source: str = "config.json",
                     published: dict[str, Any] | None = None) -> "ModelSpec":
        """Parse a Hugging Face config dict; see the module docstring for the families."""
        return guarded_load(lambda: _parse_hf(cfg, name, source, published or {}), source)

    # ---- presets ----------------------------------------------------------------------------
    @staticmethod
    def preset_names() -> list[str]:
        """Slugs of the bundled presets, sorted."""
        return sorted(p.name[:-5] for p in resources.files("moeplan.presets").iterdir() if p.name.endswith(".json"))

    @classmethod
    def preset(cls, slug: str) -> "ModelSpec":
        """A bundled real model, e.g. ``ModelSpec.preset("deepseek-v3")``."""
        names = cls.preset_names()
        key = slug.lower()
        if key not in names:
            raise InputError(f"unknown model preset '{slug}'", field="model",
                             fix=f"use one of: {', '.join(names)}, or a path to a config.json")
        text = resources.files("moeplan.presets").joinpath(f"{key}.json").read_text()
        data = json.loads(text)
        return cls.from_hf_dict(data["config"], name=data["name"], source=data["source"],
                                published=data.get("published_params") or {})

    @classmethod
    def resolve(cls, ref: str) -> "ModelSpec":
        """A preset slug, a Hugging Face ``config.json`` path, or a moeplan model JSON path."""
        p = Path(ref)
        if p.suffix == ".json" and p.exists():
            data = read_json(p)
            if isinstance(data, dict) and "attention" in data and "moe_layers" in data:
                return cls.from_dict(data, source=str(p))
            if isinstance(data, dict) and "config" in data and "name" in data:
                return cls.from_hf_dict(data["config"], name=data["name"], source=str(p),
                                        published=data.get("published_params") or {})
            return cls.from_hf_config(p)
        if p.suffix == ".json" or os.sep in ref:
            raise InputError("file not found", source=ref, fix="check the path, or give a preset name")
        return cls.preset(ref)


# What transformers' config classes fill in for a key a config.json leaves out, where it differs
# from "ungrouped": DeepseekV3Config(n_group=8, topk_group=4) (transformers @ v4.57,
# models/deepseek_v3/configuration_deepseek_v3.py::DeepseekV3Config.__init__). DeepseekV2Config
# defaults both to None, i.e. ungrouped.
TRANSFORMERS_DEFAULTS: dict[str, dict[str, int]] = {"deepseek_v3": {"n_group": 8, "topk_group": 4}}


def _parse_hf(cfg: dict[str, Any], name: str, source: str, published: dict[str, Any]) -> ModelSpec:
    f = Fields(cfg, source)
    model_type = f.str("model_type", "")
    if model_type == "dbrx" or f.has("ffn_config"):
        return _parse_dbrx(f, name, source, published)
    hidden = f.int("hidden_size", minimum=1, maximum=MAX_HIDDEN, fix=LIMIT_FIX.format(MAX_HIDDEN, "hidden size"))
    layers = f.int("num_hidden_layers", minimum=1, maximum=MAX_LAYERS, fix=LIMIT_FIX.format(MAX_LAYERS, "layers"))
    heads = f.int("num_attention_heads", minimum=1)
    kv_heads = f.int("num_key_value_heads", heads, minimum=1)
    head_dim = f.int("head_dim", hidden // heads, minimum=1)
    n_experts = None
    for key in ("num_local_experts", "n_routed_experts", "num_experts"):
        if f.has(key):
            n_experts = f.int(key, minimum=1, maximum=MAX_EXPERTS, fix=LIMIT_FIX.format(MAX_EXPERTS, "experts"))
            break
    if n_experts is None:
        raise InputError("no expert count: not a MoE config", source=source, field="num_local_experts",
                         fix="give a config with num_local_experts, n_routed_experts or num_experts")
    top_k = f.int("num_experts_per_tok", minimum=1)
    dense_ffn = f.int("intermediate_size", 0, minimum=0, maximum=MAX_FFN, fix=LIMIT_FIX.format(MAX_FFN, "FFN width"))
    expert_ffn = f.int("moe_intermediate_size", dense_ffn, minimum=1, maximum=MAX_FFN, fix=LIMIT_FIX.format(MAX_FFN, "FFN width"))
    shared_ffn = 0
    n_shared = 0
    if f.has("n_shared_experts"):
        n_shared = f.int("n_shared_experts", minimum=0, maximum=MAX_EXPERTS, fix=LIMIT_FIX.format(MAX_EXPERTS, "experts"))
        shared_ffn = n_shared * expert_ffn
    elif f.has("shared_expert_intermediate_size"):
        shared_ffn = f.int("shared_expert_intermediate_size", minimum=0, maximum=MAX_FFN, fix=LIMIT_FIX.format(MAX_FFN, "FFN width"))
        n_shared = 1 if shared_ffn else 0
    first_dense = f.int("first_k_dense_replace", 0, minimum=0)
    freq = f.int("moe_layer_freq", 1, minimum=1)
    step = f.int("decoder_sparse_step", 1, minimum=1)
    mlp_only = {int(x) for x in f.list("mlp_only_layers", [])}
    if first_dense or f.has("moe_layer_freq"):
        moe_layers = tuple(i for i in range(layers) if i >= first_dense and i % freq == 0)
    else:
        moe_layers = tuple(i for i in range(layers) if i not in mlp_only and (i + 1) % step == 0)
    if f.has("kv_lora_rank"):
        attention = AttentionSpec(
            kind="mla", num_heads=heads, num_kv_heads=heads, head_dim=f.int("v_head_dim", minimum=1),
            q_lora_rank=f.int("q_lora_rank", 0, minimum=0), kv_lora_rank=f.int("kv_lora_rank", minimum=1),
            qk_nope_head_dim=f.int("qk_nope_head_dim", minimum=0), qk_rope_head_dim=f.int("qk_rope_head_dim", minimum=0),
            v_head_dim=f.int("v_head_dim", minimum=1))
    else:
        qk_norm = {"qwen3_moe": 2 * head_dim, "olmoe": hidden + kv_heads * head_dim}.get(model_type, 0)
        attention = AttentionSpec(kind="gqa", num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                  bias=bool(cfg.get("attention_bias", False)) or model_type == "qwen2_moe",
                                  o_bias=model_type == "gpt_oss" and bool(cfg.get("attention_bias", False)),
                                  qk_norm_params=qk_norm, sinks=model_type == "gpt_oss")
    defaults = TRANSFORMERS_DEFAULTS.get(model_type, {})
    n_group = f.int("n_group", minimum=1) if f.has("n_group") else defaults.get("n_group", 1)
    topk_group = f.int("topk_group", minimum=1) if f.has("topk_group") else defaults.get("topk_group", 1)
    if n_group == 1:
        topk_group = 1
    kinds = [str(k) for k in f.list("layer_types", [])]
    sliding = tuple(i for i, k in enumerate(kinds) if k == "sliding_attention")
    linear = tuple(i for i, k in enumerate(kinds) if k == "linear_attention")
    window = f.int("sliding_window", 0, minimum=0) if sliding and cfg.get("sliding_window") is not None else 0
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "fp8":
        dtype = "fp8"  # DeepSeek-V3 ships its weights in fp8
    return ModelSpec(
        name=name, num_layers=layers, hidden_size=hidden,
        vocab_size=f.int("vocab_size", minimum=1, maximum=MAX_VOCAB, fix=LIMIT_FIX.format(MAX_VOCAB, "vocabulary")),
        attention=attention, moe_layers=moe_layers, num_experts=n_experts, top_k=top_k,
        expert_ffn=expert_ffn, dense_ffn=dense_ffn if len(moe_layers) < layers else 0,
        shared_ffn=shared_ffn, num_shared_experts=n_shared, n_group=n_group, topk_group=topk_group,
        expert_bias=model_type == "gpt_oss", tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=window, sliding_layers=sliding, linear_layers=linear,
        weight_bytes=DTYPE_BYTES.get(dtype, 2.0), family=model_type, source=source, published=published,
    ).validate(source)


def _parse_dbrx(f: Fields, name: str, source: str, published: dict[str, Any]) -> ModelSpec:
    ffn = f.sub("ffn_config")
    attn = f.sub("attn_config")
    hidden = f.int("d_model", minimum=1, maximum=MAX_HIDDEN, fix=LIMIT_FIX.format(MAX_HIDDEN, "hidden size"))
    heads = f.int("n_heads", minimum=1)
    layers = f.int("n_layers", minimum=1, maximum=MAX_LAYERS, fix=LIMIT_FIX.format(MAX_LAYERS, "layers"))
    return ModelSpec(
        name=name, num_layers=layers, hidden_size=hidden,
        vocab_size=f.int("vocab_size", minimum=1, maximum=MAX_VOCAB, fix=LIMIT_FIX.format(MAX_VOCAB, "vocabulary")),
        attention=AttentionSpec(kind="gqa", num_heads=heads, num_kv_heads=attn.int("kv_n_heads", heads, minimum=1),
                                head_dim=hidden // heads),
        moe_layers=tuple(range(layers)), num_experts=ffn.int("moe_num_experts", minimum=1, maximum=MAX_EXPERTS, fix=LIMIT_FIX.format(MAX_EXPERTS, "experts")),
        top_k=ffn.int("moe_top_k", minimum=1), expert_ffn=ffn.int("ffn_hidden_size", minimum=1, maximum=MAX_FFN, fix=LIMIT_FIX.format(MAX_FFN, "FFN width")),
        tie_embeddings=bool(f.data.get("tie_word_embeddings", False)), family="dbrx", source=source,
        published=published,
    ).validate(source)
