"""Placement and Plan: derived views, validation errors naming the field, JSON round trip."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moeplan.cache_config import CacheConfig
from moeplan.errors import InputError
from moeplan.hardware import HardwareProfile, HardwareRef
from moeplan.model import ModelSpec
from moeplan.moves import Move
from moeplan.parallel import ParallelLayout
from moeplan.plan import Placement, Plan

MIXTRAL = ModelSpec.preset("mixtral-8x7b")  # 32 MoE layers × 8 experts
LAYOUT = np.array([[0, 1, 2, 3, 0], [4, 5, 6, 7, 4]])  # 2 devices × 5 slots; experts 0 and 4 have two replicas


def placement(layout: np.ndarray = LAYOUT, layers: int = MIXTRAL.num_moe_layers, per_node: int = 2) -> Placement:
    return Placement.from_slots(np.tile(layout, (layers, 1, 1)), 8, per_node)


H100 = HardwareProfile.resolve("h100-sxm").ref()
CACHE = CacheConfig(sizes=(6,) * MIXTRAL.num_moe_layers, policy="lru", budget_bytes=80e9)


def plan(**changes: Any) -> Plan:
    base = Plan(model=MIXTRAL, hardware=H100, devices_per_node=2, nodes=1, placement=placement(),
                parallel=ParallelLayout(tp=2, cp=1, dp=1, pp=1, etp=1, ep=2, edp=1), cache=CACHE,
                moves=(Move.of_expert(0, 4, 1, 0, 0, 4, MIXTRAL.expert_bytes()),),
                solver={"name": "hand", "objective": 1.25, "bound": 1.0, "gap": 0.2, "seconds": 0.0},
                predicted={"step_seconds": 0.0123}, notes="made by hand")
    return base.with_(**changes)


def test_placement_views() -> None:
    p = placement()
    assert (p.num_layers, p.num_devices, p.slots_per_device, p.num_physical, p.num_nodes) == (32, 2, 5, 10, 1)
    np.testing.assert_array_equal(p.replica_counts()[0], [2, 1, 1, 1, 2, 1, 1, 1])
    np.testing.assert_allclose(p.replica_share[0], [[0.5, 1, 1, 1, 0.5], [0.5, 1, 1, 1, 0.5]])
    share = p.expert_device_share()
    np.testing.assert_allclose(share[0, 0], [1.0, 0.0])
    np.testing.assert_allclose(share[0, 4], [0.0, 1.0])
    np.testing.assert_allclose(share.sum(axis=2), 1.0)
    np.testing.assert_array_equal(p.phy2log()[0], LAYOUT.ravel())
    p.validate()


def test_a_missing_expert_is_named() -> None:
    layout = np.array([[0, 1, 2, 3, 0], [4, 5, 6, 4, 4]])  # expert 7 has no slot
    with pytest.raises(InputError, match="expert 7 of MoE layer 0 has no slot") as info:
        placement(layout).validate("p.json")
    assert info.value.field == "placement.slot_expert" and info.value.source == "p.json"


def test_shares_must_sum_to_one() -> None:
    p = placement()
    shares = p.replica_share.copy()
    shares[3, 0, 0] = 0.7  # expert 0 of layer 3: 0.7 + 0.5
    with pytest.raises(InputError, match="expert 0 in layer 3 sum to 1.2") as info:
        Placement(p.slot_expert, shares, 8, 2).validate()
    assert info.value.field == "placement.replica_share"
    shares[3, 0, 0] = -0.5
    shares[3, 1, 4] = 1.5
    with pytest.raises(InputError, match="≥ 0"):
        Placement(p.slot_expert, shares, 8, 2).validate()


def test_wrong_device_counts_are_named() -> None:
    with pytest.raises(InputError) as info:
        plan(nodes=2).validate()
    assert info.value.field == "placement.devices"
    with pytest.raises(InputError) as info:
        placement(per_node=3).validate()
    assert info.value.field == "placement.devices_per_node"
    data = plan().to_dict()
    data["placement"]["devices"] = 4
    with pytest.raises(InputError) as info:
        Plan.from_dict(data, "plan.json")
    assert info.value.field == "placement.devices"


def test_placement_must_match_the_model() -> None:
    with pytest.raises(InputError) as info:
        plan(placement=placement(layers=3)).validate()
    assert info.value.field == "placement.slot_expert"
    with pytest.raises(InputError) as info:
        plan(cache=replace(CACHE, sizes=(9,) * 32)).validate()
    assert info.value.field == "cache.sizes"


def test_json_round_trip(tmp_path: Path) -> None:
    original = plan()
    path = tmp_path / "plan.json"
    original.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "moeplan-plan" and data["schema_version"] == 2
    back = Plan.load(path)
    assert back.to_dict() == original.to_dict()
    assert back.model == MIXTRAL
    np.testing.assert_array_equal(back.placement.slot_expert, original.placement.slot_expert)
    np.testing.assert_allclose(back.placement.replica_share, original.placement.replica_share)
    assert (back.parallel, back.cache, back.moves, back.solver, back.predicted, back.notes) == (
        original.parallel, original.cache, original.moves, original.solver, original.predicted, original.notes)
    minimal = Plan(model=MIXTRAL, hardware=H100, devices_per_node=8, nodes=1)
    minimal.save(path)
    assert Plan.load(path).to_dict() == minimal.to_dict()


def test_an_invalid_plan_is_never_written(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    with pytest.raises(InputError):
        plan(nodes=2).save(path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(format="something-else"), "format"),
    (lambda d: d.update(schema_version=99), "schema_version"),
    (lambda d: d["cluster"].pop("nodes"), "cluster.nodes"),
    (lambda d: d["placement"].update(slot_expert=[[1, 2], [3]]), "placement.slot_expert"),
    (lambda d: d["placement"].update(slot_expert="all of them"), "placement.slot_expert"),
    (lambda d: d["model"].update(top_k=99), "top_k"),
])
def test_bad_plan_files_name_the_field(edit: Any, field: str, tmp_path: Path) -> None:
    data = plan().to_dict()
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as info:
        Plan.load(path)
    assert info.value.field == field and str(path) in str(info.value)


def test_a_plan_names_its_profile_by_file_and_digest(tmp_path: Path) -> None:
    measured = HardwareProfile.resolve("measured/h200-sxm")
    p = plan(hardware=measured.ref())
    assert p.hardware == HardwareRef("h200-sxm", "measured/h200-sxm", measured.digest(), True)
    path = tmp_path / "plan.json"
    p.save(path)
    back = Plan.load(path)
    assert back.hardware_profile().to_dict() == measured.to_dict()   # the measured file, not datasheet h200-sxm
    assert back.cluster_hardware().num_devices == 2


def test_a_moved_or_edited_profile_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    own = tmp_path / "my-gpu.yaml"
    shutil.copy(HardwareProfile.bundled()["measured/h200-sxm"], own)
    path = tmp_path / "plan.json"
    plan(hardware=HardwareProfile.resolve(str(own)).ref()).save(path)
    renamed = tmp_path / "renamed.yaml"
    own.rename(renamed)
    with pytest.raises(InputError, match="cannot be found") as info:
        Plan.load(path).hardware_profile(source=str(path))
    assert info.value.field == "hardware.file" and "--hardware PATH" in str(info.value)
    assert Plan.load(path).hardware_profile(str(renamed)).name == "h200-sxm"      # the fix works
    renamed.rename(own)
    own.write_text(own.read_text().replace("name: h200-sxm", "name: h200-edited"))
    with pytest.raises(InputError, match="changed since the plan was made") as info:
        Plan.load(path).hardware_profile(source=str(path))
    assert info.value.field == "hardware.digest"


def test_schema_1_plans_load_converted_with_a_note(tmp_path: Path) -> None:
    data = plan(moves=(), cache=None).to_dict()
    data.update(schema_version=1, hardware="h100-sxm")
    data.pop("cost_options")
    data["parallel"] = {"attention": {"tp": 2, "dp": 1}, "moe": {"ep": 2}}
    data["moves"] = [{"step": 0, "layer": 0, "expert": 4, "src_device": 1, "dst_device": 0, "slot": 4, "bytes": 1.0}]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    back = Plan.load(path)
    assert back.hardware == HardwareRef("h100-sxm", "h100-sxm", "", False) and back.moves == ()
    assert "converted from plan schema 1" in back.notes and "dropped" in back.notes
    assert back.parallel == ParallelLayout(tp=2, cp=1, dp=1, pp=1, etp=1, ep=2, edp=1, sequence_parallel=True)
    assert back.hardware_profile().name == "h100-sxm"
