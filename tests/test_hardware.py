"""HardwareProfile: bundled profiles, provenance, cluster shapes, merging measurements, curves."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from moeplan.errors import InputError
from moeplan.hardware import Curve, HardwareProfile, Provenance, Quantity, merge_profiles

BUNDLED = HardwareProfile.bundled()
RUN = {"date": "2026-01-01", "gpu": "NVIDIA H100 80GB HBM3", "driver": "550", "torch": "2.13", "cuda": "12.8"}


def quantities(p: HardwareProfile) -> dict[str, Quantity]:
    d = p.device
    out = {"memory": d.memory, "hbm": d.hbm_bandwidth, "h2d": d.h2d_bandwidth, "d2h": d.d2h_bandwidth,
           "launch": d.launch_overhead, "intra.bw": p.intra_node.bandwidth, "intra.lat": p.intra_node.latency,
           "inter.bw": p.inter_node.bandwidth, "inter.lat": p.inter_node.latency}
    out.update({f"matmul.{k}": q for k, q in d.matmul_flops.items()})
    return out


def test_the_datasheet_profiles_are_bundled() -> None:
    assert {"h100-sxm", "h200-sxm", "a100-80gb-sxm", "b200", "mi300x", "ascend-910b", "cloudmatrix384"} <= set(BUNDLED)


@pytest.mark.parametrize("name", list(BUNDLED))
def test_every_bundled_profile_loads_validates_and_round_trips(name: str, tmp_path: Path) -> None:
    p = HardwareProfile.resolve(name)
    assert p.validate() is p and p.num_devices >= 1
    assert p.device.matmul_flops["bf16"].value > 0
    out = tmp_path / "copy.yaml"
    p.save(out)
    assert HardwareProfile.load(out).to_dict() == p.to_dict()


@pytest.mark.parametrize("name", list(BUNDLED))
def test_every_figure_says_where_it_came_from(name: str) -> None:
    p = HardwareProfile.resolve(name)
    for label, q in quantities(p).items():
        assert q.prov.source in ("datasheet", "measured", "assumed"), label
        if q.prov.source == "datasheet":
            assert q.prov.ref.strip(), f"{name}: {label} has no reference"
        if q.prov.source == "assumed":
            assert q.prov.ref.strip(), f"{name}: {label} gives no reason"
        if q.prov.measured:
            assert q.prov.run in p.runs
    for c in p.curves:
        assert c.prov.source != "datasheet" or c.prov.ref
        assert not c.prov.measured or c.prov.run in p.runs
    if not p.is_measured:
        assert "datasheet figures only" in p.provenance_note()


def _profile_dict() -> dict[str, Any]:
    return copy.deepcopy(HardwareProfile.resolve("h100-sxm").to_dict())


def test_a_datasheet_figure_without_a_reference_is_refused(tmp_path: Path) -> None:
    data = _profile_dict()
    del data["device"]["hbm_bytes_per_s"]["ref"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as info:
        HardwareProfile.load(path)
    assert info.value.field == "device.hbm_bytes_per_s.ref" and str(path) in str(info.value)


def test_a_measured_curve_must_name_a_recorded_run(tmp_path: Path) -> None:
    data = _profile_dict()
    data["curves"] = [{"kind": "host_copy", "key": {"direction": "h2d"}, "x": [1e6], "y": [1e-4],
                       "source": "measured", "run": "nowhere"}]
    with pytest.raises(InputError, match="nowhere"):
        HardwareProfile.from_dict(data, "p.yaml")


@pytest.mark.parametrize("kwargs, shape", [
    ({"devices": 32}, (8, 4)), ({"devices": 8}, (8, 1)), ({"devices": 4}, (4, 1)), ({"devices": 1}, (1, 1)),
    ({"devices": 12, "nodes": 3}, (4, 3)), ({"devices": 16, "devices_per_node": 4}, (4, 4)),
    ({"nodes": 2}, (8, 2)), ({}, (8, 1)),
])
def test_with_cluster_arithmetic(kwargs: dict[str, int], shape: tuple[int, int]) -> None:
    p = HardwareProfile.resolve("h100-sxm").with_cluster(**kwargs)
    assert (p.devices_per_node, p.nodes) == shape
    assert p.num_devices == shape[0] * shape[1]
    assert p.device == HardwareProfile.resolve("h100-sxm").device


@pytest.mark.parametrize("kwargs, field", [
    ({"devices": 12}, "gpus"), ({"devices": 10, "nodes": 3}, "nodes"), ({"devices": 0}, "gpus"),
    ({"devices": -8}, "gpus"),
])
def test_with_cluster_errors_name_the_option(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(InputError) as info:
        HardwareProfile.resolve("h100-sxm").with_cluster(**kwargs)
    assert info.value.field == field


def _curve(kind: str, key: dict[str, Any], y: list[float], run: str) -> dict[str, Any]:
    return {"kind": kind, "key": key, "x": [1.0, 100.0], "y": y, "source": "measured", "run": run}


def test_merge_keeps_both_runs_and_replaces_measured_curves_of_the_same_key() -> None:
    ffn = {"hidden": 4096, "ffn": 14336, "dtype": "bf16", "kernel": "grouped"}
    a2a = {"op": "all_to_all", "scope": "intra", "ranks": 8}
    base_data = _profile_dict()
    base_data["runs"] = {"old": RUN}
    base_data["device"]["hbm_bytes_per_s"] = {"value": 3.0e12, "source": "measured", "run": "old"}
    base_data["curves"] = [_curve("expert_ffn", ffn, [1e-5, 1e-4], "old"),
                           _curve("collective", a2a, [2e-5, 5e-5], "old")]
    update_data = _profile_dict()
    update_data["runs"] = {"new": {**RUN, "date": "2026-02-01"}}
    update_data["device"]["matmul_flops"]["bf16"] = {"value": 7.0e14, "source": "measured", "run": "new"}
    update_data["device"]["memory_bytes"]["value"] = 1.0  # a datasheet figure: never replaces base's
    update_data["curves"] = [_curve("expert_ffn", ffn, [2e-5, 3e-4], "new"),
                             _curve("host_copy", {"direction": "h2d"}, [1e-5, 2e-5], "new")]
    base = HardwareProfile.from_dict(base_data, "base.yaml")
    update = HardwareProfile.from_dict(update_data, "update.yaml")
    merged = merge_profiles(base, update)
    assert set(merged.runs) == {"old", "new"}
    assert merged.find_curve("expert_ffn", **ffn).y == (2e-5, 3e-4)
    assert merged.find_curve("expert_ffn", **ffn).prov.run == "new"
    assert merged.find_curve("collective", **a2a).y == (2e-5, 5e-5)
    assert merged.find_curve("host_copy", direction="h2d") is not None
    assert len(merged.curves_of("expert_ffn")) == 1 and len(merged.curves) == 3
    assert merged.device.matmul_flops["bf16"].value == 7.0e14 and merged.device.matmul_flops["bf16"].prov.run == "new"
    assert merged.device.matmul_flops["fp8"] == base.device.matmul_flops["fp8"]
    assert merged.device.memory == base.device.memory
    assert merged.device.hbm_bandwidth.value == 3.0e12
    assert merged.measured_kinds == {"expert_ffn", "collective", "host_copy", "matmul"}
    assert merged.links_measured and "measured:" in merged.provenance_note()


def test_curve_interpolates_log_log_with_a_floor_and_linear_growth() -> None:
    c = Curve("expert_ffn", {}, (1.0, 10.0, 100.0), (1.0, 2.0, 4.0), Provenance("measured", run="r"))
    assert c(0.01) == pytest.approx(1.0)                 # below the first point: the floor
    assert c(1.0) == pytest.approx(1.0) and c(10.0) == pytest.approx(2.0) and c(100.0) == pytest.approx(4.0)
    assert c(math.sqrt(10.0)) == pytest.approx(math.sqrt(2.0))  # halfway in log x: geometric mean in y
    assert c(200.0) == pytest.approx(8.0) and c(1000.0) == pytest.approx(40.0)  # beyond: y ∝ x
    np.testing.assert_allclose(c(np.array([0.5, 10.0, 400.0])), [1.0, 2.0, 16.0])
    single = Curve("collective", {}, (1024.0,), (1e-5,), Provenance("measured", run="r"))
    assert single(1.0) == pytest.approx(1e-5) and single(4096.0) == pytest.approx(4e-5)


def test_curves_are_checked_when_loaded() -> None:
    data = _profile_dict()
    data["runs"] = {"r": RUN}
    for bad, field in (({"x": [2, 1], "y": [1, 2]}, "curves[0].x"), ({"x": [1, 2], "y": [1]}, "curves[0].y"),
                       ({"x": [1, 2], "y": [1, -2]}, "curves[0].y"), ({"kind": "teleport"}, "curves[0].kind")):
        data["curves"] = [{**_curve("expert_ffn", {}, [1, 2], "r"), **bad}]
        with pytest.raises(InputError) as info:
            HardwareProfile.from_dict(data, "p.yaml")
        assert info.value.field == field
    table_key = {"attention": "gqa", "heads": 16, "kv_heads": 1, "head_dim": 128, "kv_dtype": "bf16", "batch": 8}
    data["curves"] = [_curve("attention_context", table_key, [1, 2], "r")]
    assert HardwareProfile.from_dict(data, "p.yaml").curves_of("attention_context")
    data["curves"] = [_curve("attention_context", {k: v for k, v in table_key.items() if k != "kv_heads"}, [1, 2], "r")]
    with pytest.raises(InputError, match="kv_heads") as info:       # not a KeyError once priced
        HardwareProfile.from_dict(data, "p.yaml")
    assert info.value.field == "curves[0].key"


def test_resolve_unknown_profile_lists_the_bundled_ones() -> None:
    with pytest.raises(InputError) as info:
        HardwareProfile.resolve("tpu-v9")
    assert info.value.field == "hardware" and "h100-sxm" in info.value.fix
    with pytest.raises(InputError, match="file not found"):
        HardwareProfile.resolve("missing.yaml")


@pytest.mark.parametrize("alias, name", [("h100", "measured/h100-sxm"), ("H200", "measured/h200-sxm"),
                                         ("a100", "a100-80gb-sxm"), ("910b", "ascend-910b"), ("mi300x", "mi300x"),
                                         ("b200", "b200"), ("h100-sxm", "h100-sxm")])
def test_aliases_resolve_to_the_measured_profile_where_one_is_bundled(alias: str, name: str) -> None:
    assert HardwareProfile.resolve_name(alias) == name
    bundled = HardwareProfile.bundled()
    assert HardwareProfile.resolve(alias).digest() == HardwareProfile.load(bundled[name]).digest()


def test_commands_that_price_say_which_profile_an_alias_became(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moeplan.cli import app
    result = CliRunner().invoke(app, ["plan", "folding", "--model", "mixtral-8x7b", "--hardware", "h100",
                                      "--gpus", "64"])
    assert result.exit_code == 0, result.output
    assert "hardware: h100 → measured/h100-sxm" in result.output
    bad = CliRunner().invoke(app, ["plan", "folding", "--model", "mixtral-8x7b", "--hardware", "h1000", "--gpus", "64"])
    assert bad.exit_code == 2 and "h100, h100-sxm5" in bad.output
