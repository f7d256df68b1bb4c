"""Plotly figures of the dashboard. Pure presentation: each takes arrays the library computed and
returns a figure; no figure computes a number the library does not."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PHASE_COLOURS = {"dispatch": "#4C78A8", "compute": "#54A24B", "straggler wait": "#E45756", "combine": "#F58518"}
MEMORY_COLOURS = {"non-expert weights": "#9D755D", "experts (one copy each)": "#4C78A8", "replica slots": "#72B7B2",
                  "KV cache": "#F58518", "activations": "#B279A2", "gradients": "#FF9DA6", "optimizer": "#BAB0AC"}
HEIGHT = 420


def _layout(fig: go.Figure, height: int = HEIGHT, **kwargs: object) -> go.Figure:
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 50, "b": 10}, **kwargs)
    return fig


def _node_lines(fig: go.Figure, gpus: int, per_node: int, col: int | None = None) -> None:
    """Thin vertical lines between nodes."""
    for edge in range(per_node, gpus, per_node):
        kwargs = {"row": 1, "col": col} if col is not None else {}
        fig.add_vline(x=edge - 0.5, line_width=1, line_color="rgba(0,0,0,0.45)", **kwargs)


def load_heatmaps(loads: dict[str, np.ndarray], titles: dict[str, str], layer_ids: Sequence[int],
                  per_node: int) -> go.Figure:
    """One heatmap per solver: load of each GPU in each MoE layer ÷ that layer's mean GPU load
    (1 = even; red = a straggler), with lines between nodes of ``per_node`` GPUs. ``loads[name]``
    is [MoE layers, GPUs] token-choices."""
    names = list(loads)
    fig = make_subplots(rows=1, cols=len(names), shared_yaxes=True, horizontal_spacing=0.02,
                        subplot_titles=[titles[n] for n in names])
    top = max(1.05, max(float((ld / ld.mean(axis=1, keepdims=True)).max()) for ld in loads.values()))
    for i, name in enumerate(names):
        ld = loads[name]
        rel = ld / ld.mean(axis=1, keepdims=True)
        fig.add_trace(go.Heatmap(
            z=rel, x=np.arange(ld.shape[1]), y=list(layer_ids), customdata=ld, zmin=max(0.0, 2.0 - top), zmax=top,
            colorscale="RdBu_r", showscale=i == len(names) - 1, name=name,
            colorbar={"title": {"text": "load ÷ layer mean", "side": "right"}},
            hovertemplate="GPU %{x}, layer %{y}<br>%{z:.2f}× the layer mean<br>%{customdata:,.0f} token-choices"
                          "<extra>" + name + "</extra>"), row=1, col=i + 1)
        fig.update_xaxes(title_text="GPU", row=1, col=i + 1)
        _node_lines(fig, ld.shape[1], per_node, i + 1)
    fig.update_yaxes(title_text="decoder layer (MoE)", autorange="reversed", row=1, col=1)
    return _layout(fig, height=max(HEIGHT, 8 * len(layer_ids) + 120))


def moe_breakdown(rows: list[dict[str, float]]) -> go.Figure:
    """Stacked bars of predicted MoE time per step (ms) by phase, one bar per solver: dispatch,
    compute of the average GPU, the wait for the slowest GPU, combine."""
    fig = go.Figure()
    solvers = [r["solver"] for r in rows]
    for phase, colour in PHASE_COLOURS.items():
        fig.add_trace(go.Bar(y=solvers, x=[r[phase] for r in rows], name=phase, orientation="h",
                             marker_color=colour, hovertemplate="%{y}: %{x:.3f} ms<extra>" + phase + "</extra>"))
    fig.update_layout(barmode="stack", xaxis_title="predicted MoE time per step (ms, all MoE layers)",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0, "traceorder": "normal"},
                      yaxis={"autorange": "reversed"})
    return _layout(fig, height=130 + 45 * len(rows))


def layer_map(slot_expert: np.ndarray, slot_tokens: np.ndarray, replicas: np.ndarray, title: str,
              per_node: int) -> go.Figure:
    """The expert → GPU map of one layer: a cell per (GPU, slot) naming its expert, coloured by
    the token-choices it serves; ``replicas[e]`` copies of expert e; lines between nodes."""
    d, s = slot_expert.shape
    text = np.where(replicas[slot_expert] > 1, np.char.add(slot_expert.astype(str), "*"), slot_expert.astype(str))
    fig = go.Figure(go.Heatmap(
        z=slot_tokens.T, x=np.arange(d), y=np.arange(s), text=text.T, texttemplate="%{text}",
        textfont={"size": 10}, colorscale="Blues", customdata=replicas[slot_expert].T,
        colorbar={"title": {"text": "token-choices", "side": "right"}},
        hovertemplate="GPU %{x}, slot %{y}: expert %{text}<br>%{z:,.0f} token-choices<br>"
                      "%{customdata} cop(ies) of this expert<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="GPU", yaxis_title="slot")
    _node_lines(fig, d, per_node)
    return _layout(fig, height=140 + 34 * s)


def memory_stack(parts: dict[str, np.ndarray], capacity: float, fits: bool) -> go.Figure:
    """Stacked GiB per GPU against the capacity line (red when the plan does not fit)."""
    fig = go.Figure()
    gpus = np.arange(len(next(iter(parts.values()))))
    for name, values in parts.items():
        if np.any(values > 0):
            fig.add_trace(go.Bar(x=gpus, y=values, name=name, marker_color=MEMORY_COLOURS.get(name),
                                 hovertemplate="GPU %{x}: %{y:.2f} GiB<extra>" + name + "</extra>"))
    fig.add_hline(y=capacity, line_color="#2CA02C" if fits else "#D62728", line_width=3, line_dash="dash",
                  annotation_text=f"capacity {capacity:.1f} GiB", annotation_position="top left",
                  annotation_bgcolor="rgba(255,255,255,0.85)")
    fig.update_layout(barmode="stack", xaxis_title="GPU", yaxis_title="GiB",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0})
    return _layout(fig)


def memory_bar(parts: dict[str, float], capacity: float, fits: bool, label: str) -> go.Figure:
    """One GPU's GiB as a horizontal stacked bar against its capacity."""
    fig = go.Figure()
    for name, value in parts.items():
        if value > 0:
            fig.add_trace(go.Bar(x=[value], y=[label], name=name, orientation="h",
                                 marker_color=MEMORY_COLOURS.get(name),
                                 hovertemplate="%{x:.2f} GiB<extra>" + name + "</extra>"))
    fig.add_vline(x=capacity, line_color="#2CA02C" if fits else "#D62728", line_width=3, line_dash="dash",
                  annotation_text=f"capacity {capacity:.0f} GiB", annotation_position="top")
    fig.update_layout(barmode="stack", xaxis_title="GiB", legend={"orientation": "h", "yanchor": "bottom", "y": 1.1,
                                                                  "x": 0, "traceorder": "normal"})
    return _layout(fig, height=260)


