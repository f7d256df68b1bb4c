"""Multi-rank runtime: ``torchrun --nproc-per-node N -m moeplan.runtime --plan p.json [--trace t.npz]
[--new-plan q.json] [-o out.json]``.

Every rank holds its slots' experts of the plan; batches are served in order with per-layer
timing; with ``--new-plan`` a live re-placement starts after batch ``--migrate-after`` and
advances one step between batches. At the end the served batches that ran before the move are
computed again under the final placement and compared with what was served, the ledger is
checked on every rank, and rank 0 writes the JSON report. Exit 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import torch

from moeplan.errors import InputError
from moeplan.plan import Plan
from moeplan.runtime.batches import BatchSource
from moeplan.runtime.comm import Comm, run_ranks
from moeplan.runtime.serving import Migrate, serve
from moeplan.runtime.stack import MoEStack, check_placement, parse_layers
from moeplan.trace import RoutingTrace


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moeplan.runtime", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="Plan JSON with a placement over as many devices as ranks.")
    p.add_argument("--trace", help="Routing trace (.npz); without it the layers' random-weight routers route.")
    p.add_argument("--new-plan", help="Plan to re-place to while serving.")
    p.add_argument("--batches", type=int, default=8, help="Batches to serve.")
    p.add_argument("--tokens-per-rank", type=int, default=512, help="Tokens of each batch on each rank.")
    p.add_argument("--kernel", choices=("grouped", "loop"), default="grouped")
    p.add_argument("--layers", help="Comma-separated MoE-layer indices to run (default: all).")
    p.add_argument("--migrate-after", type=int, default=1, help="Start the re-placement after this batch.")
    p.add_argument("--experts-per-step", type=int, default=4, help="Expert transfers per migration step.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", help="JSON report (written by rank 0).")
    return p.parse_args(argv)


def run(args: argparse.Namespace, comm: Comm) -> dict[str, Any]:
    plan = Plan.load(args.plan)
    if plan.placement is None:
        raise InputError("the plan has no placement", source=args.plan, field="placement",
                         fix="solve a placement first")
    check_placement(plan.model, plan.placement, comm.world, args.plan)
    trace = None
    if args.trace:
        trace = RoutingTrace.load(args.trace)
        trace.check_model(plan.model.num_experts, plan.model.num_moe_layers, plan.model.top_k, args.trace)
    migrate = None
    if args.new_plan:
        new = Plan.load(args.new_plan)
        if new.placement is None:
            raise InputError("the new plan has no placement", source=args.new_plan, field="placement")
        check_placement(plan.model, new.placement, comm.world, args.new_plan)
        migrate = Migrate(new.placement, args.migrate_after, args.experts_per_step, moves=new.moves)
    if args.batches < 1:
        raise InputError(f"must be ≥ 1, got {args.batches}", field="batches")
    layers = parse_layers(args.layers, plan.model.num_moe_layers)
    stack = MoEStack(plan.model, plan.placement, comm, args.kernel, args.seed, layers)
    source = BatchSource(plan.model.hidden_size, args.tokens_per_rank, comm.rank, comm.world, args.seed,
                         comm.device, stack.dtype, trace)
    batch_ids = list(range(args.batches))
    with torch.inference_mode():
        result = serve(stack, source, batch_ids, migrate, keep_outputs=True, timed=True)
        mig = result.migration
        while mig is not None and mig.state == "running":
            mig.step()
        result.ledger.check(batch_ids, comm)
        served_before = [b for b, v in result.ledger.entries if v == 0]
        diffs = [float((stack.forward(source.batch(b))[0].float().cpu() - result.outputs[b]).abs().max())
                 for b in served_before]
    max_diff = max(comm.gather_objects(max(diffs, default=0.0)))
    per_layer = np.median(np.asarray(result.layer_seconds), axis=0).tolist()
    return {
        "world": comm.world, "backend": comm.backend, "device": str(comm.device), "dtype": str(stack.dtype),
        "kernel": args.kernel, "impl": stack.kernel.impl, "plan": args.plan, "new_plan": args.new_plan,
        "trace": args.trace, "batches": args.batches, "tokens_per_rank": args.tokens_per_rank, "layers": layers,
        "layer_median_s_per_rank": comm.gather_objects(per_layer),
        "ledger": result.ledger.to_dict(), "final_version": stack.version,
        "migration": comm.gather_objects(mig.report().to_dict()) if mig is not None else None,
        "recomputed_batches": served_before, "outputs_max_abs_diff": max_diff,
        "outputs_equal": max_diff == 0.0,
        "weight_mismatches": sum(len(x) for x in comm.gather_objects(stack.weight_mismatches())),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_ranks(lambda comm: run(args, comm), args.output, summary)


def summary(report: dict[str, Any]) -> str:
    """One line for the console."""
    mig = report["migration"][0] if report["migration"] else None
    line = (f"{report['world']} ranks ({report['backend']}, {report['device']}, {report['impl']}): served "
            f"{report['ledger']['served']} batches, per-layer median "
            f"{1e3 * float(np.mean(report['layer_median_s_per_rank'])):.3f} ms")
    if mig:
        line += f"; migration {mig['state']} ({mig['transfers']} transfers, {mig['local_copies']} local copies)"
    return line + (f"; recomputed outputs equal: {report['outputs_equal']} "
                   f"(max |diff| {report['outputs_max_abs_diff']:.3g})")


if __name__ == "__main__":
    sys.exit(main())
