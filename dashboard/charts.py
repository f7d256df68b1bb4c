"""Plotly figures of the dashboard. Pure presentation: each takes arrays the library computed and
returns a figure; no figure computes a number the library does not."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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
                  annotation_text=f"capacity {capacity:.1f} GiB", annotation_position="top left")
    fig.update_layout(barmode="stack", xaxis_title="GPU", yaxis_title="GiB",
                      legend={"orientation": "h", "y": 1.12, "x": 0})
    return _layout(fig)


def popularity(load_share: np.ndarray, layer_ids: Sequence[int], sort: bool) -> go.Figure:
    """Expert popularity per layer: each expert's share of its layer's token-choices × experts
    (1 = uniform); ``sort`` orders every layer's experts from hottest to coldest."""
    e = load_share.shape[1]
    rel = load_share * e
    z = -np.sort(-rel, axis=1) if sort else rel
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(e), y=list(layer_ids), colorscale="Viridis", zmin=0,
        colorbar={"title": {"text": "share × experts", "side": "right"}},
        hovertemplate=("rank %{x}" if sort else "expert %{x}") + ", layer %{y}: %{z:.2f}× uniform<extra></extra>"))
    fig.update_layout(xaxis_title="experts, hottest first" if sort else "expert id", yaxis_title="decoder layer (MoE)",
                      yaxis={"autorange": "reversed"})
    return _layout(fig, height=max(HEIGHT, 7 * len(layer_ids) + 100))


def affinity(prob: np.ndarray, src: int, dst: int) -> go.Figure:
    """P(expert j at layer ``dst`` | expert i at layer ``src``)."""
    fig = go.Figure(go.Heatmap(
        z=prob, colorscale="Magma_r", zmin=0, colorbar={"title": {"text": "P(next | expert)", "side": "right"}},
        hovertemplate=f"layer {src} expert %{{y}} → layer {dst} expert %{{x}}: %{{z:.3f}}<extra></extra>"))
    fig.update_layout(xaxis_title=f"expert at layer {dst}", yaxis_title=f"expert at layer {src}",
                      yaxis={"autorange": "reversed", "scaleanchor": "x"})
    return _layout(fig, height=560)


def consistency_curve(segments: Sequence[int], srp: Sequence[float], sch: Sequence[float]) -> go.Figure:
    """SRP and SCH against the segment length."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=list(segments), y=list(srp), mode="lines+markers", name="SRP (best F1)"))
    fig.add_trace(go.Scatter(x=list(segments), y=list(sch), mode="lines+markers", name="SCH (oracle cache hit rate)"))
    fig.update_layout(xaxis={"title": "segment (tokens)", "type": "log"}, yaxis={"title": "", "range": [0, 1]},
                      legend={"orientation": "h", "y": 1.15, "x": 0})
    return _layout(fig, height=320)


def step_breakdown(parts: dict[str, float], unit: str) -> go.Figure:
    """Horizontal bars of a predicted step's parts (ms)."""
    items = sorted(((k, v) for k, v in parts.items() if v > 0), key=lambda kv: kv[1])
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h", marker_color="#4C78A8",
                           hovertemplate="%{y}: %{x:.3f} ms<extra></extra>"))
    fig.update_layout(xaxis_title=unit)
    return _layout(fig, height=120 + 28 * len(items))
