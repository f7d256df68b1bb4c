"""Fuzz the loaders: whatever the file holds, the only error that escapes is InputError.

Each test starts from a valid file moeplan wrote (or a bundled one), mutates it at random paths
(replace a value with something of the wrong type or size, delete a key, truncate a list), or
feeds random bytes, and loads it.
"""
from __future__ import annotations

import io
import json
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeplan.errors import InputError
from moeplan.cache_config import CacheConfig
from moeplan.hardware import HardwareProfile
from moeplan.model import ModelSpec
from moeplan.moves import Move
from moeplan.parallel import ParallelLayout
from moeplan.plan import Placement, Plan
from moeplan.synth import SyntheticTraffic, synthesize
from moeplan.trace import RoutingTrace

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.sampled_from([0, -1, 1, 2, 3, 7, 10**9, 2**40]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.sampled_from(["1e3", "nan", "", "x"]),
    st.lists(st.integers(-3, 300), max_size=4), st.lists(st.lists(st.integers(-1, 9), max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 9), max_size=2),
)


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys and indices) to a node below the root."""
    out: list[tuple] = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, child in items:
        out.append(prefix + (key,))
        out.extend(_paths(child, prefix + (key,)))
    return out


def mutate(tree: Any, data: st.DataObject, rounds: int = 3) -> Any:
    """A deep copy of ``tree`` with 1..rounds random edits: replace, delete, or truncate a list."""
    tree = json.loads(json.dumps(tree))
    for _ in range(data.draw(st.integers(1, rounds))):
        paths = _paths(tree)
        if not paths:
            return data.draw(ODD_VALUES)
        path = data.draw(st.sampled_from(paths))
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "replace", "delete", "truncate"]))
        node = parent[path[-1]]
        if action == "delete":
            del parent[path[-1]]
        elif action == "truncate" and isinstance(node, list):
            parent[path[-1]] = node[: data.draw(st.integers(0, max(len(node) - 1, 0)))]
        else:
            parent[path[-1]] = data.draw(ODD_VALUES)
    return tree


def _only_input_errors(load: Any) -> None:
    try:
        load()
    except InputError:
        pass


# ---- HardwareProfile ----------------------------------------------------------------------------------------
VALID_PROFILE = HardwareProfile.resolve("h100-sxm").to_dict()
VALID_PROFILE["runs"] = {"r1": {"date": "2026-01-01", "gpu": "H100"}}
VALID_PROFILE["curves"] = [
    {"kind": "expert_ffn", "key": {"hidden": 4096, "ffn": 14336, "dtype": "bf16"}, "x": [1, 64, 4096],
     "y": [1e-5, 2e-5, 1e-3], "y_min": [0.9e-5, 1.9e-5, 0.9e-3], "y_max": [1.1e-5, 2.1e-5, 1.1e-3],
     "source": "measured", "run": "r1"},
    {"kind": "collective", "key": {"op": "all_to_all", "scope": "intra", "ranks": 8}, "x": [1024, 2**20],
     "y": [2e-5, 1e-4], "source": "measured", "run": "r1"},
]


def test_the_fuzzed_profile_starts_valid() -> None:
    HardwareProfile.from_dict(VALID_PROFILE, "valid.yaml")


@FUZZ
@given(data=st.data())
def test_hardware_profile_load_mutated_yaml(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(mutate(VALID_PROFILE, data)))
    _only_input_errors(lambda: HardwareProfile.load(path))


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.sampled_from(["a: [", "- 1\n- 2", "!!python/object:os.system x", "a: &x [*x]", "~",
                                       "schema_version: 1", "{device: 3}", "\t", "a: 1e400", "? [a]\n: b"])))
def test_hardware_profile_load_random_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _only_input_errors(lambda: HardwareProfile.load(path))


@FUZZ
@given(raw=st.binary(max_size=300))
def test_hardware_profile_load_random_bytes(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "profile.yaml"
    path.write_bytes(raw)
    _only_input_errors(lambda: HardwareProfile.load(path))


# ---- RoutingTrace --------------------------------------------------------------------------------------------
SMALL = ModelSpec.preset("mixtral-8x7b")
VALID_TRACE = synthesize(SMALL, SyntheticTraffic(tokens=40, seed=1))


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _valid_arrays() -> dict[str, np.ndarray]:
    return {"expert_ids": VALID_TRACE.expert_ids, "gate_weights": VALID_TRACE.gate_weights,
            "meta": np.array(json.dumps({"format": "moeplan-trace-v1", "num_experts": 8, "model": "Mixtral-8x7B",
                                         "provenance": {"source": "synthetic"}}))}


ODD_ARRAYS = st.one_of(
    st.builds(lambda shape, dtype, fill: np.full(shape, fill).astype(dtype),
              st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple),
              st.sampled_from(["int8", "int16", "int64", "uint8", "float16", "float64", "bool", "U3", "complex64"]),
              st.integers(-40000, 40000)),
    st.just(np.array(["not json"])), st.just(np.array(json.dumps([1, 2]))), st.just(np.array(b"\xff\xfe")),
    st.just(np.array(json.dumps({"format": "moeplan-trace-v1", "num_experts": 3.5}))),
    st.just(np.array(json.dumps({"format": "moeplan-trace-v1", "num_experts": 8, "provenance": 7}))),
    st.just(np.array(json.dumps({"format": "moeplan-trace-v1", "num_experts": 10**30}))),
    st.just(np.full((4, 32, 2), np.nan, dtype=np.float16)),
)


@FUZZ
@given(data=st.data())
def test_trace_load_mutated_arrays(tmp_path: Path, data: st.DataObject) -> None:
    arrays = _valid_arrays()
    for _ in range(data.draw(st.integers(1, 2))):
        key = data.draw(st.sampled_from(["expert_ids", "gate_weights", "meta", "extra"]))
        if data.draw(st.booleans()) and key in arrays:
            del arrays[key]
        else:
            arrays[key] = data.draw(ODD_ARRAYS)
    path = tmp_path / "trace.npz"
    path.write_bytes(_npz_bytes(arrays))
    _only_input_errors(lambda: RoutingTrace.load(path))


@FUZZ
@given(data=st.data())
def test_trace_load_corrupted_bytes(tmp_path: Path, data: st.DataObject) -> None:
    raw = bytearray(_npz_bytes(_valid_arrays()))
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "trace.npz"
    path.write_bytes(bytes(raw))
    _only_input_errors(lambda: RoutingTrace.load(path))


@FUZZ
@given(data=st.data())
def test_trace_load_uncompressed_members_with_corrupt_headers(tmp_path: Path, data: st.DataObject) -> None:
    """Stored (not deflated) members expose the .npy header bytes: flip those."""
    buffer = io.BytesIO()
    np.savez(buffer, **_valid_arrays())
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src:
        members = {name: bytearray(src.read(name)) for name in src.namelist()}
    name = data.draw(st.sampled_from(sorted(members)))
    member = members[name]
    for _ in range(data.draw(st.integers(1, 4))):
        member[data.draw(st.integers(0, min(len(member), 128) - 1))] = data.draw(st.integers(0, 255))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for key, value in members.items():
            dst.writestr(key, bytes(value))
    path = tmp_path / "trace.npz"
    path.write_bytes(out.getvalue())
    _only_input_errors(lambda: RoutingTrace.load(path))


@FUZZ
@given(raw=st.binary(max_size=400))
def test_trace_load_random_bytes(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "trace.npz"
    path.write_bytes(raw)
    _only_input_errors(lambda: RoutingTrace.load(path))


# ---- Plan ------------------------------------------------------------------------------------------------------
def _valid_plan() -> dict[str, Any]:
    spec = ModelSpec.preset("mixtral-8x7b")
    slots = np.tile(np.array([[0, 1, 2, 3, 0], [4, 5, 6, 7, 4]]), (spec.num_moe_layers, 1, 1))  # 0, 4 replicated
    plan = Plan(model=spec, hardware=HardwareProfile.resolve("h100-sxm").ref(), devices_per_node=2, nodes=1,
                placement=Placement.from_slots(slots, 8, 2),
                parallel=ParallelLayout(tp=2, cp=1, dp=1, pp=1, etp=1, ep=2, edp=1),
                cache=CacheConfig(sizes=(4,) * spec.num_moe_layers, policy="lru", budget_bytes=80e9),
                moves=(Move.of_expert(0, 1, 0, 1, 1, 3, 1.0),),
                solver={"name": "test", "objective": 1.0}, predicted={"step_s": 0.01}, notes="fuzz")
    return plan.validate().to_dict()


VALID_PLAN = _valid_plan()


@FUZZ
@given(data=st.data())
def test_plan_load_mutated_json(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(mutate(VALID_PLAN, data)))
    _only_input_errors(lambda: Plan.load(path))


@FUZZ
@given(raw=st.binary(max_size=300))
def test_plan_load_random_bytes(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(raw)
    _only_input_errors(lambda: Plan.load(path))


# ---- ModelSpec.from_hf_config --------------------------------------------------------------------------------
HF_CONFIGS = {slug: json.loads(resources.files("moeplan.presets").joinpath(f"{slug}.json").read_text())["config"]
              for slug in ModelSpec.preset_names()}


@FUZZ
@given(data=st.data())
def test_model_from_hf_config_mutated(tmp_path: Path, data: st.DataObject) -> None:
    config = HF_CONFIGS[data.draw(st.sampled_from(sorted(HF_CONFIGS)))]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(mutate(config, data)))
    _only_input_errors(lambda: ModelSpec.from_hf_config(path))


@pytest.mark.parametrize("text", ["", "[]", "null", "3", '"x"', "{", '{"model_type": "mixtral"}', "\xff"])
def test_model_from_hf_config_degenerate_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text, encoding="latin-1")
    with pytest.raises(InputError):
        ModelSpec.from_hf_config(path)


# ---- regressions: inputs that escaped as other exceptions (or never returned) before the loader fixes ----------
def _npy(header: str, body: bytes = b"\x00" * 16) -> bytes:
    header = header + " " * (118 - len(header)) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin-1") + body


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, value in members.items():
            archive.writestr(name, value)
    return out.getvalue()


def test_trace_with_a_broken_deflate_stream_is_an_input_error(tmp_path: Path) -> None:
    raw = bytearray(_npz_bytes(_valid_arrays()))
    name_len, extra_len = int.from_bytes(raw[26:28], "little"), int.from_bytes(raw[28:30], "little")
    raw[30 + name_len + extra_len] ^= 0xFF  # first byte of the first member's deflate data (zlib.error before)
    path = tmp_path / "trace.npz"
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="trace.npz"):
        RoutingTrace.load(path)


@pytest.mark.parametrize("header", [
    "{'descr': '<i2', 'fortran_order': False, 'shape': (1000000000000,), }",  # MemoryError before
    "{'descr': '<i2', 'fortran_order': False, 'shape': (4,\x00 2), }",          # SyntaxError/TokenError before
])
def test_trace_with_a_bad_npy_header_is_an_input_error(tmp_path: Path, header: str) -> None:
    path = tmp_path / "trace.npz"
    path.write_bytes(_zip({"expert_ids.npy": _npy(header)}))
    with pytest.raises(InputError, match="not a readable NPZ"):
        RoutingTrace.load(path)


@pytest.mark.parametrize("key, value, field", [
    ("num_experts", 10**9, "placement.num_experts"),          # a 32e9-entry bincount (MemoryError) before
    ("slot_expert", [[[2**32 + 3]]], "placement.slot_expert"),  # silently wrapped to expert 3 before
])
def test_plan_with_out_of_range_placement_numbers_is_an_input_error(tmp_path: Path, key: str, value: Any,
                                                                   field: str) -> None:
    data = json.loads(json.dumps(VALID_PLAN))
    data["placement"][key] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as info:
        Plan.load(path)
    assert info.value.field == field


def test_model_with_an_absurd_layer_count_is_an_input_error_not_a_hang(tmp_path: Path) -> None:
    for slug, key in (("mixtral-8x7b", "num_hidden_layers"), ("dbrx", "n_layers")):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**HF_CONFIGS[slug], key: 2**40}))
        with pytest.raises(InputError) as info:
            ModelSpec.from_hf_config(path)
        assert info.value.field == key
    spec = ModelSpec.preset("mixtral-8x7b").to_dict()
    with pytest.raises(InputError) as info:
        ModelSpec.from_dict({**spec, "num_layers": 2**40})
    assert info.value.field == "num_layers"
