"""Figures for sparse (L1 / elastic-net) logistic probes. Compute lives in ``probing_core.solvers.logistic_path``.

Every function takes result arrays and returns a ``plotly.graph_objects.Figure``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probing_core.plots._common import (
    hook_labels,
    legend_below,
    log_range,
    percent_range,
)
from probing_core.solvers.logistic_path import LogisticPathResult

_NZ = "#2a9d8f"
_ZERO = "#e63946"
_CLASS_COLORS = ["#e76f51", "#2a9d8f", "#264653", "#e9c46a", "#8ab17d", "#9b5de5", "#f15bb5", "#00bbf9"]


def _row(path: LogisticPathResult, k: int) -> np.ndarray:
    """Coefficient per feature at path point k: the class row for binary, max |coef| otherwise."""
    W = path.coefs[k]
    if W.shape[0] == 1:
        return W[0]
    return W[np.abs(W).argmax(axis=0), np.arange(W.shape[1])]


def coefficients(path: LogisticPathResult, k: int, *, feature_name: str = "MLP neuron") -> go.Figure:
    """Coefficient of every feature at path point k; non-zero as dots, exact zeros as crosses at 0."""
    w = _row(path, k)
    nz = np.flatnonzero(w)
    z = np.flatnonzero(w == 0)
    d = w.size
    fig = go.Figure()
    fig.add_trace(go.Scattergl(x=z, y=np.zeros(z.size), mode="markers", name=f"exact zero ({z.size})",
                               marker=dict(symbol="x", size=4, color=_ZERO, opacity=0.35)))
    fig.add_trace(go.Scattergl(x=nz, y=w[nz], mode="markers", name=f"non-zero ({nz.size})",
                               marker=dict(size=7, color=_NZ, line=dict(width=1, color="black"))))
    fig.update_layout(
        title=f"C = {path.Cs[k]:.4g}: {nz.size}/{d} coefficients non-zero ({100 * nz.size / d:.2f} % dense)",
        xaxis_title=feature_name, yaxis_title="coefficient (standardized units)", height=360,
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"), margin=dict(t=90),
    )
    fig.update_xaxes(tickformat="d")
    fig.update_yaxes(tickformat=".2f")
    return fig


def nonzero_histogram(path: LogisticPathResult, k: int, *, bins: int = 30) -> go.Figure:
    """Distribution of the non-zero coefficients at path point k (zeros left out)."""
    w = _row(path, k)
    fig = go.Figure(go.Histogram(x=w[w != 0], nbinsx=bins, marker=dict(color="#8d99ae", line=dict(width=1, color="black"))))
    fig.update_layout(title="Distribution of non-zero coefficients", xaxis_title="coefficient", yaxis_title="count",
                      height=360, bargap=0.02)
    fig.update_xaxes(tickformat=".2f")
    fig.update_yaxes(tickformat="d")
    return fig


def activation_strips(
    X: np.ndarray,
    y: np.ndarray,
    neurons: Sequence[int],
    *,
    class_names: Sequence[str] | None = None,
    max_points: int = 400,
    seed: int = 0,
) -> go.Figure:
    """Per-neuron activation strips by class (jittered points), one column per surviving neuron.

    Args:
        X: ``(n, d)`` raw activations; y: ``(n,)`` labels; neurons: feature indices to show.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    names = list(class_names) if class_names is not None else [str(c) for c in classes]
    fig = go.Figure()
    width = 0.7 / max(1, classes.size)
    for ci, c in enumerate(classes):
        xs, ys = [], []
        rows = np.flatnonzero(y == c)
        if rows.size > max_points:
            rows = rng.choice(rows, max_points, replace=False)
        for j, nid in enumerate(neurons):
            off = (ci - (classes.size - 1) / 2) * width
            xs.append(j + off + rng.normal(0, width / 6, rows.size))
            ys.append(X[rows, nid])
        fig.add_trace(go.Scattergl(
            x=np.concatenate(xs) if xs else [], y=np.concatenate(ys) if ys else [], mode="markers",
            name=names[ci] if ci < len(names) else str(c),
            marker=dict(size=4, opacity=0.45, color=_CLASS_COLORS[ci % len(_CLASS_COLORS)]),
        ))
    fig.update_layout(
        title="Activations of the surviving neurons, by class", yaxis_title="activation", height=380,
        xaxis=dict(tickmode="array", tickvals=list(range(len(neurons))), ticktext=[str(n) for n in neurons],
                   title="neuron (non-zero coefficient)"),
        yaxis=dict(tickformat=".2f"),
    )
    return fig


