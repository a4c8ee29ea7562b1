"""Figures for regression probes. Compute returns arrays (probing_core.solvers.ridge); these return figures."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from probing_core.analyses.regression import RegressionRun
from probing_core.plots._common import fixed_format, hook_label, hook_labels, legend_below, log_range, vline_trace
from probing_core.solvers.ridge import RidgePathResult, TransferResult

__all__ = ["r2_curve", "run_r2_curve", "r2_by_hook", "abs_r2_log", "transfer_curve", "predicted_vs_true", "label_histogram", "r2_vs_alpha"]

_TRAIN, _TEST, _CV, _BASE = "#1f77b4", "#d62728", "#2ca02c", "#7f7f7f"


def _band(x: Sequence[str] | np.ndarray, lo: np.ndarray, hi: np.ndarray, color: str, name: str) -> list[go.Scatter]:
    x = list(x)
    return [go.Scatter(x=x + x[::-1], y=np.concatenate([hi, lo[::-1]]), fill="toself", fillcolor=color, opacity=0.18,
                       line=dict(width=0), hoverinfo="skip", name=name, showlegend=True)]


def r2_curve(result: RidgePathResult, alpha_index: int | None = None, *, title: str = "R² across hooks",
             show_train: bool = True, test_name: str = "test", test_ci: np.ndarray | None = None,
             new_types: np.ndarray | None = None) -> go.Figure:
    """R² per hook: train, test, CV mean ± std band, shuffled baseline; markers at each hook's best α.

    Args:
        result: from ``fit_ridge_path``.
        alpha_index: one α of ``result.alphas`` for every hook; None = each hook's best α.
        test_name: what the test rows are (e.g. "new token types"), shown in the legend.
        test_ci: ``(hook, 2)`` 95 % interval of the test R² at the best α, drawn as a band (best α only).
        new_types: ``(hook,)`` test R² on token types unseen in training (random-token split), best α only.
    """
    hooks = hook_labels(result.hooks)
    idx = result.best_index if alpha_index is None else np.full(len(hooks), int(alpha_index))
    rows = np.arange(len(hooks))
    label = "best α per hook" if alpha_index is None else f"α = {result.alphas[int(alpha_index)]:.3g}"
    fig = go.Figure()
    cv_mean, cv_std = result.r2_cv_mean[rows, idx], result.r2_cv_std[rows, idx]
    if not np.all(np.isnan(cv_mean)):
        fig.add_traces(_band(hooks, cv_mean - cv_std, cv_mean + cv_std, _CV, "CV ± std"))
        fig.add_scatter(x=hooks, y=cv_mean, name=f"CV mean ({result.n_folds} folds)", line=dict(color=_CV))
    if show_train:
        fig.add_scatter(x=hooks, y=result.r2_train[rows, idx], name="train", line=dict(color=_TRAIN, dash="dot"))
    if test_ci is not None and alpha_index is None and np.isfinite(test_ci).any():
        fig.add_traces(_band(hooks, test_ci[:, 0], test_ci[:, 1], _TEST, "test 95 % CI (bootstrap)"))
    if new_types is not None and alpha_index is None and np.isfinite(new_types).any():
        fig.add_scatter(x=hooks, y=new_types, name="test, new token types only", mode="lines+markers",
                        line=dict(color=_TEST, dash="dashdot"))
    if not np.all(np.isnan(result.r2_test)):
        fig.add_scatter(x=hooks, y=result.r2_test[rows, idx], name="test" if test_name == "test" else f"test: {test_name} (n={result.n_test:,})",
                        line=dict(color=_TEST),
                        customdata=result.alphas[idx], hovertemplate="%{x}<br>R² %{y:.4f}<br>α %{customdata:.3g}<extra>test</extra>")
    fig.add_scatter(x=hooks, y=result.baseline_r2, name="shuffled-label baseline", line=dict(color=_BASE, dash="dash"))
    if alpha_index is None:
        score = result.r2_cv_mean if result.n_folds else result.r2_test
        fig.add_scatter(x=hooks, y=score[rows, result.best_index], mode="markers", name="best α",
                        marker=dict(symbol="diamond", size=8, color="black"), customdata=result.best_alpha,
                        hovertemplate="%{x}<br>best α %{customdata:.3g}<br>R² %{y:.4f}<extra></extra>")
    fig.update_layout(title=f"{title} ({label})", xaxis_title="hook", yaxis_title="R²", hovermode="x unified",
                      height=520)
    fig.update_yaxes(tickformat=fixed_format(np.concatenate([np.asarray(t.y, dtype=float).ravel() for t in fig.data])))
    return _hook_axis(fig, hooks)


def run_r2_curve(run: RegressionRun, alpha_index: int | None = None, *, title: str = "R² across hooks") -> go.Figure:
    """:func:`r2_curve` of a :class:`RegressionRun`: its test set named in the legend, the test CI band, and the
    new-type curve when the test set also holds seen types (not with a by-type split, where all are new)."""
    ho = run.held_out
    return r2_curve(run.result, alpha_index, title=title, test_name=run.test_name, test_ci=None if ho is None else ho.r2_ci,
                    new_types=None if ho is None or run.split_by == "type" else ho.r2_new)


def _hook_axis(fig: go.Figure, labels: Sequence[str]) -> go.Figure:
    """Rotated hook labels with room below them, then the legend in its own band under them."""
    longest = max((len(x) for x in labels), default=4)
    fig.update_xaxes(tickangle=-60 if len(labels) > 6 else 0, type="category", title_standoff=8)
    tick_px = int(4.5 * longest) + 10 if len(labels) > 6 else 20
    return legend_below(fig, tick_px=tick_px + 20)


def r2_by_hook(hooks: Sequence[str], series: Mapping[str, np.ndarray], *, title: str = "R² across hooks",
               log_abs: bool = False) -> go.Figure:
    """Generic R²-per-hook lines; ``log_abs`` plots |R²| on a log axis (as the reference notebook did)."""
    fig = go.Figure()
    labels = hook_labels(hooks)
    ys = []
    for name, r2 in series.items():
        y = np.abs(np.asarray(r2, dtype=float)) if log_abs else np.asarray(r2, dtype=float)
        ys.append(y)
        fig.add_scatter(x=labels, y=y, name=name, mode="lines+markers")
    fig.update_layout(title=title, xaxis_title="hook", yaxis_title="|R²|" if log_abs else "R²", height=480)
    if log_abs:
        fig.update_yaxes(type="log", range=log_range(np.concatenate(ys) if ys else np.ones(1)),
                         exponentformat="power")
    else:
        fig.update_yaxes(tickformat=fixed_format(np.concatenate(ys) if ys else np.zeros(1)))
    return _hook_axis(fig, labels)


def abs_r2_log(hooks: Sequence[str], r2: np.ndarray, *, title: str = "|R²| across hooks (log scale)") -> go.Figure:
    """|R²| per hook on a log axis (negative R² of a transferred probe become visible)."""
    return r2_by_hook(hooks, {"|R²|": r2}, title=title, log_abs=True)


def transfer_curve(transfer: TransferResult, *, source: str = "hook_embed", log_abs: bool = False) -> go.Figure:
    """R² (or |R²| on a log axis) of a probe fit on ``source`` and scored on every hook."""
    title = f"Probe fit on {source}, scored on every hook"
    return r2_by_hook(transfer.hooks, {"R² (transferred probe)": transfer.r2}, title=title, log_abs=log_abs)


def predicted_vs_true(y_true: np.ndarray, y_pred: np.ndarray, *, title: str = "Predicted vs true",
                      x_label: str = "true", max_boxes: int = 60) -> go.Figure:
    """Box plot of predictions for each true value (binned when there are more than ``max_boxes``),
    with the x = y line."""
    y_true = np.asarray(y_true, dtype=float)
    y_pred = np.asarray(y_pred, dtype=float)
    uniq = np.unique(y_true)
    if uniq.size > max_boxes:
        edges = np.quantile(y_true, np.linspace(0, 1, max_boxes + 1))
        edges = np.unique(edges)
        which = np.clip(np.searchsorted(edges, y_true, side="right") - 1, 0, edges.size - 2)
        x = ((edges[:-1] + edges[1:]) / 2)[which]
    else:
        x = y_true
    lo, hi = float(y_true.min()), float(y_true.max())
    fig = go.Figure(go.Box(x=x, y=y_pred, name="predicted", boxpoints=False))
    fig.add_shape(type="line", x0=lo, y0=lo, x1=hi, y1=hi, line=dict(dash="dot", color="black"),
                  label=dict(text="x=y"))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=f"predicted {x_label}", showlegend=False)
    return fig


def label_histogram(values: np.ndarray, *, title: str = "Label histogram", x_label: str = "label",
                    nbins: int | None = None) -> go.Figure:
    """Histogram of label values (outliers show up here)."""
    fig = go.Figure(go.Histogram(x=np.asarray(values, dtype=float), nbinsx=nbins))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title="tokens", bargap=0.05)
    return fig


def r2_vs_alpha(result: RidgePathResult, hook: str) -> go.Figure:
    """Train/test/CV R² against α (log axis) for one hook, with its best α marked.

    The best-α marker is a trace in data units with its label on the line (a shape on a log axis
    takes log10 units: a plain value put it at 10^α).
    """
    i = list(result.hooks).index(hook)
    a = result.alphas
    fig = go.Figure()
    ys = [result.r2_train[i], np.atleast_1d(result.baseline_r2[i])]
    if result.n_folds:
        m, s = result.r2_cv_mean[i], result.r2_cv_std[i]
        fig.add_traces(_band(a, m - s, m + s, _CV, "CV ± std"))
        fig.add_scatter(x=a, y=m, name="CV mean", line=dict(color=_CV))
        ys += [m - s, m + s]
    fig.add_scatter(x=a, y=result.r2_train[i], name="train", line=dict(color=_TRAIN, dash="dot"))
    if not np.all(np.isnan(result.r2_test[i])):
        fig.add_scatter(x=a, y=result.r2_test[i], name="test", line=dict(color=_TEST))
        ys.append(result.r2_test[i])
    base = float(result.baseline_r2[i])
    fig.add_scatter(x=[a.min(), a.max()], y=[base, base], mode="lines", name="shuffled-label baseline",
                    line=dict(color=_BASE, dash="dash"), hoverinfo="skip")
    y = np.concatenate([np.asarray(v, dtype=float).ravel() for v in ys])
    y = y[np.isfinite(y)]
    lo, hi = (float(y.min()), float(y.max())) if y.size else (0.0, 1.0)
    pad = 0.06 * max(hi - lo, 1e-6)
    best = float(result.best_alpha[i])
    fig.add_trace(vline_trace(best, [lo - pad, hi + pad], name="best α", text=f"best α = {best:.3g}"))
    fig.update_xaxes(type="log", title="α (ridge strength)", range=log_range(a, pad=0.03), dtick=1,
                     exponentformat="power", showexponent="all")
    fig.update_yaxes(range=[lo - 2 * pad, hi + 3 * pad], tickformat=fixed_format(np.array([lo, hi])))
    fig.update_layout(title=f"R² vs α — {hook_label(hook)}", yaxis_title="R²", height=440)
    return legend_below(fig, tick_px=10)
