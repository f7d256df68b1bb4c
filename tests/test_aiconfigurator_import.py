"""moeplan hardware-import --aiconfigurator on a miniature aiconfigurator-core package tree.

The rows below are copied from NVIDIA aiconfigurator-core 0.12.0 (Apache-2.0),
systems/data/h200_sxm/comm/nccl/2.29.2/nccl_perf.parquet (all_reduce, half, 8 GPUs) and
systems/data/h200_sxm/comm/sglang/0.5.14/custom_allreduce_perf.parquet; latency in ms,
message_size in elements."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.cost import CostModel
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

NCCL = [(256, 0.01601), (65536, 0.02145), (1048576, 0.03746), (16777216, 0.19734), (268435456, 2.04031)]
CUSTOM = [(128, 0.00258), (65536, 0.0040), (1048576, 0.0150)]


def fake_package(root: Path) -> Path:
    comm = root / "aiconfigurator_core" / "systems" / "data" / "h200_sxm" / "comm"
    (comm / "nccl" / "2.29.2").mkdir(parents=True)
    (comm / "sglang" / "0.5.14").mkdir(parents=True)
    pd.DataFrame([{"op_name": "all_reduce", "nccl_dtype": "half", "num_gpus": 8, "message_size": s, "latency": t}
                  for s, t in NCCL]).to_parquet(comm / "nccl" / "2.29.2" / "nccl_perf.parquet")
    rows = [{"op_name": "all_reduce", "allreduce_dtype": "bfloat16", "num_gpus": 8, "message_size": s, "latency": t,
             "kernel_source": "SGLang_CustomAllReduce_graph"} for s, t in CUSTOM]
    rows.append({"op_name": "all_reduce", "allreduce_dtype": "bfloat16", "num_gpus": 8, "message_size": 128,
                 "latency": 0.03, "kernel_source": "SGLang_CustomAllReduce_eager"})
    pd.DataFrame(rows).to_parquet(comm / "sglang" / "0.5.14" / "custom_allreduce_perf.parquet")
    (comm / "nccl" / "2.29.2" / "collection_meta.yaml").write_text("runtime: {framework: nccl, version: 2.29.2}\n")
    dist = root / "aiconfigurator_core-0.12.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.4\nName: aiconfigurator-core\nVersion: 0.12.0\n")
    return root


def test_import_writes_measured_curves_in_bytes_and_seconds_with_their_source(tmp_path: Path) -> None:
    root = fake_package(tmp_path / "pkg")
    out = tmp_path / "h200.yaml"
    res = CliRunner().invoke(app, ["hardware-import", "--aiconfigurator", "h200_sxm", "--aiconfigurator-path", str(root),
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    hw = HardwareProfile.load(out)
    curve = hw.find_curve("collective", op="all_reduce", scope="intra_node", ranks=8)
    assert curve.prov.measured and "aiconfigurator-core 0.12.0" in curve.prov.ref and "nccl_perf" in curve.prov.ref
    assert curve.x[-1] == 268435456 * 2 and curve.y[-1] == pytest.approx(2.04031e-3)
    assert hw.runs["aiconfigurator"]["tables"]["systems/data/h200_sxm/comm/nccl/2.29.2/nccl_perf.parquet"]["runtime"]
    cm = CostModel(ModelSpec.preset("deepseek-v3"), hw)
    assert cm.collective_time("all_reduce", 2 * 65536, 8) == pytest.approx(0.02145e-3)   # folding/placement use it
    shown = CliRunner().invoke(app, ["hardware", str(out)])
    assert "measured: aiconfigurator-core 0.12.0" in shown.output


def test_framework_custom_allreduce_replaces_nccl_and_drops_eager_rows(tmp_path: Path) -> None:
    from moeplan.aiconfigurator_import import import_profile
    hw = import_profile("h200_sxm", "sglang", str(fake_package(tmp_path / "pkg")))
    ar = [c for c in hw.curves if c.kind == "collective" and c.key["op"] == "all_reduce"]
    assert len(ar) == 1 and "custom_allreduce" in ar[0].prov.ref
    assert ar[0].y[0] == pytest.approx(0.00258e-3)


def test_unknown_system_framework_or_folder_is_refused(tmp_path: Path) -> None:
    from moeplan.aiconfigurator_import import import_profile
    root = str(fake_package(tmp_path / "pkg"))
    with pytest.raises(InputError, match="no moeplan profile"):
        import_profile("x_sxm", None, root)
    with pytest.raises(InputError, match="unknown framework"):
        import_profile("h200_sxm", "tgi", root)
    with pytest.raises(InputError, match="no aiconfigurator_core/systems"):
        import_profile("h200_sxm", None, str(tmp_path))
    with pytest.raises(InputError, match="no NCCL table"):
        import_profile("b200_sxm", None, root)


def test_framework_fused_moe_tables_become_curves_the_serving_model_uses(tmp_path: Path) -> None:
    # systems/data/<system>/moe/<framework>/<version>/moe_perf.parquet: latency (ms) by num_tokens per shape;
    # the newest version measuring a shape wins, only the power_law_1.01 distribution is read
    from moeplan.aiconfigurator_import import import_profile
    from moeplan.precision import Precision
    from moeplan.serving import ServeLayout, ServePredictor
    root = fake_package(tmp_path / "pkg")
    moe = root / "aiconfigurator_core" / "systems" / "data" / "h200_sxm" / "moe" / "sglang"
    shape = {"hidden_size": 7168, "inter_size": 2048, "topk": 8, "num_experts": 256, "moe_tp_size": 1,
             "moe_ep_size": 8, "moe_dtype": "fp8_block"}
    for version, scale in (("0.5.10", 2.0), ("0.5.14", 1.0)):
        (moe / version).mkdir(parents=True)
        rows = [{**shape, "kernel_source": k, "num_tokens": n, "distribution": d, "latency": lat * scale * f}
                for n, lat in ((1, 0.04), (64, 0.3), (1024, 0.56)) for k, f in (("a", 1.0), ("b", 1.5))
                for d in ("power_law_1.01", "balanced")]
        pd.DataFrame(rows).to_parquet(moe / version / "moe_perf.parquet")
    hw = import_profile("h200_sxm", "sglang", str(root))
    curve = hw.curve_for("fused_moe", hidden=7168, inter=2048, top_k=8, experts=256, moe_tp=1, moe_ep=8,
                         dtype="fp8_block")
    assert curve.prov.measured and "0.5.14" in curve.prov.ref and curve.y == pytest.approx((4e-5, 3e-4, 5.6e-4))
    cm = CostModel(ModelSpec.preset("deepseek-v3"), hw)
    pred = ServePredictor(cm, ServeLayout(8, 1, 1, 8), Precision("fp8_block", "fp8_block", "fp8"), "sglang")
    assert pred.decode_step(64, 2048).experts == pytest.approx(cm.model.num_moe_layers * 3e-4)
    # MoE TP × EP splits the table lacks price as pure EP over the same GPUs
    assert ServePredictor(cm, ServeLayout(8, 1, 2, 4), pred.precision, "sglang").moe_curve is curve


def test_framework_bf16_gemm_table_becomes_the_grid_gemm_time_prices_from(tmp_path: Path) -> None:
    # systems/data/<system>/gemm/<framework>/<version>/gemm_perf.parquet: latency (ms) by m, n, k, gemm_dtype;
    # only bfloat16 rows are read, the fastest kernel at each point kept
    root = fake_package(tmp_path / "pkg")
    folder = root / "aiconfigurator_core" / "systems" / "data" / "h200_sxm" / "gemm" / "sglang" / "0.5.14"
    folder.mkdir(parents=True)
    rows = [{"gemm_dtype": dt, "kernel_source": ks, "m": m, "n": n, "k": k, "latency": lat * f * (0.5 if dt == "fp8" else 1.0)}
            for k in (1024, 4096) for n in (1024, 4096) for m, lat in ((1, 0.01), (64, 0.012), (4096, 0.2 * k * n / 4096 ** 2))
            for dt in ("bfloat16", "fp8") for ks, f in (("torch_linear", 1.0), ("other", 1.3))]
    pd.DataFrame(rows).to_parquet(folder / "gemm_perf.parquet")
    (folder / "collection_meta.yaml").write_text("runtime: {framework: sglang, version: 0.5.14}\n")
    out = tmp_path / "h200.yaml"
    res = CliRunner().invoke(app, ["hardware-import", "--aiconfigurator", "h200_sxm", "--framework", "sglang",
                                   "--aiconfigurator-path", str(root), "-o", str(out)])
    assert res.exit_code == 0, res.output
    hw = HardwareProfile.load(out)
    gemms = hw.curves_of("gemm")
    assert len(gemms) == 4 and {c.key["dtype"] for c in gemms} == {"bf16"}
    curve = hw.curve_for("gemm", k=4096, n=4096, dtype="bf16")
    assert curve.prov.measured and "aiconfigurator-core 0.12.0" in curve.prov.ref and "gemm/sglang/0.5.14" in curve.prov.ref
    assert curve.x == (1.0, 64.0, 4096.0) and curve.y == pytest.approx((1e-5, 1.2e-5, 2e-4))
    assert hw.runs["aiconfigurator"]["tables"]["systems/data/h200_sxm/gemm/sglang/0.5.14/gemm_perf.parquet"]["runtime"]
    model = ModelSpec.preset("deepseek-v3")
    measured, roofline = CostModel(model, hw), CostModel(model, HardwareProfile.resolve("h200-sxm"))
    assert measured.gemms_measured and not roofline.gemms_measured
    assert float(measured.gemm_time(64, 4096, 4096)) == pytest.approx(1.2e-5)
    assert float(measured.gemm_time(4096, 1024, 4096)) == pytest.approx(0.2e-3 / 4)
    assert float(measured.gemm_time(64, 4096, 4096)) != pytest.approx(float(roofline.gemm_time(64, 4096, 4096)), rel=0.1)
    shown = CliRunner().invoke(app, ["hardware", str(out)])
    assert "curve gemm" in shown.output and "gemm_perf.parquet" in shown.output


def test_framework_attention_and_deepep_tables_become_measured_curves_serving_prices_from(tmp_path: Path) -> None:
    # attention/<fw>/<v>/{context,generation}_attention_perf.parquet and mla/<fw>/<v>/{context,generation}_mla_perf
    # (latency ms by per-GPU heads, KV heads, head dim, KV dtype, batch, isl + step; only window_size 0, the
    # fastest kernel kept) and comm/<fw>/<v>/wideep_deepep_{ll,normal}_perf.parquet (µs by tokens per rank)
    from moeplan.aiconfigurator_import import import_profile
    from moeplan.precision import Precision
    from moeplan.serving import ServeLayout, ServePredictor
    root = fake_package(tmp_path / "pkg")
    data = root / "aiconfigurator_core" / "systems" / "data" / "h200_sxm"
    att, mla, comm = (data / "attention" / "sglang" / "0.5.14", data / "mla" / "sglang" / "0.5.14",
                      data / "comm" / "sglang" / "0.5.12")
    for d in (att, mla, comm):
        d.mkdir(parents=True, exist_ok=True)
    gqa = {"num_heads": 16, "num_key_value_heads": 1, "head_dim": 128, "kv_cache_dtype": "bfloat16"}
    for name, step, isl in (("context", 0, None), ("generation", None, 1)):
        rows = [{**gqa, "kernel_source": k, "batch_size": b, "isl": isl or n, "step": (n - 1) if step is None else 0,
                 "window_size": w, "latency": 0.01 * b * n / 1024 * f}
                for b in (1, 32) for n in (1024, 8192) for w in (0, 128) for k, f in (("fa3", 1.0), ("triton", 2.0))]
        pd.DataFrame(rows).to_parquet(att / f"{name}_attention_perf.parquet")
        rows = [{"num_heads": 16, "tp_size": 8, "kv_cache_dtype": "fp8", "batch_size": 1, "isl": isl or n,
                 "step": (n - 1) if step is None else 0, "latency": 0.02 * n / 1024, "kernel_source": "fa"}
                for n in (1024, 8192)]
        pd.DataFrame(rows).to_parquet(mla / f"{name}_mla_perf.parquet")
    base = {"node_num": 1, "hidden_size": 7168, "num_topk": 8, "num_experts": 256}
    pd.DataFrame([{**base, "num_token": n, "dispatch_avg_t_us": 20.0 * n ** 0.5, "combine_avg_t_us": 30.0 * n ** 0.5}
                  for n in (1, 16, 256)]).to_parquet(comm / "wideep_deepep_ll_perf.parquet")
    pd.DataFrame([{**base, "num_token": n, "dispatch_sms": s, "dispatch_transmit_us": 50.0 * s, "dispatch_notify_us": 5.0,
                   "combine_sms": s, "combine_transmit_us": 60.0 * s, "combine_notify_us": 0.0}
                  for n in (16, 4096) for s in (4, 24)]).to_parquet(comm / "wideep_deepep_normal_perf.parquet")
    out = tmp_path / "h200.yaml"
    res = CliRunner().invoke(app, ["hardware-import", "--aiconfigurator", "h200_sxm", "--framework", "sglang",
                                   "--aiconfigurator-path", str(root), "-o", str(out)])
    assert res.exit_code == 0, res.output
    hw = HardwareProfile.load(out)
    ctx = hw.curve_for("attention_context", attention="gqa", heads=16, kv_heads=1, head_dim=128, kv_dtype="bf16", batch=32)
    gen = hw.curve_for("attention_generation", attention="gqa", heads=16, kv_heads=1, head_dim=128, kv_dtype="bf16",
                       batch=32)
    assert ctx.prov.measured and "attention/sglang/0.5.14/context_attention_perf.parquet" in ctx.prov.ref
    assert ctx.x == (1024.0, 8192.0) and ctx.y == pytest.approx((0.32e-3, 2.56e-3))   # fastest kernel, window 0 only
    assert gen.x == (1024.0, 8192.0) and "0.12.0" in gen.prov.ref                      # x = isl + step
    assert len(hw.curves_of("attention_context")) == 3                                # two GQA batches + one MLA
    ll = hw.curve_for("moe_a2a", backend="deepep_ll", phase="dispatch", hidden=7168, top_k=8, experts=256, ranks=8,
                      dtype="default")
    normal = hw.curve_for("moe_a2a", backend="deepep_normal", phase="dispatch", hidden=7168, top_k=8, experts=256,
                          ranks=8, dtype="default")
    assert ll.y == pytest.approx((20e-6, 80e-6, 320e-6)) and "wideep_deepep_ll_perf" in ll.prov.ref
    assert normal.y == pytest.approx((205e-6, 205e-6))                                 # transmit + notify, fewest-µs SMs
    assert hw.runs["aiconfigurator"]["tables"]["systems/data/h200_sxm/comm/sglang/0.5.12/wideep_deepep_ll_perf.parquet"] \
        is not None
    model = ModelSpec.preset("deepseek-v3")
    cm = CostModel(model, hw)
    pr = Precision("fp8", "fp8", "fp8")
    step = ServePredictor(cm, ServeLayout(8, 1, 1, 8), pr, "sglang").decode_step(1, 4095)
    roofline = ServePredictor(CostModel(model, HardwareProfile.resolve("h200-sxm")), ServeLayout(8, 1, 1, 8), pr,
                              "sglang").decode_step(1, 4095)
    assert step.attention != pytest.approx(roofline.attention, rel=1e-3)               # MLA core from the table
    wide = ServePredictor(cm, ServeLayout(1, 8, 1, 8), pr, "sglang", moe_dispatch="deepep").decode_step(16, 2048)
    assert wide.ep_comm == pytest.approx(model.num_moe_layers * (80e-6 + 120e-6))
    shown = CliRunner().invoke(app, ["hardware", str(out)])
    assert "curve attention_generation" in shown.output and "curve moe_a2a" in shown.output
    assert "backend=deepep_ll" in shown.output and "measured: aiconfigurator-core 0.12.0" in shown.output