def density_vs_C(path: LogisticPathResult, current_C: float | None = None) -> go.Figure:
    """Density (% non-zero) and test accuracy against λ = 1/C and against C (both log axes); current C marked.

    The accuracy axis runs from a round number below the data to 100 % (never past 100); the legend
    sits under the plots, clear of the two panel titles. The current-C line is a shape in data units
    (plotly.js 4 reads shape positions on a log axis as values; the old log10 position put it at the wrong λ).
    """
    fig = make_subplots(rows=1, cols=2, specs=[[{"secondary_y": True}, {"secondary_y": True}]],
                        subplot_titles=("against λ = 1/C", "against C = 1/λ"), horizontal_spacing=0.22)
    conv = path.converged
    acc = 100 * np.asarray(path.test_accuracy, dtype=float)
    for col, x in ((1, path.lambdas), (2, path.Cs)):
        show = col == 1
        fig.add_trace(go.Scatter(x=x, y=path.density, mode="lines+markers", name="density (%)", showlegend=show,
                                 marker=dict(size=8, color="#6c8ebf", symbol=np.where(conv, "circle", "circle-open"))),
                      row=1, col=col, secondary_y=False)
        fig.add_trace(go.Scatter(x=x, y=acc, mode="lines+markers", name="test accuracy (%)",
                                 showlegend=show, line=dict(dash="dot", color="#e76f51")),
                      row=1, col=col, secondary_y=True)
        fig.update_xaxes(type="log", range=log_range(x, pad=0.03), dtick=1, exponentformat="power",
                         showexponent="all", row=1, col=col)
    fig.update_xaxes(title_text="λ (penalty strength)", row=1, col=1)
    fig.update_xaxes(title_text="C (inverse penalty)", row=1, col=2)
    fig.update_yaxes(title_text="density (% non-zero)", secondary_y=False, range=[0, 100.5] if
                     np.nanmax(path.density) > 50 else None, rangemode="tozero", tickformat=".0f")
    fig.update_yaxes(title_text="test accuracy (%)", secondary_y=True, range=percent_range(acc), dtick=10,
                     tickformat=".0f", showgrid=False)
    fig.update_layout(height=440, title="Density and test accuracy along the regularization path", margin=dict(t=90))
    legend_below(fig, tick_px=10)
    if not conv.all():
        fig.add_annotation(text=f"open markers: {int((~conv).sum())} C value(s) not converged", xref="paper",
                           yref="paper", x=1, xanchor="right", y=1.12, yanchor="bottom", showarrow=False)
        fig.update_layout(margin=dict(t=120))
    return fig if current_C is None else mark_current_C(fig, current_C)


def _C_line(xref: str, yref: str, x: float) -> dict:
    # plotly.js 4: shapes on a log axis take data values (annotations take log10 values)
    return {"type": "line", "x0": x, "x1": x, "xref": xref, "y0": 0, "y1": 1, "yref": f"{yref} domain",
            "line": {"color": "black", "dash": "dash"}}


def mark_current_C(fig: go.Figure, current_C: float) -> go.Figure:
    """``fig`` (:func:`density_vs_C` without a C) with the current C marked on both panels, as a new figure.

    The new figure is made from ``fig``'s validated properties without validating them again (plotly 7's
    ``_validate=False``; the two lines are plain shapes): a C step then costs ~10 % of rebuilding the whole
    figure (measured: 26 vs 279 ms under load). Trace and layout dicts are copied one level deep, so ``fig``
    (a figure shared by every session) is never changed.
    """
    layout = dict(fig._layout)  # the validated property dicts (NumPy arrays kept; to_dict() would base64 them)
    layout["shapes"] = [*layout.get("shapes", ()), _C_line("x", "y", float(1.0 / current_C)),
                        _C_line("x2", "y3", float(current_C))]
    return go.Figure({"data": [dict(t) for t in fig._data], "layout": layout}, _validate=False)


