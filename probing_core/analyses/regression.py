"""Regression probes end to end: cached activations + label + position rule → ridge path per hook.

This is the orchestration behind the "Regression probes" page and ``probe regression`` CLI:

* :func:`regression_data` selects token rows (position rule, BOS excluded, label mask) and reads
  each hook's rows from the store lazily (one hook in memory at a time).
* :func:`run_regression` fits the whole ridge path on every hook (:func:`probing_core.solvers.ridge.fit_ridge_path`)
  and returns a :class:`RegressionRun` with a JSON manifest. Its ``decompositions`` can be passed
  back to fit another label on the same rows without a new eigendecomposition (the caller keeps
  them; this module holds no state).
* :func:`embedding_regression` regresses token properties from the embedding matrix ``W_E`` over
  the whole vocabulary (the reference notebook's first experiment).
* :func:`probe_transfer` fits one probe on ``W_E`` (or ``hook_embed``) and scores it unchanged on
  every residual-stream hook of a cache entry (the notebook's "continuing up the model").
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from probing_core.store.activations import CachedActivations
from probing_core.errors import HookError, LabelError, ProbeError, ProbingError
from probing_core.data.labels import LABELS, LabelSpec, compute_labels, number_token_counts
from probing_core.models import LoadedModel
from probing_core.solvers.ridge import (
    DEFAULT_ALPHAS,
    RidgeDecomposition,
    RidgePathResult,
    RidgeSplit,
    TransferResult,
    fit_ridge_path,
    make_split,
    score_transfer,
)
from probing_core.threads import single_threaded
from probing_core.solvers.splits import bootstrap_r2_ci, bootstrap_r2_ci_many, grouped_blocks, r2_score, seen_in_training

__all__ = [
    "PositionRule",
    "SelectionInfo",
    "SPLITS",
    "HeldOut",
    "resolve_split",
    "HookRows",
    "ReusableDecompositions",
    "RegressionRun",
    "EMBEDDING_TASKS",
    "EmbeddingTask",
    "EmbeddingRegressionResult",
    "TransferRun",
    "regression_data",
    "run_regression",
    "remember_decompositions",
    "embedding_regression",
    "probe_transfer",
    "transfer_hooks",
    "curve_rows",
    "weights_zip",
    "families_present",
    "default_families",
    "alpha_labels",
    "SPLIT_CHOICES",
    "TRANSFER_SOURCES",
]

_RESID = re.compile(r"^(hook_embed|blocks\.(\d+)\.hook_resid_(pre|mid|post))$")
_STAGE = {"pre": 0, "mid": 1, "post": 2}


# --------------------------------------------------------------------------------------------
# Position rules and row selection
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PositionRule:
    """Which token rows to probe. ``kind``: "all" (every token but BOS), "last" (last token of
    each row) or "match" (tokens whose text is one of ``tokens``; " the" also matches "Ġthe")."""

    kind: str = "all"
    tokens: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "PositionRule":
        """From "all", "last" or "match:TOK,TOK" (the CLI and URL form).

        Raises:
            ProbeError: unknown rule or an empty token list.
        """
        t = (text or "all").strip()
        if t in ("all", "last"):
            return cls(t)
        if t.startswith("match:"):
            toks = tuple(s for s in t[len("match:"):].split(",") if s != "")
            if not toks:
                raise ProbeError("give the tokens to match, e.g. match: the, an (comma-separated; a leading space is kept).")
            return cls("match", toks)
        raise ProbeError(f"unknown position rule {text!r}; use all, last or match:TOK,TOK.")

    def __str__(self) -> str:
        return self.kind if self.kind != "match" else "match:" + ",".join(self.tokens)


def _candidate_rows(acts: CachedActivations, rule: PositionRule) -> np.ndarray:
    keep = ~acts.bos_mask()
    if rule.kind == "last":
        keep &= acts.next_ids < 0
    elif rule.kind == "match":
        want = set(rule.tokens)
        marker = acts.space_marker or ""
        if marker and marker != " ":
            want |= {marker + t[1:] for t in rule.tokens if t.startswith(" ")}
        ids = np.unique(acts.token_ids)
        raw, text = acts.raw_strings(ids), acts.text_strings(ids)
        hit = np.array([r in want or t in want for r, t in zip(raw, text)], dtype=bool)
        keep &= np.isin(acts.token_ids, ids[hit])
    elif rule.kind != "all":
        raise ProbeError(f"unknown position rule {rule.kind!r}; use all, last or match.")
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        what = {"match": f"tokens equal to {list(rule.tokens)}", "last": "last tokens"}.get(rule.kind, "tokens")
        raise ProbeError(f"the position rule selects no rows ({what} do not occur in this cache entry); "
                         "pick another rule or tokens that occur in the corpus.")
    return rows


def _column_values(acts: CachedActivations, spec: LabelSpec, rows: np.ndarray) -> list[Any] | None:
    if spec.name != "column":
        return None
    cols = acts.columns()
    if not cols:
        raise LabelError("this cache entry has no label columns; upload a .csv/.jsonl with a label column and cache it.")
    name = spec.get("column") or (next(iter(cols)) if len(cols) == 1 else None)
    if name not in cols:
        raise LabelError(f"pick the column to regress with column=NAME; this entry has: {', '.join(cols)}.")
    per_doc = cols[name]
    vals = [per_doc[d] for d in acts.doc_index[acts.seq[rows]]]
    # The store keeps columns as text; numbers go back to floats so they are regressed, not coded.
    present = [v for v in vals if v is not None and str(v).strip() != ""]
    try:
        [float(v) for v in present]
    except ValueError:
        return vals
    return [float(v) if v is not None and str(v).strip() != "" else None for v in vals]


@dataclass(frozen=True)
class SelectionInfo:
    """What :func:`regression_data` selected.

    Attributes:
        rows: ``(n,)`` indices into the entry's token table.
        label: the label spec; description: one line (label + counts).
        n_candidates: rows allowed by the position rule (before the label mask).
        position_rule: the rule as text; categories: names of categorical codes (column labels).
    """

    rows: np.ndarray
    label: LabelSpec
    description: str
    n_candidates: int
    position_rule: str
    categories: tuple[str, ...] = ()

    @property
    def n_selected(self) -> int:
        return int(self.rows.size)

    @property
    def rows_digest(self) -> str:
        return hashlib.blake2b(np.ascontiguousarray(self.rows, dtype=np.int64).tobytes(), digest_size=8).hexdigest()


class HookRows(Mapping[str, np.ndarray]):
    """Hook → float32 ``(n, width)`` activations of the selected rows, read from the store on access.

    Only one hook is held in memory (the last one read), so 90 hooks of a large entry never sit in
    RAM together. Each read is checked for NaN/inf.
    """

    def __init__(self, acts: CachedActivations, hooks: Sequence[str], rows: np.ndarray) -> None:
        self._acts, self._hooks, self._rows = acts, tuple(hooks), rows
        self._last: tuple[str, np.ndarray] | None = None

    def __getitem__(self, hook: str) -> np.ndarray:
        if hook not in self._hooks:
            raise KeyError(hook)
        if self._last is not None and self._last[0] == hook:
            return self._last[1]
        X = np.asarray(self._acts.hook(hook)[self._rows], dtype=np.float32)
        if not np.isfinite(X).all():
            raise ProbeError(_nonfinite_message(hook, int(X.size - np.isfinite(X).sum())))
        self._last = (hook, X)
        return X

    def __iter__(self) -> Iterator[str]:
        return iter(self._hooks)

    def __len__(self) -> int:
        return len(self._hooks)


def _nonfinite_message(hook: str, count: int) -> str:
    return (f"hook {hook!r}: {count:,} activation values are NaN or inf (float16 overflow?). Rebuild the cache "
            "entry with float32 storage (Home → Storage dtype, or `cache build --store-dtype float32`).")


def _check_hooks(acts: CachedActivations, hooks: Sequence[str]) -> tuple[str, ...]:
    hooks = tuple(dict.fromkeys(hooks))
    if not hooks:
        raise ProbeError("no hooks selected; pick at least one hook to probe.")
    missing = [h for h in hooks if h not in acts.hooks]
    if missing:
        raise HookError(f"hook(s) {missing} are not in cache entry {acts.key}; it holds {len(acts.hooks)} hooks "
                        f"({', '.join(acts.hooks[:4])}…). Build an entry with them on Home.")
    widths = {h: int(acts.meta["widths"][h]) for h in hooks}
    if len(set(widths.values())) > 1:
        groups: dict[int, list[str]] = {}
        for h, w in widths.items():
            groups.setdefault(w, []).append(h)
        desc = "; ".join(f"width {w}: {', '.join(hs[:3])}{'…' if len(hs) > 3 else ''}" for w, hs in groups.items())
        raise ProbeError(f"the selected hooks have different widths ({desc}); probe hooks of one kind together "
                         "(e.g. the residual stream, or the MLP neurons).")
    bad = {h: n for h, n in acts.meta.get("nonfinite", {}).items() if h in hooks and n}
    if bad:
        h, n = next(iter(bad.items()))
        raise ProbeError(_nonfinite_message(h, int(n)))
    return hooks


def regression_data(
    acts: CachedActivations,
    hooks: Sequence[str],
    label_spec: LabelSpec,
    position_rule: PositionRule | str = "all",
) -> tuple[HookRows, np.ndarray, SelectionInfo]:
    """Activations and label of the selected tokens.

    Args:
        acts: an opened cache entry.
        hooks: hook names of one width, all present in the entry.
        label_spec: see :data:`probing_core.data.labels.LABELS`.
        position_rule: :class:`PositionRule` or its text form ("all", "last", "match:TOK,TOK").

    Returns:
        (X_by_hook: hook → float32 ``(n, width)`` (read lazily), y: ``(n,)`` float64, info).

    Raises:
        HookError: hook not in the entry. ProbeError: mixed widths, NaN/inf activations, no rows.
        LabelError: constant label, label defined for no selected token, bad parameters.
    """
    rule = PositionRule.parse(position_rule) if isinstance(position_rule, str) else position_rule
    hooks = _check_hooks(acts, hooks)
    rows = _candidate_rows(acts, rule)
    ids = acts.token_ids[rows]
    nxt = acts.next_ids[rows]
    need = LABELS[label_spec.name].needs if label_spec.name in LABELS else ()
    next_strings = None
    if "next_token_strings" in need:
        strs = acts.raw_strings(np.where(nxt >= 0, nxt, 0))
        next_strings = [s if n >= 0 else None for s, n in zip(strs, nxt)]
    lab = compute_labels(
        label_spec, acts.raw_strings(ids), positions=acts.pos[rows], next_token_strings=next_strings,
        column_values=_column_values(acts, label_spec, rows), space_marker=acts.space_marker or None,
    )
    keep = rows[lab.mask]
    info = SelectionInfo(rows=keep, label=label_spec, description=f"{lab.description} ({rule})",
                         n_candidates=int(rows.size), position_rule=str(rule), categories=lab.categories)
    return HookRows(acts, hooks, keep), lab.values[lab.mask], info


# --------------------------------------------------------------------------------------------
# Splits: random tokens or token types
# --------------------------------------------------------------------------------------------
#: Split name → what is held out (said on the page, the CLI and in the manifest).
SPLITS: dict[str, str] = {
    "type": "new token types: no token type of the test set (or of a CV fold) occurs in training",
    "tokens": "random tokens: test tokens are mostly token types also seen in training",
}
#: The ``split_by`` choices as a page offers them (name → words).
SPLIT_CHOICES: dict[str, str] = {
    "auto": "auto (new token types when the token decides the label)",
    "type": "new token types",
    "tokens": "random tokens (mostly seen types)",
}


def resolve_split(split_by: str, label_spec: LabelSpec) -> str:
    """"auto" → "type" for labels the token's identity decides (``LABELS[...].by_type``), else "tokens".

    Raises:
        ProbeError: an unknown split name.
    """
    if split_by == "auto":
        info = LABELS.get(label_spec.name)
        return "type" if info is not None and info.by_type else "tokens"
    if split_by not in SPLITS:
        raise ProbeError(f"unknown split {split_by!r}; use auto, type (new token types) or tokens (random tokens).")
    return split_by


def _build_split(split_by: str, groups: np.ndarray, test_fraction: float, cv: int, seed: int) -> RidgeSplit:
    if split_by == "tokens":
        return make_split(groups.size, test_fraction=test_fraction, cv=cv, seed=seed)
    block = grouped_blocks(groups, test_fraction=test_fraction, cv=cv, seed=seed)
    return RidgeSplit(block=block, n_folds=int(cv) if int(cv) >= 2 else 0, test_fraction=float(test_fraction),
                      seed=int(seed))


@dataclass(frozen=True, eq=False)
class HeldOut:
    """Held-out R² at each hook's chosen α, split by whether the test token's type was seen in training.

    Attributes (``(hook,)`` arrays; CIs ``(hook, 2)`` 95 % percentile bootstrap over the test rows):
        r2, r2_ci: every test row (the same number as ``r2_test`` at the best α).
        r2_seen, r2_seen_ci: test rows whose token type also occurs in training (NaN if < 3 rows).
        r2_new, r2_new_ci: test rows of token types never seen in training (NaN if < 3 rows).
        n_test, n_seen, n_new: row counts (the same for every hook).
    """

    r2: np.ndarray
    r2_ci: np.ndarray
    r2_seen: np.ndarray
    r2_seen_ci: np.ndarray
    r2_new: np.ndarray
    r2_new_ci: np.ndarray
    n_test: int
    n_seen: int
    n_new: int


def _held_out(acts: CachedActivations, r: RidgePathResult, rows: np.ndarray, y: np.ndarray, split: RidgeSplit,
              seed: int, arrays: Mapping[str, np.ndarray] | None = None) -> HeldOut | None:
    """``arrays``: hook → the entry's stored array (already opened memmaps; opening one again re-checks the store)."""
    test = split.block == 0
    if not test.any():
        return None
    groups = acts.token_ids[rows]
    seen = seen_in_training(groups, split.block)[test]
    test_rows, yt = rows[test], y[test]
    # predictions of every hook's probe (at its best α) on the test rows, then all intervals at once
    src = arrays if arrays is not None else {h: acts.hook(h) for h in r.hooks}
    P = np.stack([r.predict(h, np.asarray(src[h][test_rows], dtype=np.float32)) for h in r.hooks])
    arr: dict[str, np.ndarray] = {}
    for key, m in (("r2", np.ones_like(seen)), ("r2_seen", seen), ("r2_new", ~seen)):
        if int(m.sum()) >= 3:
            arr[key] = np.array([r2_score(yt[m], p[m]) for p in P])
            arr[key + "_ci"] = bootstrap_r2_ci_many(yt[m], P[:, m], seed=seed)
        else:
            arr[key] = np.full(len(r.hooks), np.nan)
            arr[key + "_ci"] = np.full((len(r.hooks), 2), np.nan)
    return HeldOut(**arr, n_test=int(test.sum()), n_seen=int(seen.sum()), n_new=int((~seen).sum()))


