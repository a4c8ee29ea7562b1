"""Figures for attention patterns and head scores (inputs: results of :mod:`probing_core.analyses.attention`)."""
from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probing_core.analyses.attention import HeadScores

_TITLES = {
    "entropy": "entropy (nats)",
    "prev_token": "previous-token score",
    "first_token": "attention to first token",
}


def _show(tok: str) -> str:
    return html.escape(tok.replace("\n", "\\n").replace(" ", "·"))


def head_score_heatmap(scores: HeadScores, metric: str = "prev_token") -> go.Figure:
    """One layer × head heatmap of a head score ("entropy", "prev_token", "first_token", "selected")."""
    if metric == "selected":
        if scores.selected is None:
            raise ValueError("no token was selected for this HeadScores")
        z = scores.selected
        sel = scores.selected_token or 0
        title = f"attention to position {sel} ({_show(scores.tokens[sel])})"
    else:
        z = getattr(scores, metric)
        title = _TITLES[metric]
    L, H = z.shape
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"H{h}" for h in range(H)], y=[f"L{li}" for li in range(L)],
        colorscale="Viridis", zmin=0, zmax=None if metric == "entropy" else 1,
        hovertemplate="%{y}%{x}: %{z:.3f}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
                      height=max(300, 18 * L + 150))
    return fig


def head_scores_grid(scores: HeadScores) -> go.Figure:
    """All head scores side by side (layer × head each)."""
    metrics = ["entropy", "prev_token", "first_token"] + (["selected"] if scores.selected is not None else [])
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[
        _TITLES.get(m, f"attention to position {scores.selected_token}") for m in metrics], horizontal_spacing=0.06)
    for i, m in enumerate(metrics, start=1):
        z = scores.selected if m == "selected" else getattr(scores, m)
        L, H = z.shape
        fig.add_trace(go.Heatmap(
            z=z, x=[f"H{h}" for h in range(H)], y=[f"L{li}" for li in range(L)], colorscale="Viridis",
            showscale=False, hovertemplate=f"{m} %{{y}}%{{x}}: %{{z:.3f}}<extra></extra>",
        ), row=1, col=i)
        fig.update_yaxes(autorange="reversed", row=1, col=i)
    fig.update_layout(title="Head scores", height=max(300, 18 * scores.entropy.shape[0] + 150))
    return fig


def head_pattern_heatmap(tokens: list[str], pattern: np.ndarray, *, title: str = "Attention pattern") -> go.Figure:
    """One head's [query, key] pattern with token labels (query rows, key columns)."""
    labels = [f"{i}: {_show(t)}" for i, t in enumerate(tokens)]
    pat = np.asarray(pattern, dtype=float)
    T = pat.shape[0]
    masked = np.where(np.triu(np.ones((T, T), bool), k=1) & (pat == 0), np.nan, pat)
    fig = go.Figure(go.Heatmap(
        z=masked, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1,
        hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>", colorbar_title="weight",
    ))
    fig.update_layout(title=title, xaxis_title="key (attended to)", yaxis_title="query (attending)",
                      yaxis_autorange="reversed", height=max(400, 16 * T + 200))
    fig.update_xaxes(tickangle=-45)
    return fig
