"""Plotly drawing of a tree-search sample: the tree by depth, the goal, the true and predicted paths."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from probing_core.tree.task import TreeSample

_TRUE = "#2ca02c"
_PRED_OK = "#1f77b4"
_PRED_BAD = "#d62728"
#: node kind → (fill, label colour); dark fills get white labels (contrast ≥ 4.5 : 1)
_NODE_KINDS = {
    "root": ("#5b2a86", "#ffffff"),
    "goal": ("#b34700", "#ffffff"),
    "on the path": ("#98df8a", "#000000"),
    "other node": ("#ffffff", "#000000"),
}


def tree_layout(sample: TreeSample) -> dict[int, tuple[float, float]]:
    """Node → (x, y): y = -depth, x = in-order leaf slot so subtrees never overlap.

    Children are placed in ascending label order, so the drawing does not depend on the
    (shuffled) order of the edges in the prompt.
    """
    children = {p: sorted(cs) for p, cs in sample.children().items()}
    pos: dict[int, tuple[float, float]] = {}
    next_x = [0.0]

    def place(node: int, depth: int) -> float:
        kids = children.get(node, [])
        if not kids:
            x = next_x[0]
            next_x[0] += 1.0
        else:
            xs = [place(k, depth + 1) for k in kids]
            x = sum(xs) / len(xs)
        pos[node] = (x, -float(depth))
        return x

    place(sample.root, 0)
    return pos


def _path_edges(path: Sequence[int]) -> list[tuple[int, int]]:
    return list(zip(path[:-1], path[1:]))


def plot_tree(sample: TreeSample, predicted_path: Sequence[int] | None = None, title: str | None = None) -> go.Figure:
    """Draw the tree top-down (root on top), highlight the goal, the true path and a prediction.

    Args:
        sample: the task instance.
        predicted_path: nodes from the root (root included, as :func:`tree_model.predict_path`
            returns); ``-1`` entries (a non-node token) and edges not in the tree are drawn as
            dashed red jumps.
        title: figure title (default: goal, depth and whether the prediction is right).

    Returns:
        A plotly Figure.
    """
    pos = tree_layout(sample)
    fig = go.Figure()

    ex, ey = [], []
    for p, c in sample.edges:
        ex += [pos[p][0], pos[c][0], None]
        ey += [pos[p][1], pos[c][1], None]
    fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line=dict(color="#bbbbbb", width=1.5),
                             hoverinfo="skip", name="edges"))

    tx, ty = [], []
    for a, b in _path_edges(sample.path):
        tx += [pos[a][0], pos[b][0], None]
        ty += [pos[a][1], pos[b][1], None]
    fig.add_trace(go.Scatter(x=tx, y=ty, mode="lines", line=dict(color=_TRUE, width=7),
                             opacity=0.45, name="true path"))

    correct = None
    if predicted_path is not None:
        pred = [int(v) for v in predicted_path]
        correct = pred == list(sample.path)
        edge_set = set(sample.edges)
        px, py, bx, by = [], [], [], []
        for a, b in _path_edges(pred):
            if a in pos and b in pos and (a, b) in edge_set:
                px += [pos[a][0], pos[b][0], None]
                py += [pos[a][1], pos[b][1], None]
            elif a in pos and b in pos:
                bx += [pos[a][0], pos[b][0], None]
                by += [pos[a][1], pos[b][1], None]
        color = _PRED_OK if correct else _PRED_BAD
        fig.add_trace(go.Scatter(x=px, y=py, mode="lines", line=dict(color=color, width=2.5, dash="dot"),
                                 name="predicted path"))
        if bx:
            fig.add_trace(go.Scatter(x=bx, y=by, mode="lines", line=dict(color=_PRED_BAD, width=2, dash="dash"),
                                     name="predicted jump (not an edge)"))

    nodes = sorted(pos)
    depth_of = {v: int(-pos[v][1]) for v in nodes}
    on_path = set(sample.path)
    groups = {kind: [] for kind in _NODE_KINDS}
    for v in nodes:
        kind = "goal" if v == sample.goal else "root" if v == sample.root else "on the path" if v in on_path else "other node"
        groups[kind].append(v)
    for kind, members in groups.items():
        if not members:
            continue
        fill, ink = _NODE_KINDS[kind]
        fig.add_trace(go.Scatter(
            x=[pos[v][0] for v in members], y=[pos[v][1] for v in members], mode="markers+text",
            text=[str(v) for v in members], textposition="middle center",
            textfont=dict(color=ink, size=13, family="Arial Black, Arial, sans-serif"),
            marker=dict(size=30, color=fill, line=dict(color="#333333", width=1.5)),
            hovertext=[f"node {v}, depth {depth_of[v]} ({kind})" for v in members],
            hoverinfo="text", name=kind, showlegend=True,
        ))

    if title is None:
        title = f"goal {sample.goal} at depth {sample.depth}"
        if correct is not None:
            title += " — prediction " + ("correct" if correct else "wrong")
    fig.update_layout(
        title=title, showlegend=True, plot_bgcolor="white",
        xaxis=dict(visible=False), yaxis=dict(visible=False, scaleanchor=None),
        legend=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0, xanchor="left"),
        margin=dict(l=10, r=10, t=50, b=80),
        height=170 + 70 * (max(depth_of.values()) + 1),
    )
    return fig


def accuracy_by_depth(depths: Sequence[int], accuracy: Sequence[float], counts: Sequence[int], *,
                      title: str = "Exact-path accuracy by path length") -> go.Figure:
    """Bars of exact-path accuracy (%) per depth, the number of puzzles on each bar.

    Args:
        depths, accuracy, counts: per depth (as :meth:`TreeEvalResult.depth_rows` lists them); accuracy in 0…1.
    """
    acc = 100 * np.asarray(accuracy, dtype=float)
    n = np.asarray(counts, dtype=int)
    fig = go.Figure(go.Bar(
        x=[int(d) for d in depths], y=acc, marker_color=_PRED_OK, name="whole path right",
        text=[f"n={c}" for c in n], textposition="inside", insidetextanchor="start",
        hovertemplate="depth %{x}: %{y:.1f} % (%{text})<extra></extra>",
    ))
    fig.update_layout(title=title, height=340, showlegend=False, margin=dict(l=10, r=10, t=50, b=10))
    fig.update_xaxes(title="path length (depth)", tickformat="d", dtick=1)
    fig.update_yaxes(title="puzzles solved (%)", range=[0, 100], tickformat=".0f", dtick=20)
    return fig
