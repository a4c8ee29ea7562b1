"""Labels for probes, computed from token strings (never by running user code).

A label is named by a :class:`LabelSpec` (name + parameters, hashable, JSON-friendly) and
computed by :func:`compute_labels` into a :class:`LabelResult`: float64 values and a validity
mask (rows whose label is undefined or excluded as an outlier have ``mask == False``).

Token strings are the tokenizer's raw vocabulary strings, with its leading-space marker:
``"Ġ"`` for byte-level BPE (GPT-2, SmolLM2), ``"▁"`` for SentencePiece (Llama 2, T5), or a
plain ``" "`` for tokenizers that decode to text. :func:`detect_space_marker` guesses it.

``LABELS`` describes every label for the UI (title, description, parameters, what it needs).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from probing_core.errors import LabelError

try:  # the third-party `regex` module supports a match timeout (guards against catastrophic patterns)
    import regex as _re

    _HAS_TIMEOUT = True
except ImportError:  # pragma: no cover - regex is pinned in requirements
    import re as _re  # type: ignore[no-redef]

    _HAS_TIMEOUT = False

__all__ = [
    "SPACE_MARKERS",
    "LabelSpec",
    "LabelResult",
    "LabelInfo",
    "LABELS",
    "TYPE_DECIDED",
    "number_token_counts",
    "compute_labels",
    "detect_space_marker",
]

SPACE_MARKERS: tuple[str, ...] = ("Ġ", "▁", " ")
MAX_PATTERN_LENGTH = 200
_REGEX_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class LabelSpec:
    """Which label to compute. ``params`` is a sorted tuple of (key, value) pairs so the spec
    is hashable; build it with ``LabelSpec.make("length", max_length=15)``."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, name: str, **params: Any) -> "LabelSpec":
        return cls(name, tuple(sorted((k, v) for k, v in params.items() if v is not None)))

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


@dataclass(frozen=True, eq=False)
class LabelResult:
    """Attributes:
    values: ``(n,)`` float64 label (0 where invalid).
    mask: ``(n,)`` bool, True where the label is defined and kept.
    description: one line for plots and manifests.
    spec: the spec that produced it.
    categories: names of the codes 0..k-1 for categorical labels (else empty).
    """

    values: np.ndarray
    mask: np.ndarray
    description: str
    spec: LabelSpec
    categories: tuple[str, ...] = ()

    @property
    def n_valid(self) -> int:
        return int(np.count_nonzero(self.mask))

    def selected(self) -> np.ndarray:
        """Values of the valid rows, ``(n_valid,)``."""
        return self.values[self.mask]


