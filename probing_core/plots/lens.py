"""Figures for the logit lens and logit attribution (inputs: results of :mod:`probing_core.analyses.lens`)."""
from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from probing_core.analyses.lens import AttributionResult, LogitDiffResult, LogitLensResult, NextTokenResult


def _show(tok: str) -> str:
    """Token text safe for plotly labels: visible spaces/newlines, HTML escaped."""
    return html.escape(tok.replace("\n", "\\n").replace(" ", "·"))


def _pos_labels(tokens: list[str]) -> list[str]:
    return [f"{i}: {_show(t)}" for i, t in enumerate(tokens)]


def next_token_bar(res: NextTokenResult) -> go.Figure:
    """Horizontal bars of the top-k next-token probabilities (best at the top)."""
    labels = [f"{_show(t)} ({i})" for i, t in enumerate(res.top_tokens)]
    fig = go.Figure(go.Bar(
        x=res.top_probs[::-1], y=labels[::-1], orientation="h",
        customdata=np.stack([res.top_logits[::-1], res.top_ids[::-1]], -1),
        hovertemplate="%{y}<br>prob %{x:.4f}<br>logit %{customdata[0]:.3f}<br>id %{customdata[1]}<extra></extra>",
    ))
    title = "Next-token probabilities"
    if res.answer is not None:
        title += f" — answer {_show(res.answer)}: rank {res.answer_rank}, prob {res.answer_prob:.4f}"
    fig.update_layout(title=title, xaxis_title="probability", yaxis_title="token (rank)",
                      height=max(250, 28 * len(labels) + 100))
    return fig


def logit_lens_heatmap(res: LogitLensResult, *, value: str = "top_prob") -> go.Figure:
    """Layers × positions; cell text = top-1 token; hover = top-k with probabilities.

    Args:
        res: a :class:`LogitLensResult`.
        value: colour by "top_prob" (top-1 probability) or "next_prob" (probability of the actual
            next token) or "next_rank_log" (log10(1 + rank) of the actual next token).
    """
    L, T, k = res.top_probs.shape
    if value == "top_prob":
        z, cbar = res.top_probs[:, :, 0], "top-1 prob"
    elif value == "next_prob":
        z, cbar = res.next_prob, "P(next token)"
    elif value == "next_rank_log":
        z, cbar = np.where(res.next_rank >= 0, np.log10(1 + np.maximum(res.next_rank, 0).astype(float)), np.nan), "log10(1+rank)"
    else:
        raise ValueError(f"value must be top_prob, next_prob or next_rank_log, got {value!r}")
    text = [[_show(res.top_tokens[li][p][0]) for p in range(T)] for li in range(L)]
    hover = []
    for li in range(L):
        row = []
        for p in range(T):
            tops = "<br>".join(f"{_show(res.top_tokens[li][p][r])}: {res.top_probs[li, p, r]:.3f}" for r in range(k))
            nxt = ""
            if res.next_rank[li, p] >= 0:
                nxt = (f"<br>next {_show(res.tokens[p + 1])}: p={res.next_prob[li, p]:.3g}, "
                       f"rank {res.next_rank[li, p]}")
            row.append(f"{res.labels[li]} · pos {p} {_show(res.tokens[p])}{nxt}<br>{tops}")
        hover.append(row)
    fig = go.Figure(go.Heatmap(
        z=z, x=_pos_labels(res.tokens), y=res.labels, text=text, texttemplate="%{text}",
        customdata=hover, hovertemplate="%{customdata}<extra></extra>", colorscale="Blues",
        colorbar_title=cbar, zmin=0, zmax=1 if value != "next_rank_log" else None,
    ))
    fig.update_layout(title="Logit lens: top token per layer and position", xaxis_title="position: input token",
                      yaxis_title="residual stream", height=max(350, 22 * L + 150))
    fig.update_xaxes(tickangle=-45)
    return fig


