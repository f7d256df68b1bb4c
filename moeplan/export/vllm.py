"""vLLM: the expert-parallel and EPLB configuration that matches a plan's placement.

Upstream vLLM cannot load an initial expert placement (read in ``vllm/config/parallel.py`` @
``00193b82`` and ``vllm/distributed/eplb/eplb_state.py`` @ ``50feac95``; the PRs that add a
placement file, e.g. #34811 and #49572, were open when read). What it can run is:

* ``linear`` (default): EP rank r holds experts ``r·E/ep … (r+1)·E/ep − 1`` in order, no
  replicas (``determine_expert_map``);
* ``--expert-placement-strategy round_robin``: rank r holds ``r, r+ep, r+2·ep, …``; vLLM keeps it
  only for grouped routing (``num_expert_group > 1``) with no redundant experts and no EPLB, and
  with an all-to-all kernel only on DeepEP low-latency (``determine_expert_placement_strategy``);
* ``--enable-eplb``: ``E + R`` physical experts, rank-major, starting from
  ``build_initial_global_physical_to_logical_map`` = ``[0…E−1] + [i % E for i < R]`` in every MoE
  layer, then rebalanced by the EPLB policy every ``step_interval`` steps from the expert loads of
  the last ``window_size`` steps.

So a plan equal to one of the first three layouts runs exactly; any other plan runs as online
EPLB with the plan's ``R`` redundant experts, converging to EPLB's own placement, and the plan's
placement is written beside the command as EPLB tensors (MoE-layer rows, vLLM's layer axis) for
reference and for a vLLM build that can load one.

EP size = TP × DP (× prefill CP) when ``--enable-expert-parallel`` is on
(``FusedMoEParallelConfig.flatten_tp_across_dp_and_pcp``). Without a parallel mapping in the plan
the command uses DP attention (TP 1, DP = all GPUs), vLLM's wide-EP layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moeplan.dispatch import check_export
from moeplan.errors import InputError
from moeplan.export.common import Export, hf_model_path, require_placement, shell_command
from moeplan.export.eplb import EplbTensors
from moeplan.io import write_text
from moeplan.model import ModelSpec
from moeplan.plan import Placement, Plan

WINDOW_SIZE = 1000
STEP_INTERVAL = 3000
RPC_PORT = 13345


ROUND_ROBIN_ALL2ALL = "deepep_low_latency"
"""All-to-all backend a round_robin placement needs when DP > 1: vLLM's
``vllm/model_executor/layers/fused_moe/layer.py::determine_expert_placement_strategy`` falls back to linear when
``use_all2all_kernels`` (DP > 1 with EP) and the kernels are neither DeepEP low-latency nor NIXL EP."""


def layout_kind(placement: Placement, model: ModelSpec) -> str:
    """Which vLLM layout the placement is: "linear", "round_robin", "eplb_initial" or "custom"."""
    d, s, e = placement.num_devices, placement.slots_per_device, placement.num_experts
    se = placement.slot_expert
    phys = np.arange(d * s)
    if placement.num_physical == e:
        if np.array_equal(se, np.broadcast_to(phys.reshape(d, s), se.shape)):
            return "linear"
        round_robin = (np.arange(d)[:, None] + np.arange(s)[None, :] * d)
        if model.n_group > 1 and np.array_equal(se, np.broadcast_to(round_robin, se.shape)):
            return "round_robin"
    initial = np.where(phys < e, phys, (phys - e) % e).reshape(d, s)
    if placement.num_physical > e and np.array_equal(se, np.broadcast_to(initial, se.shape)):
        return "eplb_initial"
    return "custom"


def parallel_sizes(plan: Plan, devices: int) -> tuple[int, int]:
    """(tensor-parallel, data-parallel) sizes with TP × DP = the placement's devices (the EP size)."""
    if plan.parallel is None:
        return 1, devices
    layout = plan.parallel
    if layout.pp != 1 or layout.cp != 1:
        raise InputError(f"vLLM export covers pp = cp = 1 (EP over TP×DP); the plan has pp={layout.pp}, "
                         f"cp={layout.cp}", field="parallel.attention")
    if layout.tp * layout.dp != devices or layout.ep != devices:
        raise InputError(f"vLLM's EP size is TP×DP = {layout.tp}×{layout.dp}; the placement spans {devices} devices "
                         f"and moe.ep is {layout.ep}", field="parallel", fix="make tp×dp = ep = the devices")
    return layout.tp, layout.dp


