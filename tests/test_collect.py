"""Trace collection from transformers MoE models (tiny, randomly initialised, no download).

The reference top-k is recomputed here in float64 numpy from the hidden states each router
received and the router's weights, family by family (softmax top-k, GPT-OSS logit top-k,
DeepSeek-V2 group-limited greedy, DeepSeek-V3 sigmoid + correction bias + group selection),
and must equal what the collector recorded from the experts' inputs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.collect import BYTE_TOKENIZER, CollectOptions, byte_token_ids, collect_trace, route_tokens, tiny_config
from moeplan.model import ModelSpec
from moeplan.trace import RoutingTrace

HIDDEN = 32
VOCAB = 101
TEXT = ("Mixture-of-Experts layers route every token to a few experts; the router picks them. " * 8).encode()
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8,
           v_head_dim=8)  # MLA attention needs as many KV heads as heads


def preset_config(slug: str) -> dict[str, Any]:
    return json.loads(resources.files("moeplan.presets").joinpath(f"{slug}.json").read_text())["config"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread when CPU cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- reference routers (float64 numpy) -----------------------------------------------------------------------
def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _group_mask(group_scores: np.ndarray, topk_group: int, per_group: int) -> np.ndarray:
    keep = np.zeros_like(group_scores, dtype=bool)
    np.put_along_axis(keep, _top(group_scores, topk_group), True, axis=1)
    return np.repeat(keep, per_group, axis=1)


def ref_softmax_topk(logits: np.ndarray, cfg: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    p = _softmax(logits)
    ids = _top(p, k)
    w = np.take_along_axis(p, ids, axis=1)
    if getattr(cfg, "model_type", "") == "mixtral" or getattr(cfg, "norm_topk_prob", False):
        w = w / w.sum(axis=1, keepdims=True)
    return ids, w


def ref_dbrx(logits: np.ndarray, cfg: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    p = _softmax(logits)
    ids = _top(p, k)
    w = np.take_along_axis(p, ids, axis=1)
    norm = cfg.ffn_config.moe_normalize_expert_weights
    return ids, w / np.linalg.norm(w, ord=norm, axis=1, keepdims=True)


def ref_gpt_oss(logits: np.ndarray, cfg: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = _top(logits, k)
    return ids, _softmax(np.take_along_axis(logits, ids, axis=1))


def ref_deepseek_v2(logits: np.ndarray, cfg: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = _softmax(logits)
    if cfg.topk_method == "group_limited_greedy":
        per = logits.shape[1] // cfg.n_group
        mask = _group_mask(scores.reshape(len(scores), cfg.n_group, per).max(axis=2), cfg.topk_group, per)
        scores = np.where(mask, scores, 0.0)
    ids = _top(scores, k)
    return ids, np.take_along_axis(scores, ids, axis=1) * cfg.routed_scaling_factor


def ref_deepseek_v3(logits: np.ndarray, cfg: Any, k: int, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = 1.0 / (1.0 + np.exp(-logits))
    choice = s + bias
    per = logits.shape[1] // cfg.n_group
    top2 = np.sort(choice.reshape(len(s), cfg.n_group, per), axis=2)[:, :, -2:].sum(axis=2)
    ids = _top(np.where(_group_mask(top2, cfg.topk_group, per), choice, -np.inf), k)
    w = np.take_along_axis(s, ids, axis=1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(axis=1, keepdims=True) + 1e-20)
    return ids, w * cfg.routed_scaling_factor


# ---- families --------------------------------------------------------------------------------------------------
FAMILIES: dict[str, tuple[str, dict[str, Any], list[int], Callable[..., tuple[np.ndarray, np.ndarray]]]] = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_hidden_layers=2, num_local_experts=8,
                                      num_experts_per_tok=2), [0, 1], ref_softmax_topk),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=32, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=16, num_hidden_layers=3, num_experts=8,
                                         num_experts_per_tok=2, mlp_only_layers=[1]), [0, 2], ref_softmax_topk),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
                                         head_dim=8, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True),
                  [0, 1], ref_softmax_topk),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2),
              [0, 1], ref_softmax_topk),
    "deepseek_v2": ("DeepseekV2Config", dict(intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
                                             first_k_dense_replace=1, n_routed_experts=16, n_shared_experts=1,
                                             num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
                                             topk_group=2, routed_scaling_factor=1.5, **MLA),
                    [1, 2], ref_deepseek_v2),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
                                             first_k_dense_replace=1, n_routed_experts=16, n_shared_experts=1,
                                             num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True,
                                             routed_scaling_factor=2.5, **MLA),
                    [1, 2], ref_deepseek_v3),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=16, num_hidden_layers=2, head_dim=8, num_local_experts=8,
                                     num_experts_per_tok=2, sliding_window=8), [0, 1], ref_gpt_oss),
    "dbrx": ("DbrxConfig", dict(d_model=HIDDEN, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=VOCAB,
                                attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                                ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 8, "moe_top_k": 2}),
             [0, 1], ref_dbrx),
}


def build(family: str) -> tuple[Any, Any]:
    """A tiny random base model of ``family`` with well-spread router weights (no ties)."""
    class_name, kwargs, _, _ = FAMILIES[family]
    config_class = getattr(transformers, class_name, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    config = config_class(**(kwargs if family == "dbrx" else {**COMMON, **kwargs}))
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    with torch.no_grad():
        for _, router in routers(model):
            weight = router.layer.weight if family == "dbrx" else router.weight
            weight.normal_(0.0, HIDDEN ** -0.5)
            if getattr(router, "bias", None) is not None:
                router.bias.normal_(0.0, 0.5)
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.normal_(0.0, 0.3)
    return model, config


def routers(model: Any) -> list[tuple[str, Any]]:
    """The router module of every MoE block (the experts' sibling named gate or router)."""
    out = []
    for name, module in model.named_modules():
        if name.endswith(".experts") and not isinstance(module, torch.nn.ModuleList):
            block = model.get_submodule(name.rsplit(".", 1)[0])
            out.append((name, getattr(block, "gate", None) or block.router))
    return out


def router_logits(family: str, router: Any, hidden: np.ndarray) -> np.ndarray:
    weight = (router.layer.weight if family == "dbrx" else router.weight).detach().double().numpy()
    logits = hidden @ weight.T
    if getattr(router, "bias", None) is not None:
        logits = logits + router.bias.detach().double().numpy()
    return logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recorded_ids_are_the_routers_choice(family: str) -> None:
    model, config = build(family)
    _, _, moe_layers, reference = FAMILIES[family]
    seen: dict[int, list[np.ndarray]] = {}
    hooks = []
    for i, (_, router) in enumerate(routers(model)):
        seen[i] = []
        hooks.append(router.register_forward_pre_hook(
            lambda mod, args, i=i: seen[i].append(args[0].detach().double().reshape(-1, HIDDEN).numpy())))
    tokens = byte_token_ids(TEXT, VOCAB)[:45]
    ids, weights, layers = route_tokens(model, tokens, seq_len=10, batch=2)  # 2 batches of 2 + a 5-token tail
    for h in hooks:
        h.remove()
    k = ids.shape[2]
    assert layers == moe_layers
    assert ids.shape == weights.shape == (45, len(moe_layers), k)
    assert np.all(np.diff(weights, axis=2) <= 0), "column 0 must be the largest-weight choice"
    for j, (_, router) in enumerate(routers(model)):
        hidden = np.concatenate(seen[j])
        assert hidden.shape[0] == 45
        logits = router_logits(family, router, hidden)
        if family == "deepseek_v3":
            bias = router.e_score_correction_bias.detach().double().numpy()
            ref_ids, ref_w = reference(logits, config, k, bias)
        else:
            ref_ids, ref_w = reference(logits, config, k)
        order = np.argsort(-ref_w, axis=1, kind="stable")
        np.testing.assert_array_equal(ids[:, j], np.take_along_axis(ref_ids, order, axis=1))
        np.testing.assert_allclose(weights[:, j], np.take_along_axis(ref_w, order, axis=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_grouped_routing_is_captured_not_recomputed(family: str) -> None:
    """Group-limited routing keeps each token inside topk_group groups, and that differs from a
    plain top-k of the router's scores for some tokens (so the check above can tell them apart)."""
    model, config = build(family)
    captured: list[np.ndarray] = []
    _, router = routers(model)[0]
    hook = router.register_forward_pre_hook(lambda mod, args: captured.append(
        args[0].detach().double().reshape(-1, HIDDEN).numpy()))
    ids, _, _ = route_tokens(model, byte_token_ids(TEXT, VOCAB)[:64], seq_len=32, batch=2)
    hook.remove()
    per = config.n_routed_experts // config.n_group
    groups = ids // per
    assert max(len(set(row)) for row in groups.reshape(-1, ids.shape[2]).tolist()) <= config.topk_group
    logits = router_logits(family, router, np.concatenate(captured))
    score = logits + (router.e_score_correction_bias.detach().double().numpy() if family == "deepseek_v3" else 0)
    plain = np.sort(_top(score, ids.shape[2]), axis=1)
    assert np.any(plain != np.sort(ids[:, 0], axis=1))


@pytest.mark.parametrize("slug", ModelSpec.preset_names())
def test_every_preset_builds_tiny_and_matches_its_model_spec(slug: str, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    trace = collect_trace(slug, text, CollectOptions(max_tokens=24, seq_len=12, device="cpu"), random_init=True,
                          tiny=True)
    tiny = ModelSpec.from_hf_dict(tiny_config(preset_config(slug)), name=slug)
    full = ModelSpec.preset(slug)
    assert (tiny.num_experts, tiny.top_k, tiny.n_group, tiny.topk_group) == (
        full.num_experts, full.top_k, full.n_group, full.topk_group)
    trace.check_model(tiny.num_experts, tiny.num_moe_layers, tiny.top_k)
    assert trace.provenance["moe_layers"] == list(tiny.moe_layers)
    assert trace.num_tokens == 24


def test_cli_collects_a_tiny_deepseek_v3_with_provenance(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    out = tmp_path / "t.npz"
    args = ["trace", "collect", "--model", "deepseek-v3", "--random-init", "--tiny", "--text", str(text),
            "--max-tokens", "50", "--seq-len", "16", "--batch", "2", "--device", "cpu", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    trace = RoutingTrace.load(out)
    assert trace.expert_ids.shape == (50, 4, 8) and trace.num_experts == 256
    prov = trace.provenance
    assert prov["source"] == "collected" and prov["model"] == "deepseek-v3" and prov["text"] == str(text)
    assert prov["tokens"] == 50 and prov["transformers"] == transformers.__version__
    assert prov["tokenizer"] == BYTE_TOKENIZER and prov["moe_layers"] == [3, 4, 5, 6]
    groups = trace.expert_ids.astype(int) // 32
    assert max(len(set(row)) for row in groups.reshape(-1, 8).tolist()) <= 4
    again = tmp_path / "again.npz"
    assert CliRunner().invoke(app, args[:-1] + [str(again)]).exit_code == 0
    np.testing.assert_array_equal(RoutingTrace.load(again).expert_ids, trace.expert_ids)


def _word_tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(TEXT.decode().replace(";", " ").replace(".", " ").replace(",", " ").split()))
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(folder)
    return fast


def test_a_saved_model_folder_is_loaded_with_its_weights_and_tokenizer(tmp_path: Path) -> None:
    config = transformers.MixtralConfig(**COMMON, intermediate_size=16, num_hidden_layers=2, num_local_experts=8,
                                        num_experts_per_tok=2)
    torch.manual_seed(1)
    lm = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for _, router in routers(lm):
            router.weight.normal_(0.0, HIDDEN ** -0.5)
    folder = tmp_path / "tiny-mixtral"
    lm.save_pretrained(folder)
    tokenizer = _word_tokenizer(folder)
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    trace = collect_trace(str(folder), text, CollectOptions(seq_len=16, device="cpu"))
    expected_tokens = np.asarray(tokenizer(TEXT.decode(), add_special_tokens=False)["input_ids"])
    ids, weights, _ = route_tokens(lm.model, expected_tokens, seq_len=16, batch=1)
    assert trace.provenance["tokens"] == expected_tokens.size and trace.provenance["tokenizer"] != BYTE_TOKENIZER
    assert trace.model == "tiny-mixtral" and trace.provenance["random_init"] is False
    np.testing.assert_array_equal(trace.expert_ids, ids)
    np.testing.assert_allclose(trace.gate_weights, weights, rtol=1e-5)


def test_byte_fallback_is_deterministic_and_inside_the_vocab() -> None:
    ids = byte_token_ids("héllo wörld".encode(), 7)
    assert ids.size == len("héllo wörld".encode()) and ids.min() >= 0 and ids.max() < 7
    np.testing.assert_array_equal(ids, byte_token_ids("héllo wörld".encode(), 7))


@pytest.mark.parametrize("extra, needle", [
    (["--model", "deepseek-v3"], "--random-init"),
    (["--model", "mixtral-8x7b", "--tiny"], "--random-init"),
    (["--model", "no-such-model", "--random-init"], "no-such-model"),
    (["--model", "mixtral-8x7b", "--random-init", "--tiny", "--seq-len", "0"], "seq-len"),
    (["--model", "mixtral-8x7b", "--random-init", "--tiny", "--device", "cuda:0"], "device"),
    (["--model", "deepseek-v3", "--random-init"], "--tiny"),
])
def test_cli_bad_inputs_exit_2_naming_the_problem(extra: list[str], needle: str, tmp_path: Path) -> None:
    if "cuda:0" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    result = CliRunner().invoke(app, ["trace", "collect", "--text", str(text), "-o", str(tmp_path / "t.npz"), *extra])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not (tmp_path / "t.npz").exists()


def test_cli_bad_files_exit_2_naming_the_file(tmp_path: Path) -> None:
    runner = CliRunner()
    out = str(tmp_path / "t.npz")
    missing = runner.invoke(app, ["trace", "collect", "--model", "mixtral-8x7b", "--random-init", "--tiny",
                                  "--text", str(tmp_path / "missing.txt"), "-o", out])
    assert missing.exit_code == 2 and "missing.txt" in missing.output
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    result = runner.invoke(app, ["trace", "collect", "--model", "mixtral-8x7b", "--random-init", "--tiny",
                                 "--text", str(empty), "-o", out])
    assert result.exit_code == 2 and "empty.txt" in result.output
    folder = tmp_path / "weights-no-tokenizer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_config(preset_config("mixtral-8x7b"))))
    result = runner.invoke(app, ["trace", "collect", "--model", str(folder), "--text", str(empty), "-o", out])
    assert result.exit_code == 2 and "tokenizer" in result.output
    result = runner.invoke(app, ["trace", "collect", "--model", str(folder / "config.json"), "--text", str(empty),
                                 "-o", out])
    assert result.exit_code == 2 and "config.json" in result.output


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, moeplan.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_long_texts_are_tokenised_in_chunks_up_to_max_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moeplan import collect

    tokenizer = _word_tokenizer(tmp_path)
    text = TEXT.decode().replace("; ", ";\n")  # lines of ~70 characters: chunks of 200 end at newlines
    whole = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(collect, "TOKENIZE_CHUNK", 200)
    np.testing.assert_array_equal(collect.text_tokens(text.encode(), "t", tokenizer, VOCAB, None), whole)
    calls: list[int] = []
    counting = lambda t, **kw: calls.append(len(t)) or tokenizer(t, **kw)
    np.testing.assert_array_equal(collect.text_tokens(text.encode(), "t", counting, VOCAB, 20), whole[:20])
    assert len(calls) < 4 and max(calls) <= 200


def test_a_dense_model_is_refused(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(**COMMON, intermediate_size=16, num_hidden_layers=1)
    config.save_pretrained(tmp_path / "llama")
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    result = CliRunner().invoke(app, ["trace", "collect", "--model", str(tmp_path / "llama" / "config.json"),
                                      "--random-init", "--text", str(text), "-o", str(tmp_path / "t.npz")])
    assert result.exit_code == 2 and "no MoE experts module" in result.output