# --------------------------------------------------------------------------------------------
# Fresh probe per hook
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ReusableDecompositions:
    """Label-independent ridge decompositions for one row selection and split (pass to
    :func:`run_regression` to fit another label without a new eigendecomposition)."""

    rows_digest: str
    split: tuple  # (test_fraction, cv, seed, split_by)
    by_hook: Mapping[str, RidgeDecomposition] = field(repr=False)


@dataclass(frozen=True, eq=False)
class RegressionRun:
    """One label probed on several hooks.

    Attributes:
        result: the :class:`RidgePathResult` (R² ``(hook, alpha)``, best α, baseline, coefficients).
        info: the row selection; label: the spec; description: one line.
        y_mean, y_std: label statistics over the selected rows.
        manifest: JSON-able run description (model, dataset fingerprint, label, α grid, split, versions).
        decompositions: reusable for another label on the same rows (see :class:`ReusableDecompositions`).
        split_by: "type" (test and CV folds hold token types never seen in training) or "tokens"
            (random tokens; most test tokens are types seen in training); held_out: R² at the best α
            on seen and new types with bootstrap CIs (None without a test split).
    """

    result: RidgePathResult
    info: SelectionInfo
    label: LabelSpec
    description: str
    y_mean: float
    y_std: float
    manifest: dict[str, Any]
    decompositions: ReusableDecompositions = field(repr=False)
    split_by: str = "tokens"
    held_out: HeldOut | None = None

    @property
    def test_name(self) -> str:
        """What the test curve is: "new token types" or "random tokens (mostly seen types)"."""
        return "new token types" if self.split_by == "type" else "random tokens (mostly seen types)"

    def table(self, alpha_index: int | None = None) -> list[dict[str, Any]]:
        """One row per hook at one α of the grid (None = each hook's best α)."""
        r, ho = self.result, self.held_out
        out = []
        for i, h in enumerate(r.hooks):
            j = int(r.best_index[i]) if alpha_index is None else int(alpha_index)
            row = {
                "hook": h, "alpha": float(r.alphas[j]), "best_alpha": float(r.best_alpha[i]),
                "r2_train": float(r.r2_train[i, j]), "r2_test": float(r.r2_test[i, j]), "n_test": r.n_test,
                "r2_cv_mean": float(r.r2_cv_mean[i, j]), "r2_cv_std": float(r.r2_cv_std[i, j]),
                "baseline_r2": float(r.baseline_r2[i]),
            }
            if ho is not None and alpha_index is None:
                row |= {"r2_test_ci_low": float(ho.r2_ci[i, 0]), "r2_test_ci_high": float(ho.r2_ci[i, 1]),
                        "r2_seen_types": float(ho.r2_seen[i]), "n_seen_types": ho.n_seen,
                        "r2_new_types": float(ho.r2_new[i]), "n_new_types": ho.n_new}
            out.append(row)
        return out

    @property
    def score_name(self) -> str:
        """The column α was chosen on: "r2_cv_mean" with CV folds, else "r2_test"."""
        return "r2_cv_mean" if self.result.n_folds else "r2_test"

    def best_row(self, alpha_index: int | None = None) -> dict[str, Any]:
        """The row of :meth:`table` with the highest :attr:`score_name` (NaN skipped; the first on ties, and the
        first row when every score is NaN: its NaN is then shown, not an error)."""
        rows = self.table(alpha_index)
        scores = np.array([row[self.score_name] for row in rows], dtype=np.float64)
        return rows[0 if np.isnan(scores).all() else int(np.nanargmax(scores))]

    def test_note(self, row: Mapping[str, Any]) -> str:
        """How many test rows a row of :meth:`table` rests on, with the 95 % bootstrap interval of its test R²
        when the row has one (each hook's best α): "n = 1,234 test rows (95 % CI 0.41…0.47)"."""
        ci = f" (95 % CI {row['r2_test_ci_low']:.2f}…{row['r2_test_ci_high']:.2f})" if "r2_test_ci_low" in row else ""
        return f"n = {self.result.n_test:,} test rows{ci}"

    def held_out_note(self) -> str:
        """What is held out, where α was chosen, and (with a test split) the seen/new-type test rows, in words."""
        ho = self.held_out
        return (f"{SPLITS[self.split_by]}; α chosen on "
                + ("the CV folds of the training rows" if self.result.n_folds else "the test split (no CV: optimistic)")
                + (f"; test rows of seen types {ho.n_seen:,}, of new types {ho.n_new:,} (table: R² on each)."
                   if ho is not None else "."))

    def weights(self, alpha: float | None = None) -> dict[str, np.ndarray]:
        """Hook → float32 ``(width + 1,)``: coefficients then the intercept (None = each hook's best α)."""
        r = self.result
        return {h: np.append(r.coef(h, alpha), r.intercept(h, alpha)).astype(np.float32) for h in r.hooks}


