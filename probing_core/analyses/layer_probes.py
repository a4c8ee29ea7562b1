"""Probe accuracy across layers and positions (issue 8): categorical labels, position rules, one
multinomial L2 probe per hook fitted for all hooks at once, and the tree-search edge preset.

Labels never run user code. A :class:`LayerLabelSpec` names one of

* ``token`` — the identity of the token at an offset from the probed position (0 = the current
  token, -2 = two positions back, 1 = the next token), the top-K most frequent classes kept;
* ``column`` — a per-document label column of an uploaded (or template) dataset, mapped to every
  token of the document through ``CachedActivations.doc_index[seq]``.
  A *template class* is such a column (templates are built with ``make_dataset(..., columns=)``).

A :class:`PositionSpec` picks the token rows read: every token, fixed positions (negative ones
count from the row end, -1 = last token), tokens whose string is in a set, or every k-th token.
BOS rows are always left out.

:func:`probe_layers` returns a :class:`LayerAccuracyResult` (hooks × columns accuracy table,
chance level, Hewitt–Liang control task and selectivity per hook). The tree preset
(:func:`run_tree_edge_preset`) reproduces the notebook's table: the source (node 0) and target
(node 1) of every edge read at the edge's 2nd, 3rd and 4th tokens, at ``hook_embed`` and every
``resid_post``.

Nothing here imports streamlit; every array returned is CPU numpy.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from probing_core.data.datasets import DatasetSpec, make_dataset
from probing_core.errors import HookError, InputError, LabelError, ProbeError
from probing_core.models import LoadedModel
from probing_core.solvers import multiclass, splits
from probing_core.store.activations import CachedActivations, build_cache, open_entry
from probing_core.store.entries import ActivationStore, StoreEntry
from probing_core.store.shards import check_fits_in_memory

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "FAMILIES",
    "LayerAccuracyResult",
    "LayerLabelSpec",
    "PositionSpec",
    "ProbeTask",
    "build_tree_cache",
    "chance_note",
    "compute_layer_labels",
    "families_in",
    "keep_top_classes",
    "parse_label",
    "parse_positions",
    "probe_layers",
    "probe_tasks",
    "probe_tree_edges",
    "run_tree_edge_preset",
    "select_rows",
    "split_note",
    "table_note",
    "tree_edge_samples",
]

#: Cap on probe samples per column (seeded subsample): keeps H × n × d in memory and L-BFGS quick.
DEFAULT_MAX_SAMPLES = 6000
Progress = Callable[[float, str], None]


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerLabelSpec:
    """Which categorical label to probe.

    Attributes:
        kind: ``"token"`` (token identity at ``offset``) or ``"column"`` (a per-document column).
        offset: token offset from the probed position (``kind="token"``).
        column: column name (``kind="column"``).
        top_k: keep the ``top_k`` most frequent classes; rows of other classes are dropped.
    """

    kind: Literal["token", "column"] = "token"
    offset: int = 0
    column: str | None = None
    top_k: int = 20

    def name(self) -> str:
        if self.kind == "column":
            return f"column {self.column!r}"
        if self.offset == 0:
            return "current token"
        return f"token at {self.offset:+d}"


@dataclass(frozen=True)
class PositionSpec:
    """Which token rows are probed (BOS rows never are).

    Attributes:
        kind: ``"all"``, ``"positions"`` (fixed positions in the row; -1 = last token),
            ``"tokens"`` (token string in ``tokens``; decoded text like ``" the"`` or the raw
            vocabulary form like ``"Ġthe"``) or ``"every"`` (every ``every``-th token).
        positions, tokens, every: the rule's parameters.
        split: with ``kind="positions"``, one table column per position instead of one pooled.
    """

    kind: Literal["all", "positions", "tokens", "every"] = "all"
    positions: tuple[int, ...] = ()
    tokens: tuple[str, ...] = ()
    every: int = 1
    split: bool = False

    def name(self) -> str:
        if self.kind == "positions":
            return "positions " + ",".join(map(str, self.positions))
        if self.kind == "tokens":
            return "tokens " + " | ".join(repr(t) for t in self.tokens)
        if self.kind == "every":
            return f"every {self.every}th token"
        return "all tokens"


def one_step_away(label: LayerLabelSpec, offsets: tuple[int, int], top_ks: tuple[int, int]) -> list[LayerLabelSpec]:
    """The labels one step of a control away from ``label``: the token offset ∓1 (token labels), then the top-K ∓1,
    kept within the controls' ranges ``offsets`` and ``top_ks`` (inclusive bounds)."""
    near = [replace(label, offset=o) for o in (label.offset - 1, label.offset + 1)
            if label.kind == "token" and offsets[0] <= o <= offsets[1]]
    return near + [replace(label, top_k=k) for k in (label.top_k - 1, label.top_k + 1) if top_ks[0] <= k <= top_ks[1]]