def popularity(load_share: np.ndarray, layer_ids: Sequence[int], sort: bool) -> go.Figure:
    """Expert popularity per layer: each expert's share of its layer's token-choices × experts
    (1 = uniform), on a log colour scale; ``sort`` orders every layer's experts from hottest to
    coldest."""
    e = load_share.shape[1]
    rel = load_share * e
    z = -np.sort(-rel, axis=1) if sort else rel
    ticks = [t for t in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16, 32) if z[z > 0].min() / 2 <= t <= z.max() * 2]
    fig = go.Figure(go.Heatmap(
        z=np.log2(np.maximum(z, 1 / 64)), x=np.arange(e), y=list(layer_ids), customdata=z, colorscale="Viridis",
        colorbar={"title": {"text": "× uniform", "side": "right"}, "tickvals": np.log2(ticks).tolist(),
                  "ticktext": [f"{t:g}" for t in ticks]},
        hovertemplate=("rank %{x}" if sort else "expert %{x}") + ", layer %{y}: %{customdata:.2f}× uniform"
                      "<extra></extra>"))
    fig.update_layout(xaxis_title="experts, hottest first" if sort else "expert id", yaxis_title="decoder layer (MoE)",
                      yaxis={"autorange": "reversed"})
    return _layout(fig, height=max(HEIGHT, 7 * len(layer_ids) + 100))


