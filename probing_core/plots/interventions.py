"""Figures for interventions: the probe direction's line beside the band of random directions.

Inputs are results of :mod:`probing_core.analyses.interventions`, :mod:`~probing_core.analyses.amnesic`
and :mod:`~probing_core.analyses.truth_case`. Every score is drawn with its control: the band is
the min–max of the K random directions (their mean dashed), so "inside the band" reads off the chart.
"""
from __future__ import annotations

import html
import re

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probing_core.analyses.amnesic import AmnesicResult, LossEffect
from probing_core.analyses.interventions import ControlComparison, LensDiff, PromptEffect, SteeringSweep
from probing_core.analyses.truth_case import TruthProbeCurve

_COLOURS = {"true": "#1f77b4", "false": "#d62728", "": "#2ca02c", None: "#2ca02c"}
_BAND = "rgba(127,127,127,0.25)"


def _show(tok: str) -> str:
    return html.escape(tok.replace("\n", "\\n").replace(" ", "·"))


def layer_name(hook: str) -> str:
    """``blocks.5.hook_resid_post`` → ``layer 5 · resid post``; lens labels ``5_pre`` → ``layer 5 · resid pre``."""
    m = re.match(r"^blocks\.(\d+)\.(?:hook_)?(.+)$", hook) or re.match(r"^(\d+)_(.+)$", hook)
    if m:
        what = m.group(2).replace("hook_", "").replace("mlp.post", "MLP neurons").replace("_", " ")
        if what in ("pre", "mid", "post"):
            what = "resid " + what
        return f"layer {m.group(1)} · {what}"
    return {"final_post": "final layer", "hook_embed": "embedding"}.get(hook, hook)


def _band(fig: go.Figure, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, mean: np.ndarray, name: str, colour: str,
          row: int | None = None, col: int | None = None, show: bool = True) -> None:
    kw = {} if row is None else {"row": row, "col": col}
    fig.add_trace(go.Scatter(x=x, y=hi, mode="lines", line=dict(width=0), showlegend=False, hoverinfo="skip",
                             legendgroup=name), **kw)
    fig.add_trace(go.Scatter(x=x, y=lo, mode="lines", line=dict(width=0), fill="tonexty", fillcolor=_BAND,
                             name=f"{name}: random band (min–max)", legendgroup=name, showlegend=show,
                             hovertemplate="random min %{y:.4f}<extra></extra>"), **kw)
    fig.add_trace(go.Scatter(x=x, y=mean, mode="lines", line=dict(color=colour, dash="dot", width=1),
                             name=f"{name}: random mean", legendgroup=name, showlegend=show), **kw)


def steering_sweep_figure(sweep: SteeringSweep) -> go.Figure:
    """P(a) − P(b) vs c: one line per class of prompts along the probe direction, each with its random band."""
    a, b = sweep.answers
    fig = go.Figure()
    classes = list(dict.fromkeys(sweep.classes))
    K = sweep.controls.shape[0]
    for cls in classes:
        probe, ctl = sweep.class_mean(cls if cls else None)
        name = f"{cls} statements" if cls else "prompts"
        colour = _COLOURS.get(cls, "#2ca02c")
        _band(fig, sweep.coefs, ctl.min(0), ctl.max(0), ctl.mean(0), name, colour)
        fig.add_trace(go.Scatter(x=sweep.coefs, y=probe, mode="lines+markers", line=dict(color=colour, width=3),
                                 name=f"{name}: probe direction",
                                 hovertemplate="c = %{x:+g} σ<br>P(a) − P(b) = %{y:.4f}<extra></extra>"))
    fig.update_layout(
        title=f"Steering at {layer_name(sweep.hook)} ({sweep.positions}): P({_show(a)}) − P({_show(b)}) "
              f"vs {K} random directions of the same norm (seed {sweep.seed})",
        xaxis_title="c: added vector in standard deviations along the direction",
        yaxis_title=f"P({_show(a)}) − P({_show(b)}) (mean over prompts)", yaxis_range=[-1.05, 1.05],
        legend=dict(orientation="h", yanchor="top", y=-0.2), height=480)
    return fig


def truth_curve_figure(curve: TruthProbeCurve) -> go.Figure:
    """Held-out accuracy per layer: logistic probe, mass-mean probe, shuffled-label control and chance."""
    x = curve.layers
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=curve.logistic, mode="lines+markers", name="logistic probe (C = 0.1)"))
    fig.add_trace(go.Scatter(x=x, y=curve.mass_mean, mode="lines+markers", name="mass-mean probe"))
    fig.add_trace(go.Scatter(x=x, y=curve.control, mode="lines", line=dict(dash="dash", color="grey"),
                             name="control: logistic on shuffled labels"))
    fig.add_trace(go.Scatter(x=[x.min(), x.max()], y=[curve.chance] * 2, mode="lines", line=dict(dash="dot", color="black"),
                             name=f"chance ({curve.chance:.2f})"))
    b = curve.best_index
    fig.add_trace(go.Scatter(x=[x[b]], y=[curve.logistic[b]], mode="markers", marker=dict(size=14, symbol="star"),
                             name=f"best: layer {x[b]} ({curve.logistic[b]:.3f})"))
    fig.update_layout(title=f"Truth probe per layer (resid post at the statement's last token; {curve.n_train} train / "
                            f"{curve.n_test} test statements)",
                      xaxis_title="layer (resid post)", yaxis_title="test accuracy", yaxis_range=[0.3, 1.02],
                      legend=dict(orientation="h", yanchor="top", y=-0.2), height=460)
    return fig