def parse_label(text: str, top_k: int = 20) -> LayerLabelSpec:
    """Parse ``token`` / ``token-offset:-2`` / ``column:NAME`` (also ``class:NAME``) into a spec.

    Raises:
        LabelError: anything else.
    """
    t = text.strip()
    m = re.fullmatch(r"token(?:-offset)?(?::([+-]?\d+))?", t)
    if m:
        return LayerLabelSpec("token", offset=int(m.group(1) or 0), top_k=top_k)
    m = re.fullmatch(r"(?:column|class):(.+)", t)
    if m:
        return LayerLabelSpec("column", column=m.group(1).strip(), top_k=top_k)
    raise LabelError(f"label {text!r} not understood; write token-offset:-2, token-offset:0, or column:NAME.")


def parse_positions(text: str, split: bool = False) -> PositionSpec:
    """Parse ``all`` / ``at:0,1,-1`` / ``every:4`` / ``tokens: the,Ġa`` into a spec.

    Raises:
        InputError: anything else.
    """
    t = text.strip()
    if t in ("", "all"):
        return PositionSpec("all")
    kind, _, arg = t.partition(":")
    try:
        if kind in ("at", "positions"):
            return PositionSpec("positions", positions=tuple(int(x) for x in arg.split(",") if x.strip()), split=split)
        if kind == "every":
            return PositionSpec("every", every=int(arg))
    except ValueError:
        raise InputError(f"positions {text!r}: write integers, e.g. at:0,1,-1 or every:4.") from None
    if kind == "tokens":
        return PositionSpec("tokens", tokens=tuple(x for x in arg.split(",") if x != ""))
    raise InputError(f"positions {text!r} not understood; write all, at:0,1,-1, every:4 or tokens:STR1,STR2.")


# --------------------------------------------------------------------------------------------
# Rows and labels
# --------------------------------------------------------------------------------------------


def _row_lengths(acts: CachedActivations) -> np.ndarray:
    """[n_tokens] length of the row each token belongs to."""
    seq = np.asarray(acts.seq, dtype=np.int64)
    return np.bincount(seq)[seq]


def select_rows(acts: CachedActivations, spec: PositionSpec) -> list[tuple[str, np.ndarray]]:
    """Token rows picked by a position rule (BOS excluded), as ``[(group name, rows)]``.

    One group, unless ``spec.split`` with fixed positions (one group per position).

    Raises:
        InputError: a malformed rule, or one that selects nothing.
    """
    pos = np.asarray(acts.pos, dtype=np.int64)
    keep = ~acts.bos_mask()
    if spec.kind == "all":
        groups = [("all tokens", keep)]
    elif spec.kind == "positions":
        if not spec.positions:
            raise InputError("no positions given; list positions such as 0,1,-1 (-1 = last token of a row).")
        length = _row_lengths(acts)
        groups = []
        for p in spec.positions:
            m = keep & ((pos == p) if p >= 0 else (pos == length + p))
            groups.append((f"pos {p}", m))
        if not spec.split:
            groups = [(spec.name(), np.logical_or.reduce([g for _, g in groups]))]
    elif spec.kind == "tokens":
        wanted = set(spec.tokens)
        if not wanted:
            raise InputError("no token strings given; type tokens such as ' the' (or the raw form 'Ġthe').")
        ids = np.unique(acts.token_ids)
        hit = {int(i) for i, r, t in zip(ids, acts.raw_strings(ids), acts.text_strings(ids)) if r in wanted or t in wanted}
        groups = [(spec.name(), keep & np.isin(acts.token_ids, list(hit)))]
    elif spec.kind == "every":
        if spec.every < 1:
            raise InputError(f"every={spec.every}: use a step of 1 or more.")
        first = 1 if acts.meta.get("has_bos") else 0
        groups = [(spec.name(), keep & ((pos - first) % spec.every == 0))]
    else:
        raise InputError(f"position rule {spec.kind!r} unknown; use all, positions, tokens or every.")
    out = [(name, np.flatnonzero(m)) for name, m in groups]
    empty = [name for name, rows in out if rows.size == 0]
    if empty:
        raise InputError(
            f"the position rule selects no tokens ({', '.join(empty)}) in this cache entry; "
            "pick positions inside the rows, tokens that occur in the text, or 'all tokens'."
        )
    return out


