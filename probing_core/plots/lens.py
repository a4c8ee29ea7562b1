"""Figures for the logit lens and logit attribution (inputs: results of :mod:`probing_core.analyses.lens`)."""
from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from probing_core.analyses.lens import AttributionResult, LogitDiffResult, LogitLensResult, NextTokenResult
from probing_core.plots._common import hook_labels, legend_below, log_range


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
    fig.update_xaxes(tickformat=".2f")
    return fig


#: What :func:`logit_lens_heatmap` can colour by (``value`` → words for a picker).
LENS_COLOURS = {"top_prob": "top-1 probability", "next_prob": "probability of the actual next token",
                "next_rank_log": "rank of the actual next token (log)"}


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
        z, cbar = np.where(res.next_rank >= 0, np.log10(1 + np.maximum(res.next_rank, 0).astype(float)), np.nan), "rank (1 = top)"
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
            row.append(f"{hook_labels([res.labels[li]])[0]} · pos {p} {_show(res.tokens[p])}{nxt}<br>{tops}")
        hover.append(row)
    colorbar: dict = dict(title=cbar)
    if value == "next_rank_log":
        # colour is log10(rank); the bar names ranks (1, 10, 100, …), not their logs
        top = max(1, int(np.ceil(np.nanmax(z)))) if np.isfinite(z).any() else 1
        colorbar.update(tickvals=list(range(top + 1)), ticktext=[f"{10 ** d:,}" for d in range(top + 1)])
    else:
        colorbar.update(tickformat=".1f")
    fig = go.Figure(go.Heatmap(
        z=z, x=_pos_labels(res.tokens), y=hook_labels(res.labels), text=text, texttemplate="%{text}",
        customdata=hover, hovertemplate="%{customdata}<extra></extra>", colorscale="Blues",
        reversescale=value == "next_rank_log",  # dark = the model's pick in every colouring (rank 1, high probability)
        colorbar=colorbar, zmin=0, zmax=1 if value != "next_rank_log" else None,
    ))
    fig.update_layout(title="Logit lens: top token per layer and position", xaxis_title="position: input token",
                      yaxis_title="residual stream", height=max(350, 22 * L + 150))
    fig.update_xaxes(tickangle=-45)
    return fig


def next_token_by_layer(res: LogitLensResult, position: int = -1) -> go.Figure:
    """Probability and rank of the actual next token at one position, per layer (two y axes).

    ``position`` defaults to the last position that has a next token. Ranks are drawn 1-based
    (1 = top) so the top token stays on the log axis (a 0-based rank 0 has no logarithm and vanished).
    """
    T = len(res.tokens)
    if T < 2:
        raise ValueError("need at least two tokens to have a next token")
    p = position if position >= 0 else T - 2
    p = min(p, T - 2)
    x = hook_labels(res.labels)
    rank1 = np.asarray(res.next_rank[:, p], dtype=float) + 1.0
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=res.next_prob[:, p], name="probability", mode="lines+markers"))
    fig.add_trace(go.Scatter(x=x, y=rank1, name="rank (1 = top)", mode="lines+markers", yaxis="y2",
                             customdata=res.next_rank[:, p],
                             hovertemplate="%{x}<br>rank %{y:,.0f}<extra></extra>"))
    hi = log_range(np.concatenate([rank1, [10.0]]), pad=0.0)[1]
    fig.update_layout(
        title=f"Next token {_show(res.tokens[p + 1])} after position {p} ({_show(res.tokens[p])}), per layer",
        xaxis_title="residual stream", yaxis=dict(title="probability", range=[0, 1], tickformat=".1f"),
        yaxis2=dict(title="rank (1 = top, log)", overlaying="y", side="right", type="log",
                    range=[-0.05, float(np.ceil(hi)) + 0.05], dtick=1, tickformat=",d"),
        height=460,
    )
    fig.update_xaxes(type="category", tickangle=-60 if len(x) > 8 else 0)
    return legend_below(fig, tick_px=6 * max(len(v) for v in x) if len(x) > 8 else 20)


_CLASS_COLORS = {"positive": "#2a9d8f", "negative": "#e76f51", "": "#457b9d"}


def _prompt_labels(prompts: list[str], width: int = 28) -> list[str]:
    """Short distinct category names for prompts (numbered so equal prompts stay apart)."""
    out = []
    for i, p in enumerate(prompts):
        p = " ".join(p.split())
        short = p if len(p) <= width else "…" + p[-(width - 1):]
        out.append(f"{i + 1}. {html.escape(short)}")
    return out