def eplb_config(num_redundant: int, step_interval: int) -> dict[str, object]:
    """The ``--eplb-config`` JSON (keys of vLLM's ``EPLBConfig``)."""
    return {"window_size": WINDOW_SIZE, "step_interval": step_interval, "num_redundant_experts": num_redundant,
            "log_balancedness": True}


def export_vllm(plan: Plan, out: Path, model_path: str | None = None, rebalance_every: int | None = None) -> Export:
    """Write ``out/launch_vllm.sh`` and ``out/placement_eplb.json``; ``out`` is a folder."""
    placement = require_placement(plan, "vllm")
    check_export(plan, "vllm")
    if out.suffix:
        raise InputError("the vLLM export writes a folder (a launch script and the placement)", source=str(out),
                         field="output", fix="give a folder path without a suffix")
    devices = placement.num_devices
    tp, dp = parallel_sizes(plan, devices)
    if tp > plan.devices_per_node or plan.devices_per_node % tp:
        raise InputError(f"tp {tp} must divide the {plan.devices_per_node} GPUs of a node (DP ranks span nodes, "
                         f"TP does not here)", field="parallel.attention.tp")
    kind = layout_kind(placement, plan.model)
    redundant = placement.num_physical - placement.num_experts
    args = ["vllm", "serve", model_path or hf_model_path(plan.model), "--tensor-parallel-size", str(tp),
            "--data-parallel-size", str(dp), "--enable-expert-parallel"]
    notes: list[str] = []
    if kind == "round_robin" and rebalance_every is None:
        args += ["--expert-placement-strategy", "round_robin"]
        if dp > 1:
            args += ["--all2all-backend", ROUND_ROBIN_ALL2ALL]
        notes.append("the plan is vLLM's round_robin placement and loads exactly (vLLM keeps round_robin only "
                     "without EPLB, and, with DP > 1, only on the deepep_low_latency or NIXL EP all-to-all: "
                     "determine_expert_placement_strategy falls back to linear on any other backend)")
    elif kind == "linear" and rebalance_every is None:
        notes.append("the plan is vLLM's default linear placement and loads exactly (no EPLB needed)")
    else:
        if devices < 2:
            raise InputError("vLLM's EPLB needs TP×DP > 1", field="placement.devices")
        config = eplb_config(redundant, rebalance_every or STEP_INTERVAL)
        args += ["--enable-eplb", "--eplb-config", json.dumps(config, separators=(",", ":"))]
        interval = config["step_interval"]
        notes.append({
            "custom": "upstream vLLM cannot load an initial expert placement: it starts from its default map and "
                      f"EPLB rebalances every {interval} steps with {redundant} redundant experts; the plan's "
                      "placement is in placement_eplb.json (not read by vLLM)",
            "eplb_initial": "the plan equals vLLM's initial EPLB map and loads exactly; EPLB first rearranges it "
                            f"after {interval // 4} steps (its step counter starts at 3/4 of the interval)",
            "linear": f"the plan is vLLM's linear placement; EPLB starts from it and rebalances every {interval} steps",
            "round_robin": "vLLM drops round_robin under EPLB: it starts from the linear map and rebalances every "
                           f"{interval} steps",
        }[kind])
    if plan.nodes > 1:
        local = plan.devices_per_node // tp
        args += ["--data-parallel-size-local", str(local), "--data-parallel-address", "$HEAD_IP",
                 "--data-parallel-rpc-port", str(RPC_PORT)]
        notes.append(f"run the command on the head node; on node k = 1…{plan.nodes - 1} add "
                     f"--headless --data-parallel-start-rank $((NODE_RANK*{local})) with NODE_RANK=k")
    command = shell_command(args)
    out.mkdir(parents=True, exist_ok=True)
    tensors = EplbTensors.from_placement(placement, plan.model.moe_layers)
    placement_path = out / "placement_eplb.json"
    write_text(placement_path, json.dumps(tensors.to_json(note=_placement_note(kind)), separators=(",", ":")) + "\n")
    script = out / "launch_vllm.sh"
    write_text(script, "#!/usr/bin/env bash\n" + "".join(f"# {n}\n" for n in notes) + command + "\n", executable=True)
    return Export(files=[script, placement_path], command=command, notes=notes)


def _placement_note(kind: str) -> str:
    if kind == "custom":
        return ("moeplan placement in EPLB-tensor form over vLLM's layer axis (MoE layers); upstream vLLM does not "
                "load it: it starts from its default map and rebalances with EPLB")
    return f"moeplan placement; vLLM builds this same layout itself ({kind})"
