"""``moeplan trace collect``: record a real (or randomly initialised) model's routing over a text."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from moeplan.cli.apps import trace_app
from moeplan.cli.common import console, guarded, progress, status
from moeplan.collect import CollectOptions, Collection


@trace_app.command("collect")
@guarded
def collect(
    model: str = typer.Option(..., "--model", help="Local Hugging Face model folder; with --random-init also a "
                                                   "config.json or a moeplan preset name."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to route through the model."),
    output: Path = typer.Option(..., "-o", "--output", help="Trace file to write (.npz)."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Route at most this many tokens of the text."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence (the context restarts at each)."),
    batch: int = typer.Option(1, "--batch", help="Sequences per forward pass."),
    random_init: bool = typer.Option(False, "--random-init", help="Build the model from its config with random "
                                                                  "weights (no checkpoint needed)."),
    tiny: bool = typer.Option(False, "--tiny", help="With --random-init: shrink to a toy width and 4 MoE layers, "
                                                    "keeping experts, top-k and routing groups (smoke runs)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
) -> None:
    """Collect a routing trace: the router's top-k experts and gate weights per token per MoE layer."""
    t0 = time.perf_counter()
    options = CollectOptions(max_tokens=max_tokens, seq_len=seq_len, batch=batch, device=device)
    with status(f"loading {model}"):
        job = Collection.prepare(model, text, options, random_init=random_init, tiny=tiny)
    with progress("routing tokens", total=int(job.tokens.size)) as advance:
        trace = job.run(advance)
    trace.save(output)
    prov = trace.provenance
    console.print(f"wrote {output} ({trace.num_tokens:,} tokens, {trace.num_layers} MoE layers, top-{trace.top_k} "
                  f"of {trace.num_experts} experts; {prov['tokenizer']} tokens, {prov['dtype']} on {prov['device']}) "
                  f"in {time.perf_counter() - t0:.1f} s")
    if random_init:
        console.print("random weights: the routing shows the model's shape, not a trained router's "
                      "preferences", style="yellow")