def controls_figure(cmp: ControlComparison) -> go.Figure:
    """The K control effects as a strip, the band shaded, the probe direction's effect as a line."""
    c = cmp.controls
    fig = go.Figure()
    fig.add_vrect(x0=float(c.min()), x1=float(c.max()), fillcolor=_BAND, line_width=0)
    jitter = np.random.default_rng(0).uniform(-0.3, 0.3, c.size)
    fig.add_trace(go.Scatter(x=c, y=jitter, mode="markers", marker=dict(color="grey", size=9),
                             name=f"random directions (K = {c.size}, seed {cmp.seed}); band = min–max",
                             hovertemplate="%{x:.4g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[cmp.value, cmp.value], y=[-0.5, 0.5], mode="lines", line=dict(color="#d62728", width=3),
                             name=f"probe direction: {cmp.value:+.4g} (percentile {cmp.percentile:.0f}, z = {cmp.z:+.2f})"))
    fig.update_layout(title=cmp.metric + (" — inside the random band" if cmp.inside_band else " — outside the random band"),
                      xaxis_title=cmp.metric, yaxis=dict(visible=False, range=[-0.6, 0.6]), height=260,
                      legend=dict(orientation="h", yanchor="top", y=-0.35))
    return fig


def topk_before_after(eff: PromptEffect) -> go.Figure:
    """Next-token probabilities before and after, over the union of both top-k lists."""
    before = {r["token"]: r["prob"] for r in eff.top_before}
    after = {r["token"]: r["prob"] for r in eff.top_after}
    toks = list(dict.fromkeys([r["token"] for r in eff.top_before] + [r["token"] for r in eff.top_after]))
    labels = [_show(t) for t in toks]
    fig = go.Figure([
        go.Bar(x=labels, y=[before.get(t, np.nan) for t in toks], name="before"),
        go.Bar(x=labels, y=[after.get(t, np.nan) for t in toks], name=f"after: {eff.intervention_label}"),
    ])
    fig.update_layout(barmode="group", title="Next token before vs after (bars missing: not in that top-k)",
                      xaxis_title="token", yaxis_title="probability", height=380,
                      legend=dict(orientation="h", yanchor="top", y=-0.25))
    return fig


def lens_diff_heatmap(ld: LensDiff) -> go.Figure:
    """Layers × positions: change in the lens's probability of the unintervened model's final top-1 token."""
    z = ld.diff
    lim = float(np.nanmax(np.abs(z))) or 1.0
    x = [f"{i}: {_show(t)}" for i, t in enumerate(ld.tokens)]
    text = [[_show(ld.targets[p]) for p in range(len(ld.tokens))] for _ in ld.labels]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=[layer_name(lab) for lab in ld.labels], text=text, zmid=0, zmin=-lim, zmax=lim,
                               colorscale="RdBu", colorbar=dict(title="Δ probability"),
                               hovertemplate="%{y} · %{x}<br>tracked token %{text}<br>Δ p = %{z:+.4f}<extra></extra>"))
    fig.update_layout(title="Logit lens after − before: probability of the unintervened top-1 next token",
                      xaxis_title="position: input token", yaxis_title="residual stream", height=max(350, 20 * len(ld.labels) + 150))
    return fig


def amnesic_figure(res: AmnesicResult) -> go.Figure:
    """Probe accuracy (same and later hook) and LM loss vs the number of directions removed, probe vs random."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("fresh probe accuracy", "LM loss on cached rows"))
    k = res.k
    fig.add_trace(go.Scatter(x=k, y=res.probe_acc, mode="lines+markers", name=f"at {layer_name(res.hook)}: probe directions removed",
                             line=dict(color="#d62728")), row=1, col=1)
    fig.add_trace(go.Scatter(x=k, y=res.control_acc, mode="lines+markers", name=f"at {layer_name(res.hook)}: random directions removed",
                             line=dict(color="grey", dash="dash")), row=1, col=1)
    if res.later_hook is not None:
        fig.add_trace(go.Scatter(x=k, y=res.downstream_acc, mode="lines+markers", line=dict(color="#9467bd"),
                                 name=f"downstream at {layer_name(res.later_hook)}: probe directions removed"), row=1, col=1)
        fig.add_trace(go.Scatter(x=k, y=res.control_downstream_acc, mode="lines+markers", line=dict(color="#9467bd", dash="dash"),
                                 name=f"downstream at {layer_name(res.later_hook)}: random removed"), row=1, col=1)
    fig.add_trace(go.Scatter(x=[k.min(), k.max()], y=[res.chance] * 2, mode="lines", line=dict(color="black", dash="dot"),
                             name=f"chance ({res.chance:.2f})"), row=1, col=1)
    fig.add_trace(go.Scatter(x=k, y=res.loss, mode="lines+markers", line=dict(color="#d62728"), showlegend=False,
                             name="loss: probe directions removed"), row=1, col=2)
    fig.add_trace(go.Scatter(x=k, y=res.control_loss, mode="lines+markers", line=dict(color="grey", dash="dash"),
                             showlegend=False, name="loss: random directions removed"), row=1, col=2)
    fig.update_xaxes(title_text="directions removed (k)", dtick=1)
    fig.update_yaxes(title_text="test accuracy", row=1, col=1)
    fig.update_yaxes(title_text="cross-entropy (nats/token)", row=1, col=2)
    fig.update_layout(title="Amnesic probing (INLP): fit → project out → repeat", height=460,
                      legend=dict(orientation="h", yanchor="top", y=-0.25))
    return fig


def loss_figure(le: LossEffect) -> go.Figure:
    """LM loss change with the intervention against the random directions' changes."""
    return controls_figure(le.comparison)
