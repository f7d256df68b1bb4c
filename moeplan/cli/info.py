"""``moeplan models`` and ``moeplan hardware``: what is bundled."""
from __future__ import annotations

import typer

from moeplan.cli.apps import app
from moeplan.cli.common import console, guarded, human_bytes, human_params, print_table
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec


@app.command()
@guarded
def models(
    model: str = typer.Argument(None, help="Show one model in detail: a preset name or a config.json path."),
) -> None:
    """List the bundled model presets with total/active parameters next to the published figures."""
    if model:
        m = ModelSpec.resolve(model)
        a = m.attention
        rows = [
            ("layers (MoE / dense)", f"{m.num_layers} ({m.num_moe_layers} / {len(m.dense_layers)})"),
            ("hidden", m.hidden_size), ("routed experts × top-k", f"{m.num_experts} × {m.top_k}"),
            ("expert FFN", m.expert_ffn), ("shared experts (total FFN)", f"{m.num_shared_experts} ({m.shared_ffn})"),
            ("dense FFN", m.dense_ffn), ("grouped routing", f"{m.n_group} groups, top {m.topk_group}"),
            ("attention", f"{a.kind}: {a.num_heads} heads, {a.num_kv_heads} KV heads"
             + (f", kv_lora {a.kv_lora_rank}, q_lora {a.q_lora_rank}" if a.kind == "mla" else f", head dim {a.head_dim}")),
            ("total parameters", human_params(m.total_params())), ("active parameters", human_params(m.active_params())),
            ("bytes per expert", human_bytes(m.expert_bytes())), ("weight bytes/param", m.weight_bytes),
            ("forward FLOPs/token (no context)", f"{m.flops_per_token() / 1e9:.2f} GFLOP"),
            ("KV cache per token", human_bytes(m.kv_cache_bytes_per_token())), ("source", m.source),
        ]
        print_table(m.name, ["field", "value"], rows)
        return
    rows = []
    for name in ModelSpec.preset_names():
        m = ModelSpec.preset(name)
        pub = m.published
        total, active = m.total_params(), m.active_params()
        rows.append((name, m.num_moe_layers, f"{m.num_experts}×top{m.top_k}", m.num_shared_experts, m.attention.kind,
                     human_params(total), human_params(pub["total"]) if pub.get("total") else "–",
                     human_params(active), human_params(pub["active"]) if pub.get("active") else "–",
                     human_bytes(m.expert_bytes())))
    print_table("Model presets (numbers from each model's published config.json)",
                ["preset", "MoE layers", "experts", "shared", "attn", "total", "published", "active", "published",
                 "bytes/expert"], rows,
                caption="active counts follow each publisher's convention (GPT-OSS and DeepSeek exclude the input "
                        "embedding); `moeplan models NAME` shows one model")


@app.command()
@guarded
def hardware(
    profile: str = typer.Argument(None, help="Show one profile in detail: a bundled name or a YAML path."),
) -> None:
    """List the bundled hardware profiles; measured ones are marked, with what they measured."""
    if profile:
        p = HardwareProfile.resolve(profile)
        d = p.device
        def q(label: str, quantity, unit: float, suffix: str) -> tuple[str, str, str]:
            return (label, f"{quantity.value / unit:.4g} {suffix}", quantity.prov.source
                    + (f" ({quantity.prov.run})" if quantity.prov.run else ""))
        rows = [
            ("device", d.name, ""), ("cluster", f"{p.nodes} node(s) × {p.devices_per_node}", ""),
            q("memory", d.memory, 2**30, "GiB"),
            *[q(f"matmul {k}", v, 1e12, "TFLOP/s") for k, v in d.matmul_flops.items()],
            q("HBM bandwidth", d.hbm_bandwidth, 1e12, "TB/s"), q("H2D", d.h2d_bandwidth, 1e9, "GB/s"),
            q("D2H", d.d2h_bandwidth, 1e9, "GB/s"), q("launch overhead", d.launch_overhead, 1e-6, "µs"),
            q(f"intra-node: {p.intra_node.name}", p.intra_node.bandwidth, 1e9, "GB/s"),
            q(f"inter-node: {p.inter_node.name}", p.inter_node.bandwidth, 1e9, "GB/s"),
        ]
        for c in p.curves:
            rows.append((f"curve {c.kind}", ", ".join(f"{k}={v}" for k, v in c.key.items()),
                         c.prov.source + (f": {c.prov.ref}" if c.prov.ref else "")))
        print_table(p.name, ["figure", "value", "source"], rows, caption=p.provenance_note())
        return
    rows = []
    for name, path in HardwareProfile.bundled().items():
        p = HardwareProfile.load(path)
        d = p.device
        rows.append((name, d.name, f"{d.memory.value / 2**30:.0f} GiB", f"{d.matmul_flops['bf16'].value / 1e12:.0f}",
                     f"{d.hbm_bandwidth.value / 1e12:.2f}", f"{p.intra_node.bandwidth.value / 1e9:.0f}",
                     f"{p.inter_node.bandwidth.value / 1e9:.0f}", p.devices_per_node,
                     "measured" if p.is_measured else "datasheet"))
    print_table("Hardware profiles", ["profile", "device", "memory", "bf16 TFLOP/s", "HBM TB/s", "intra GB/s",
                                      "inter GB/s", "per node", "source"], rows,
                caption="measured profiles say which curves they measured: `moeplan hardware NAME`")
    console.print("A profile without measured link curves uses datasheet bandwidth for all-to-all; "
                  "the simulator says so in its output.", style="dim")
