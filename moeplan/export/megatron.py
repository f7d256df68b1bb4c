"""Megatron-Core: the command-line arguments of a plan's parallel mapping and expert parallelism.

``Plan.parallel`` is a :class:`~moeplan.parallel.ParallelLayout` (written by the
parallel-folding solver, read here and by the SGLang and vLLM exporters; its file format is in
:mod:`moeplan.parallel`). All sizes are ≥ 1. Megatron's rules (``megatron/core/parallel_state.py::initialize_model_parallel``,
``megatron/training/arguments.py``; NVIDIA/Megatron-LM tag ``core_v0.15.0`` and HEAD ``d98e8a64``):

* attention ranks ``tp × cp × dp × pp`` = world = the plan's devices; MoE ranks
  ``etp × ep × edp × pp`` = the same world (MoE parallel folding: one rank generator per layer
  kind, ``tp-cp-dp-pp`` and ``tp-ep-dp-pp``); both share the pipeline groups;
* ``num_experts % ep == 0``; experts are contiguous per EP rank (``local_expert_indices_offset =
  ep_rank · E/ep``); no redundant experts and no EPLB in Megatron training;
* ``num_attention_heads % tp == 0``; GQA query groups a multiple or divisor of tp;
* MoE with tp > 1 needs ``--sequence-parallel`` (an error in older releases, a warning since
  2025-08); it is emitted when tp > 1 unless the plan says ``sequence_parallel: false`` (then a
  note warns); Megatron turns it off at tp = 1;
* ``seq_len % (2·cp) == 0`` when cp > 1;
* with ``vpp > 1``: ``num_layers % pp == 0``, ``(num_layers/pp) % vpp == 0``, and pp > 1
  (interleaving with p2p overlap, Megatron's default); without: ``num_layers % pp == 0``;
* expert biases (GPT-OSS) need ``etp == 1``;
* ``global_batch % (micro_batch × dp) == 0``.

A placement plan without a parallel mapping exports only its expert-parallel arguments.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from moeplan.errors import InputError
from moeplan.export.common import Export, arg_lines, output_file, shell_command
from moeplan.io import write_text
from moeplan.model import ModelSpec
from moeplan.parallel import ParallelLayout
from moeplan.plan import Placement, Plan

def check_layout(layout: ParallelLayout, model: ModelSpec, devices: int, source: str) -> None:
    """Megatron's own assertions for ``layout`` of ``model`` on ``devices`` GPUs (module docstring)."""
    def bad(fld: str, message: str, fix: str = "") -> InputError:
        return InputError(message, source=source, field=f"parallel.{fld}", fix=fix)

    if layout.world != devices:
        raise bad("attention", f"tp×cp×dp×pp = {layout.world}, the plan has {devices} devices")
    if model.num_experts % layout.ep:
        raise bad("moe.ep", f"{model.num_experts} experts are not a multiple of ep {layout.ep}")
    if model.attention.num_heads % layout.tp:
        raise bad("attention.tp", f"{model.attention.num_heads} attention heads do not split over tp {layout.tp}")
    groups = model.attention.num_kv_heads
    if model.attention.kind == "gqa" and groups % layout.tp and layout.tp % groups:
        raise bad("attention.tp", f"{groups} query groups are neither a multiple nor a divisor of tp {layout.tp}")
    if model.expert_bias and layout.etp != 1:
        raise bad("moe.etp", "experts with biases need expert tensor parallelism 1")
    if model.num_layers % layout.pp:
        raise bad("attention.pp", f"{model.num_layers} layers do not split evenly over pp {layout.pp}",
                  "choose pp dividing num_layers (uneven first/last stages are set by hand in Megatron)")
    if layout.vpp > 1:
        if layout.pp < 2:
            raise bad("vpp", "virtual pipeline stages need pp > 1")
        if (model.num_layers // layout.pp) % layout.vpp:
            raise bad("vpp", f"{model.num_layers // layout.pp} layers per pipeline stage do not split into "
                             f"{layout.vpp} virtual stages")
    if layout.seq_len is not None and layout.cp > 1 and layout.seq_len % (2 * layout.cp):
        raise bad("seq_len", f"{layout.seq_len} tokens are not a multiple of 2·cp = {2 * layout.cp}")
    if layout.global_batch is not None:
        micro = layout.micro_batch or 1
        if layout.global_batch % (micro * layout.dp):
            raise bad("global_batch", f"{layout.global_batch} is not a multiple of micro_batch×dp = "
                                      f"{micro}×{layout.dp}")


def megatron_placement(num_layers: int, num_experts: int, ep: int, devices_per_node: int) -> Placement:
    """The placement Megatron uses: EP rank r holds experts r·E/ep … (r+1)·E/ep − 1, in order."""
    slots = np.broadcast_to(np.arange(num_experts).reshape(ep, num_experts // ep), (num_layers, ep, num_experts // ep))
    return Placement.from_slots(slots, num_experts, devices_per_node)


def check_placement(placement: Placement, source: str) -> bool:
    """Raise unless Megatron can run ``placement``; True when only the order inside a rank differs."""
    if placement.num_physical != placement.num_experts:
        raise InputError(f"the placement has {placement.num_physical - placement.num_experts} redundant expert "
                         f"slots; Megatron-Core has no redundant experts or EPLB (each expert lives on exactly one "
                         f"EP rank)", source=source, field="placement.slot_expert",
                         fix="export a placement without replicas, or use --format sglang/vllm for serving")
    want = megatron_placement(placement.num_layers, placement.num_experts, placement.num_devices,
                              placement.devices_per_node).slot_expert
    have = np.sort(placement.slot_expert, axis=2)
    if not np.array_equal(have, want):
        layer, rank = (int(v) for v in np.argwhere((have != want).any(axis=2))[0])
        s = placement.slots_per_device
        raise InputError(f"MoE layer {layer}, EP rank {rank} holds experts {have[layer, rank].tolist()}, Megatron "
                         f"places {rank * s}…{rank * s + s - 1} there (contiguous blocks by EP rank, the same in "
                         f"every layer)", source=source, field="placement.slot_expert",
                         fix="Megatron cannot load a custom expert placement; renumber experts in the checkpoint "
                             "or export to a serving runtime")
    return not np.array_equal(placement.slot_expert, want)


def moe_layer_pattern(model: ModelSpec) -> str:
    """``--moe-layer-freq`` list expression, e.g. ``([0]*3+[1]*58)`` (1 = MoE layer)."""
    moe = set(model.moe_layers)
    flags = [1 if i in moe else 0 for i in range(model.num_layers)]
    runs: list[tuple[int, int]] = []
    for flag in flags:
        if runs and runs[-1][0] == flag:
            runs[-1] = (flag, runs[-1][1] + 1)
        else:
            runs.append((flag, 1))
    return "(" + "+".join(f"[{flag}]*{count}" for flag, count in runs) + ")"


def megatron_args(plan: Plan) -> list[str]:
    """The parallel, MoE and model-shape arguments of ``pretrain_gpt.py`` for the plan."""
    if plan.parallel is None and plan.placement is None:
        raise InputError("the plan has neither a parallel mapping nor a placement", field="parallel",
                         fix="solve a parallel folding or a placement first")
    model = plan.model
    layout = plan.parallel
    if layout is not None:
        check_layout(layout, model, plan.num_devices, "plan")
    ep = layout.ep if layout is not None else plan.num_devices
    if plan.placement is not None:
        check_placement(plan.placement, "plan")
        if plan.placement.num_devices != ep:
            raise InputError(f"the placement spans {plan.placement.num_devices} devices, the mapping has ep {ep}",
                             field="parallel.moe.ep", fix="a placement covers one EP group")
    args = ["--num-layers", str(model.num_layers), "--hidden-size", str(model.hidden_size),
            "--num-attention-heads", str(model.attention.num_heads)]
    if model.dense_layers:
        args += ["--ffn-hidden-size", str(model.dense_ffn), "--moe-layer-freq", moe_layer_pattern(model)]
    args += ["--num-experts", str(model.num_experts), "--moe-ffn-hidden-size", str(model.expert_ffn),
             "--moe-router-topk", str(model.top_k)]
    if model.shared_ffn:
        args += ["--moe-shared-expert-intermediate-size", str(model.shared_ffn)]
    if model.n_group > 1:
        args += ["--moe-router-num-groups", str(model.n_group), "--moe-router-group-topk", str(model.topk_group)]
    args += ["--moe-token-dispatcher-type", "alltoall"]
    if model.num_experts // ep > 1:
        args.append("--moe-grouped-gemm")
    if layout is not None:
        args += ["--tensor-model-parallel-size", str(layout.tp), "--context-parallel-size", str(layout.cp),
                 "--pipeline-model-parallel-size", str(layout.pp)]
    args += ["--expert-model-parallel-size", str(ep)]
    if layout is None:
        return args
    args += ["--expert-tensor-parallel-size", str(layout.etp)]
    if layout.tp > 1 and layout.sequence_parallel:
        args.append("--sequence-parallel")
    if layout.seq_len is not None:
        args += ["--seq-length", str(layout.seq_len)]
    if layout.vpp > 1:
        args += ["--num-layers-per-virtual-pipeline-stage", str(model.num_layers // layout.pp // layout.vpp)]
    if layout.micro_batch is not None:
        args += ["--micro-batch-size", str(layout.micro_batch)]
    if layout.global_batch is not None:
        args += ["--global-batch-size", str(layout.global_batch)]
    if layout.recompute:
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    if layout.distributed_optimizer:
        args.append("--use-distributed-optimizer")
    return args


def launch_environment(layout: ParallelLayout | None) -> dict[str, str]:
    """Environment variables Megatron needs for the layout: ``CUDA_DEVICE_MAX_CONNECTIONS=1`` when TP or CP > 1,
    which Megatron-Core's ``megatron/training/arguments.py::validate_args`` asserts on GPUs before Blackwell
    (compute capability < 10; without FSDP or MoE comm overlap) so that TP/CP communication kernels are issued in
    order; on Blackwell it is harmless."""
    if layout is not None and (layout.tp > 1 or layout.cp > 1):
        return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    return {}


def export_megatron(plan: Plan, out: Path) -> Export:
    """Write a bash snippet defining ``MOEPLAN_MEGATRON_ARGS=(…)`` and build the torchrun line.

    ``out`` is a ``.sh`` file, or a folder that gets ``megatron_args.sh``.
    """
    args = megatron_args(plan)
    target = output_file(out, "megatron_args.sh", (".sh",))
    header = ["# Megatron-Core arguments from moeplan: parallel mapping, MoE layout, model shape.",
              f"# Model {plan.model.name}; {plan.num_devices} GPUs ({plan.nodes} node(s) × {plan.devices_per_node}).",
              "# Architecture flags (attention type, norms, rope, tokenizer, data) come from your model recipe."]
    env = launch_environment(plan.parallel)
    body = [f"export {name}={value}" for name, value in env.items()]
    body += ["MOEPLAN_MEGATRON_ARGS=(", *("    " + line for line in arg_lines(args)), ")"]
    write_text(target, "\n".join(header + body) + "\n", executable=True)
    launcher = [*(f"{name}={value}" for name, value in env.items()), "torchrun", "--nproc-per-node", str(plan.devices_per_node), "--nnodes", str(plan.nodes)]
    if plan.nodes > 1:
        launcher += ["--node-rank", "$NODE_RANK", "--master-addr", "$MASTER_ADDR", "--master-port", "6000"]
    command = shell_command([*launcher, "pretrain_gpt.py"] + args)
    notes = ["Megatron places experts contiguously by EP rank with no replicas"]
    layout = plan.parallel
    if layout is not None and layout.tp > 1 and not layout.sequence_parallel:
        notes.append("the plan turns sequence parallelism off with tp > 1: Megatron warns for MoE (older releases "
                     "refuse to start)")
    if layout is not None and layout.mode == "serve":
        notes.append("the plan was solved for serving; these are Megatron training arguments")
    if plan.parallel is None:
        notes.append("the plan has no parallel mapping: only the expert-parallel arguments are set; Megatron's "
                     "DP = world / (TP·CP·PP)")
    if plan.placement is not None and check_placement(plan.placement, "plan"):
        notes.append("the placement orders experts differently inside some ranks; Megatron orders them by id "
                     "(same experts per rank, same communication)")
    return Export(files=[target], command=command, notes=notes)
