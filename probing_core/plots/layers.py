"""Figures for layer probes (probing_core.analyses.layer_probes): accuracy heatmap and accuracy-vs-layer lines."""
from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from probing_core.analyses.layer_probes import LayerAccuracyResult
from probing_core.plots._common import hook_label, hook_labels, legend_below

__all__ = ["accuracy_heatmap", "accuracy_lines", "accuracy_tables", "short_hook"]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def short_hook(hook: str) -> str:
    """The hook named for people (kept for callers of the old name): see :func:`hook_label`."""
    return hook_label(hook)


def accuracy_tables(result: LayerAccuracyResult, *, research: bool = True) -> tuple[Any, Any]:
    """The accuracy table for people, and its 95 % intervals apart (many interval columns ran off the right edge).

    Returns:
        ``(table, intervals)``: pandas DataFrames with a "layer" column named for people first (the raw
        ``hook`` column only when ``research``); ``intervals`` is None when the result has none.
    """
    import pandas as pd

    shown = pd.DataFrame(result.table())
    shown.insert(0, "layer", [hook_label(h) for h in result.hooks])
    if not research:
        shown = shown.drop(columns="hook")
    ci_cols = [c for c in shown.columns if c.endswith("95% CI")]
    return shown.drop(columns=ci_cols), shown[["layer", *ci_cols]] if ci_cols else None


def accuracy_heatmap(result: LayerAccuracyResult, *, title: str | None = None) -> go.Figure:
    """Hooks (rows, model order top-down) × columns, test accuracy in each cell; chance in the column titles.

    Returns:
        A plotly Figure.
    """
    z = np.asarray(result.test_accuracy, dtype=float)
    x = [f"{c}<br><sub>chance {ch:.2f}</sub>" for c, ch in zip(result.columns, result.chance)]
    y = hook_labels(result.hooks)
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=y, zmin=0.0, zmax=1.0, colorscale="Viridis", colorbar=dict(title="test acc.", tickformat=".1f"),
        text=np.vectorize(lambda v: f"{v:.3f}")(z), texttemplate="%{text}", hovertemplate="%{y} · %{x}<br>accuracy %{z:.4f}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", title="hook")
    fig.update_layout(title=title or f"Probe test accuracy — {result.label}", height=max(300, 60 + 28 * len(y)),
                      margin=dict(l=10, r=10, t=60, b=10))
    return fig


def accuracy_lines(result: LayerAccuracyResult, *, title: str | None = None, show_train: bool = False) -> go.Figure:
    """Test accuracy per hook for every column, with each column's chance level (dotted) and the
    control-task accuracy (dashed grey) of the control column.

    Returns:
        A plotly Figure.
    """
    x = hook_labels(result.hooks)
    fig = go.Figure()
    for j, col in enumerate(result.columns):
        color = _PALETTE[j % len(_PALETTE)]
        ci = getattr(result, "test_accuracy_ci", None)
        if ci is not None and ci.shape[:2] == result.test_accuracy.shape:  # 95 % Wilson band over n_test rows
            fig.add_scatter(x=list(x) + list(x)[::-1], y=np.concatenate([ci[:, j, 1], ci[::-1, j, 0]]), fill="toself",
                            fillcolor=color, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                            name=f"{col} 95 % CI (n={int(result.n_test[j])})", showlegend=len(result.columns) <= 3)
        fig.add_scatter(x=x, y=result.test_accuracy[:, j], name=col, mode="lines+markers", line=dict(color=color))
        if show_train:
            fig.add_scatter(x=x, y=result.train_accuracy[:, j], name=f"{col} (train)", mode="lines",
                            line=dict(color=color, dash="dot", width=1))
        fig.add_scatter(x=x, y=np.full(len(x), result.chance[j]), name=f"chance ({col})", mode="lines",
                        line=dict(color=color, dash="dot", width=1), opacity=0.6, showlegend=len(result.columns) <= 3)
    if result.control_column is not None and np.isfinite(result.control_accuracy).any():
        fig.add_scatter(x=x, y=result.control_accuracy, name=f"control task ({result.control_column})", mode="lines+markers",
                        line=dict(color="#7f7f7f", dash="dash"))
    fig.update_layout(title=title or "Probe accuracy across layers", xaxis_title="hook", yaxis_title="test accuracy",
                      yaxis_range=[0, 1.02], margin=dict(l=10, r=10, t=50), height=480)
    fig.update_yaxes(tickformat=".1f", dtick=0.1)
    fig.update_xaxes(type="category", tickangle=-60 if len(x) > 6 else 0)
    n_legend = len(fig.data) - sum(1 for t in fig.data if t.showlegend is False)
    return legend_below(fig, tick_px=6 * max((len(v) for v in x), default=4) if len(x) > 6 else 20,
                        rows=1 + n_legend // 4)
