"""ModelSpec: presets against published totals, hand-worked sizes and FLOPs, HF config parsing."""
from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from moeplan.errors import InputError
from moeplan.model import ModelSpec

PRESETS = ModelSpec.preset_names()


def hf_config(slug: str) -> dict[str, Any]:
    return json.loads(resources.files("moeplan.presets").joinpath(f"{slug}.json").read_text())["config"]


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_the_bundled_presets_are_the_fourteen_models() -> None:
    assert PRESETS == ["dbrx", "deepseek-v2-lite", "deepseek-v3", "glm-5", "gpt-oss-120b", "kimi-k2.5", "minimax-m2.5",
                       "mixtral-8x22b", "mixtral-8x7b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b", "qwen2-57b-a14b",
                       "qwen3-235b-a22b", "qwen3-30b-a3b", "qwen3.5-397b-a17b"]


# Figures published rounded to one or two significant digits, with the relative tolerance that rounding allows:
# Kimi-K2.5's "1T" total (1.026T from its config), MiniMax-M2.5's "10B" active (10.4B from its config).
# Qwen3.5-397B-A17B's active count from the preset is 13.7B of "17B": its 45 Gated-DeltaNet layers are costed
# with the full-attention projection shape (71M weights a layer against ~117M) and the output gate of the 15
# full-attention layers (+34M each) is not modelled, ~2.6B in all (the preset's source says so).
ROUNDED = {("kimi-k2.5", "total"): 0.03, ("minimax-m2.5", "active"): 0.05, ("qwen3.5-397b-a17b", "active"): 0.2}


@pytest.mark.parametrize("slug", PRESETS)
def test_preset_totals_match_the_published_figures(slug: str) -> None:
    spec = ModelSpec.preset(slug)
    published = spec.published
    assert published["source"]
    active = spec.active_params(include_input_embedding=not published.get("active_excludes_input_embedding", False))
    assert spec.total_params() == pytest.approx(published["total"], rel=ROUNDED.get((slug, "total"), 0.02))
    # DeepSeek publishes V2-Lite's activated parameters rounded to one decimal ("2.4B"); the count from its
    # config is 2.45B, which that rounding covers but 2% of 2.4B does not.
    active_tolerance = 0.025 if slug == "deepseek-v2-lite" else ROUNDED.get((slug, "active"), 0.02)
    assert active == pytest.approx(published["active"], rel=active_tolerance)


def test_mixtral_8x7b_sizes_and_flops_by_hand() -> None:
    m = ModelSpec.preset("mixtral-8x7b")
    expert = 3 * 4096 * 14336
    assert m.expert_params() == expert == 176_160_768
    assert m.expert_bytes() == 2 * expert
    assert m.expert_flops_per_token() == 2 * expert
    attention = 4096 * 32 * 128 + 2 * 4096 * 8 * 128 + 32 * 128 * 4096
    per_layer = attention + 4096 * 8 + 2 * expert           # attention, router, two routed experts
    matmul = 32 * per_layer + 32000 * 4096                  # + the LM head (the embedding is a lookup)
    assert m.flops_per_token() == 2 * matmul == 25_497_174_016
    assert m.flops_per_token(context=1000) == 2 * matmul + 2 * 32 * 32 * (128 + 128) * 1000
    assert m.kv_cache_bytes_per_token() == 32 * 2 * 8 * 128 * 2


def test_deepseek_v3_expert_mla_and_kv_cache_by_hand() -> None:
    m = ModelSpec.preset("deepseek-v3")
    assert m.expert_params() == 3 * 7168 * 2048
    assert m.weight_bytes == 1.0 and m.expert_bytes() == 3 * 7168 * 2048  # fp8 checkpoint
    q = 7168 * 1536 + 1536 + 1536 * 128 * (128 + 64)
    kv = 7168 * (512 + 64) + 512 + 512 * 128 * (128 + 128)
    o = 128 * 128 * 7168
    assert m.attention.params(7168) == q + kv + o == 187_107_328
    assert m.kv_cache_bytes_per_token(kv_bytes=2) == 61 * (512 + 64) * 2
    assert m.shared_params() == 3 * 7168 * 2048
    assert m.dense_ffn_params() == 3 * 7168 * 18432


