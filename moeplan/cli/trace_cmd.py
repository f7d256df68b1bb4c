"""``moeplan trace synth|import|stats``."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer

from moeplan.cli.apps import trace_app
from moeplan.cli.common import console, guarded, print_table, status
from moeplan.errors import InputError
from moeplan.io import write_json
from moeplan.model import ModelSpec
from moeplan.stats import TraceStats
from moeplan.synth import SyntheticTraffic, synthesize
from moeplan.trace import RoutingTrace
from moeplan.trace_import import IMPORT_FORMATS, import_trace


@trace_app.command("synth")
@guarded
def synth(
    output: Path = typer.Option(..., "-o", "--output", help="Trace file to write (.npz)."),
    model: str = typer.Option("deepseek-v3", help="Model preset or config.json path."),
    tokens: int = typer.Option(100_000, help="Tokens to generate."),
    zipf: float = typer.Option(0.6, help="Popularity skew per layer (Zipf exponent; 0 = uniform)."),
    affinity: float = typer.Option(0.4, help="Share of choices that follow the previous layer's expert (0..1)."),
    locality: float = typer.Option(0.3, help="Share of choices that follow the current context (0..1)."),
    segment: int = typer.Option(64, help="Mean tokens a context lasts (temporal locality)."),
    seed: int = typer.Option(0, help="Random seed."),
    shuffle: bool = typer.Option(True, help="Hot experts at random ids (--no-shuffle: expert 0 hottest, then 1, …)."),
) -> None:
    """Synthesise a routing trace with realistic structure (skew, inter-layer affinity, locality)."""
    spec = ModelSpec.resolve(model)
    knobs = SyntheticTraffic(tokens=tokens, zipf=zipf, affinity=affinity, locality=locality, segment=segment, seed=seed,
                             shuffle=shuffle)
    t0 = time.perf_counter()
    with status(f"synthesising {tokens:,} tokens × {spec.num_moe_layers} MoE layers × top-{spec.top_k}"):
        trace = synthesize(spec, knobs)
    trace.save(output)
    console.print(f"wrote {output} ({trace.num_tokens:,} tokens, {trace.num_layers} layers, top-{trace.top_k}, "
                  f"{spec.num_experts} experts) in {time.perf_counter() - t0:.1f} s")


@trace_app.command("import")
@guarded
def import_cmd(
    files: list[Path] = typer.Argument(..., metavar="FILE...", help="Recorded routing: one or more files of one format."),
    output: Path = typer.Option(..., "-o", "--output", help="Trace file to write (.npz)."),
    model: str = typer.Option(..., help="Model preset or config.json path the traffic was recorded on."),
    fmt: str = typer.Option("auto", "--format",
                            help="auto (by suffix) | npz (expert_ids [tokens, layers, top_k]) | sglang-pass (SGLang "
                                 "per_token recorder .pt dumps, one per rank) | csv | parquet (token, layer, "
                                 "expert_0..expert_{k-1}[, weight_0..])."),
) -> None:
    """Import routing recorded elsewhere (plain arrays, SGLang recorder dumps, CSV/Parquet) as a moeplan trace."""
    if fmt not in IMPORT_FORMATS:
        raise InputError(f"unknown format {fmt!r}", field="format", fix=f"use one of {', '.join(IMPORT_FORMATS)}")
    spec = ModelSpec.resolve(model)
    trace = import_trace(files, fmt, spec)
    trace.save(output)
    console.print(f"wrote {output} ({trace.num_tokens:,} tokens, {trace.num_layers} MoE layers, top-{trace.top_k}, "
                  f"{trace.num_experts} experts, from {len(files)} {trace.provenance['format']} file(s))")


@trace_app.command("stats")
@guarded
def stats(
    trace_path: Path = typer.Argument(..., metavar="TRACE", help="Trace file (.npz)."),
    layer: int = typer.Option(0, help="MoE layer for the co-activation and transition details."),
    json_out: Path = typer.Option(None, "--json", help="Also write all statistics as JSON."),
) -> None:
    """Summarise a trace: load skew, co-activation, inter-layer affinity, local routing consistency."""
    trace = RoutingTrace.load(trace_path)
    if not 0 <= layer < trace.num_layers:
        raise InputError(f"layer must lie in 0..{trace.num_layers - 1}, got {layer}", field="layer")
    t0 = time.perf_counter()
    st = TraceStats.of(trace)
    summary = st.summary()
    imb = st.imbalance()
    co = st.coactivation(layer)
    top_pair = np.unravel_index(int(co.argmax()), co.shape)
    seconds = time.perf_counter() - t0
    rows = [("tokens", trace.num_tokens), ("MoE layers × experts × top-k", f"{trace.num_layers} × {trace.num_experts} × {trace.top_k}"),
            ("source", trace.provenance.get("source", "?")),
            ("max/mean expert load (mean over layers)", summary["max_over_mean_load_mean"]),
            ("max/mean expert load (worst layer)", summary["max_over_mean_load_worst"]),
            ("top-1 affinity (share following the likeliest successor)", summary["top1_affinity_mean"]),
            (f"layer {layer}: most co-activated pair", f"{top_pair[0]}+{top_pair[1]} ({int(co.max()):,} tokens)"),
            ("SRP (segment 16)", summary["srp_16"]), ("SCH (look-ahead 16, cache 2×top-k per layer)", summary["sch_16_2k"])]
    if trace.num_layers > 1:
        tr = st.transitions(layer if layer < trace.num_layers - 1 else layer - 1)
        rows.append((f"layer {layer}→{layer + 1}: strongest P(next|expert)", float(tr.max())))
    print_table(f"Trace {trace_path.name}", ["statistic", "value"], rows, caption=f"computed in {seconds:.2f} s")
    if json_out:
        write_json(json_out, {**summary, "imbalance_per_layer": imb.tolist(), "load": st.load.tolist(),
                              "srp": {str(m): st.srp(m) for m in (4, 16, 64)},
                              "sch": {str(m): st.head_for_sch().sch(m) for m in (4, 16, 64)}})
        console.print(f"wrote {json_out}")
