"""Attention patterns, per-head summary scores and offline CircuitsVis rendering.

Patterns come from ``blocks.{layer}.attn.hook_pattern`` ([batch, head, query, key], each row a
softmax over keys, zero above the diagonal for causal models). Head scores are pure numpy over
pattern arrays so they can be checked on hand-built patterns. CircuitsVis HTML is always built
from the package's inlined bundle (``RenderedHTML.local_src``) — the object's string form, its
``show_code`` method and ``_repr_html_`` load JavaScript from a CDN or ping outside hosts, which fails offline.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from probing_core.errors import InputError
from probing_core.models import LoadedModel, as_numpy

#: Default cap on prompt length for attention views ([layer, head, pos, pos] grows quadratically,
#: and CircuitsVis gets unreadable long before the context limit).
DEFAULT_MAX_LEN = 128


@dataclass(frozen=True)
class AttentionResult:
    """Attention patterns of one layer (or all layers) for one prompt.

    Attributes:
        prompt: the prompt text.
        tokens: [pos] token texts (BOS first), after truncation.
        token_ids: [pos] int64.
        pattern: [head, query, key] float32 for one layer, or [layer, head, query, key] when
            ``layer`` is None (all layers).
        layer: the layer shown, or None for all layers.
        truncated: whether the prompt was cut to ``n_tokens`` of ``n_tokens_original``.
        notice: a sentence to show the user when truncated (else None).
        n_tokens_original: token count before truncation (with BOS).
    """

    prompt: str
    tokens: list[str]
    token_ids: np.ndarray
    pattern: np.ndarray
    layer: int | None
    truncated: bool
    notice: str | None
    n_tokens_original: int

    @property
    def n_heads(self) -> int:
        return int(self.pattern.shape[-3])

    def head(self, head: int, layer: int | None = None) -> np.ndarray:
        """[query, key] pattern of one head (``layer`` needed when this holds all layers).

        Raises:
            InputError: head or layer out of range.
        """
        pat = self.pattern
        if pat.ndim == 4:
            if layer is None:
                raise InputError("this result holds every layer; say which layer.")
            _check_range("layer", layer, pat.shape[0])
            pat = pat[layer]
        _check_range("head", head, pat.shape[0])
        return pat[head]

    def head_rows(self, head: int, layer: int | None = None) -> list[dict[str, Any]]:
        """Long-form rows (query, key, weight) of one head, for CSV export."""
        pat = self.head(head, layer)
        return [
            {"query_pos": q, "query_token": self.tokens[q], "key_pos": kpos, "key_token": self.tokens[kpos],
             "weight": float(pat[q, kpos])}
            for q in range(pat.shape[0]) for kpos in range(pat.shape[1])
        ]


def _check_range(what: str, value: int, n: int) -> None:
    if not isinstance(value, (int, np.integer)) or not 0 <= int(value) < n:
        raise InputError(f"{what} {value} is out of range; this model has {what}s 0…{n - 1}.")


def _prepare_tokens(model: LoadedModel, prompt: str, max_len: int | None) -> tuple[list[int], bool, str | None, int]:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty; type some text or pick a dataset sample.")
    ids = model.encode(prompt, prepend_bos=True)
    n0 = len(ids)
    cap = model.n_ctx if max_len is None else min(int(max_len), model.n_ctx)
    if cap < 1:
        raise InputError(f"max_len must be at least 1, got {max_len}.")
    if n0 <= cap:
        return ids, False, None, n0
    why = "the model's context" if cap == model.n_ctx else "the view's limit"
    notice = f"the prompt is {n0} tokens; only the first {cap} are shown ({why} is {cap} tokens)."
    return ids[:cap], True, notice, n0


def _run_patterns(model: LoadedModel, ids: list[int], layers: Sequence[int]) -> np.ndarray:
    names = [f"blocks.{i}.attn.hook_pattern" for i in layers]
    _, acts = model.run_with_cache(torch.tensor([ids]), names)
    return np.stack([as_numpy(acts[n][0]) for n in names])  # [layer, head, q, k]


def attention_patterns(
    model: LoadedModel, prompt: str, *, layer: int | None, max_len: int | None = DEFAULT_MAX_LEN
) -> AttentionResult:
    """Attention patterns of every head of ``layer`` (or of every layer when ``layer`` is None).

    Args:
        model: a loaded model.
        prompt: the text (BOS is prepended).
        layer: 0…n_layers-1, or None for all layers.
        max_len: keep at most this many tokens (with BOS); longer prompts are truncated with a
            notice. None: only the model's context limit.

    Returns:
        An :class:`AttentionResult`; ``pattern`` is [head, query, key] (or [layer, head, query, key]).

    Raises:
        InputError: empty prompt, layer out of range.
    """
    if layer is not None:
        _check_range("layer", layer, model.n_layers)
    ids, truncated, notice, n0 = _prepare_tokens(model, prompt, max_len)
    layers = list(range(model.n_layers)) if layer is None else [int(layer)]
    pats = _run_patterns(model, ids, layers)
    return AttentionResult(
        prompt=prompt,
        tokens=model.to_str_tokens(ids),
        token_ids=np.asarray(ids, dtype=np.int64),
        pattern=pats if layer is None else pats[0],
        layer=None if layer is None else int(layer),
        truncated=truncated,
        notice=notice,
        n_tokens_original=n0,
    )


# ---------------------------------------------------------------------------------------------
# Head scores (pure numpy)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadScores:
    """Per-head summaries, each [layer, head].

    Every score averages over query positions ``q >= 1`` (query 0 can only attend to itself, which
    would pull every score toward trivial values); with a single token, over query 0.

    Attributes:
        entropy: mean attention entropy in nats (0 = always one key; log(q+1) = uniform).
        prev_token: mean weight on the previous token, ``pattern[q, q-1]``.
        first_token: mean weight on position 0 (BOS — an "attention sink").
        selected: mean weight on ``selected_token`` over queries that can see it
            (``q >= max(selected_token, 1)``); None when no token was selected.
        selected_token: the position used for ``selected``.
        tokens: [pos] token texts.
    """

    entropy: np.ndarray
    prev_token: np.ndarray
    first_token: np.ndarray
    selected: np.ndarray | None
    selected_token: int | None
    tokens: list[str]

    def table(self) -> dict[str, np.ndarray]:
        out = {"entropy": self.entropy, "prev_token": self.prev_token, "first_token": self.first_token}
        if self.selected is not None:
            out[f"attn_to_pos_{self.selected_token}"] = self.selected
        return out

    def rows(self) -> list[dict[str, Any]]:
        t = self.table()
        L, H = self.entropy.shape
        return [{"layer": li, "head": h, **{k: float(v[li, h]) for k, v in t.items()}} for li in range(L) for h in range(H)]


def head_scores(patterns_all_layers: np.ndarray, tokens: Sequence[str], selected_token: int | None = None) -> HeadScores:
    """Summaries of every head from its attention pattern.

    Args:
        patterns_all_layers: [layer, head, query, key] (a [head, query, key] array is treated as one layer).
        tokens: [pos] token texts (only their count is checked).
        selected_token: optional key position whose received attention to report.

    Returns:
        A :class:`HeadScores`.

    Raises:
        InputError: wrong shape, token count mismatch, selected position out of range.
    """
    pat = np.asarray(patterns_all_layers, dtype=np.float64)
    if pat.ndim == 3:
        pat = pat[None]
    if pat.ndim != 4 or pat.shape[-1] != pat.shape[-2]:
        raise InputError(f"patterns must be [layer, head, query, key] with query == key, got shape {pat.shape}.")
    T = pat.shape[-1]
    if len(tokens) != T:
        raise InputError(f"{len(tokens)} tokens for patterns over {T} positions.")
    if T == 0:
        raise InputError("patterns over zero positions.")
    q0 = 1 if T > 1 else 0
    qs = np.arange(q0, T)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(pat > 0, pat * np.log(np.where(pat > 0, pat, 1.0)), 0.0)
    entropy = -plogp.sum(-1)[..., qs].mean(-1)
    if T > 1:
        prev = pat[..., qs, qs - 1].mean(-1)
    else:
        prev = np.zeros(pat.shape[:2])
    first = pat[..., qs, 0].mean(-1)
    selected = None
    if selected_token is not None:
        _check_range("selected token position", selected_token, T)
        s = int(selected_token)
        sq = np.arange(max(s, q0), T)
        selected = pat[..., sq, s].mean(-1).astype(np.float32)
    return HeadScores(
        entropy=entropy.astype(np.float32), prev_token=prev.astype(np.float32), first_token=first.astype(np.float32),
        selected=selected, selected_token=None if selected_token is None else int(selected_token), tokens=list(tokens),
    )


# ---------------------------------------------------------------------------------------------
# CircuitsVis, offline
# ---------------------------------------------------------------------------------------------


def circuitsvis_html(
    tokens: Sequence[str],
    pattern: np.ndarray,
    *,
    head_names: Sequence[str] | None = None,
    kind: str = "heads",
    title: str = "Attention patterns",
) -> str:
    """A standalone HTML page showing ``pattern`` with CircuitsVis, JavaScript inlined (works offline).

    Args:
        tokens: [pos] token texts.
        pattern: [head, query, key].
        head_names: optional names per head (default ``H0``, ``H1``, …).
        kind: "heads" (``attention_heads``: thumbnails + one enlarged head) or "patterns"
            (``attention_patterns``: token-hover view).
        title: the page title.

    Returns:
        A complete HTML document (about 1.3 MB: the bundle is inside).

    Raises:
        InputError: pattern not [head, pos, pos] matching the tokens, unknown kind.
    """
    import circuitsvis as cv  # heavy-ish import; only here

    pat = np.asarray(pattern, dtype=np.float32)
    if pat.ndim != 3 or pat.shape[1] != pat.shape[2] or pat.shape[1] != len(tokens):
        raise InputError(f"pattern must be [head, query, key] over {len(tokens)} tokens, got shape {pat.shape}.")
    toks = [str(t) for t in tokens]
    if kind == "heads":
        names = list(head_names) if head_names is not None else [f"H{h}" for h in range(pat.shape[0])]
        rendered = cv.attention.attention_heads(attention=pat, tokens=toks, attention_head_names=names)
    elif kind == "patterns":
        rendered = cv.attention.attention_patterns(tokens=toks, attention=pat)
    else:
        raise InputError(f"unknown CircuitsVis view {kind!r}; choose 'heads' or 'patterns'.")
    body = _escape_props(rendered.local_src)  # only the inlined bundle: the other renderings use a CDN
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _escape_props(src: str) -> str:
    """Neutralise ``</script>`` / ``<!--`` inside the JSON props (token text is user input).

    CircuitsVis puts the props as JSON inside an inline ``<script>``; a token such as
    ``</script><script>…`` would end that element and run as code. ``<\\/`` is the same string to
    JavaScript but not a closing tag to the HTML parser.
    """
    start = src.rfind("CircuitsVis.render(")
    end = src.rfind("</script>")
    if start < 0 or end < start:
        raise RuntimeError("unexpected CircuitsVis output; cannot place the props safely")
    props = src[start:end].replace("</", "<\\/").replace("<!--", "<\\!--")
    return src[:start] + props + src[end:]
