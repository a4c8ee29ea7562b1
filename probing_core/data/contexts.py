"""Mining classification contexts from a cached corpus (e.g. " the" vs " an" followed by a word).

Works on a cache entry's token table (``token_ids``, ``seq``, ``pos``), so the activations at
each target position are already on disk: mining a new class pair needs no forward pass. The
model is causal, so the features at the target depend only on the tokens before it; ``before``
and ``after`` say how much context a sample must have (and what is shown).

``offset`` says where the features are read relative to the target: 0 reads the target token
itself (the reference notebook; a probe then mostly reads which token it is), -1 the token before
it (does the model already know which of the classes comes next?).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from probing_core.errors import LabelError


@dataclass(frozen=True)
class ContextSet:
    """Target positions of each class, ready for probing.

    Attributes:
        rows: ``(n,)`` row indices into the entry's token table (the target tokens).
        labels: ``(n,)`` class index into ``class_names``.
        class_names: display name per class (e.g. ``"' the'"``).
        class_token_ids: token ids of each class.
        found: contexts found per class before capping; counts: kept per class.
        next_ids: ``(n,)`` the token after each target (the word type, used by the control task).
        samples: up to a few decoded contexts per class, the target in ⟦brackets⟧.
        offset: where the features are read, relative to the target (0 = at it, -1 = the token before).
    """

    rows: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    class_token_ids: list[list[int]]
    found: dict[str, int]
    counts: dict[str, int]
    next_ids: np.ndarray
    samples: dict[str, list[str]]
    before: int
    after: int
    offset: int = 0

    @property
    def feature_rows(self) -> np.ndarray:
        """``(n,)`` rows whose activations are the features: ``rows + offset``."""
        return self.rows + int(self.offset)

    @property
    def question(self) -> str:
        """The question a probe on these features answers, in words."""
        names = " or ".join(self.class_names)
        if self.offset == 0:
            return (f"Read at the target token itself: which token is it ({names})? The answer is the token's "
                    "identity, so the embedding alone already solves it.")
        back = "the token before the target" if self.offset == -1 else f"{-self.offset} tokens before the target"
        return f"Read at {back}: does the model already know that the next token will be {names}?"


def resolve_token_set(
    texts: Sequence[str], encode: Callable[[str], list[int]], decode_tokens: Callable[[Sequence[int]], list[str]]
) -> list[int]:
    """Token ids of a user-given set of strings; each must be one token.

    Raises:
        LabelError: an empty set, or a string that the tokenizer splits (the message lists the pieces).
    """
    ids: list[int] = []
    for t in texts:
        if t == "":
            continue
        enc = encode(t)
        if len(enc) != 1:
            pieces = decode_tokens(enc)
            raise LabelError(
                f"{t!r} is not a single token: it splits into {pieces!r}. Pick a one-token string — mind the "
                "leading space (' the' and 'the' are different tokens)."
            )
        ids.append(int(enc[0]))
    if not ids:
        raise LabelError("a class has no tokens; type at least one token string for it (e.g. ' the').")
    return list(dict.fromkeys(ids))


def mine_contexts(
    token_ids: np.ndarray,
    seq: np.ndarray,
    pos: np.ndarray,
    next_ids: np.ndarray,
    text_of: Callable[[np.ndarray], list[str]],
    class_token_ids: Sequence[Sequence[int]],
    class_names: Sequence[str],
    *,
    before: int = 14,
    after: int = 3,
    whole_word_next: bool = True,
    max_per_class: int | None = None,
    n_samples: int = 5,
    seed: int = 0,
    offset: int = 0,
) -> ContextSet:
    """Find every occurrence of each class's tokens with enough context around it.

    Args:
        token_ids, seq, pos, next_ids: the entry's ``(n_tokens,)`` token table (next_ids = -1 at a row end).
        text_of: decodes an id array to per-token text (``CachedActivations.text_strings``).
        class_token_ids: token ids per class (e.g. ``[[id(' the')], [id(' an')]]``).
        class_names: one name per class.
        before: tokens that must precede the target in its row (context window N).
        after: tokens that must follow it in the same row (M).
        whole_word_next: keep only targets whose next token starts with a space, i.e. the target
            is a whole word followed by a whole word (" the" + " cat", not " the" + "ory").
        max_per_class: cap per class (random, seeded); None keeps all.
        n_samples: decoded example contexts kept per class.
        offset: read the features this many tokens from the target (≤ 0; the read token must be in
            the target's row).

    Returns:
        :class:`ContextSet` (rows sorted by class then position).

    Raises:
        LabelError: overlapping token sets, fewer than two classes, or a class with no context.
    """
    if len(class_token_ids) < 2:
        raise LabelError("give at least two classes (e.g. ' the' and ' an').")
    offset = int(offset)
    if offset > 0:
        raise LabelError(f"target offset {offset}: read at the target (0) or before it (-1, -2, …); a token after "
                         "the target has already seen it.")
    seen: dict[int, int] = {}
    for ci, ids in enumerate(class_token_ids):
        for t in ids:
            if t in seen and seen[t] != ci:
                raise LabelError(
                    f"token {text_of(np.array([t]))[0]!r} is in both {class_names[seen[t]]} and {class_names[ci]}; "
                    "the classes must not overlap — remove it from one of them."
                )
            seen[t] = ci
    token_ids = np.asarray(token_ids)
    n = token_ids.size
    ok = pos >= max(before, -offset)
    if after > 0:
        j = np.minimum(np.arange(n) + after, n - 1)
        ok &= (np.arange(n) + after < n) & (seq[j] == seq) & (pos[j] == pos + after)
    if whole_word_next:
        nxt = np.asarray(next_ids)
        uniq = np.unique(nxt[nxt >= 0])
        starts = dict(zip(uniq.tolist(), [s[:1] == " " and s[1:2].isalnum() for s in text_of(uniq)]))
        ok &= np.array([starts.get(int(t), False) for t in nxt]) if n else np.zeros(0, bool)
    rng = np.random.default_rng(seed)
    rows, labels, found, counts, samples = [], [], {}, {}, {}
    for ci, ids in enumerate(class_token_ids):
        r = np.flatnonzero(np.isin(token_ids, list(ids)) & ok)
        name = class_names[ci]
        found[name] = int(r.size)
        if r.size == 0:
            raise LabelError(
                f"no context for {name} in this corpus (with {before} tokens before, {after} after"
                f"{', followed by a whole word' if whole_word_next else ''}); use a bigger corpus, a shorter window, "
                "or other tokens."
            )
        if max_per_class is not None and r.size > max_per_class:
            r = np.sort(rng.choice(r, max_per_class, replace=False))
        counts[name] = int(r.size)
        rows.append(r)
        labels.append(np.full(r.size, ci, np.int64))
        show = r if r.size <= n_samples else np.sort(rng.choice(r, n_samples, replace=False))
        samples[name] = [_decode_context(token_ids, text_of, int(i), before, after) for i in show]
    rows_a = np.concatenate(rows)
    return ContextSet(
        rows=rows_a, labels=np.concatenate(labels), class_names=list(class_names),
        class_token_ids=[list(map(int, c)) for c in class_token_ids], found=found, counts=counts,
        next_ids=np.asarray(next_ids)[rows_a], samples=samples, before=before, after=after, offset=offset,
    )


def _decode_context(token_ids: np.ndarray, text_of: Callable[[np.ndarray], list[str]], i: int, before: int, after: int) -> str:
    pre = "".join(text_of(token_ids[i - before : i]))
    tgt = "".join(text_of(token_ids[i : i + 1]))
    post = "".join(text_of(token_ids[i + 1 : i + 1 + after]))
    return f"{pre}⟦{tgt}⟧{post}".replace("\n", "⏎")
