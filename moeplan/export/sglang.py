"""SGLang: the file ``--init-expert-location`` loads, and the server command that loads it.

The loader (``compute_initial_expert_location_metadata`` in
``sglang/python/sglang/srt/eplb/expert_location.py``, read at commit
``01fec5c2e61f9568c41a6e1d4fd5ac46c88504f1`` and in its late-2025 form with ``moe_ep_rank``)
takes a ``.pt`` path (``torch.load(weights_only=True)``), a ``.json`` path, or inline JSON, and
dispatches on the keys:

* ``physical_to_logical_map`` → ``ExpertLocationMetadata.init_by_mapping(server_args,
  model_config, **data_dict)``. Every key becomes a keyword argument, so the file must hold
  **that key only** (any other key is a ``TypeError`` at startup).
* ``logical_count`` → SGLang runs EPLB on those loads (a recorder dump); see
  :mod:`moeplan.export.importers`.

What the map must be (each rule is the loader's, or a crash/defect it would hit):

* shape ``[num_hidden_layers, E + R]``: one row per decoder layer, dense layers included, rows
  indexed by absolute ``layer_id``; ``E`` = routed experts, ``R`` = ``--ep-num-redundant-experts``
  (``_init_common``: ``num_physical_experts = E + R``; FusedMoE allocates ``(E+R)/ep_size``
  local slots);
* ``(E + R) % ep_size == 0`` (``_init_common`` asserts it); rank ``r`` holds physical ids
  ``r·S … r·S+S−1`` with ``S = (E+R)/ep_size`` (``_compute_gpu_id_of_physical_expert``);
* values in ``0..E−1``: a larger one is an IndexError, a negative one silently wraps;
* every logical expert in **every** row: with a location file SGLang defaults to
  ``ep_dispatch_algorithm="static"``, and ``compute_logical_to_rank_dispatch_physical_map`` then
  runs ``_fair_choices(candidates, …)`` for every layer and expert, dense layers included; an
  expert without a slot divides by zero there;
* no two replicas of one expert on one rank (MoE rows): since late 2025
  ``_compute_logical_to_all_physical_map`` keeps only the *nearest* replica per rank
  (``_find_nearest_expert``: the first same-GPU one), so the weight loader fills one of the two
  slots and the other stays empty while other ranks may still dispatch to it. The export repairs
  such a plan by slot swaps between ranks (:func:`repair_same_rank_replicas`) and says how many;
* a model SGLang can place: a family whose model class lacks ``get_model_config_for_expert_location``
  (Mixtral, DBRX, OLMoE) is refused (:data:`NO_EXPERT_LOCATION`).

**Dense-layer rows.** SGLang ignores their content for computation (no FusedMoE there) but
validates them as above. We write what SGLang itself builds for them in ``init_trivial``:
``arange(E + R) % E`` (identity, redundant slots cycling from expert 0), which satisfies every
rule. MTP/draft layers beyond ``num_hidden_layers`` are not rows: SGLang falls back to the
identity map for them.

Token shares among replicas (``Placement.replica_share``) do not travel: SGLang's static
dispatch sends each rank's tokens to the replica on its own GPU if there is one, else to a fixed
fair choice among the replicas.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moeplan.dispatch import check_export
from moeplan.errors import InputError
from moeplan.export.common import Export, hf_model_path, output_file, require_placement, shell_command
from moeplan.io import atomic_open, write_text
from moeplan.model import ModelSpec
from moeplan.plan import Plan

MAP_KEY = "physical_to_logical_map"


def dense_row(num_physical: int, num_experts: int) -> np.ndarray:
    """SGLang's own row for a layer without experts: ``arange(P) % E`` (``init_trivial``)."""
    return np.arange(num_physical, dtype=np.int64) % num_experts


NO_EXPERT_LOCATION = {"mixtral": "MixtralForCausalLM", "dbrx": "DbrxForCausalLM", "olmoe": "OlmoeForCausalLM"}
"""Hugging Face ``model_type`` → SGLang model class without ``get_model_config_for_expert_location``: for these
``sglang/srt/eplb/expert_location.py::compute_initial_expert_location_metadata`` gets no expert-location config
and ``ExpertLocationDispatchInfo.init_new`` asserts, so SGLang cannot place their experts (read in SGLang 0.5.x's
``sglang/srt/models/{mixtral,dbrx,olmoe}.py``)."""


def check_model_supported(model: ModelSpec, source: str = "plan", field: str = "model.family") -> None:
    """Raise InputError (naming ``source`` and ``field``) if SGLang cannot load an expert placement for
    ``model``'s family."""
    cls = NO_EXPERT_LOCATION.get(model.family)
    if cls is not None:
        raise InputError(f"SGLang cannot place the experts of {model.name}: its {cls} has no "
                         f"get_model_config_for_expert_location, so compute_initial_expert_location_metadata has "
                         f"no expert-location config and ExpertLocationDispatchInfo.init_new asserts at startup",
                         source=source, field=field,
                         fix="serve this model without --init-expert-location (SGLang's default placement), or "
                             "export to vLLM")