def test_gpt_oss_experts_carry_biases() -> None:
    m = ModelSpec.preset("gpt-oss-120b")
    assert m.expert_bias
    assert m.expert_params() == 3 * 2880 * 2880 + 2 * 2880 + 2880
    assert m.router_params() == 2880 * 128 + 128


def test_deepseek_v3_parses_dense_first_layers_shared_expert_mla_and_groups() -> None:
    m = ModelSpec.preset("deepseek-v3")
    assert m.moe_layers == tuple(range(3, 61)) and m.dense_layers == (0, 1, 2)
    assert (m.dense_ffn, m.expert_ffn) == (18432, 2048)
    assert (m.num_shared_experts, m.shared_ffn) == (1, 2048)
    assert (m.num_experts, m.top_k, m.n_group, m.topk_group, m.experts_per_group) == (256, 8, 8, 4, 32)
    a = m.attention
    assert a.kind == "mla" and (a.q_lora_rank, a.kv_lora_rank) == (1536, 512)
    assert (a.qk_head_dim, a.v_dim, a.num_heads) == (192, 128, 128)
    assert a.kv_cache_elems_per_token() == 576


def test_deepseek_v2_lite_has_no_query_compression_and_two_shared_experts() -> None:
    m = ModelSpec.preset("deepseek-v2-lite")
    assert m.dense_layers == (0,) and m.num_moe_layers == 26
    assert m.attention.kind == "mla" and m.attention.q_lora_rank == 0
    assert (m.num_shared_experts, m.shared_ffn) == (2, 2 * 1408)
    assert (m.n_group, m.topk_group) == (1, 1)