def compute_layer_labels(acts: CachedActivations, rows: np.ndarray, spec: LayerLabelSpec) -> tuple[np.ndarray, np.ndarray]:
    """Class label (a string) of each row, and which rows have one.

    Returns:
        (labels [m] object array of str, valid [m] bool).

    Raises:
        LabelError: unknown kind, or a column missing from the dataset.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if spec.kind == "token":
        tgt = rows + int(spec.offset)
        ok = (tgt >= 0) & (tgt < acts.n_tokens)
        tgt_c = np.clip(tgt, 0, acts.n_tokens - 1)
        ok &= np.asarray(acts.seq)[tgt_c] == np.asarray(acts.seq)[rows]  # same row of text
        ids = np.asarray(acts.token_ids)[tgt_c]
        labels = np.array(acts.text_strings(ids), dtype=object)
        return labels, ok
    if spec.kind == "column":
        cols = acts.columns()
        if spec.column not in cols:
            have = ", ".join(sorted(cols)) or "none (this dataset has no label columns — upload a CSV/JSONL with one)"
            raise LabelError(f"column {spec.column!r} is not in this cache entry's dataset; columns: {have}.")
        values = cols[spec.column]
        doc = np.asarray(acts.doc_index)[np.asarray(acts.seq)[rows]]
        labels = np.array([values[int(d)] for d in doc], dtype=object)
        ok = np.array([v is not None and str(v) != "" for v in labels], dtype=bool)
        return labels, ok
    raise LabelError(f"label kind {spec.kind!r} unknown; use token or column.")


def _label_types(acts: CachedActivations, rows: np.ndarray, spec: LayerLabelSpec) -> np.ndarray:
    """The type the label of each row is about (the control task's unit, Hewitt & Liang): the token
    at the label's offset for token labels; the probed token itself for column labels (a document
    label is about the whole row, so the probed token is the "word" whose identity a probe could
    memorise)."""
    ids = np.asarray(acts.token_ids)
    if spec.kind == "token":
        return ids[np.clip(np.asarray(rows, dtype=np.int64) + int(spec.offset), 0, acts.n_tokens - 1)]
    return ids[np.asarray(rows, dtype=np.int64)]


def keep_top_classes(labels: np.ndarray, top_k: int, min_count: int = 2) -> tuple[np.ndarray, list[str], str | None]:
    """Mask keeping the ``top_k`` most frequent classes that have at least ``min_count`` rows.

    Returns:
        (keep [m] bool, kept classes (most frequent first), a note on what was dropped or None).

    Raises:
        LabelError: top_k < 2.
    """
    if top_k < 2:
        raise LabelError(f"keep at least 2 classes (top-K = {top_k}); a probe needs two classes to tell apart.")
    vals, counts = np.unique(labels.astype(str), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    kept = [str(vals[i]) for i in order[:top_k] if counts[i] >= min_count]
    keep = np.isin(labels.astype(str), kept)
    dropped_cls = vals.size - len(kept)
    note = None
    if dropped_cls:
        note = (f"kept the {len(kept)} most frequent of {vals.size} classes (at least {min_count} examples each); "
                f"{int((~keep).sum())} of {labels.size} samples of other classes dropped.")
    return keep, kept, note


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerAccuracyResult:
    """Probe accuracy per hook (rows) and label/position column.

    Attributes:
        hooks: [H] hook names.
        columns: [K] column names (label × position group).
        test_accuracy, train_accuracy: [H, K].
        converged: [H, K] bool (L-BFGS gradient criterion).
        chance: [K] majority-class rate on each column's test split (measured, the baseline).
        n_samples: [K] probe samples (train + test); n_test: [K] of them in the test split.
        test_accuracy_ci: [H, K, 2] 95 % Wilson interval of each test accuracy over its n_test rows.
        classes: per column, the class names kept.
        control_accuracy: [H] test accuracy on the Hewitt–Liang control task of ``control_column``
            (each type of the token the label is about gets one random class), NaN when it could not be formed.
        control_accuracy_ci: [H, 2] its Wilson interval; control_chance: its majority rate; control_n_test.
        selectivity: [H] real − control accuracy on ``control_column``.
        control_column: the column the control task was run on (None: no control).
        C: inverse L2 strength.
        label, position: descriptions of the label and position rule.
        notes: plain-language notes (dropped classes, subsampling, control task).
    """

    hooks: list[str]
    columns: list[str]
    test_accuracy: np.ndarray
    train_accuracy: np.ndarray
    converged: np.ndarray
    chance: np.ndarray
    n_samples: np.ndarray
    classes: list[list[str]]
    control_accuracy: np.ndarray
    selectivity: np.ndarray
    control_column: str | None
    C: float
    label: str
    position: str
    notes: list[str] = field(default_factory=list)
    n_test: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    test_accuracy_ci: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 2)))
    control_accuracy_ci: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    control_chance: float = float("nan")
    control_n_test: int = 0

    def table(self) -> list[dict[str, Any]]:
        """One row per hook: test accuracy per column, then control and selectivity."""
        rows = []
        for i, h in enumerate(self.hooks):
            r: dict[str, Any] = {"hook": h}
            for j, c in enumerate(self.columns):
                r[c] = float(self.test_accuracy[i, j])
                if self.test_accuracy_ci.shape[:2] == self.test_accuracy.shape:
                    lo, hi = self.test_accuracy_ci[i, j]
                    r[f"{c} 95% CI"] = f"{lo:.3f}–{hi:.3f} (n={int(self.n_test[j])})"
            if self.control_column is not None:
                r["control"] = float(self.control_accuracy[i])
                r["selectivity"] = float(self.selectivity[i])
            rows.append(r)
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label, "position": self.position, "C": self.C,
            "hooks": list(self.hooks), "columns": list(self.columns),
            "test_accuracy": self.test_accuracy.round(6).tolist(),
            "train_accuracy": self.train_accuracy.round(6).tolist(),
            "converged": self.converged.tolist(),
            "chance": dict(zip(self.columns, self.chance.round(6).tolist())),
            "n_samples": dict(zip(self.columns, self.n_samples.tolist())),
            "n_test": dict(zip(self.columns, np.asarray(self.n_test).tolist())),
            "test_accuracy_ci95": np.round(self.test_accuracy_ci, 6).tolist(),
            "control_chance": None if self.control_column is None else round(float(self.control_chance), 6),
            "control_n_test": None if self.control_column is None else int(self.control_n_test),
            "n_classes": dict(zip(self.columns, [len(c) for c in self.classes])),
            "control_column": self.control_column,
            "control_accuracy": None if self.control_column is None else np.round(self.control_accuracy, 6).tolist(),
            "selectivity": None if self.control_column is None else np.round(self.selectivity, 6).tolist(),
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeTask:
    """One table column: rows of the entry, their class labels and token types (for the control).

    Attributes:
        name: column name.
        rows: [m] row indices into the entry's token table.
        labels: [m] class labels.
        token_types: [m] the type of the thing the label is about (the control task's "word type",
            Hewitt & Liang): the token at the label's offset for token labels, the current token for
            column labels, the node for the tree preset.
    """

    name: str
    rows: np.ndarray
    labels: np.ndarray
    token_types: np.ndarray


def _check_hooks(acts: CachedActivations, hooks: Sequence[str]) -> list[str]:
    hooks = list(dict.fromkeys(hooks))
    if not hooks:
        raise HookError("pick at least one hook to probe.")
    missing = [h for h in hooks if h not in acts.hooks]
    if missing:
        raise HookError(
            f"hooks {missing[:4]} are not in cache entry {acts.key[:8]} (it holds {len(acts.hooks)} hooks: "
            f"{', '.join(acts.hooks[:4])}…); pick hooks it holds or build an entry with them on Home."
        )
    return hooks


class _HookArrays(dict):
    """``{hook: memmap}`` of one entry, each opened on first use and then kept for one probe call (the real task
    and the control read the same arrays: every store read re-checks the entry's folder, ~5 ms a read).
    ``opened``: arrays the caller opened already (e.g. on another thread, see :func:`probe_layers`)."""

    def __init__(self, acts: CachedActivations, opened: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__(opened or {})
        self.acts = acts

    def __missing__(self, hook: str) -> np.ndarray:
        a = self[hook] = self.acts.hook(hook)
        return a


def _fit_by_width(acts: CachedActivations, hooks: list[str], rows: np.ndarray, y: np.ndarray, *, C: float,
                  test_fraction: float, seed: int, progress: Progress | None = None, tol: float = 1e-4,
                  arrays: dict[str, np.ndarray] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:
    """Fit all hooks (one fit per feature width). Returns train, test, converged [H], chance, n_test.

    ``progress(fraction, message)`` once per fitted hook (fraction of ``hooks``). ``arrays``: the hooks' arrays
    opened so far (filled here; default: opened for this call).
    """
    arrays = _HookArrays(acts) if arrays is None else arrays
    widths = acts.meta.get("widths", {})
    tr = np.zeros(len(hooks))
    te = np.zeros(len(hooks))
    conv = np.zeros(len(hooks), dtype=bool)
    chance = float("nan")
    n_test = 0
    order = np.argsort(rows, kind="stable")  # memmap gathers in ascending order read sequentially
    rows_s, y_s = rows[order], y[order]
    done = 0
    for w in sorted({widths.get(h, 0) for h in hooks}):
        idx = [i for i, h in enumerate(hooks) if widths.get(h, 0) == w]
        tick = None
        if progress is not None:
            def tick(f: float, msg: str, before: int = done, size: int = len(idx)) -> None:
                progress((before + f * size) / len(hooks), msg)
        # The stored memmaps are read in place, a hook at a time (no stacked copy). No
        # eigen-preconditioner: on SmolLM2's activations it cost more iterations, not fewer.
        X = {hooks[i]: arrays[hooks[i]] for i in idx}
        # The L-BFGS fit holds a hook's selected rows in memory (two hooks in flight): refuse
        # clearly rather than swap when an entry is larger than memory (the ridge probe streams).
        check_fits_in_memory(2 * len(rows_s) * int(w) * 4, "the per-layer multiclass probe")
        res = multiclass.fit_multiclass_all_hooks(X, y_s, C=C, test_fraction=test_fraction, seed=seed, rows=rows_s,
                                                progress=tick, tol=tol)
        tr[idx], te[idx], conv[idx] = res.train_accuracy, res.test_accuracy, res.converged
        chance = res.chance
        n_test = len(res.test_idx)
        done += len(idx)
    return tr, te, conv, chance, n_test


def probe_tasks(
    acts: CachedActivations,
    hooks: Sequence[str],
    tasks: Sequence[ProbeTask],
    *,
    top_k: int = 20,
    test_fraction: float = 0.3,
    seed: int = 0,
    C: float = 1.0,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    control: bool = True,
    label: str = "",
    position: str = "",
    notes: Sequence[str] = (),
    progress: Progress | None = None,
    tol: float = 1e-4,
    control_samples: int | Literal["task"] | None = "task",
    arrays: Mapping[str, np.ndarray] | None = None,
) -> LayerAccuracyResult:
    """Fit one multinomial L2 probe per hook and task (all hooks at once per task).

    Args:
        acts: cache entry.
        hooks: [H] hook names held by the entry.
        tasks: the table's columns.
        top_k: classes kept per column (most frequent first).
        test_fraction, seed: stratified split (also the subsample and control-task seed).
        C: inverse L2 strength.
        max_samples: per column, a seeded subsample above this many samples.
        control: run the Hewitt–Liang control task on the first column: every type in its
            ``token_types`` (all of them, also those of rows whose class is not among the top-K)
            gets one random class drawn from the kept classes' distribution (rows capped at
            ``max_samples``). A probe can only score on it by memorising types.
        label, position, notes: descriptions carried into the result.
        progress: ``cb(fraction, message)``.
        control_samples: cap on the control task's rows (a seeded subsample). Default ``"task"``: as many
            rows as the first column's real task (the same n on both sides of the selectivity, and a control
            fit that costs what the real one costs; the page and ``probe layers`` use it); None = every row
            up to ``max_samples`` (``probe layers --control-every-row``, the page's research checkbox).
        tol: the solver's stopping tolerance (scikit-learn's lbfgs ``tol`` scaling; see
            ``multiclass.fit_multiclass_all_hooks``); ``converged`` is that gradient norm within ``10 * tol``.

    Returns:
        :class:`LayerAccuracyResult`.

    Raises:
        HookError: hooks missing from the entry. LabelError: one class, or more classes than
        samples. ProbeError: bad C or test fraction.
    """
    hooks = _check_hooks(acts, hooks)
    if not tasks:
        raise InputError("nothing to probe: no label/position columns.")
    if not (0.0 < test_fraction < 1.0):
        raise ProbeError(f"test_fraction={test_fraction} must be between 0 and 1 (e.g. 0.3).")
    if max_samples < 4:
        raise InputError(f"max_samples={max_samples} is too small; use at least a few hundred.")
    H, K = len(hooks), len(tasks)
    train = np.zeros((H, K))
    test = np.zeros((H, K))
    conv = np.zeros((H, K), dtype=bool)
    chance = np.zeros(K)
    n_samples = np.zeros(K, dtype=np.int64)
    n_test = np.zeros(K, dtype=np.int64)
    classes: list[list[str]] = []
    notes_out = list(notes)
    control_acc = np.full(H, np.nan)
    control_col: str | None = None
    rng = np.random.default_rng(seed)
    first_kept: tuple[np.ndarray, np.ndarray, int] | None = None
    control_ci = np.full((H, 2), np.nan)
    control_chance, control_n_test = float("nan"), 0
    arrays = _HookArrays(acts, arrays)
    for k, task in enumerate(tasks):
        if progress:
            progress(k / (K + (1 if control else 0)), f"fitting {task.name} ({H} hooks)")
        labels = np.asarray(task.labels).astype(str)
        n_cls = np.unique(labels).size
        if n_cls < 2:
            raise LabelError(
                f"{task.name}: every selected token has the same label ({str(labels[0]) if labels.size else 'none'!r}); "
                "a probe needs at least two classes — widen the position rule or pick another label."
            )
        if n_cls > labels.size:
            raise LabelError(f"{task.name}: {n_cls} classes for {labels.size} samples; collect more samples.")
        keep, kept, note = keep_top_classes(labels, top_k)
        if note:
            notes_out.append(f"{task.name}: {note}")
        if len(kept) < 2:
            raise LabelError(
                f"{task.name}: fewer than two classes have at least two examples ({labels.size} samples, "
                f"{n_cls} classes); select more tokens (a larger cache entry or a wider position rule)."
            )
        idx = np.flatnonzero(keep)
        if idx.size > max_samples:
            idx = np.sort(rng.choice(idx, size=max_samples, replace=False))
            notes_out.append(f"{task.name}: a seeded subsample of {max_samples:,} of {int(keep.sum()):,} samples was probed.")
        rows, y = np.asarray(task.rows)[idx], labels[idx]
        slots = K + (1 if control else 0)
        tick = None
        if progress:
            def tick(f: float, msg: str, k: int = k, name: str = task.name, slots: int = slots) -> None:
                progress((k + f) / slots, f"{name}: {msg}")
        tr, te, cv, ch, nt = _fit_by_width(acts, hooks, rows, y, C=C, test_fraction=test_fraction, seed=seed,
                                           progress=tick, tol=tol, arrays=arrays)
        train[:, k], test[:, k], conv[:, k], chance[k], n_test[k] = tr, te, cv, ch, nt
        n_samples[k] = idx.size
        classes.append(sorted(set(y.tolist())))
        if first_kept is None:
            first_kept = (np.asarray(task.rows), np.asarray(task.token_types), k)
            first_y, first_n = y, idx.size
    selectivity = np.full(H, np.nan)
    if control and first_kept is not None:
        all_rows, all_types, _ = first_kept
        # Every type the label is about gets one class drawn from the real task's class
        # distribution, over all rows of the column (types outside the top-K too, capped like the
        # real task at max_samples): a task solvable only by memorising types.
        yc_all = splits.control_labels(all_types, first_y, seed=seed)
        pick = np.arange(all_rows.size)
        cap = max_samples if control_samples is None else first_n if control_samples == "task" else int(control_samples)
        if pick.size > cap:
            pick = np.sort(np.random.default_rng(seed + 7).choice(pick, size=cap, replace=False))
            if cap < max_samples:
                notes_out.append(f"control task: a seeded subsample of {cap:,} of its {all_rows.size:,} rows"
                                 + (" (as many as the real task has)." if control_samples == "task" else "."))
        rows, yc = all_rows[pick], yc_all[pick]
        cls_c, cnt_c = np.unique(yc, return_counts=True)
        usable = np.isin(yc, cls_c[cnt_c >= 2])  # a class drawn for rare types only: too few rows to split
        rows, yc = rows[usable], yc[usable]
        _, cnt = np.unique(yc, return_counts=True)
        if cnt.size >= 2 and cnt.min() >= 2:
            if progress:
                progress(K / (K + 1), "fitting the control task")
            tick = None
            if progress:
                def tick(f: float, msg: str) -> None:
                    progress((K + f) / (K + 1), f"control task: {msg}")
            _, control_acc, _, control_chance, control_n_test = _fit_by_width(
                acts, hooks, rows, yc, C=C, test_fraction=test_fraction, seed=seed, progress=tick, tol=tol,
                arrays=arrays)
            control_col = tasks[0].name
            selectivity = test[:, 0] - control_acc
            control_ci = splits.accuracy_ci(np.round(control_acc * control_n_test), control_n_test)
            notes_out.append(
                f"control task ({tasks[0].name}): each of {np.unique(all_types).size:,} types of the token the label "
                f"is about got a random class; {rows.size:,} rows, majority {control_chance:.3f}.")
        else:
            notes_out.append(
                f"no control task for {tasks[0].name}: too few distinct token types at the probed positions "
                "to give each one a random class."
            )
    if progress:
        progress(1.0, "done")
    return LayerAccuracyResult(
        hooks=hooks, columns=[t.name for t in tasks], test_accuracy=test, train_accuracy=train, converged=conv,
        chance=chance, n_samples=n_samples, classes=classes, control_accuracy=control_acc, selectivity=selectivity,
        control_column=control_col, C=float(C), label=label, position=position, notes=notes_out,
        n_test=n_test, test_accuracy_ci=splits.accuracy_ci(np.round(test * n_test[None, :]), n_test[None, :]),
        control_accuracy_ci=control_ci, control_chance=control_chance, control_n_test=control_n_test,
    )


def probe_layers(
    acts: CachedActivations,
    hooks: Sequence[str],
    label_spec: LayerLabelSpec | Sequence[LayerLabelSpec],
    position_spec: PositionSpec,
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    C: float = 1.0,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    control: bool = True,
    progress: Progress | None = None,
    tol: float = 1e-4,
    control_samples: int | Literal["task"] | None = "task",
    arrays: Mapping[str, np.ndarray] | None = None,
) -> LayerAccuracyResult:
    """Probe accuracy of categorical labels across hooks (layers) and positions.

    Columns are every (label, position group) pair: one group per position when
    ``position_spec.split``, else one.

    Args:
        acts: a cache entry (any model and dataset).
        hooks: [H] hooks held by the entry (hooks of different widths are fitted in groups).
        label_spec: one label or several (one column each).
        position_spec: which token rows to read.
        test_fraction, seed, C, max_samples, control, progress, tol, control_samples: see :func:`probe_tasks`.
        arrays: ``{hook: acts.hook(hook)}`` opened already (the rest are opened here). A fit on a thread other
            than the one that runs Streamlit's scripts gets them opened on that thread: numpy parses a ``.npy``
            header with ``ast``, and CPython 3.11's AST constructor is not safe beside a script compile.

    Returns:
        :class:`LayerAccuracyResult` with test accuracy ``[H, columns]``.

    Raises:
        HookError: hooks missing. InputError: a position rule that selects nothing.
        LabelError: one class, more classes than samples, a missing column.
    """
    hooks = _check_hooks(acts, hooks)
    labels = [label_spec] if isinstance(label_spec, LayerLabelSpec) else list(label_spec)
    if not labels:
        raise LabelError("no label given; pick a label such as the current token.")
    if len({s.top_k for s in labels}) > 1:
        raise LabelError("use one top-K for all labels of a table.")
    groups = select_rows(acts, position_spec)
    tasks: list[ProbeTask] = []
    skipped: list[tuple[str, LabelError]] = []
    for spec in labels:
        for gname, rows in groups:
            name = spec.name() if len(groups) == 1 else f"{spec.name()} @ {gname}"
            y, ok = compute_layer_labels(acts, rows, spec)
            if not ok.any():
                skipped.append((name, LabelError(
                    f"{spec.name()} is undefined at every selected token ({gname}): the offset leaves the row "
                    "or the column is empty there; pick a smaller offset or other positions."
                )))
                continue
            if np.unique(y[ok].astype(str)).size < 2:
                skipped.append((name, LabelError(
                    f"{name}: every selected token has the same label ({str(y[ok][0])!r}); a probe needs at least "
                    "two classes — widen the position rule or pick another label."
                )))
                continue
            tasks.append(ProbeTask(name, rows[ok], y[ok], _label_types(acts, rows[ok], spec)))
    if not tasks:
        raise skipped[0][1]
    # With several columns, one unusable column (e.g. an offset reaching before the row) is left
    # out and said so, rather than failing the whole table.
    notes = [f"column {n!r} left out: {e}" for n, e in skipped]
    return probe_tasks(
        acts, hooks, tasks, top_k=labels[0].top_k, test_fraction=test_fraction, seed=seed, C=C,
        max_samples=max_samples, control=control, label=", ".join(s.name() for s in labels),
        position=position_spec.name(), notes=notes, progress=progress, tol=tol, control_samples=control_samples,
        arrays=arrays,
    )


# --------------------------------------------------------------------------------------------
# Tree-search preset (the notebook's study)
# --------------------------------------------------------------------------------------------

_OFFSET_TOKEN = {"second": "2nd token (→dst)", "third": "3rd token (,)", "fourth": "4th token (next src)"}
_NODE = {"source": "node 0", "target": "node 1"}


def tree_edge_samples(n_samples: int = 400, seed: int = 0, n_nodes: int | None = None) -> list:
    """Seeded natural tree samples for the preset (same arguments → same samples)."""
    from probing_core.tree import model as tree_model
    from probing_core.tree import task as tree_task

    if n_samples < 10:
        raise InputError(f"n_samples={n_samples}: use at least 10 trees (a few hundred give stable accuracies).")
    return tree_task.make_dataset(n_samples, seed, n_nodes or tree_model.trained_n_nodes())


def build_tree_cache(
    model: LoadedModel,
    samples: Sequence[Any],
    store: ActivationStore,
    *,
    seed: int,
    hooks: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> StoreEntry:
    """Cache ``hook_embed`` and every ``resid_post`` over the samples' prompts (one row per sample).

    The text is each prompt (edges, ``| goal : root``) without the path; the tree tokenizer has no
    BOS, so positions in the entry are positions in the prompt.

    Raises:
        ModelError/InputError: the model cannot read tree prompts.
    """
    from probing_core.tree import task as tree_task

    if not isinstance(model.tokenizer, tree_task.TreeTokenizer):
        raise InputError("the tree edge preset needs the tree-search model (ModelSpec('tree')); pick it in the sidebar.")
    tok = model.tokenizer
    docs = [tok.decode(s.prompt_ids) for s in samples]
    n_nodes = samples[0].n_nodes
    ds = make_dataset(DatasetSpec("texts", f"tree-search samples seed={seed} n={len(samples)} nodes={n_nodes}"), docs)
    hooks = list(hooks) if hooks else model.hook_names(["embed", "resid_post"])
    length = tree_task.prompt_length(n_nodes)
    entry, _ = build_cache(model, ds, hooks, store=store, max_len=length, max_tokens=None, prepend_bos=False,
                           batch_size=64, progress=progress)
    return entry


def probe_tree_edges(
    acts: CachedActivations,
    samples: Sequence[Any],
    hooks: Sequence[str] | None = None,
    *,
    offsets: Sequence[int] = (1, 2, 3),
    test_fraction: float = 0.3,
    seed: int = 0,
    C: float = 1.0,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    progress: Progress | None = None,
) -> LayerAccuracyResult:
    """The notebook's table: source (node 0) and target (node 1) of each edge, probed at the edge's
    2nd, 3rd and 4th token, per hook (default ``hook_embed`` and every ``resid_post``).

    Args:
        acts: the entry from :func:`build_tree_cache` for these ``samples``.
        samples: the tree samples, in the entry's document order.

    Returns:
        :class:`LayerAccuracyResult`; columns ``"node 0 @ 2nd token (→dst)"`` … .

    Raises:
        InputError: the entry does not hold these samples.
    """
    from probing_core.tree import task as tree_task

    if hooks is None:
        hooks = [h for h in acts.hooks if h == "hook_embed" or h.endswith("hook_resid_post")]
    doc = np.asarray(acts.doc_index)
    if doc.size != len(samples) or not np.array_equal(doc, np.arange(len(samples))):
        raise InputError(
            f"cache entry {acts.key[:8]} holds {doc.size} rows, not the {len(samples)} tree prompts (one per row); "
            "build it with build_tree_cache for the same samples."
        )
    seq = np.asarray(acts.seq, dtype=np.int64)
    row_start = np.searchsorted(seq, np.arange(len(samples)), side="left")
    first = 1 if acts.meta.get("has_bos") else 0
    targets = tree_task.edge_probe_targets(samples, offsets)
    tasks = []
    for off, who in targets.tasks():
        if off not in [tree_task.EDGE_OFFSETS[o] for o in offsets]:
            continue
        s_idx, p, lab = targets.select(off, who)
        rows = row_start[s_idx] + first + p
        want = np.array([samples[int(i)].prompt_ids[int(q)] for i, q in zip(s_idx, p)])
        if not np.array_equal(np.asarray(acts.token_ids)[rows], want):
            raise InputError(f"cache entry {acts.key[:8]} does not hold these tree prompts; rebuild it for the same seed.")
        # The label is the node's identity, so the control's type is that node (the node token the
        # label is about), not the token read at the probed position.
        tasks.append(ProbeTask(f"{_NODE[who]} @ {_OFFSET_TOKEN[off]}", rows, lab.astype(str), lab.astype(str)))
    res = probe_tasks(
        acts, hooks, tasks, top_k=tree_task.MAX_NODES, test_fraction=test_fraction, seed=seed, C=C,
        max_samples=max_samples, label="edge source (node 0) / target (node 1)",
        position="2nd, 3rd, 4th token of each edge",
        notes=[(f"{len(samples)} seeded trees of {samples[0].n_nodes} nodes; 'node 0' = an edge's source, "
                "'node 1' = its target.")],
        progress=progress,
    )
    return replace(res, notes=[*res.notes, chance_note(res)])


#: Hook families a layer probe reads, in model order.
FAMILIES = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def families_in(model: LoadedModel, hooks: Sequence[str]) -> tuple[list[str], list[str]]:
    """The hook families an entry holds (of :data:`FAMILIES`) and the default pick (embed and resid_post)."""
    have = [f for f in FAMILIES if any(h in hooks for h in model.hook_names([f]))]
    return have, [f for f in ("embed", "resid_post") if f in have] or have[:1]


def table_note(res: LayerAccuracyResult) -> str:
    """What the accuracy table shows, in words (for the caption above it)."""
    return (f"Each row is one place in the model, from the embedding down to the last layer; each number is the share "
            f"of held-out tokens where a probe trained there names the **{res.label}** correctly "
            f"({', '.join(f'{len(c)} classes' for c in res.classes[:1])}). **Control** is the same probe on a task "
            "where each type of the token the label is about (e.g. the token two back) gets a random class "
            "(memorizing types scores there); **selectivity** = real − control: the part the layer really encodes.")


def split_note(res: LayerAccuracyResult, test_fraction: float) -> str:
    """The held-out split, chance, samples and C behind the table (for the caption below it)."""
    return (f"Held out: a stratified {test_fraction:.0%} of the samples per column. Chance (majority class of the test "
            f"split): {', '.join(f'{c} {v:.3f} (n_test {int(n):,})' for c, v, n in zip(res.columns, res.chance, res.n_test))}"
            + (f" · control majority {res.control_chance:.3f}" if res.control_column else "")
            + f" · samples: {', '.join(f'{n:,}' for n in res.n_samples)} · C = {res.C:g}; intervals: 95 % Wilson.")


def chance_note(res: LayerAccuracyResult) -> str:
    """The chance level as measured: the majority class of each column's test split (the baseline
    drawn beside the scores), with the number of classes and test rows."""
    lo, hi = float(np.min(res.chance)), float(np.max(res.chance))
    k = max(len(c) for c in res.classes) if res.classes else 0
    span = f"{lo:.3f}" if abs(hi - lo) < 5e-4 else f"{lo:.3f}–{hi:.3f}"
    return (f"chance (majority class of the test split, measured): {span} over {k} classes "
            f"(uniform would be 1/{k} = {1 / max(k, 1):.3f}); n_test {int(np.min(res.n_test)):,}–{int(np.max(res.n_test)):,}.")


def run_tree_edge_preset(
    model: LoadedModel,
    store: ActivationStore,
    *,
    n_samples: int = 400,
    seed: int = 0,
    C: float = 1.0,
    test_fraction: float = 0.3,
    progress: Progress | None = None,
) -> LayerAccuracyResult:
    """Generate seeded trees, cache their activations through the store, and probe the edges."""
    samples = tree_edge_samples(n_samples, seed)

    def part(lo: float, hi: float) -> Progress | None:
        return None if progress is None else (lambda f, m: progress(lo + (hi - lo) * f, m))

    entry = build_tree_cache(model, samples, store, seed=seed, progress=part(0.0, 0.5))
    acts = open_entry(store, entry.key)
    return probe_tree_edges(acts, samples, C=C, test_fraction=test_fraction, seed=seed, progress=part(0.5, 1.0))
