"""Routing-trace collection from Hugging Face ``transformers`` MoE models.

The model runs over a text file, sequence by sequence, and a forward pre-hook on every MoE
layer's experts module records the expert ids and gate weights the experts actually receive.
In transformers 5.x every supported family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2,
DeepSeek-V3, GPT-OSS, DBRX) calls ``experts(hidden_states, top_k_index, top_k_weights)`` with
its router's output, so the recorded ids are the router's own choice, grouped routing and
correction biases included, and nothing is recomputed here. Each token's choices are ordered
by gate weight (column 0 = the choice with the largest weight; DeepSeek's routers return their
top-k unsorted).

The model is a local folder (``from_pretrained``) or, with ``random_init``, a config (a
moeplan preset, a ``config.json`` or a folder holding one) built with random weights; ``tiny``
shrinks that config to a few small layers (same experts, top-k and grouping) for smoke runs.
Text is tokenised with the model's tokenizer when the folder holds one; a random model without
one maps the text's UTF-8 bytes into the vocabulary (token id = byte value mod vocab size).

torch and transformers are imported lazily, inside the functions that need them, so planning
code that imports moeplan never loads them.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from moeplan.errors import InputError
from moeplan.io import read_json
from moeplan.model import ModelSpec
from moeplan.trace import RoutingTrace

INIT_SEED = 0
TINY_HIDDEN = 64
TINY_HEADS = 4
TINY_HEAD_DIM = 16
TINY_DENSE_FFN = 128
TINY_EXPERT_FFN = 32
TINY_MOE_LAYERS = 4
HOST_MEMORY_SHARE = 0.8
BYTE_TOKENIZER = "utf8-bytes-mod-vocab"
TOKENIZE_CHUNK = 1 << 20  # characters per tokenizer call; a chunk ends at a newline where it can
FAMILIES = "Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS, DBRX"
DROPPED_KEYS = ("quantization_config", "auto_map", "torch_dtype", "dtype", "transformers_version")


@dataclass(frozen=True)
class CollectOptions:
    """How to run the model. max_tokens: tokens of the text to route (None = all); seq_len: tokens
    per sequence (context restarts at every boundary); batch: sequences per forward pass;
    device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"."""

    max_tokens: int | None = None
    seq_len: int = 512
    batch: int = 1
    device: str = "auto"

    def validate(self) -> "CollectOptions":
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InputError(f"must be ≥ 1, got {self.max_tokens}", field="max-tokens")
        if self.seq_len < 1:
            raise InputError(f"must be ≥ 1, got {self.seq_len}", field="seq-len")
        if self.batch < 1:
            raise InputError(f"must be ≥ 1, got {self.batch}", field="batch")
        return self


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: ``folder`` (weights and maybe a tokenizer) or ``config`` (an HF
    config dict for random initialisation); ``name`` is the display name."""

    name: str
    folder: Path | None
    config: dict[str, Any] | None


def resolve_source(ref: str, random_init: bool) -> ModelSource:
    """A local model folder, a ``config.json`` path, or a moeplan preset slug."""
    path = Path(ref)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError("no config.json in this folder", source=ref, fix="give a Hugging Face model folder")
        config = read_json(path / "config.json") if random_init else None
        return ModelSource(path.resolve().name, path, config)
    if path.is_file():
        if not random_init:
            raise InputError("a config file holds no weights", source=ref,
                             fix="give the model folder, or add --random-init")
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("config"), dict) and "name" in data:
            return ModelSource(str(data["name"]), None, data["config"])
        return ModelSource(path.parent.resolve().name or path.stem, path.parent, data)
    if os.sep in ref or path.suffix == ".json":
        raise InputError("not found", source=ref, fix="give a model folder, a config.json or a preset name")
    names = ModelSpec.preset_names()
    if ref.lower() not in names:
        raise InputError(f"unknown model '{ref}'", field="model",
                         fix=f"give a local model folder, a config.json, or a preset: {', '.join(names)}")
    if not random_init:
        raise InputError(f"preset '{ref}' is a config without weights", field="model",
                         fix="add --random-init (with --tiny for a small model), or give a local model folder")
    data = json.loads(resources.files("moeplan.presets").joinpath(f"{ref.lower()}.json").read_text())
    return ModelSource(data["name"], None, data["config"])


def tiny_config(config: dict[str, Any]) -> dict[str, Any]:
    """The same architecture at toy width: hidden 64, 4 heads, expert FFN 32, the dense layers
    plus up to 4 MoE layers; experts, top-k and routing groups unchanged."""
    cfg = {k: v for k, v in config.items() if k not in DROPPED_KEYS}
    if cfg.get("model_type") == "dbrx":
        layers = min(int(cfg["n_layers"]), TINY_MOE_LAYERS)
        kv = int(cfg.get("attn_config", {}).get("kv_n_heads", TINY_HEADS))
        cfg.update(d_model=TINY_HIDDEN, n_heads=TINY_HEADS, n_layers=layers)
        cfg["attn_config"] = {**cfg.get("attn_config", {}), "kv_n_heads": min(kv, TINY_HEADS)}
        cfg["ffn_config"] = {**cfg["ffn_config"], "ffn_hidden_size": TINY_EXPERT_FFN}
        return cfg
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    step = int(cfg.get("decoder_sparse_step") or 1) * int(cfg.get("moe_layer_freq") or 1)
    layers = min(int(cfg["num_hidden_layers"]), first_dense + TINY_MOE_LAYERS * step)
    kv = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    cfg.update(hidden_size=TINY_HIDDEN, num_hidden_layers=layers, num_attention_heads=TINY_HEADS,
               num_key_value_heads=TINY_HEADS if kv % TINY_HEADS == 0 else 1,
               intermediate_size=TINY_DENSE_FFN, moe_intermediate_size=TINY_EXPERT_FFN)
    if "head_dim" in cfg:
        cfg["head_dim"] = TINY_HEAD_DIM
    if cfg.get("shared_expert_intermediate_size"):
        cfg["shared_expert_intermediate_size"] = TINY_EXPERT_FFN
    if cfg.get("model_type") == "gpt_oss":
        cfg["intermediate_size"] = TINY_EXPERT_FFN
    if "kv_lora_rank" in cfg:
        cfg.update(kv_lora_rank=2 * TINY_HEAD_DIM, qk_nope_head_dim=TINY_HEAD_DIM,
                   qk_rope_head_dim=TINY_HEAD_DIM // 2, v_head_dim=TINY_HEAD_DIM)
        if cfg.get("q_lora_rank"):
            cfg["q_lora_rank"] = 3 * TINY_HEAD_DIM
    for key in ("layer_types", "mlp_only_layers"):
        if isinstance(cfg.get(key), list):
            kept = cfg[key][:layers] if key == "layer_types" else [i for i in cfg[key] if i < layers]
            cfg[key] = kept
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = min(int(cfg["max_window_layers"]), layers)
    return cfg


def byte_token_ids(text: bytes, vocab_size: int) -> np.ndarray:
    """Deterministic stand-in tokenisation: each UTF-8 byte becomes token ``byte % vocab_size``."""
    return np.frombuffer(text, dtype=np.uint8).astype(np.int64) % vocab_size


def _torch_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"not a torch device ({exc})", field="device", fix="use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available on this machine", field="device", fix="use --device cpu")
    return device


def _hf_config(config: dict[str, Any], source: str) -> Any:
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.items() if k not in DROPPED_KEYS}
    model_type = cfg.pop("model_type", None)
    if not isinstance(model_type, str):
        raise InputError("no model_type", source=source, field="model_type", fix="give a Hugging Face config.json")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except ValueError as exc:
        raise InputError(f"this transformers cannot build '{model_type}' ({exc})", source=source,
                         field="model_type", fix="upgrade transformers, or use a supported MoE family") from None


def _check_fits_host(hf_config: Any, source: str) -> None:
    """Refuse random initialisation of a model whose float32 weights exceed most of host memory."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        shell = AutoModel.from_config(hf_config)
    weight_bytes = 4 * sum(p.numel() for p in shell.parameters())
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if weight_bytes > HOST_MEMORY_SHARE * host:
        raise InputError(f"random weights would take {weight_bytes / 2**30:.0f} GiB, this machine has "
                         f"{host / 2**30:.0f} GiB", source=source, field="model", fix="add --tiny")


