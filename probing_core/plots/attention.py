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


def _zmax(metric: str, z: np.ndarray) -> float:
    """Scores are shares of attention (0…1); entropy runs from 0 to its largest value (nats)."""
    if metric != "entropy":
        return 1.0
    m = float(np.nanmax(z)) if np.isfinite(z).any() else 1.0
    return m if m > 0 else 1.0


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
        z=z, x=list(range(H)), y=list(range(L)),
        colorscale="Viridis", zmin=0, zmax=_zmax(metric, z),
        colorbar=dict(title="nats" if metric == "entropy" else "share", tickformat=".2f"),
        hovertemplate="layer %{y} · head %{x}: %{z:.3f}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", height=max(300, 18 * L + 150))
    fig.update_xaxes(tickformat="d", dtick=1)
    fig.update_yaxes(autorange="reversed", tickformat="d", dtick=1 if L <= 16 else 2)
    return fig


def head_scores_grid(scores: HeadScores) -> go.Figure:
    """All head scores side by side (layer × head each), each with its own colour bar under its panel."""
    metrics = ["entropy", "prev_token", "first_token"] + (["selected"] if scores.selected is not None else [])
    n = len(metrics)
    gap = 0.06
    fig = make_subplots(rows=1, cols=n, subplot_titles=[
        _TITLES.get(m, f"attention to position {scores.selected_token}") for m in metrics], horizontal_spacing=gap)
    width = (1 - gap * (n - 1)) / n
    height = max(360, 18 * scores.entropy.shape[0] + 230)
    below = -62 / (height - 80 - 130)  # colour bars ~62 px under the panels: clear of the "head" axis titles
    for i, m in enumerate(metrics, start=1):
        z = scores.selected if m == "selected" else getattr(scores, m)
        L, H = z.shape
        centre = (i - 1) * (width + gap) + width / 2
        fig.add_trace(go.Heatmap(
            z=z, x=list(range(H)), y=list(range(L)), colorscale="Viridis", zmin=0, zmax=_zmax(m, z),
            showscale=True, colorbar=dict(orientation="h", x=centre, xanchor="center", len=width, lenmode="fraction",
                                          y=below, yanchor="top", thickness=12, tickformat=".1f",
                                          title=dict(text="nats" if m == "entropy" else "share", side="right")),
            hovertemplate=f"{m} · layer %{{y}} · head %{{x}}: %{{z:.3f}}<extra></extra>",
        ), row=1, col=i)
        fig.update_yaxes(autorange="reversed", tickformat="d", dtick=1 if L <= 16 else 2, row=1, col=i)
        fig.update_xaxes(tickformat="d", dtick=1 if H <= 12 else 2, title_text="head", row=1, col=i)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title="Head scores", height=height, margin=dict(t=80, b=130))
    return fig


def circuitsvis_frame_height(n_heads: int) -> int:
    """Pixel height of an iframe that shows a whole CircuitsVis ``attention_heads`` view.

    Measured in headless Chromium (``test_circuitsvis_frame_fits`` re-measures it): the enlarged
    pattern is a square at most ~900 px wide whatever the token count, and the head thumbnails wrap
    to rows of about six (125 px a row) in a narrow frame. 9 heads × 64 tokens took 1,198 px in a
    1,240 px frame and 1,073 px in a 768 px one; the old fixed 720 px cut the pattern after ~8 tokens.
    """
    return 1000 + 125 * max(1, -(-int(n_heads) // 6))


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