def repair_same_rank_replicas(phy2log: np.ndarray, ep_size: int) -> tuple[np.ndarray, int]:
    """Move replicas so that no rank holds two of one expert, by swapping slot contents between ranks.

    ``phy2log``: int [rows, P], rank r owning slots ``r·P/ep … (r+1)·P/ep − 1``. Each duplicate slot swaps with a
    slot of another rank that holds neither copy's expert and whose expert the first rank lacks, preferring a
    slot that itself holds a replicated expert (so single-copy experts stay put). Every rank keeps its slot count
    and every expert its replica count. Returns the repaired copy and the number of swaps; raises InputError when
    no swap exists (an expert with more replicas than ranks)."""
    out = np.array(phy2log, dtype=np.int64, copy=True)
    rows, width = out.shape
    per = width // ep_size
    swaps = 0
    for row in range(rows):
        ranks = out[row].reshape(ep_size, per)
        copies = np.bincount(ranks.ravel())
        for rank in range(ep_size):
            for slot in range(per):
                x = ranks[rank, slot]
                if np.count_nonzero(ranks[rank] == x) < 2:
                    continue
                best: tuple[int, int, int] | None = None
                for other in range(ep_size):
                    if other == rank or (ranks[other] == x).any():
                        continue
                    for cand in range(per):
                        y = ranks[other, cand]
                        if (ranks[rank] == y).any():
                            continue
                        key = -int(copies[y])
                        if best is None or key < best[0]:
                            best = (key, other, cand)
                if best is None:
                    raise InputError(f"row {row}: expert {x} has two replicas on rank {rank} and no slot swap "
                                     f"separates them", source="plan", field=MAP_KEY,
                                     fix="give an expert at most one replica per rank")
                _, other, cand = best
                ranks[rank, slot], ranks[other, cand] = ranks[other, cand], x
                swaps += 1
    return out, swaps


def location_map(plan: Plan) -> tuple[np.ndarray, int]:
    """int64 [num_hidden_layers, E + R]: the plan's placement as SGLang's ``physical_to_logical_map``, with
    same-rank duplicate replicas repaired (:func:`repair_same_rank_replicas`), and the number of swaps made."""
    placement = require_placement(plan, "sglang")
    model = plan.model
    check_model_supported(model)
    out = np.tile(dense_row(placement.num_physical, model.num_experts), (model.num_layers, 1))
    moe_rows, swaps = repair_same_rank_replicas(placement.phy2log(), placement.num_devices)
    out[list(model.moe_layers)] = moe_rows
    check_location_map(out, model, placement.num_devices, source="plan")
    return out, swaps


def check_location_map(phy2log: np.ndarray, model: ModelSpec, ep_size: int, source: str) -> None:
    """Raise InputError unless SGLang's loader accepts ``phy2log`` for ``model`` with ``--ep-size ep_size``
    (shape, integers, range, divisibility, every expert in every row)."""
    def bad(message: str, fix: str = "") -> InputError:
        return InputError(message, source=source, field=MAP_KEY, fix=fix)

    e = model.num_experts
    if phy2log.ndim != 2:
        raise bad(f"expected [layers, physical experts], got shape {phy2log.shape}")
    rows, width = phy2log.shape
    if rows != model.num_layers:
        raise bad(f"has {rows} rows, {model.name} has {model.num_layers} decoder layers (num_hidden_layers; "
                  f"SGLang wants a row for every layer, dense ones included)", "check --model")
    if phy2log.dtype.kind not in "iu":
        raise bad(f"expected integers, got {phy2log.dtype}")
    if width < e:
        raise bad(f"has {width} physical experts per row, fewer than the {e} logical experts")
    if width % ep_size:
        raise bad(f"{width} physical experts (E + R = {e} + {width - e}) do not divide over ep_size {ep_size}",
                  "give --gpus equal to the EP size, or a map whose width is a multiple of it")
    if phy2log.min() < 0 or phy2log.max() >= e:
        row, col = np.argwhere((phy2log < 0) | (phy2log >= e))[0]
        raise bad(f"row {row}, physical {col}: logical id {phy2log[row, col]} outside 0..{e - 1}")
    offsets = (np.arange(rows, dtype=np.int64) * e)[:, None]
    counts = np.bincount((phy2log.astype(np.int64) + offsets).ravel(), minlength=rows * e).reshape(rows, e)
    missing = np.argwhere(counts == 0)
    if missing.size:
        row, expert = missing[0]
        kind = "MoE" if row in model.moe_layers else "dense"
        raise bad(f"logical expert {expert} has no physical slot in row {row} ({kind} layer); SGLang's static "
                  f"dispatch needs every expert in every row", "put each expert in at least one slot of every row")