def run_regression(
    acts: CachedActivations,
    hooks: Sequence[str],
    label_spec: LabelSpec,
    position_rule: PositionRule | str = "all",
    *,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    cv: int = 5,
    test_fraction: float = 0.2,
    seed: int = 0,
    split_by: str = "auto",
    decompositions: ReusableDecompositions | Sequence[ReusableDecompositions] | None = None,
    model_description: Mapping[str, Any] | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> RegressionRun:
    """Fit the ridge path of ``label_spec`` on every hook (fresh probe per hook).

    α is chosen on the CV folds of the training rows (on the test split only with ``cv`` < 2), and
    the test R² is reported at that α.

    Args:
        acts, hooks, label_spec, position_rule: see :func:`regression_data`.
        alphas: α grid (> 0). cv: CV folds (0/1 = none). test_fraction: held-out share. seed: split seed.
        split_by: "type" (grouped by token type: test set and CV folds hold only types never seen in
            training), "tokens" (random tokens) or "auto" ("type" for labels the token's identity
            decides, see ``LabelInfo.by_type``).
        decompositions: from earlier runs (one or several); one built for exactly these rows and split is reused.
        model_description: ``LoadedModel.describe()`` for the manifest (default: the entry's model fields).
        progress: ``progress(fraction, message)`` after each hook (on the calling thread).

    Returns:
        RegressionRun.

    Raises:
        ProbeError, LabelError, HookError: see :func:`regression_data` and ``fit_ridge_path``.
    """
    _, y, info = regression_data(acts, hooks, label_spec, position_rule)
    how = resolve_split(split_by, label_spec)
    split_key = (float(test_fraction), int(cv), int(seed), how)
    split = _build_split(how, acts.token_ids[info.rows], float(test_fraction), int(cv), int(seed))
    cands = [decompositions] if isinstance(decompositions, ReusableDecompositions) else list(decompositions or [])
    reuse = next((d.by_hook for d in cands if d.rows_digest == info.rows_digest and d.split == split_key), None)
    # The stored arrays themselves (memmaps): a label change then reads each hook once, in place.
    full = {h: acts.hook(h) for h in dict.fromkeys(hooks)}
    result = fit_ridge_path(full, y, alphas=alphas, test_fraction=test_fraction, cv=cv, seed=seed,
                            decompositions=reuse, rows=info.rows, progress=progress, split=split)
    with single_threaded():  # small products: oversubscribed BLAS threads made them 10x slower here
        held = _held_out(acts, result, info.rows, y, split, int(seed), full)
    decs = ReusableDecompositions(info.rows_digest, split_key, result.decompositions)
    manifest = _manifest(acts, info, result, model_description)
    manifest["split"] |= {"by": how, "held_out": SPLITS[how], "alpha_chosen_on": "CV folds of the training rows"
                          if result.n_folds else "the test split (no CV: the test R² is optimistic)"}
    if held is not None:
        manifest["split"] |= {"n_test_seen_types": held.n_seen, "n_test_new_types": held.n_new}
    return RegressionRun(result=result, info=info, label=label_spec, description=info.description,
                         y_mean=float(y.mean()), y_std=float(y.std()), manifest=manifest, decompositions=decs,
                         split_by=how, held_out=held)


def remember_decompositions(kept: list[ReusableDecompositions], run: RegressionRun, keep: int = 3) -> RegressionRun:
    """Put ``run``'s decompositions first in the caller's list ``kept`` (at most ``keep``; unchanged when it
    already holds them), for the next :func:`run_regression` on the same rows. Returns ``run``."""
    if all(d is not run.decompositions for d in kept):
        kept[:] = [run.decompositions, *kept][:keep]
    return run


def _versions() -> dict[str, str]:
    import sklearn
    import torch

    import probing_core

    return {"probing_core": probing_core.__version__, "numpy": np.__version__, "torch": torch.__version__,
            "scikit-learn": sklearn.__version__}


def _manifest(acts: CachedActivations, info: SelectionInfo, r: RidgePathResult, model: Mapping[str, Any] | None) -> dict[str, Any]:
    meta = acts.meta
    return {
        "analysis": "ridge regression probe per hook",
        "model": dict(model) if model else {"key": meta.get("model_key"), "label": meta.get("model_label")},
        "cache_entry": {k: meta.get(k) for k in ("key", "dataset_label", "dataset_fingerprint", "n_tokens", "max_len", "max_tokens", "dtype")} | {"key": acts.key},
        "label": info.label.to_dict(),
        "label_description": info.description,
        "position_rule": info.position_rule,
        "n_samples": info.n_selected,
        "hooks": list(r.hooks),
        "alphas": r.alphas.tolist(),
        "split": {"seed": r.seed, "test_fraction": r.test_fraction, "cv_folds": r.n_folds, "n_train": r.n_train, "n_test": r.n_test},
        "best_alpha": dict(zip(r.hooks, r.best_alpha.tolist())),
        "versions": _versions(),
    }


def weights_zip(run: RegressionRun, alpha: float | None = None) -> bytes:
    """A zip with one ``<hook>.npy`` per hook (float32 ``(width + 1,)``: coefficients, then the
    intercept) written with ``allow_pickle=False``, plus ``README.txt``."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for h, w in run.weights(alpha).items():
            b = io.BytesIO()
            np.save(b, w, allow_pickle=False)
            z.writestr(f"{h}.npy", b.getvalue())
        z.writestr("README.txt", f"Ridge probe weights for {run.description}; alpha = "
                   f"{'best per hook' if alpha is None else alpha}. Each file: coefficients (d) then the intercept; "
                   "prediction = x @ w[:-1] + w[-1]. Load with numpy.load(path) (no pickle).\n")
    return buf.getvalue()


def families_present(model: LoadedModel, hooks: Sequence[str]) -> dict[str, list[str]]:
    """Hook family → the entry's hooks of that family, in model order (families with none omitted)."""
    from probing_core.models import HOOK_FAMILIES

    have = set(hooks)
    out = {f: [h for h in model.hook_names([f]) if h in have] for f in HOOK_FAMILIES}
    return {f: hs for f, hs in out.items() if hs}


#: Hook families a page preselects, in this order (those the entry holds).
DEFAULT_FAMILIES = ("embed", "resid_pre", "resid_mid", "resid_post")


def default_families(families: Mapping[str, Sequence[str]]) -> list[str]:
    """The families to preselect among ``families`` (from :func:`families_present`): the residual stream and
    the embedding that are there, else the first family."""
    return [f for f in DEFAULT_FAMILIES if f in families] or list(families)[:1]


def alpha_labels(alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS) -> dict[str, float]:
    """URL-safe short labels of an α grid → α (``1e6``, ``0.001``: three significant digits, no "+")."""
    return {f"{float(a):.3g}".replace("e+0", "e").replace("e+", "e"): float(a) for a in alphas}


def curve_rows(run: RegressionRun) -> list[dict[str, Any]]:
    """Long-format rows (hook, α, train/test/CV R², baseline) of the whole path, for CSV export."""
    r = run.result
    return [
        {"hook": h, "alpha": float(a), "r2_train": float(r.r2_train[i, j]), "r2_test": float(r.r2_test[i, j]),
         "r2_cv_mean": float(r.r2_cv_mean[i, j]), "r2_cv_std": float(r.r2_cv_std[i, j]),
         "best_alpha": float(r.best_alpha[i]), "baseline_r2": float(r.baseline_r2[i])}
        for i, h in enumerate(r.hooks) for j, a in enumerate(r.alphas)
    ]


# --------------------------------------------------------------------------------------------
# Embedding regression over the vocabulary
# --------------------------------------------------------------------------------------------
#: Task name → (label, uses the length threshold, uses the numeric threshold).
EMBEDDING_TASKS: dict[str, tuple[str, bool, bool]] = {
    "length": ("length", False, False),
    "length_no_space": ("length_no_space", False, False),
    "length (no outliers)": ("length", True, False),
    "length_no_space (no outliers)": ("length_no_space", True, False),
    "numeric_value": ("numeric_value", False, True),
}


@dataclass(frozen=True, eq=False)
class EmbeddingTask:
    """One vocabulary regression task. ``note`` is set (and the arrays empty) when it could not run.

    Each vocabulary row is its own token type, so the random split of ``W_E`` rows is already a
    split by type: every test token is a type the probe never saw.

    Attributes:
        name, description; n_tokens: vocabulary rows used; n_train / n_test: rows in each split;
        best_alpha: chosen on the CV folds of the training rows (never on the test rows);
        r2_train / r2_test at that α; r2_test_ci: 95 % bootstrap interval of r2_test over the test rows;
        r2_cv_mean / r2_cv_std: CV R² at that α (mean and spread over folds);
        r2_ols_all: plain least squares fit and scored in-sample on every row (the reference
            notebook's number; an in-sample figure, not a held-out one);
        baseline_r2: shuffled-label test R²; values: ``(n_tokens,)`` label values (histogram);
        y_true, y_pred: ``(n_test,)`` held-out true values and predictions (box plots).
    """

    name: str
    description: str
    n_tokens: int = 0
    n_train: int = 0
    n_test: int = 0
    best_alpha: float = float("nan")
    r2_train: float = float("nan")
    r2_test: float = float("nan")
    r2_test_ci: tuple[float, float] = (float("nan"), float("nan"))
    r2_cv_mean: float = float("nan")
    r2_cv_std: float = float("nan")
    r2_ols_all: float = float("nan")
    baseline_r2: float = float("nan")
    values: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    y_true: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    y_pred: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    note: str | None = None


@dataclass(frozen=True, eq=False)
class EmbeddingRegressionResult:
    """Attributes: tasks (in the order asked); d_vocab, d_model; thresholds used; alphas;
    number_tokens: (all-digit tokens, all-digit tokens allowing a leading space) in this vocabulary."""

    tasks: tuple[EmbeddingTask, ...]
    d_vocab: int
    d_model: int
    length_threshold: int
    numeric_threshold: int
    alphas: np.ndarray
    number_tokens: tuple[int, int] = (0, 0)
    test_fraction: float = 0.2
    cv: int = 5

    def describe(self) -> str:
        """How to read :meth:`table`, in words: what the test rows are, where α was chosen, the number tokens."""
        chosen = f"{self.cv}-fold CV of the training rows" if self.cv >= 2 else "the test split (no CV: optimistic)"
        return (f"W_E: {self.d_vocab:,} tokens × {self.d_model} dims; each row is its own token type, so the "
                f"{100 * self.test_fraction:g} % test rows are types never seen in training. α chosen on {chosen}; "
                "test R² at that α with a 95 % bootstrap CI. `r2_ols_all_rows` is least squares fit and scored on "
                "every row (the notebook's in-sample number). Number tokens here: "
                f"{self.number_tokens[0]} all-digit, {self.number_tokens[1]} with a leading space allowed.")

    def table(self) -> list[dict[str, Any]]:
        return [{"task": t.name, "tokens": t.n_tokens, "n_test": t.n_test, "best_alpha (CV)": t.best_alpha,
                 "r2_train": t.r2_train, "r2_cv_mean": t.r2_cv_mean, "r2_test (new types)": t.r2_test,
                 "r2_test_ci_low": t.r2_test_ci[0], "r2_test_ci_high": t.r2_test_ci[1],
                 "r2_ols_all_rows (in-sample)": t.r2_ols_all, "baseline_r2": t.baseline_r2,
                 "note": t.note or ""} for t in self.tasks]


def _vocab(model: LoadedModel) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``W_E`` as float32 ``(d_vocab, d_model)``, raw token strings, rows with a real token string."""
    W = model.bridge.W_E.detach().to("cpu").float().numpy()
    strs = model.tokenizer.token_strings(list(range(W.shape[0])))
    ok = np.array([isinstance(s, str) and s != "" for s in strs], dtype=bool)
    return W, [s if isinstance(s, str) else "" for s in strs], ok


def embedding_regression(
    model: LoadedModel,
    tasks: Sequence[str] = tuple(EMBEDDING_TASKS),
    *,
    length_threshold: int = 15,
    numeric_threshold: int = 1000,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    test_fraction: float = 0.2,
    cv: int = 5,
    seed: int = 0,
) -> EmbeddingRegressionResult:
    """Regress token properties from the rows of ``W_E`` over the whole vocabulary.

    Args:
        model: the loaded model (``model.bridge.W_E`` ``(d_vocab, d_model)``; no forward pass).
        tasks: names from :data:`EMBEDDING_TASKS`.
        length_threshold: tokens longer than this (full length) are outliers in the "no outliers" tasks.
        numeric_threshold: number tokens above this value are outliers.
        alphas, test_fraction, cv, seed: ridge settings; α is chosen on ``cv`` folds of the training
            rows and the test R² is reported at that α (``cv`` < 2 chooses on the test split: optimistic).

    Returns:
        EmbeddingRegressionResult; a task that cannot run (e.g. SmolLM2 has 13 all-digit tokens)
        carries a ``note`` instead of numbers.

    Raises:
        LabelError: an unknown task name.
    """
    unknown = [t for t in tasks if t not in EMBEDDING_TASKS]
    if unknown:
        raise LabelError(f"unknown embedding task(s) {unknown}; choose from {list(EMBEDDING_TASKS)}.")
    W, strs, ok = _vocab(model)
    marker = getattr(model.tokenizer, "space_marker", "") or None
    out: list[EmbeddingTask] = []
    reuse: dict[str, Mapping[str, RidgeDecomposition]] = {}  # rows digest → decompositions (local to this call)
    ols_all: dict[str, float] = {}  # (rows digest, label) → in-sample OLS R² on every row
    for name in tasks:
        label, use_len, use_num = EMBEDDING_TASKS[name]
        params: dict[str, Any] = {}
        if use_len:
            params["max_length"] = int(length_threshold)
        if use_num:
            params["max_value"] = int(numeric_threshold)
        spec = LabelSpec.make(label, **params)
        try:
            lab = compute_labels(spec, strs, space_marker=marker)
            mask = lab.mask & ok
            y = lab.values[mask]
            if y.size and float(np.ptp(y)) == 0.0:
                raise LabelError(f"{name}: every vocabulary token has the same value ({y[0]:g}); nothing to regress "
                                 "(a byte-level vocabulary has length-1 tokens only).")
            rows = np.flatnonzero(mask)
            digest = hashlib.blake2b(rows.astype(np.int64).tobytes(), digest_size=8).hexdigest()
            X = {"W_E": W[rows]}
            r = fit_ridge_path(X, y, alphas=alphas, test_fraction=test_fraction, cv=cv, seed=seed,
                               decompositions=reuse.get(digest))
            reuse[digest] = r.decompositions
            test = make_split(y.size, test_fraction=test_fraction, cv=cv, seed=seed).block == 0
            j = int(r.best_index[0])
            pred = r.predict("W_E", X["W_E"][test])
            okey = f"{digest}:{label}"
            if okey not in ols_all:  # the notebook's figure: least squares fit and scored on every row
                full = fit_ridge_path(X, y, alphas=[1.0], test_fraction=0.0, cv=0, baseline=False,
                                      decompositions=reuse.get(digest + ":all"))
                reuse[digest + ":all"] = full.decompositions
                ols_all[okey] = float(full.r2_train_ols[0])
            out.append(EmbeddingTask(
                name=name, description=lab.description, n_tokens=int(y.size), n_train=r.n_train, n_test=r.n_test,
                best_alpha=float(r.best_alpha[0]), r2_train=float(r.r2_train[0, j]), r2_test=float(r.r2_test[0, j]),
                r2_test_ci=bootstrap_r2_ci(y[test], pred, seed=seed), r2_cv_mean=float(r.r2_cv_mean[0, j]),
                r2_cv_std=float(r.r2_cv_std[0, j]), r2_ols_all=ols_all[okey], baseline_r2=float(r.baseline_r2[0]),
                values=y, y_true=y[test], y_pred=pred,
            ))
        except ProbingError as e:
            out.append(EmbeddingTask(name=name, description=str(spec.to_dict()), note=str(e)))
    return EmbeddingRegressionResult(tasks=tuple(out), d_vocab=int(W.shape[0]), d_model=int(W.shape[1]),
                                     length_threshold=int(length_threshold), numeric_threshold=int(numeric_threshold),
                                     alphas=np.asarray(alphas, dtype=np.float64),
                                     number_tokens=number_token_counts([s for s, o in zip(strs, ok) if o], marker),
                                     test_fraction=float(test_fraction), cv=int(cv))


# --------------------------------------------------------------------------------------------
# Transfer: one probe fit on the embeddings, scored on every hook
# --------------------------------------------------------------------------------------------
def transfer_hooks(hooks: Sequence[str]) -> list[str]:
    """``hook_embed`` and every ``resid_pre/mid/post`` among ``hooks``, in model order."""
    found = [(h, _RESID.match(h)) for h in hooks]
    keyed = [((-1, 0) if m.group(2) is None else (int(m.group(2)), _STAGE[m.group(3)]), h) for h, m in found if m]
    return [h for _, h in sorted(keyed)]


@dataclass(frozen=True, eq=False)
class TransferRun:
    """Attributes:
    transfer: R² of the fixed probe on every hook (``TransferResult``; ``abs_r2`` for the log plot).
    source: "W_E" (vocabulary) or "hook_embed" (corpus); alpha: ridge strength of the source fit.
    source_r2: in-sample R² of the probe on the rows it was fit on; n_fit: those rows.
    description: label on the corpus; coef ``(d_model,)``, intercept: the probe.
    """

    transfer: TransferResult
    source: str
    alpha: float
    source_r2: float
    n_fit: int
    description: str
    coef: np.ndarray = field(repr=False)
    intercept: float = 0.0

    def rows(self) -> list[dict[str, Any]]:
        return [{"hook": h, "r2": float(v), "abs_r2": float(abs(v))} for h, v in zip(self.transfer.hooks, self.transfer.r2)]


#: ``probe_transfer``'s sources as a page offers them (name → words).
TRANSFER_SOURCES: dict[str, str] = {"W_E": "the embedding matrix (whole vocabulary)", "hook_embed": "hook_embed (this corpus)"}


def probe_transfer(
    model: LoadedModel,
    acts: CachedActivations,
    label_spec: LabelSpec,
    position_rule: PositionRule | str = "all",
    *,
    alpha: float = 1.0,
    source: str = "W_E",
    hooks: Sequence[str] | None = None,
) -> TransferRun:
    """Fit one ridge probe on the embeddings and score it unchanged on every residual hook.

    Args:
        model: the model the entry was built with (for ``W_E`` and the vocabulary).
        acts: cache entry over a corpus.
        label_spec, position_rule: the label (computed on the vocabulary for the fit when
            ``source == "W_E"``, and on the corpus tokens for scoring).
        alpha: ridge strength of the source fit (> 0); fit on every usable row (no split), as in the notebook.
        source: "W_E" (every vocabulary row) or "hook_embed" (the entry's corpus rows).
        hooks: hooks to score (default: ``hook_embed`` and every resid hook present).

    Returns:
        TransferRun.

    Raises:
        ProbeError: entry from another model, no resid hooks, widths ≠ d_model, bad α.
        LabelError: label undefined/constant on the vocabulary or the corpus.
    """
    if acts.meta.get("model_key") not in (None, model.key):
        raise ProbeError(f"cache entry {acts.key} was built with another model; pick an entry of {model.spec.label()}.")
    targets = list(hooks) if hooks is not None else transfer_hooks(acts.hooks)
    if not targets:
        raise ProbeError("this cache entry holds no hook_embed or resid hooks; build one with embed + resid_* on Home.")
    if source == "W_E":
        W, strs, ok = _vocab(model)
        lab = compute_labels(label_spec, strs, space_marker=getattr(model.tokenizer, "space_marker", "") or None)
        rows = np.flatnonzero(lab.mask & ok)
        Xs, ys = W[rows], lab.values[rows]
    elif source == "hook_embed":
        Xmap, ys, _ = regression_data(acts, ["hook_embed"], label_spec, position_rule)
        Xs = Xmap["hook_embed"]
    else:
        raise ProbeError(f"unknown transfer source {source!r}; use 'W_E' or 'hook_embed'.")
    fit = fit_ridge_path({source: Xs}, ys, alphas=[float(alpha)], test_fraction=0.0, cv=0, baseline=False)
    coef, b = fit.coef(source, float(alpha)), fit.intercept(source, float(alpha))
    X, y, info = regression_data(acts, targets, label_spec, position_rule)
    tr = score_transfer(coef, b, X, y)
    return TransferRun(transfer=tr, source=source, alpha=float(alpha), source_r2=float(fit.r2_train[0, 0]),
                       n_fit=int(ys.size), description=info.description, coef=coef, intercept=float(b))