@dataclass(frozen=True)
class LabelInfo:
    """UI description of a label. ``needs`` lists the extra inputs of :func:`compute_labels`."""

    name: str
    title: str
    description: str
    params: Mapping[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    level: str = "token"  # "token", "next_token" or "sequence"
    #: True when the label is a function of the token's identity alone (length, capitalised, …): a
    #: random split of token rows then mostly re-scores token types seen in training, so probes of
    #: these labels split by token type by default (see ``analyses.regression``).
    by_type: bool = False


LABELS: dict[str, LabelInfo] = {
    i.name: i
    for i in [
        LabelInfo("length", "Token length", "Number of characters in the token string, counting the leading-space marker.",
                  {"max_length": None}),
        LabelInfo("length_no_space", "Token length without space",
                  "Number of characters without the leading-space marker (Ġ / ▁).", {"max_length": None}),
        LabelInfo("is_number", "Is a number", "1 if the token is all digits (leading-space marker allowed), else 0.",
                  {"allow_space": True}),
        LabelInfo("numeric_value", "Numeric value",
                  "Integer value of tokens made only of digits; other tokens are masked out.",
                  {"allow_space": False, "max_value": None, "min_count": 20}),
        LabelInfo("capitalised", "Capitalised", "1 if the first character after the space marker is an upper-case letter."),
        LabelInfo("starts_with_space", "Starts with space", "1 if the token begins with the leading-space marker."),
        LabelInfo("position", "Position", "Position of the token in its document (0 = first).", needs=("positions",)),
        LabelInfo("regex", "Regex match", "1 if the pattern matches anywhere in the token string (space marker shown as a space).",
                  {"pattern": ""}),
        LabelInfo("equals", "Equals token", "1 if the token is exactly the given string (a leading space matches the marker).",
                  {"token": ""}),
        LabelInfo("next_starts_with_space", "Next token starts with space",
                  "1 if the following token begins with the space marker (a whole new word follows).",
                  needs=("next_token_strings",), level="next_token"),
        LabelInfo("next_equals", "Next token equals", "1 if the following token is exactly the given string.",
                  {"token": ""}, needs=("next_token_strings",), level="next_token"),
        LabelInfo("column", "Column of the dataset",
                  "A per-row value from the uploaded file: numbers are used as is, text is coded by category.",
                  {"drop_missing": False}, needs=("column_values",), level="sequence"),
    ]
}


#: Labels decided by the token's identity (the same token string always gets the same value).
TYPE_DECIDED: frozenset[str] = frozenset(
    {"length", "length_no_space", "is_number", "numeric_value", "capitalised", "starts_with_space", "regex", "equals"}
)
LABELS = {k: (replace(v, by_type=True) if k in TYPE_DECIDED else v) for k, v in LABELS.items()}


def detect_space_marker(token_strings: Sequence[str]) -> str:
    """The leading-space marker used by a vocabulary: the most frequent first character among
    "Ġ", "▁" and " " (default "Ġ" when none occurs)."""
    counts = Counter(s[0] for s in token_strings if s and s[0] in SPACE_MARKERS)
    return counts.most_common(1)[0][0] if counts else "Ġ"


def _strip(s: str, marker: str) -> str:
    return s[len(marker):] if s.startswith(marker) else s


def _binary(values: Sequence[bool]) -> np.ndarray:
    return np.fromiter((1.0 if v else 0.0 for v in values), dtype=np.float64, count=len(values))


def compute_labels(
    spec: LabelSpec,
    token_strings: Sequence[str],
    positions: Sequence[int] | np.ndarray | None = None,
    next_token_strings: Sequence[str | None] | None = None,
    *,
    column_values: Sequence[Any] | np.ndarray | None = None,
    space_marker: str | None = None,
    allow_constant: bool = False,
) -> LabelResult:
    """Compute a label for each of ``n`` tokens (or rows).

    Args:
        spec: the label and its parameters (see ``LABELS``).
        token_strings: ``(n,)`` raw token strings (vocabulary or the tokens of a corpus).
        positions: ``(n,)`` positions, needed by "position".
        next_token_strings: ``(n,)`` string of the following token (None at the end of a document),
            needed by the next-token labels.
        column_values: ``(n,)`` per-row values, needed by "column".
        space_marker: leading-space marker; default: guessed by :func:`detect_space_marker`.
        allow_constant: do not raise when the label is constant over the valid rows.

    Returns:
        LabelResult.

    Raises:
        LabelError: unknown label, missing input, bad regex, nothing matches, no number tokens,
            NaN/inf values, constant label, no valid rows.
    """
    if spec.name not in LABELS:
        raise LabelError(f"unknown label {spec.name!r}; choose one of: {', '.join(LABELS)}.")
    toks = list(token_strings)
    n = len(toks)
    marker = space_marker if space_marker is not None else detect_space_marker(toks)
    name = spec.name
    mask = np.ones(n, dtype=bool)
    categories: tuple[str, ...] = ()
    title = LABELS[name].title

    if name in ("length", "length_no_space"):
        full = np.fromiter((len(t) for t in toks), dtype=np.float64, count=n)
        values = full if name == "length" else np.fromiter((len(_strip(t, marker)) for t in toks), dtype=np.float64, count=n)
        max_length = spec.get("max_length")
        if max_length is not None:
            # As in the reference notebook: outliers are judged on the full length for both tasks.
            mask &= full <= float(max_length)
            title += f" (length ≤ {max_length})"
    elif name == "is_number":
        allow = bool(spec.get("allow_space", True))
        values = _binary([_digits(t, marker, allow) is not None for t in toks])
    elif name == "numeric_value":
        allow = bool(spec.get("allow_space", False))
        digits = [_digits(t, marker, allow) for t in toks]
        mask = np.array([d is not None for d in digits], dtype=bool)
        count = int(mask.sum())
        min_count = int(spec.get("min_count", 20))
        if count < max(min_count, 1):
            plain, spaced = number_token_counts(toks, marker)
            raise LabelError(
                f"only {count} number tokens (all digits{'' if allow else ', no leading space'}) in the selection "
                f"({plain} without and {spaced} with a leading space); a regression needs at least "
                f"{max(min_count, 1)}. This tokenizer probably splits numbers into single digits; try gpt2 (it has "
                "well over a thousand number tokens)" + ("" if allow else ", or allow a leading space") + "."
            )
        values = np.array([float(int(d)) if d is not None else 0.0 for d in digits], dtype=np.float64)
        max_value = spec.get("max_value")
        if max_value is not None:
            mask &= values <= float(max_value)
            title += f" (value ≤ {max_value})"
    elif name == "capitalised":
        values = _binary([_is_capital(_strip(t, marker)[:1], marker) for t in toks])
    elif name == "starts_with_space":
        values = _binary([t.startswith(marker) for t in toks])
    elif name == "position":
        if positions is None:
            raise LabelError("the position label needs token positions; use a corpus dataset (not the vocabulary).")
        values = np.asarray(positions, dtype=np.float64).ravel()
        if values.shape[0] != n:
            raise LabelError(f"got {values.shape[0]} positions for {n} tokens.")
    elif name == "regex":
        pat = _compile(spec.get("pattern", ""))
        shown = [t.replace(marker, " ") if marker != " " else t for t in toks]
        try:
            hits = [pat.search(s, timeout=_REGEX_TIMEOUT_S) is not None for s in shown] if _HAS_TIMEOUT else [pat.search(s) is not None for s in shown]
        except TimeoutError:
            raise LabelError("the regex took too long on a token (catastrophic backtracking); simplify the pattern.") from None
        values = _binary(hits)
        if not any(hits):
            raise LabelError(f"the regex {spec.get('pattern')!r} matches no token in the selection; check the pattern "
                             f"(the space marker {marker!r} is shown as a plain space).")
        title = f"Regex {spec.get('pattern')!r}"
    elif name in ("equals", "next_equals"):
        target = spec.get("token", "")
        if not isinstance(target, str) or target == "":
            raise LabelError("give the token to compare with, e.g. ' the' (a leading space stands for the space marker).")
        forms = {target, marker + target[1:] if target.startswith(" ") else target}
        src = toks if name == "equals" else _need_next(next_token_strings, n)
        if name == "next_equals":
            mask = np.array([s is not None for s in src], dtype=bool)
        hits = [s is not None and s in forms for s in src]
        values = _binary(hits)
        if not any(hits):
            raise LabelError(f"no {'next ' if name == 'next_equals' else ''}token equals {target!r} in the selection; "
                             "check spelling and the leading space.")
        title = f"{'Next token' if name == 'next_equals' else 'Token'} = {target!r}"
    elif name == "next_starts_with_space":
        src = _need_next(next_token_strings, n)
        mask = np.array([s is not None for s in src], dtype=bool)
        values = _binary([s is not None and s.startswith(marker) for s in src])
    else:  # column
        values, mask, categories = _column(column_values, n, bool(spec.get("drop_missing", False)))

    if n == 0 or not mask.any():
        raise LabelError(f"the label {title!r} is defined for no token of the selection; select more tokens or relax thresholds.")
    sel = values[mask]
    if not np.all(np.isfinite(sel)):
        raise LabelError(f"the label {title!r} has NaN or inf values; mask them out or pick another label.")
    if not allow_constant and float(sel.max() - sel.min()) == 0.0:
        raise LabelError(
            f"the label {title!r} is constant ({sel[0]:g}) over the {sel.size} selected tokens, so there is "
            "nothing to predict; select other tokens/positions or another label."
        )
    values = np.where(mask, values, 0.0)
    desc = f"{title} — {int(mask.sum())} of {n} tokens"
    return LabelResult(values=values, mask=mask, description=desc, spec=spec, categories=categories)


def number_token_counts(token_strings: Sequence[str], marker: str | None = None) -> tuple[int, int]:
    """``(all-digit tokens, all-digit tokens allowing a leading-space marker)`` among ``token_strings``
    (the counts the numeric-value label works with; measured, never hard-coded)."""
    toks = list(token_strings)
    m = marker if marker is not None else detect_space_marker(toks)
    return (sum(_digits(t, m, False) is not None for t in toks), sum(_digits(t, m, True) is not None for t in toks))


def _is_capital(ch: str, marker: str) -> bool:
    # Byte-level BPE maps control bytes and space to U+0100..U+0143 (Ġ, Ċ, ...), which Python
    # counts as upper-case letters; they are not capitals of the text.
    if marker == "Ġ" and ch and 0x100 <= ord(ch) <= 0x143:
        return False
    return ch.isupper()


def _digits(tok: str, marker: str, allow_space: bool) -> str | None:
    s = _strip(tok, marker) if allow_space else tok
    return s if s and s.isascii() and s.isdigit() else None


def _compile(pattern: Any):
    if not isinstance(pattern, str) or pattern == "":
        raise LabelError("give a regular expression, e.g. '^ [A-Z]' (tokens starting with a space and a capital).")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise LabelError(f"the regex is {len(pattern)} characters long; keep it under {MAX_PATTERN_LENGTH}.")
    try:
        return _re.compile(pattern)
    except _re.error as e:
        raise LabelError(f"the regex {pattern!r} does not compile ({e}); fix the pattern (escape special characters with \\).") from None


def _need_next(next_token_strings: Sequence[str | None] | None, n: int) -> list[str | None]:
    if next_token_strings is None:
        raise LabelError("next-token labels need the following token of each token; use a corpus dataset, not the vocabulary.")
    src = list(next_token_strings)
    if len(src) != n:
        raise LabelError(f"got {len(src)} next tokens for {n} tokens.")
    return src


def _column(column_values: Any, n: int, drop_missing: bool) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    if column_values is None:
        raise LabelError("the column label needs a dataset with a label column (upload a .csv/.jsonl with one).")
    vals = list(column_values.tolist() if isinstance(column_values, np.ndarray) else column_values)
    if len(vals) != n:
        raise LabelError(f"the column has {len(vals)} values for {n} rows.")
    missing = [v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.strip() == "") for v in vals]
    if any(missing) and not drop_missing:
        raise LabelError(f"{sum(missing)} rows have a missing (empty/NaN) label; fill them or enable 'drop missing'.")
    mask = ~np.array(missing, dtype=bool)
    present = [v for v, m in zip(vals, missing) if not m]
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in present)
    if numeric:
        out = np.array([float(v) if not m else 0.0 for v, m in zip(vals, missing)], dtype=np.float64)
        if not np.all(np.isfinite(out[mask])):
            raise LabelError("the column has inf values; remove or clip them.")
        return out, mask, ()
    cats = tuple(sorted({str(v) for v in present}))
    code = {c: i for i, c in enumerate(cats)}
    out = np.array([float(code[str(v)]) if not m else 0.0 for v, m in zip(vals, missing)], dtype=np.float64)
    return out, mask, cats