def test_gqa_shapes_of_the_other_families() -> None:
    mixtral, qwen3, qwen15, gpt, dbrx = (ModelSpec.preset(s) for s in
                                         ("mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "gpt-oss-120b", "dbrx"))
    assert (mixtral.attention.kind, mixtral.attention.num_heads, mixtral.attention.num_kv_heads,
            mixtral.attention.head_dim) == ("gqa", 32, 8, 128)
    assert (qwen3.attention.num_heads, qwen3.attention.num_kv_heads, qwen3.attention.head_dim) == (32, 4, 128)
    assert (gpt.attention.num_heads, gpt.attention.num_kv_heads, gpt.attention.head_dim) == (64, 8, 64)
    assert (dbrx.num_experts, dbrx.top_k, dbrx.attention.num_kv_heads, dbrx.attention.head_dim) == (16, 4, 8, 128)
    assert qwen15.attention.bias and not mixtral.attention.bias
    assert (qwen15.num_shared_experts, qwen15.shared_ffn) == (1, 5632)
    for m in (mixtral, qwen3, qwen15, gpt, dbrx):
        assert m.moe_layers == tuple(range(m.num_layers)) and m.dense_ffn == 0


def test_sparse_step_and_mlp_only_layers_make_dense_layers() -> None:
    cfg = {**hf_config("qwen3-30b-a3b"), "num_hidden_layers": 8, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    m = ModelSpec.from_hf_dict(cfg, "q")
    assert m.moe_layers == (1, 5, 7) and m.dense_layers == (0, 2, 3, 4, 6) and m.dense_ffn == 6144


def test_moe_layer_freq_after_the_dense_layers() -> None:
    cfg = {**hf_config("deepseek-v3"), "num_hidden_layers": 10, "moe_layer_freq": 2}
    assert ModelSpec.from_hf_dict(cfg, "d").moe_layers == (4, 6, 8)


@pytest.mark.parametrize("slug", PRESETS)
def test_from_hf_config_reads_a_written_config_json(slug: str, tmp_path: Path) -> None:
    preset = ModelSpec.preset(slug)
    path = write_config(tmp_path / slug, hf_config(slug))
    parsed = ModelSpec.from_hf_config(path)
    assert parsed.name == slug and parsed.source == str(path)
    assert replace(parsed, name=preset.name, source=preset.source) == preset
    assert ModelSpec.resolve(str(path)) == parsed


@pytest.mark.parametrize("slug", PRESETS)
def test_to_dict_from_dict_round_trip(slug: str) -> None:
    spec = ModelSpec.preset(slug)
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.published == spec.published
    assert again.total_params() == spec.total_params()


def test_resolve_reads_moeplan_model_json_and_preset_files(tmp_path: Path) -> None:
    spec = ModelSpec.preset("olmoe-1b-7b")
    own = tmp_path / "model.json"
    own.write_text(json.dumps(spec.to_dict()))
    assert ModelSpec.resolve(str(own)) == spec
    wrapped = tmp_path / "preset.json"
    wrapped.write_text(resources.files("moeplan.presets").joinpath("olmoe-1b-7b.json").read_text())
    assert replace(ModelSpec.resolve(str(wrapped)), source=spec.source) == spec
    with pytest.raises(InputError, match="file not found"):
        ModelSpec.resolve(str(tmp_path / "missing.json"))
    with pytest.raises(InputError) as info:
        ModelSpec.resolve("gpt-5")
    assert info.value.field == "model" and "deepseek-v3" in info.value.fix


@pytest.mark.parametrize("change, field", [
    ({"num_local_experts": None, "num_experts": None}, "num_local_experts"),
    ({"num_experts_per_tok": 9}, "top_k"),
    ({"num_key_value_heads": 5}, "attention.num_kv_heads"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"hidden_size": "4096"}, "hidden_size"),
])
def test_bad_configs_name_the_field(change: dict[str, Any], field: str, tmp_path: Path) -> None:
    cfg = {k: v for k, v in {**hf_config("mixtral-8x7b"), **change}.items() if v is not None}
    path = write_config(tmp_path, cfg)
    with pytest.raises(InputError) as info:
        ModelSpec.from_hf_config(path)
    assert info.value.field == field and str(path) in str(info.value)


@pytest.mark.parametrize("slug, change, field", [
    ("mixtral-8x7b", {"num_local_experts": 10**9}, "num_local_experts"),
    ("deepseek-v3", {"n_routed_experts": 65_537}, "n_routed_experts"),
    ("qwen3-30b-a3b", {"num_experts": 10**9}, "num_experts"),
    ("mixtral-8x7b", {"hidden_size": 10**15}, "hidden_size"),
    ("mixtral-8x7b", {"hidden_size": 1e15}, "hidden_size"),
    ("mixtral-8x7b", {"num_hidden_layers": 10_001}, "num_hidden_layers"),
    ("mixtral-8x7b", {"vocab_size": 10**8}, "vocab_size"),
    ("mixtral-8x7b", {"intermediate_size": 10**12}, "intermediate_size"),
    ("deepseek-v3", {"moe_intermediate_size": 10**12}, "moe_intermediate_size"),
    ("deepseek-v3", {"n_shared_experts": 10**9}, "n_shared_experts"),
])
def test_absurd_config_sizes_are_refused_naming_the_field(slug: str, change: dict[str, Any], field: str,
                                                         tmp_path: Path) -> None:
    path = write_config(tmp_path, {**hf_config(slug), **change})
    with pytest.raises(InputError) as info:
        ModelSpec.from_hf_config(path)
    assert info.value.field == field and str(path) in str(info.value)
    assert "must be ≤" in str(info.value) and "moeplan takes models up to" in info.value.fix


def test_limits_sit_at_the_documented_maxima_and_apply_to_model_json() -> None:
    from moeplan.model import MAX_EXPERTS, MAX_HIDDEN, MAX_LAYERS, MAX_VOCAB
    assert (MAX_EXPERTS, MAX_HIDDEN, MAX_LAYERS, MAX_VOCAB) == (65_536, 1_048_576, 10_000, 10_000_000)
    at_limit = {**hf_config("qwen3-30b-a3b"), "num_experts": MAX_EXPERTS}
    assert ModelSpec.from_hf_dict(at_limit, "q").num_experts == MAX_EXPERTS
    data = ModelSpec.preset("mixtral-8x7b").to_dict()
    with pytest.raises(InputError) as info:
        ModelSpec.from_dict({**data, "num_experts": MAX_EXPERTS + 1}, "plan.json")
    assert info.value.field == "num_experts"
    with pytest.raises(InputError) as info:
        replace(ModelSpec.preset("mixtral-8x7b"), hidden_size=MAX_HIDDEN + 1).validate("x")
    assert info.value.field == "hidden_size"


def test_cli_refuses_a_config_with_a_billion_experts(tmp_path: Path) -> None:
    from typer.testing import CliRunner
    from moeplan.cli import app
    path = write_config(tmp_path, {**hf_config("mixtral-8x7b"), "num_local_experts": 10**9})
    result = CliRunner().invoke(app, ["models", str(path)])
    assert result.exit_code == 2, result.output
    assert "num_local_experts" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("change, field", [
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"topk_group": 1, "num_experts_per_tok": 40}, "topk_group"),
    ({"first_k_dense_replace": 61}, "moe_layers"),
])
def test_bad_grouped_routing_and_layer_layout_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError) as info:
        ModelSpec.from_hf_dict({**hf_config("deepseek-v3"), **change}, "d")
    assert info.value.field == field