def layers_curve(
    hooks: Sequence[str],
    test_accuracy: np.ndarray,
    density: np.ndarray | None = None,
    *,
    chance: float | None = None,
    train_accuracy: np.ndarray | None = None,
    C: float | None = None,
    ci: np.ndarray | None = None,
) -> go.Figure:
    """Accuracy (and L1 density) per layer/hook at one C; chance level dashed; NaN = not computed yet.
    ``ci``: ``(hook, 2)`` 95 % interval of the test accuracy (fractions), drawn as a band."""
    fig = make_subplots(specs=[[{"secondary_y": density is not None}]])
    x = hook_labels(hooks)
    acc = [100 * np.asarray(test_accuracy, dtype=float)]
    if ci is not None and np.isfinite(np.asarray(ci, dtype=float)).any():
        band = 100 * np.asarray(ci, dtype=float)
        fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=np.concatenate([band[:, 1], band[::-1, 0]]), fill="toself",
                                 opacity=0.18, line=dict(width=0), hoverinfo="skip", name="test 95 % CI (Wilson)"))
        acc.append(band.ravel())
    fig.add_trace(go.Scatter(x=x, y=acc[0], mode="lines+markers", name="test accuracy (%)"))
    if train_accuracy is not None:
        acc.append(100 * np.asarray(train_accuracy, dtype=float))
        fig.add_trace(go.Scatter(x=x, y=acc[-1], mode="lines", name="train accuracy (%)", line=dict(dash="dot")))
    if density is not None:
        fig.add_trace(go.Bar(x=x, y=density, name="density (%)", opacity=0.35), secondary_y=True)
        fig.update_yaxes(title_text="density (% non-zero)", secondary_y=True, rangemode="tozero", tickformat=".1f",
                         showgrid=False)
    if chance is not None:
        acc.append(np.array([100 * chance]))
        fig.add_hline(y=100 * chance, line=dict(dash="dash", color="grey"), annotation_text="chance",
                      annotation_position="bottom right")
    fig.update_yaxes(title_text="accuracy (%)", secondary_y=False, range=percent_range(np.concatenate(acc)), dtick=10,
                     tickformat=".0f")
    fig.update_xaxes(type="category", tickangle=-60 if len(x) > 6 else 0)
    fig.update_layout(title="Probe accuracy across layers" + (f" at C = {C:.4g}" if C else ""), height=440,
                      xaxis_title="hook")
    return legend_below(fig, tick_px=6 * max((len(v) for v in x), default=4) if len(x) > 6 else 20)


def layer_points_curve(points: Sequence, *, C: float | None = None, chance: float | None = None) -> go.Figure:
    """:func:`layers_curve` from ``analyses.sparse.LayerPoint`` objects (hook, test_accuracy, density, ci_low/high)."""
    return layers_curve([p.hook for p in points], [p.test_accuracy for p in points], [p.density for p in points],
                        C=C, chance=chance, ci=[(p.ci_low, p.ci_high) for p in points])


def selection_frequency_bars(freq: np.ndarray, *, top: int = 30, feature_name: str = "neuron") -> go.Figure:
    """Share of folds/seeds in which each of the most often selected features is non-zero."""
    freq = np.asarray(freq)
    idx = np.argsort(-freq, kind="stable")[:top]
    idx = idx[freq[idx] > 0]
    fig = go.Figure(go.Bar(x=[str(i) for i in idx], y=freq[idx], marker_color=_NZ))
    fig.update_layout(title="Selection frequency across folds", xaxis_title=feature_name,
                      yaxis=dict(title="share of folds with a non-zero coefficient", range=[0, 1.05], tickformat=".1f"),
                      height=340)
    fig.update_xaxes(type="category")  # neuron ids are names, not positions on a number line
    return fig