def logit_diff_bar(res: LogitDiffResult) -> go.Figure:
    """Logit difference per prompt (named by its text), coloured by class with a legend, the mean as a line.

    ``data[0]`` is the bar of every prompt; one legend entry per class colour follows, then the mean.
    """
    x = _prompt_labels(list(res.prompts))
    classes = list(res.classes)
    fig = go.Figure(go.Bar(
        x=x, y=res.logit_diff, marker_color=[_CLASS_COLORS.get(c, "#457b9d") for c in classes], showlegend=False,
        name="logit difference",
        customdata=[[html.escape(p[:80]), html.escape(a[0]), html.escape(a[1]), c or "—"]
                    for p, a, c in zip(res.prompts, res.answers, res.classes)],
        hovertemplate="prompt: %{customdata[0]}<br>%{customdata[1]} − %{customdata[2]} = %{y:.3f}"
                      "<br>class %{customdata[3]}<extra></extra>",
    ))
    for c in dict.fromkeys(classes):  # legend entries for the bar colours, in order of appearance
        fig.add_trace(go.Bar(x=[None], y=[None], name=c or "prompt", marker_color=_CLASS_COLORS.get(c, "#457b9d"),
                             showlegend=True, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[x[0], x[-1]], y=[res.mean, res.mean], mode="lines", name=f"mean {res.mean:.3f}",
                             line=dict(color="black", dash="dash"), hoverinfo="skip"))
    y = np.append(np.asarray(res.logit_diff, dtype=float), [res.mean, 0.0])
    lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
    pad = 0.08 * max(hi - lo, 1e-3)
    fig.update_layout(title="Logit difference (correct − incorrect) per prompt", xaxis_title="prompt",
                      yaxis=dict(title="logit difference", range=[lo - pad, hi + pad], tickformat=".2f",
                                 zeroline=True, zerolinecolor="#888"), barmode="overlay", height=440)
    fig.update_xaxes(type="category", tickangle=-30 if len(x) > 3 else 0)
    return legend_below(fig, tick_px=60 if len(x) > 3 else 20)


def accumulated_resid_line(res: AttributionResult) -> go.Figure:
    """Logit difference read from the accumulated residual stream (x in layers; mids at +0.5)."""
    fig = go.Figure(go.Scatter(
        x=res.accumulated_x, y=res.accumulated, mode="lines+markers", text=hook_labels(res.accumulated_labels),
        hovertemplate="%{text}: %{y:.3f}<extra></extra>", name="accumulated residual",
    ))
    xs = np.asarray(res.accumulated_x, dtype=float)
    fig.add_trace(go.Scatter(x=[xs.min(), xs.max()], y=[res.model_logit_diff] * 2, mode="lines",
                             name=f"model's logit difference {res.model_logit_diff:.3f}",
                             line=dict(color="black", dash="dot"), hoverinfo="skip"))
    fig.update_layout(title="Logit difference from the accumulated residual stream", xaxis_title="layer",
                      yaxis=dict(title="logit difference", tickformat=".2f"), height=420)
    fig.update_xaxes(tickformat="d", dtick=1 if xs.max() <= 12 else 5)
    return legend_below(fig, tick_px=10)


_KIND_COLORS = {"attention": "#e9c46a", "MLP": "#264653", "embedding / bias": "#8d99ae"}


def _kind(label: str) -> str:
    return "attention" if "attn" in label else "MLP" if "mlp" in label else "embedding / bias"


def decomposition_bar(res: AttributionResult) -> go.Figure:
    """Contribution of every component (embeddings, each attn_out and mlp_out) to the logit difference.

    ``data[0]`` holds every bar; legend entries name the colours (attention, MLP, embedding / bias).
    """
    kinds = [_kind(lab) for lab in res.decomposition_labels]
    x = hook_labels(res.decomposition_labels)
    fig = go.Figure(go.Bar(x=x, y=res.decomposition, marker_color=[_KIND_COLORS[k] for k in kinds],
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>", showlegend=False, name="component"))
    for k in dict.fromkeys(kinds):
        fig.add_trace(go.Bar(x=[None], y=[None], name=k, marker_color=_KIND_COLORS[k], showlegend=True, hoverinfo="skip"))
    fig.update_layout(
        title=(f"Logit difference from each component (sum {res.decomposition_sum:.3f}, "
               f"model {res.model_logit_diff:.3f})"),
        xaxis_title="component", yaxis=dict(title="logit difference", tickformat=".2f"), barmode="overlay", height=480)
    fig.update_xaxes(tickangle=-60, type="category")
    return legend_below(fig, tick_px=6 * max((len(v) for v in x), default=4))


def head_dla_heatmap(res: AttributionResult) -> go.Figure:
    """Layer × head direct logit attribution, diverging colours centred on zero."""
    m = float(np.abs(res.head_dla).max()) or 1.0
    L, H = res.head_dla.shape
    fig = go.Figure(go.Heatmap(
        z=res.head_dla, x=list(range(H)), y=list(range(L)), colorscale="RdBu", zmid=0, zmin=-m, zmax=m,
        hovertemplate="layer %{y} · head %{x}: %{z:.3f}<extra></extra>",
        colorbar=dict(title="logit diff", tickformat=".2f"),
    ))
    fig.update_layout(title="Direct logit attribution per head", xaxis_title="head", yaxis_title="layer",
                      height=max(350, 18 * L + 150))
    fig.update_xaxes(tickformat="d", dtick=1)
    fig.update_yaxes(autorange="reversed", tickformat="d", dtick=1 if L <= 16 else 2)
    return fig