def affinity(matrix: np.ndarray, src: int, dst: int, lift: bool) -> go.Figure:
    """Where the tokens of each expert at layer ``src`` go at layer ``dst``: P(next | expert), or its
    lift over the next layer's popularity (P(next | expert) ÷ P(next); 1 = no affinity), on a log
    colour scale."""
    if lift:
        ticks = [t for t in (1 / 4, 1 / 2, 1, 2, 4, 8, 16, 32, 64) if t <= max(float(matrix.max()), 1.0) * 2]
        z = np.log2(np.maximum(matrix, 1 / 8))
        colorbar = {"title": {"text": "lift over popularity", "side": "right"}, "tickvals": np.log2(ticks).tolist(),
                    "ticktext": [f"{t:g}" for t in ticks]}
        hover = "%{customdata:.2f}× its popularity"
    else:
        z, colorbar, hover = matrix, {"title": {"text": "P(next | expert)", "side": "right"}}, "P = %{customdata:.3f}"
    fig = go.Figure(go.Heatmap(
        z=z, customdata=matrix, colorscale="Magma_r", colorbar=colorbar,
        hovertemplate=f"layer {src} expert %{{y}} → layer {dst} expert %{{x}}: {hover}<extra></extra>"))
    fig.update_layout(xaxis_title=f"expert at decoder layer {dst}", yaxis_title=f"expert at decoder layer {src}",
                      yaxis={"autorange": "reversed"})
    return _layout(fig, height=620)


def consistency_curve(segments: Sequence[int], srp: Sequence[float], sch: Sequence[float]) -> go.Figure:
    """SRP and SCH against the segment length."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=list(segments), y=list(srp), mode="lines+markers", name="SRP (best F1)"))
    fig.add_trace(go.Scatter(x=list(segments), y=list(sch), mode="lines+markers", name="SCH (oracle cache hit rate)"))
    fig.update_layout(xaxis={"title": "segment (tokens)", "type": "log", "tickvals": list(segments)},
                      yaxis={"title": "", "range": [0, 1]},
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0})
    return _layout(fig, height=320)


def step_breakdown(parts: dict[str, float], unit: str) -> go.Figure:
    """Horizontal bars of a predicted step's parts (ms)."""
    items = sorted(((k, v) for k, v in parts.items() if v > 0), key=lambda kv: kv[1])
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h", marker_color="#4C78A8",
                           hovertemplate="%{y}: %{x:.3f} ms<extra></extra>"))
    fig.update_layout(xaxis_title=unit)
    return _layout(fig, height=120 + 28 * len(items))


def cache_throughput(curve: Sequence[float], expert_gib: float, planned: int, knee: int) -> go.Figure:
    """Predicted tokens/s against the GiB of expert cache (total slots × one expert), with the plan
    and the knee (where more cache stops paying) marked."""
    y = np.asarray(curve)
    x = np.arange(y.size) * expert_gib
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines", name="best allocation", line={"color": "#4C78A8"},
                               customdata=np.arange(y.size),
                               hovertemplate="%{x:.1f} GiB (%{customdata} experts): %{y:.2f} tokens/s<extra></extra>"))
    for slots, name, colour in ((planned, "plan", "#E45756"), (knee, "knee", "#54A24B")):
        fig.add_trace(go.Scatter(x=[x[slots]], y=[y[slots]], mode="markers+text", name=name, text=[name],
                                 textposition="top center", marker={"size": 11, "color": colour},
                                 hovertemplate=f"{name}: %{{x:.1f}} GiB, %{{y:.2f}} tokens/s<extra></extra>"))
    fig.update_layout(xaxis_title="expert cache on the GPU (GiB)", yaxis_title="predicted tokens/s", showlegend=False)
    return _layout(fig, height=360)


