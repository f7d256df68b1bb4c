"""Placement and Plan: derived views, validation errors naming the field, JSON round trip."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moeplan.errors import InputError
from moeplan.model import ModelSpec
from moeplan.plan import Placement, Plan

MIXTRAL = ModelSpec.preset("mixtral-8x7b")  # 32 MoE layers × 8 experts
LAYOUT = np.array([[0, 1, 2, 3, 0], [4, 5, 6, 7, 4]])  # 2 devices × 5 slots; experts 0 and 4 have two replicas


def placement(layout: np.ndarray = LAYOUT, layers: int = MIXTRAL.num_moe_layers, per_node: int = 2) -> Placement:
    return Placement.from_slots(np.tile(layout, (layers, 1, 1)), 8, per_node)


def plan(**changes: Any) -> Plan:
    base = Plan(model=MIXTRAL, hardware="h100-sxm", devices_per_node=2, nodes=1, placement=placement(),
                parallel={"attention": {"tp": 2, "dp": 1}, "moe": {"ep": 2}},
                cache={"sizes": [6] * MIXTRAL.num_moe_layers, "policy": "lru"},
                moves=[{"layer": 0, "expert": 4, "src": 1, "dst": 0, "slot": 4, "bytes": MIXTRAL.expert_bytes()}],
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
        plan(cache={"sizes": [9] * 32}).validate()
    assert info.value.field == "cache.sizes"


def test_json_round_trip(tmp_path: Path) -> None:
    original = plan()
    path = tmp_path / "plan.json"
    original.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "moeplan-plan" and data["schema_version"] == 1
    back = Plan.load(path)
    assert back.to_dict() == original.to_dict()
    assert back.model == MIXTRAL
    np.testing.assert_array_equal(back.placement.slot_expert, original.placement.slot_expert)
    np.testing.assert_allclose(back.placement.replica_share, original.placement.replica_share)
    assert (back.parallel, back.cache, back.moves, back.solver, back.predicted, back.notes) == (
        original.parallel, original.cache, original.moves, original.solver, original.predicted, original.notes)
    minimal = Plan(model=MIXTRAL, hardware="h100-sxm", devices_per_node=8, nodes=1)
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