def test_every_view_shows_one_active_parameter_figure() -> None:
    from typer.testing import CliRunner

    from moeplan.cli import app
    from moeplan.cli.common import human_params
    spec = ModelSpec.preset("deepseek-v3")  # DeepSeek's 37B excludes the input embedding
    assert spec.active_params() == spec.active_params(include_input_embedding=False)
    detail = CliRunner().invoke(app, ["models", "deepseek-v3"]).output
    table = CliRunner().invoke(app, ["models"]).output
    assert human_params(spec.active_params()) in detail and human_params(spec.active_params()) in table


def test_attention_counts_qk_norms_output_bias_and_sinks() -> None:
    qwen3 = ModelSpec.preset("qwen3-30b-a3b").attention  # q_norm, k_norm: RMSNorm(head_dim) each
    assert qwen3.qk_norm_params == 2 * qwen3.head_dim
    plain = replace(qwen3, qk_norm_params=0)
    assert qwen3.params(2048) - plain.params(2048) == 2 * 128
    gpt = ModelSpec.preset("gpt-oss-120b")  # o_proj bias (hidden) and one sink per head, every layer
    a = gpt.attention
    assert a.o_bias and a.sinks
    assert a.params(gpt.hidden_size) - replace(a, o_bias=False, sinks=False).params(gpt.hidden_size) \
        == gpt.hidden_size + a.num_heads
    olmoe = ModelSpec.preset("olmoe-1b-7b")  # q_norm over hidden, k_norm over the KV width
    assert olmoe.attention.qk_norm_params == olmoe.hidden_size + olmoe.attention.num_kv_heads * olmoe.attention.head_dim
    again = ModelSpec.from_dict(gpt.to_dict())
    assert again.attention == a and again.total_params() == gpt.total_params()


def test_missing_group_keys_read_as_transformers_reads_them() -> None:
    """tiny-mla.json (deepseek_v3) names no n_group/topk_group: transformers fills 8 and 4."""
    spec = ModelSpec.resolve(str(Path(__file__).resolve().parents[1] / "tiny-mla.json"))
    assert (spec.n_group, spec.topk_group) == (8, 4)
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model("deepseek_v3")
    assert (config.n_group, config.topk_group) == (spec.n_group, spec.topk_group)


def test_sliding_window_and_linear_attention_layers_read_from_layer_types() -> None:
    oss = ModelSpec.preset("gpt-oss-120b")
    assert oss.sliding_window == 128 and len(oss.sliding_layers) == 18
    assert oss.attention_layer_contexts(8192) == ((18, 8192.0), (18, 128.0))
    qwen = ModelSpec.preset("qwen3.5-397b-a17b")
    assert len(qwen.linear_layers) == 45 and qwen.attention_layer_contexts(1000) == ((15, 1000.0), (45, 0.0))
    assert qwen.kv_cache_bytes_per_token(1.0) == 15 * 2 * 2 * 256      # full-attention layers only
    assert ModelSpec.from_dict(qwen.to_dict()) == qwen