def load_model(source: ModelSource, random_init: bool, tiny: bool, device: Any) -> tuple[Any, Any]:
    """Build or load the base (decoder-only, no LM head) model on ``device``, in eval mode, and its
    tokenizer (None when the folder has none or the model is a random one from a preset)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = None
    if source.folder is not None and (source.folder / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.folder)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load the tokenizer ({exc})", source=str(source.folder),
                             field="tokenizer_config.json") from None
    if random_init:
        assert source.config is not None
        config = tiny_config(source.config) if tiny else source.config
        hf_config = _hf_config(config, source.name)
        if not tiny:
            _check_fits_host(hf_config, source.name)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(INIT_SEED)
        model = AutoModel.from_config(hf_config, dtype=dtype)
    else:
        if tokenizer is None:
            raise InputError("no tokenizer in the model folder", source=str(source.folder),
                             field="tokenizer_config.json",
                             fix="add the tokenizer files (a real model needs real tokens)")
        try:
            model = AutoModel.from_pretrained(source.folder, dtype="auto")
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load the model ({exc})", source=str(source.folder)) from None
    return model.to(device).eval(), tokenizer


def _read_text(text_path: str | os.PathLike[str]) -> bytes:
    path = Path(text_path)
    if not path.is_file():
        raise InputError("file not found" if not path.exists() else "not a file", source=str(path),
                         fix="give a UTF-8 text file")
    return path.read_bytes()


def text_tokens(raw: bytes, source: str, tokenizer: Any, vocab_size: int, max_tokens: int | None) -> np.ndarray:
    """Token ids (int64) of the text ``raw`` read from ``source``, at most ``max_tokens`` of them."""
    if tokenizer is None:
        ids = byte_token_ids(raw, vocab_size)
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"not UTF-8 text ({exc})", source=source, fix="give a UTF-8 text file") from None
        ids = _tokenize(tokenizer, text, max_tokens)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.size == 0:
        raise InputError("no tokens in the text", source=source, fix="give a non-empty text file")
    return ids


def _tokenize(tokenizer: Any, text: str, max_tokens: int | None) -> np.ndarray:
    """Tokenise ``text`` a chunk at a time, stopping once ``max_tokens`` are in hand, so a large
    corpus is not tokenised whole for a short trace."""
    pieces: list[list[int]] = []
    count = start = 0
    while start < len(text) and (max_tokens is None or count < max_tokens):
        stop = min(len(text), start + TOKENIZE_CHUNK)
        if stop < len(text):
            stop = text.rfind("\n", start, stop) + 1 or stop
        pieces.append(tokenizer(text[start:stop], add_special_tokens=False)["input_ids"])
        count += len(pieces[-1])
        start = stop
    return np.asarray([i for piece in pieces for i in piece], dtype=np.int64)


def _layer_index(module_name: str) -> int:
    match = re.search(r"\.(\d+)\.", f".{module_name}.")
    return int(match.group(1)) if match else -1


def _routing_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    """The (top-k ids [tokens, k], top-k weights [tokens, k]) an experts module was called with."""
    import torch

    tensors = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim == 2]
    ids = next((t for t in tensors if not t.is_floating_point()), None)
    if ids is None:
        return None
    weights = next((t for t in tensors if t.is_floating_point() and t.shape == ids.shape), None)
    return (ids, weights) if weights is not None else None


class RouteRecorder:
    """Forward pre-hooks on every MoE layer's experts module; ``take()`` returns what the last
    forward pass routed: ids [tokens, layers, k] int64 and weights [tokens, layers, k] float32."""

    def __init__(self, model: Any) -> None:
        import torch

        self.layers: list[int] = []
        self._captured: list[list[tuple[Any, Any]]] = []
        self._handles = []
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] != "experts" or isinstance(module, torch.nn.ModuleList):
                continue
            slot = len(self.layers)
            self.layers.append(_layer_index(name))
            self._captured.append([])
            self._handles.append(module.register_forward_pre_hook(
                lambda mod, args, kwargs, slot=slot: self._record(slot, args, kwargs), with_kwargs=True))
        if not self.layers:
            raise InputError(f"no MoE experts module in {type(model).__name__}", field="model",
                             fix=f"use one of the supported families: {FAMILIES}")

    def _record(self, slot: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        routed = _routing_arguments(args, kwargs)
        if routed is None:
            raise InputError(f"MoE layer {self.layers[slot]}: the experts module got no top-k ids and weights",
                             field="model", fix=f"use one of the supported families: {FAMILIES}")
        ids, weights = routed
        self._captured[slot].append((ids.detach().to("cpu", copy=True), weights.detach().float().to("cpu")))

    def take(self, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        ids, weights = [], []
        for layer, captured in zip(self.layers, self._captured):
            if len(captured) != 1 or captured[0][0].shape[0] != tokens:
                raise RuntimeError(f"MoE layer {layer} routed {[c[0].shape[0] for c in captured]} tokens in one "
                                   f"pass, expected [{tokens}]")
            ids.append(captured[0][0])
            weights.append(captured[0][1])
            captured.clear()
        ids_t, weights_t = torch.stack(ids, dim=1), torch.stack(weights, dim=1)
        order = torch.argsort(weights_t, dim=2, descending=True, stable=True)
        return (torch.gather(ids_t, 2, order).numpy().astype(np.int64),
                torch.gather(weights_t, 2, order).numpy().astype(np.float32))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def route_tokens(model: Any, tokens: np.ndarray, seq_len: int, batch: int,
                 advance: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Run ``model`` over ``tokens`` in sequences of ``seq_len`` (``batch`` per pass; the last, shorter
    sequence alone) and return ids [tokens, moe_layers, k], gate weights of the same shape, and
    the decoder-layer index of each MoE layer."""
    import torch

    device = next(model.parameters()).device
    full = tokens.size // seq_len
    passes = []
    for first in range(0, full, batch):
        stop = min(first + batch, full)
        passes.append(tokens[first * seq_len:stop * seq_len].reshape(stop - first, seq_len))
    if tokens.size % seq_len:
        passes.append(tokens[full * seq_len:][None, :])
    recorder = RouteRecorder(model)
    ids, weights = [], []
    try:
        with torch.inference_mode():
            for chunk in passes:
                model(input_ids=torch.from_numpy(chunk).to(device), use_cache=False)
                i, w = recorder.take(chunk.size)
                ids.append(i)
                weights.append(w)
                if advance is not None:
                    advance(chunk.size)
    finally:
        recorder.close()
    return np.concatenate(ids), np.concatenate(weights), recorder.layers