def launch_args(plan: Plan, location_file: str, model_path: str, rebalance_every: int | None) -> list[str]:
    """``python -m sglang.launch_server`` arguments that run the plan from ``location_file``.

    EP spans all the plan's devices and equals the TP size (the DeepEP all-to-all backend forces
    ``ep_size = tp_size``). With a parallel mapping whose attention has DP > 1 the command adds
    ``--enable-dp-attention --dp-size`` (attention TP = tp_size / dp_size on the same GPUs).
    """
    placement = require_placement(plan, "sglang")
    devices = placement.num_devices
    attention_dp = _attention_dp(plan, devices)
    args = ["python", "-m", "sglang.launch_server", "--model-path", model_path,
            "--tp-size", str(devices), "--ep-size", str(devices), "--moe-a2a-backend", "deepep",
            "--ep-num-redundant-experts", str(placement.num_physical - placement.num_experts),
            "--init-expert-location", location_file]
    if attention_dp > 1:
        args += ["--enable-dp-attention", "--dp-size", str(attention_dp)]
    if plan.nodes > 1:
        args += ["--nnodes", str(plan.nodes), "--node-rank", "$NODE_RANK", "--dist-init-addr", "$MASTER_ADDR:5000"]
    if rebalance_every is not None:
        if devices < 2:
            raise InputError("SGLang's EPLB needs ep_size > 1", field="rebalance_every")
        args += ["--enable-eplb", "--eplb-rebalance-num-iterations", str(rebalance_every)]
    return args


def _attention_dp(plan: Plan, devices: int) -> int:
    """Attention DP of the plan's parallel mapping (1 without one), checked against SGLang's layout."""
    if plan.parallel is None:
        return 1
    layout = plan.parallel
    if layout.pp != 1 or layout.cp != 1:
        raise InputError(f"SGLang export covers pp = cp = 1 (one EP group over the TP group); the plan has "
                         f"pp={layout.pp}, cp={layout.cp}", field="parallel.attention")
    if layout.tp * layout.dp != devices:
        raise InputError(f"attention tp×dp = {layout.tp}×{layout.dp} must equal the {devices} devices of the "
                         f"placement (SGLang: --tp-size = all GPUs, attention TP = tp/dp)", field="parallel.attention")
    if layout.ep != devices or layout.etp != 1:
        raise InputError(f"SGLang with DeepEP needs moe.ep = {devices} (all devices) and moe.etp = 1; the plan "
                         f"has ep={layout.ep}, etp={layout.etp}", field="parallel.moe")
    return layout.dp


def export_sglang(plan: Plan, out: Path, model_path: str | None = None,
                  rebalance_every: int | None = None) -> Export:
    """Write the expert-location file (``.json``, or ``.pt`` with torch) and build the launch command.

    ``out`` is a ``.json``/``.pt`` file, or a folder that gets ``expert_location.json``.
    """
    placement = require_placement(plan, "sglang")
    phy2log, swaps = location_map(plan)
    check_export(plan, "sglang")
    target = output_file(out, "expert_location.json", (".json", ".pt"))
    args = launch_args(plan, str(target.resolve()), model_path or hf_model_path(plan.model), rebalance_every)
    if target.suffix == ".pt":
        torch = _torch(target)
        with atomic_open(target, "wb") as handle:
            torch.save({MAP_KEY: torch.from_numpy(phy2log)}, handle)
    else:
        write_text(target, json.dumps({MAP_KEY: phy2log.tolist()}, separators=(",", ":")) + "\n")
    notes = [f"{plan.model.num_layers} rows (all decoder layers); the {len(plan.model.dense_layers)} dense-layer "
             f"rows hold SGLang's trivial row arange({placement.num_physical}) % {placement.num_experts}",
             "SGLang splits an expert's tokens among its replicas by its static dispatch (same-GPU replica first), "
             "not by the plan's replica shares"]
    if swaps:
        notes.append(f"{swaps} slot swap(s) moved replicas so that no rank holds two of one expert (SGLang loads "
                     f"weights into only the nearest one); per-rank loads may differ slightly from the plan's")
    if rebalance_every is None:
        notes.append("static placement: --enable-eplb is off, so SGLang keeps this placement")
    else:
        notes.append(f"--enable-eplb: SGLang starts from this placement and re-runs EPLB every {rebalance_every} "
                     f"iterations")
    if plan.nodes > 1:
        notes.append(f"copy {target.name} to the same path on all {plan.nodes} nodes; set NODE_RANK and MASTER_ADDR")
    return Export(files=[target], command=shell_command(args), notes=notes)


def _torch(target: Path):  # noqa: ANN202 - the torch module
    try:
        import torch
    except ImportError:
        raise InputError("writing a .pt file needs torch", source=str(target), field="output",
                         fix="install torch, or write .json (SGLang reads both)") from None
    return torch