def next_token_by_layer(res: LogitLensResult, position: int = -1) -> go.Figure:
    """Probability and rank of the actual next token at one position, per layer (two y axes).

    ``position`` defaults to the last position that has a next token.
    """
    T = len(res.tokens)
    if T < 2:
        raise ValueError("need at least two tokens to have a next token")
    p = position if position >= 0 else T - 2
    p = min(p, T - 2)
    x = res.labels
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=res.next_prob[:, p], name="probability", mode="lines+markers"))
    fig.add_trace(go.Scatter(x=x, y=res.next_rank[:, p], name="rank (0 = top)", mode="lines+markers", yaxis="y2"))
    fig.update_layout(
        title=f"Next token {_show(res.tokens[p + 1])} after position {p} ({_show(res.tokens[p])}), per layer",
        xaxis_title="residual stream", yaxis=dict(title="probability", range=[0, 1]),
        yaxis2=dict(title="rank", overlaying="y", side="right", type="log"),
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


def logit_diff_bar(res: LogitDiffResult) -> go.Figure:
    """Logit difference per prompt, coloured by class, with the mean as a line."""
    colors = {"positive": "#2a9d8f", "negative": "#e76f51", "": "#457b9d"}
    x = [f"{i}" for i in range(len(res.prompts))]
    fig = go.Figure(go.Bar(
        x=x, y=res.logit_diff, marker_color=[colors.get(c, "#457b9d") for c in res.classes],
        customdata=[[html.escape(p[:80]), html.escape(a[0]), html.escape(a[1]), c]
                    for p, a, c in zip(res.prompts, res.answers, res.classes)],
        hovertemplate="prompt %{x}: %{customdata[0]}<br>%{customdata[1]} − %{customdata[2]} = %{y:.3f}"
                      "<br>%{customdata[3]}<extra></extra>",
    ))
    fig.add_hline(y=res.mean, line_dash="dash", annotation_text=f"mean {res.mean:.3f}")
    fig.update_layout(title="Logit difference (correct − incorrect) per prompt", xaxis_title="prompt",
                      yaxis_title="logit difference")
    return fig


def accumulated_resid_line(res: AttributionResult) -> go.Figure:
    """Logit difference read from the accumulated residual stream (x in layers; mids at +0.5)."""
    fig = go.Figure(go.Scatter(
        x=res.accumulated_x, y=res.accumulated, mode="lines+markers", text=res.accumulated_labels,
        hovertemplate="%{text}: %{y:.3f}<extra></extra>",
    ))
    fig.add_hline(y=res.model_logit_diff, line_dash="dot", annotation_text=f"model {res.model_logit_diff:.3f}")
    fig.update_layout(title="Logit difference from the accumulated residual stream", xaxis_title="layer",
                      yaxis_title="logit difference")
    return fig


def decomposition_bar(res: AttributionResult) -> go.Figure:
    """Contribution of every component (embeddings, each attn_out and mlp_out) to the logit difference."""
    colors = ["#e9c46a" if "attn" in lab else "#264653" if "mlp" in lab else "#8d99ae"
              for lab in res.decomposition_labels]
    fig = go.Figure(go.Bar(x=res.decomposition_labels, y=res.decomposition, marker_color=colors,
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    fig.update_layout(
        title=(f"Logit difference from each component (sum {res.decomposition_sum:.3f}, "
               f"model {res.model_logit_diff:.3f})"),
        xaxis_title="component", yaxis_title="logit difference")
    fig.update_xaxes(tickangle=-60)
    return fig


def head_dla_heatmap(res: AttributionResult) -> go.Figure:
    """Layer × head direct logit attribution, diverging colours centred on zero."""
    m = float(np.abs(res.head_dla).max()) or 1.0
    fig = go.Figure(go.Heatmap(
        z=res.head_dla, x=[f"H{h}" for h in range(res.head_dla.shape[1])],
        y=[f"L{li}" for li in range(res.head_dla.shape[0])], colorscale="RdBu", zmid=0, zmin=-m, zmax=m,
        hovertemplate="%{y}%{x}: %{z:.3f}<extra></extra>", colorbar_title="logit diff",
    ))
    fig.update_layout(title="Direct logit attribution per head", xaxis_title="head", yaxis_title="layer",
                      yaxis_autorange="reversed", height=max(350, 18 * res.head_dla.shape[0] + 150))
    return fig