@dataclass
class Collection:
    """A model loaded and a text tokenised, ready to route: build with :meth:`prepare`, then :meth:`run`."""

    model_ref: str
    text_path: str
    source: ModelSource
    model: Any
    tokenizer: Any
    tokens: np.ndarray
    options: CollectOptions
    random_init: bool
    tiny: bool

    @classmethod
    def prepare(cls, model_ref: str, text_path: str | os.PathLike[str], options: CollectOptions = CollectOptions(),
                random_init: bool = False, tiny: bool = False) -> "Collection":
        """Check the inputs, load or build the model (see the module docstring) and tokenise the text."""
        options.validate()
        if tiny and not random_init:
            raise InputError("--tiny shrinks a config for random initialisation", field="tiny",
                             fix="add --random-init")
        raw = _read_text(text_path)
        source = resolve_source(model_ref, random_init)
        model, tokenizer = load_model(source, random_init, tiny, _torch_device(options.device))
        tokens = text_tokens(raw, str(text_path), tokenizer, int(model.config.vocab_size), options.max_tokens)
        return cls(str(model_ref), str(text_path), source, model, tokenizer, tokens, options, random_init, tiny)

    def run(self, advance: Callable[[int], None] | None = None) -> RoutingTrace:
        """Route every token and return the trace with its provenance; ``advance(n)`` is called after
        every forward pass with the tokens it routed."""
        import torch
        import transformers

        ids, weights, layers = route_tokens(self.model, self.tokens, self.options.seq_len, self.options.batch,
                                            advance)
        parameter = next(self.model.parameters())
        provenance = {
            "source": "collected", "model": self.model_ref, "model_class": type(self.model).__name__,
            "text": self.text_path, "tokens": int(self.tokens.size),
            "tokenizer": type(self.tokenizer).__name__ if self.tokenizer is not None else BYTE_TOKENIZER,
            "seq_len": self.options.seq_len, "batch": self.options.batch, "random_init": self.random_init,
            "tiny": self.tiny, "init_seed": INIT_SEED if self.random_init else None, "moe_layers": layers,
            "device": str(parameter.device), "dtype": str(parameter.dtype).removeprefix("torch."),
            "transformers": transformers.__version__, "torch": torch.__version__,
        }
        name = f"{self.source.name} (tiny, random weights)" if self.tiny else self.source.name
        trace = RoutingTrace(ids.astype(np.int16), _num_experts(self.model.config), name, weights, provenance)
        return trace.validate(self.model_ref)


def collect_trace(model_ref: str, text_path: str | os.PathLike[str], options: CollectOptions = CollectOptions(),
                  random_init: bool = False, tiny: bool = False,
                  advance: Callable[[int], None] | None = None) -> RoutingTrace:
    """:meth:`Collection.prepare` then :meth:`Collection.run`, in one call."""
    return Collection.prepare(model_ref, text_path, options, random_init, tiny).run(advance)


def _num_experts(config: Any) -> int:
    if getattr(config, "model_type", "") == "dbrx":
        return int(config.ffn_config.moe_num_experts)
    for key in ("num_local_experts", "n_routed_experts", "num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise InputError("the model config names no expert count", field="model")