def cache_layer(rows: list[dict[str, Any]], expert_gib: float) -> go.Figure:
    """One layer: hit rate and predicted tokens/s (every other layer at its planned size) against
    its cache size; the planned size marked; memory freed in the hover."""
    sizes = [r["size"] for r in rows]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=sizes, y=[r["hit_rate"] for r in rows], name="hit rate", mode="lines",
                             customdata=[r["memory_freed_bytes"] / 2**30 for r in rows],
                             hovertemplate="%{x} experts: hit rate %{y:.3f}, %{customdata:.2f} GiB freed"
                                           "<extra></extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(x=sizes, y=[r["tokens_per_s"] for r in rows], name="tokens/s", mode="lines",
                             line={"dash": "dot"}, hovertemplate="%{x} experts: %{y:.2f} tokens/s<extra></extra>"),
                  secondary_y=True)
    planned = next(r["size"] for r in rows if r["planned"])
    fig.add_vline(x=planned, line_color="#E45756", line_dash="dash", annotation_text=f"planned {planned}",
                  annotation_position="top")
    fig.update_layout(xaxis_title=f"experts cached in this layer (one = {expert_gib * 1024:.0f} MiB)",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0})
    fig.update_yaxes(title_text="hit rate", range=[0, 1], secondary_y=False)
    fig.update_yaxes(title_text="predicted tokens/s", tickformat=".1f", secondary_y=True)
    return _layout(fig, height=380)


def cache_sizes(sizes: Sequence[int], layer_ids: Sequence[int], experts: int) -> go.Figure:
    """Planned cache size of every MoE layer."""
    fig = go.Figure(go.Bar(x=[str(i) for i in layer_ids], y=list(sizes), marker_color="#4C78A8",
                           hovertemplate="layer %{x}: %{y} experts cached<extra></extra>"))
    fig.update_layout(xaxis_title="decoder layer (MoE)", yaxis={"title": "experts cached", "range": [0, experts]})
    return _layout(fig, height=300)


def autoscale(frame: pd.DataFrame, slo: float) -> go.Figure:
    """Demand and SLO capacity, GPUs, and time per output token over time, one colour per strategy."""
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("Demand and SLO capacity (tokens/s)", "GPUs", "Time per output token (ms)"))
    colours = {"elastic": "#4C78A8", "restart": "#F58518", "replica": "#54A24B", "static": "#B279A2"}
    first = frame[frame["strategy"] == frame["strategy"].iloc[0]]
    minutes = first["time_s"] / 60
    fig.add_trace(go.Scatter(x=minutes, y=first["demand_tokens_per_s"], name="demand", line={"color": "#333"},
                             hovertemplate="%{x:.0f} min: %{y:,.0f} tokens/s<extra>demand</extra>"), row=1, col=1)
    for strategy, run in frame.groupby("strategy", sort=False):
        colour = colours.get(strategy)
        t = run["time_s"] / 60
        fig.add_trace(go.Scatter(x=t, y=run["slo_capacity_tokens_per_s"], name=strategy, legendgroup=strategy,
                                 line={"color": colour, "width": 1.5},
                                 hovertemplate="%{x:.0f} min: %{y:,.0f} tokens/s<extra>" + strategy + "</extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=t, y=run["devices"], name=strategy, legendgroup=strategy, showlegend=False,
                                 line={"color": colour, "shape": "hv"},
                                 hovertemplate="%{x:.0f} min: %{y:.1f} GPUs<extra>" + strategy + "</extra>"),
                      row=2, col=1)
        tpot = np.where(np.isfinite(run["tpot_s"]), run["tpot_s"] * 1e3, np.nan)
        fig.add_trace(go.Scatter(x=t, y=tpot, name=strategy, legendgroup=strategy, showlegend=False,
                                 line={"color": colour}, connectgaps=False,
                                 hovertemplate="%{x:.0f} min: %{y:.2f} ms<extra>" + strategy + "</extra>"),
                      row=3, col=1)
    fig.add_hline(y=slo * 1e3, line_dash="dash", line_color="#D62728", annotation_text="SLO", row=3, col=1)
    fig.update_xaxes(title_text="minutes", row=3, col=1)
    fig.update_layout(legend={"orientation": "h", "yanchor": "bottom", "y": 1.04, "x": 0})
    return _layout(fig, height=760)
