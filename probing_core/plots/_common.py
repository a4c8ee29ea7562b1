"""Helpers shared by every chart: hook names for people, legend placement, log-axis markers.

Every chart with hooks (or layers) on an axis names them with :func:`hook_label`
("layer 5 · resid post"), never ``blocks.5.hook_resid_post``.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

__all__ = ["hook_label", "hook_labels", "legend_below", "legend_above", "log_range", "vline_trace", "percent_range",
           "fixed_format"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LENS = re.compile(r"^(\d+|final)_(.+)$")  # TransformerLens's accumulated_resid / decompose_resid labels
_WORDS = {
    "hook_resid_pre": "resid pre", "hook_resid_mid": "resid mid", "hook_resid_post": "resid post",
    "hook_attn_out": "attn out", "hook_mlp_out": "mlp out", "mlp.hook_post": "MLP neurons", "mlp.hook_pre": "MLP pre",
    "attn.hook_pattern": "attn pattern", "attn.hook_z": "attn z", "attn.hook_result": "attn heads",
    "pre": "resid pre", "mid": "resid mid", "post": "resid post", "attn_out": "attn out", "mlp_out": "mlp out",
}
_TOP = {"hook_embed": "embedding", "embed": "embedding", "hook_pos_embed": "position embedding",
        "pos_embed": "position embedding", "ln_final.hook_normalized": "final LayerNorm", "final_post": "final layer"}


def hook_label(hook: str) -> str:
    """A hook (or a TransformerLens accumulated/decomposed label) named for people.

    ``blocks.5.hook_resid_post`` → ``layer 5 · resid post``; ``blocks.3.mlp.hook_post`` →
    ``layer 3 · MLP neurons``; ``hook_embed`` → ``embedding``; ``5_attn_out`` → ``layer 5 · attn out``;
    ``final_post`` → ``final layer``. Unknown names come back unchanged.
    """
    h = str(hook)
    if h in _TOP:
        return _TOP[h]
    m = _BLOCK.match(h) or _LENS.match(h)
    if m:
        layer, rest = m.groups()
        what = _WORDS.get(rest, rest.removeprefix("hook_").replace("hook_", "").replace("_", " "))
        return f"{'final layer' if layer == 'final' else 'layer ' + layer} · {what}"
    return h.removeprefix("hook_").replace("_", " ") if h.startswith("hook_") else h


def hook_labels(hooks: Sequence[str]) -> list[str]:
    """:func:`hook_label` of each hook (categorical axes need distinct names; hook names are distinct)."""
    return [hook_label(h) for h in hooks]


def legend_below(fig: go.Figure, *, tick_px: int = 0, rows: int = 1) -> go.Figure:
    """Put the legend in its own band under the x-axis tick labels (never over the plot, the ticks or the title).

    Args:
        tick_px: room the x tick labels take below the axis (e.g. ~7 px per character when rotated).
        rows: legend rows to make room for.
    """
    bottom = 50 + tick_px + 24 * rows
    fig.update_layout(
        legend=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0, xanchor="left"),
        margin=dict(b=bottom, t=max(60, (fig.layout.margin.t or 0))),
    )
    return fig


def legend_above(fig: go.Figure, *, rows: int = 1) -> go.Figure:
    """Legend in a band between the title and the plot area (the title sits higher; the margin makes room)."""
    top = 60 + 24 * rows
    fig.update_layout(
        legend=dict(orientation="h", yref="paper", y=1.0, yanchor="bottom", x=0, xanchor="left"),
        margin=dict(t=top), title=dict(yref="container", y=1.0, yanchor="top", pad=dict(t=12)),
    )
    return fig


def log_range(values: np.ndarray, pad: float = 0.05) -> list[float]:
    """A log axis range, in log10 units as plotly wants, spanning the positive values' decades."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return [0.0, 1.0]
    lo, hi = math.log10(v.min()), math.log10(v.max())
    span = max(hi - lo, 1e-9)
    return [lo - pad * span, hi + pad * span]


def percent_range(values_pct: np.ndarray, *, floor: float = 50.0) -> list[float]:
    """An accuracy axis in %: ends just above 100, starts at a round 10 below the data (never above ``floor``, never below 0)."""
    v = np.asarray(values_pct, dtype=float)
    v = v[np.isfinite(v)]
    lo = float(v.min()) if v.size else 0.0
    start = max(0.0, min(floor, 10.0 * math.floor(lo / 10.0)))
    return [start, 101.0]  # 1 point of headroom: markers at 100 % are not cut in half


def fixed_format(values: np.ndarray, *, at_least: int = 2, at_most: int = 6) -> str:
    """A d3 tick format with enough decimals to tell the ticks apart over the data's span.

    ``.2f`` on R² values 0.003…0.004 printed "0.01, 0.01": the decimals follow the span here.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    span = float(v.max() - v.min()) if v.size > 1 else 0.0
    need = at_least if span <= 0 else math.ceil(-math.log10(span)) + 1
    return f".{min(at_most, max(at_least, need))}f"


def vline_trace(x: float, y_range: Sequence[float], *, name: str, text: str, color: str = "black",
                dash: str = "dot", showlegend: bool = True, **kw) -> go.Scatter:
    """A vertical marker drawn as a trace, so line and label share data units on any axis type.

    (``add_vline(annotation_text=...)`` on a log axis puts the line at the value but its annotation at
    10^value — plotly.js 4 reads shapes in data units and annotations in log10 units — which stretched
    the axis to 10^162 for α = 162 and left the label far from its line.)
    """
    y0, y1 = float(y_range[0]), float(y_range[1])
    return go.Scatter(x=[x, x], y=[y0, y1], mode="lines+text", text=["", text], textposition="top right",
                      line=dict(color=color, dash=dash, width=1.5), name=name, showlegend=showlegend,
                      hoverinfo="skip", cliponaxis=False, **kw)
