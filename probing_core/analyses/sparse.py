"""Sparse-probe experiment (issue 7): contexts → features at the target → L1/L2/EN path → report.

The page and the CLI both call these; arrays come from the activation store (memmap reads).

What is held out and what a score is compared with (issue 20):

* C is chosen on k-fold CV of the training rows (:func:`chosen_index`), never on the test rows;
  the test accuracy is reported at that C, with its n and a 95 % Wilson interval.
* Beside the neuron probe: the majority baseline of the test split and the **embed-only
  baseline** — the same probe and split on ``hook_embed`` at the same positions, at the same C
  values (:func:`fit_embed_same`) and at its own CV-chosen C on its own grid
  (:func:`fit_embed_baseline`, independent of the hook) (:func:`summarize`). At the article itself
  (offset 0) the embedding alone identifies the token, so the task is trivial; at the token before
  it (offset -1, :data:`PRESETS`) the question is whether the layer already knows the next word
  will be " an".

For the page (issue 16), :func:`fit_sparse` fits everything a C step shows once per (hook, query) —
the path, the embed-only probes and the control task along the path — into a :class:`SparseFit`
whose per-step methods are lookups.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from probing_core.data.contexts import ContextSet, mine_contexts, resolve_token_set
from probing_core.errors import HookError, LabelError
from probing_core.solvers.logistic_path import (
    ControlTaskResult,
    LogisticPathResult,
    classification_report_dict,
    default_Cs,
    fit_control_task,
    fit_cv_fold,
    fit_logistic_path,
    with_cv,
)
from probing_core.solvers.splits import accuracy_ci, control_labels
from probing_core.store.activations import CachedActivations
from probing_core.threads import single_threaded, workers

Progress = Callable[[float, str], None]

#: Where the features are read, relative to the class token (the page's one-click presets).
PRESETS: dict[str, int] = {
    "the token before (does layer L already know?)": -1,
    "the class token itself (the notebook)": 0,
}
#: Folds used to choose C when the caller asks for no CV.
SELECT_CV = 3
#: The reference notebook's layer (the page opens on it when the entry holds it).
NOTEBOOK_HOOK = "blocks.3.mlp.hook_post"


@dataclass(frozen=True)
class SparseQuery:
    """What the page asks, hashable (it keys the shared results): the contexts (classes, window, cap, where the
    features are read) and the probe (penalty, L1 ratio, CV folds; 0 = :data:`SELECT_CV`)."""

    classes: tuple[tuple[str, ...], ...]
    before: int = 14
    after: int = 3
    whole_word_next: bool = True
    max_per_class: int | None = 500
    offset: int = -1
    penalty: str = "l1"
    l1_ratio: float = 0.5
    cv: int = 0

    def contexts_key(self) -> tuple:
        """The fields the contexts depend on (not the probe's)."""
        return (self.classes, self.before, self.after, self.whole_word_next, self.max_per_class, self.offset)


def parse_classes(*texts: str) -> tuple[tuple[str, ...], ...]:
    """One class per text, its token strings comma-separated (leading spaces kept: " the" is not "the")."""
    return tuple(tuple(t.split(",")) for t in texts)


def probe_hooks(hooks: Sequence[str]) -> list[str]:
    """The hooks a sparse probe reads here: MLP neurons and the residual stream after each block."""
    return [h for h in hooks if h.endswith(("mlp.hook_post", "hook_resid_post"))]


def same_family(hooks: Sequence[str], hook: str) -> list[str]:
    """``hooks`` of ``hook``'s family (MLP neurons or resid_post): the all-layers curve's x axis."""
    fam = "mlp.hook_post" if "mlp" in hook else "hook_resid_post"
    return [h for h in hooks if h.endswith(fam)]


def contexts_for(
    acts: CachedActivations,
    encode,  # type: ignore[no-untyped-def]
    decode_tokens,  # type: ignore[no-untyped-def]
    class_texts: Sequence[Sequence[str]],
    *,
    before: int = 14,
    after: int = 3,
    whole_word_next: bool = True,
    max_per_class: int | None = None,
    seed: int = 0,
    offset: int = 0,
) -> ContextSet:
    """Resolve each class's token strings (one token each) and mine their contexts in ``acts``.

    ``offset``: where features are read relative to the class token (0 = at it, -1 = the token before).

    Raises:
        LabelError: a string that is not one token, overlapping sets, a class with no context.
    """
    ids = [resolve_token_set(list(t), encode, decode_tokens) for t in class_texts]
    names = [" | ".join(repr(s) for s in t if s) for t in class_texts]
    return mine_contexts(acts.token_ids, acts.seq, acts.pos, acts.next_ids, lambda a: acts.text_strings(np.asarray(a)),
                         ids, names, before=before, after=after, whole_word_next=whole_word_next,
                         max_per_class=max_per_class, seed=seed, offset=offset)


def mine(acts: CachedActivations, tokenizer: Any, q: SparseQuery) -> ContextSet:
    """:func:`contexts_for` with a query's settings (``tokenizer``: has ``encode`` and ``decode_tokens``)."""
    return contexts_for(acts, tokenizer.encode, tokenizer.decode_tokens, q.classes, before=q.before, after=q.after,
                        whole_word_next=q.whole_word_next, max_per_class=q.max_per_class, offset=q.offset)


def context_tables(ctx: ContextSet) -> tuple[list[dict], list[dict]]:
    """Two tables for a reader: contexts found and kept per class; sample contexts (target in ⟦ ⟧)."""
    counts = [{"class": n, "found": ctx.found[n], "kept": c} for n, c in ctx.counts.items()]
    samples = [{"class": n, "example (target in ⟦ ⟧)": x} for n, xs in ctx.samples.items() for x in xs]
    return counts, samples


def features(acts: CachedActivations, hook: str, ctx: ContextSet) -> np.ndarray:
    """``(n_contexts, width)`` float32 features of ``hook`` at the read positions (``ctx.feature_rows``:
    the target, or ``ctx.offset`` tokens from it).

    Raises:
        HookError: the entry does not hold the hook.
    """
    if hook not in acts.hooks:
        raise HookError(f"this cache entry has no {hook!r}; build one with it on the Home page "
                        f"(it holds: {', '.join(acts.hooks[:6])}{'…' if len(acts.hooks) > 6 else ''}).")
    return np.asarray(acts.hook(hook)[ctx.feature_rows], dtype=np.float32)


def fit_sparse_path(
    X: np.ndarray, ctx: ContextSet, *, Cs: Sequence[float] | None = None, n_Cs: int = 17, penalty: str = "l1",
    l1_ratio: float = 0.5, test_fraction: float = 0.3, seed: int = 0, cv: int | None = None,
) -> LogisticPathResult:
    """The C path for one hook (default grid: 17 values over 2 decades from the first entering neuron).

    ``cv``: folds of the training rows (None or < 2: :data:`SELECT_CV`); they choose C
    (:func:`chosen_index`) and give each neuron's selection frequency.
    """
    grid = np.asarray(Cs, float) if Cs is not None else default_Cs(X, ctx.labels, n=n_Cs)
    folds = int(cv) if cv is not None and int(cv) >= 2 else SELECT_CV
    return fit_logistic_path(X, ctx.labels, Cs=grid, penalty=penalty, l1_ratio=l1_ratio,
                             test_fraction=test_fraction, seed=seed, cv=folds)


def chosen_index(path: LogisticPathResult) -> int:
    """Path point with the best mean CV accuracy (converged points first; the sparsest on ties).

    Uses only the training rows' folds, so shuffling the test labels never changes it. A path
    without CV (a single C) gives 0.
    """
    if path.cv_accuracy is None:
        return 0
    score = np.asarray(path.cv_accuracy, dtype=np.float64)
    ok = np.asarray(path.converged) & (np.asarray(path.cv_converged) if path.cv_converged is not None else True)
    if ok.any():
        score = np.where(ok, score, -np.inf)
    best = float(np.max(score))
    return int(np.flatnonzero(score >= best - 1e-12)[0])  # Cs ascend: the first is the strongest penalty


@dataclass(frozen=True)
class SparseSummary:
    """The neuron probe at the chosen C beside its baselines (what a reader should compare).

    Attributes:
        question: the question the features answer (see ``ContextSet.question``); offset: read position.
        hook: the probed hook; k, C: the path point chosen on CV; cv_accuracy: its mean CV accuracy.
        test_accuracy, test_ci: on the held-out rows at that C, with a 95 % Wilson interval; n_train, n_test.
        majority: majority-class rate of the test split (what a constant guess scores).
        embed_hook: "hook_embed" or None when the entry does not hold it (then the embed figures are NaN).
        embed_accuracy, embed_ci: the same probe (same C, split, penalty) on ``hook_embed`` at the same rows.
        embed_best_accuracy, embed_best_C: the embed-only probe at its own CV-chosen C.
    """

    question: str
    offset: int
    hook: str
    k: int
    C: float
    cv_accuracy: float
    test_accuracy: float
    test_ci: tuple[float, float]
    n_train: int
    n_test: int
    majority: float
    embed_hook: str | None
    embed_accuracy: float
    embed_ci: tuple[float, float]
    embed_best_accuracy: float
    embed_best_C: float

    def rows(self) -> list[dict]:
        """Table rows: the probe, the embed-only baseline, the majority baseline (n and CI on each)."""
        def ci(t: tuple[float, float]) -> str:
            return f"{t[0]:.3f}–{t[1]:.3f}" if np.isfinite(t[0]) else ""
        return [
            {"probe": f"{self.hook} at C = {self.C:.4g} (chosen on CV)", "test_accuracy": self.test_accuracy,
             "95% CI": ci(self.test_ci), "n_test": self.n_test},
            {"probe": "embed only (hook_embed, same C)", "test_accuracy": self.embed_accuracy,
             "95% CI": ci(self.embed_ci), "n_test": self.n_test},
            {"probe": f"embed only at its CV-chosen C = {self.embed_best_C:.4g}", "test_accuracy": self.embed_best_accuracy,
             "95% CI": "", "n_test": self.n_test},
            {"probe": "majority class", "test_accuracy": self.majority, "95% CI": "", "n_test": self.n_test},
        ]


def summarize(acts: CachedActivations, hook: str, ctx: ContextSet, path: LogisticPathResult, *,
              k: int | None = None, seed: int = 0, embed_path: LogisticPathResult | None = None,
              embed_best: LogisticPathResult | None = None) -> SparseSummary:
    """The chosen point of ``path`` (default: :func:`chosen_index`) with the majority and embed-only baselines.

    Args:
        acts, hook, ctx: what ``path`` was fit on. path: from :func:`fit_sparse_path`.
        k: path point to report (None: chosen on CV). seed: the path's split seed.
        embed_path: the embed-only probe on ``path``'s C grid and split (:func:`fit_embed_same`); fit here
            when None and the entry holds ``hook_embed``.
        embed_best: the embed-only probe on its own C grid with C chosen on CV (:func:`fit_embed_baseline`,
            which does not depend on the hook); fit here when None and the entry holds ``hook_embed``.

    Returns:
        SparseSummary.
    """
    if "hook_embed" in acts.hooks:
        if embed_path is None:
            embed_path = fit_embed_same(acts, ctx, path, seed=seed)
        if embed_best is None:
            embed_best = fit_embed_baseline(acts, ctx, penalty=path.penalty, l1_ratio=path.l1_ratio,
                                            test_fraction=_test_fraction(path), seed=seed)
    return _summary(ctx, hook, path, chosen_index(path) if k is None else int(k), embed_path, embed_best)


def _test_fraction(path: LogisticPathResult) -> float:
    return len(path.test_idx) / (len(path.test_idx) + len(path.train_idx))


def _summary(ctx: ContextSet, hook: str, path: LogisticPathResult, k: int, embed_path: LogisticPathResult | None,
             embed_best: LogisticPathResult | None) -> SparseSummary:
    te = path.test_idx
    n_test = int(te.size)
    _, counts = np.unique(ctx.labels[te], return_counts=True)
    acc = float(path.test_accuracy[k])
    ci = tuple(accuracy_ci(round(acc * n_test), n_test).tolist())
    e_acc = e_best = e_C = float("nan")
    e_ci = (float("nan"), float("nan"))
    if embed_path is not None:
        e_acc = float(embed_path.test_accuracy[k])
        e_ci = tuple(accuracy_ci(round(e_acc * n_test), n_test).tolist())
    if embed_best is not None:
        eb = chosen_index(embed_best)
        e_best, e_C = float(embed_best.test_accuracy[eb]), float(embed_best.Cs[eb])
    return SparseSummary(
        question=ctx.question, offset=int(ctx.offset), hook=hook, k=k, C=float(path.Cs[k]),
        cv_accuracy=float(path.cv_accuracy[k]) if path.cv_accuracy is not None else float("nan"),
        test_accuracy=acc, test_ci=ci, n_train=len(path.train_idx), n_test=n_test,
        majority=float(counts.max() / counts.sum()),
        embed_hook="hook_embed" if embed_path is not None or embed_best is not None else None,
        embed_accuracy=e_acc, embed_ci=e_ci, embed_best_accuracy=e_best, embed_best_C=e_C,
    )


def fit_embed_same(acts: CachedActivations, ctx: ContextSet, path: LogisticPathResult, *,
                   seed: int = 0) -> LogisticPathResult:
    """The embed-only probe at ``path``'s C values, penalty and split (no CV: it only scores each C).

    Raises:
        HookError: the entry has no ``hook_embed``.
    """
    return fit_logistic_path(features(acts, "hook_embed", ctx), ctx.labels, Cs=path.Cs, penalty=path.penalty,
                             l1_ratio=path.l1_ratio, test_fraction=_test_fraction(path), seed=seed, tol=path.tol)


def fit_embed_baseline(acts: CachedActivations, ctx: ContextSet, *, penalty: str = "l1", l1_ratio: float = 0.5,
                       cv: int | None = None, test_fraction: float = 0.3, seed: int = 0) -> LogisticPathResult | None:
    """The embed-only probe on its own C grid, C chosen on CV (:func:`chosen_index`); None without ``hook_embed``.

    It depends on the contexts and the penalty, not on the hook probed beside it: a page keeps one per
    (entry, contexts, penalty) and a hook change costs no embed fit with CV.
    """
    if "hook_embed" not in acts.hooks:
        return None
    return fit_sparse_path(features(acts, "hook_embed", ctx), ctx, penalty=penalty, l1_ratio=l1_ratio,
                           test_fraction=test_fraction, seed=seed, cv=cv)


@dataclass(frozen=True)
class ControlPath:
    """The Hewitt–Liang control task at every C of a path (one batched fit), beside the real task.

    Attributes:
        Cs: (K,) the path's C values; accuracy: (K,) real-task test accuracy (the path's own);
        control_accuracy: (K,) control-task test accuracy at each C; control_chance: its majority rate;
        converged: (K,) both fits within their tolerance.
    """

    Cs: np.ndarray
    accuracy: np.ndarray
    control_accuracy: np.ndarray
    control_chance: float
    converged: np.ndarray

    def at(self, k: int) -> ControlTaskResult:
        """The control task at path point ``k`` (a lookup)."""
        return ControlTaskResult(C=float(self.Cs[k]), accuracy=float(self.accuracy[k]),
                                 control_accuracy=float(self.control_accuracy[k]),
                                 selectivity=float(self.accuracy[k] - self.control_accuracy[k]),
                                 control_chance=self.control_chance, converged=bool(self.converged[k]))


def control_path(X: np.ndarray, ctx: ContextSet, path: LogisticPathResult, *, seed: int = 0) -> ControlPath:
    """:func:`control_task` at every C of ``path`` at once: the control labels (one random class per following word
    type) fitted along the same C grid with the same penalty, split and tolerance; the real task is ``path`` itself.

    Raises:
        LabelError: the control labels collapse to one usable class (too few word types).
    """
    ctrl, chance = _control_fit(X, ctx, path.Cs, penalty=path.penalty, l1_ratio=path.l1_ratio,
                                test_fraction=_test_fraction(path), seed=seed, tol=path.tol)
    return _control_path(path, ctrl, chance)


def _control_fit(X: np.ndarray, ctx: ContextSet, Cs: np.ndarray, *, penalty: str, l1_ratio: float, test_fraction: float,
                 seed: int, tol: float) -> tuple[LogisticPathResult, float]:
    yc = control_labels(ctx.next_ids, ctx.labels, seed=seed)
    _, counts = np.unique(yc, return_counts=True)
    if counts.size < 2 or counts.min() < 2:
        raise LabelError("the control task has fewer than two usable classes (too few distinct token types); "
                         "collect more contexts or use a token type with more variety.")
    ctrl = fit_logistic_path(X, yc, Cs=Cs, penalty=penalty, l1_ratio=l1_ratio, test_fraction=test_fraction,
                             seed=seed, tol=tol)
    return ctrl, float(counts.max() / counts.sum())


def _control_path(path: LogisticPathResult, ctrl: LogisticPathResult, chance: float) -> ControlPath:
    return ControlPath(Cs=path.Cs, accuracy=np.asarray(path.test_accuracy), control_accuracy=ctrl.test_accuracy,
                       control_chance=chance, converged=np.asarray(path.converged) & np.asarray(ctrl.converged))


@dataclass(frozen=True)
class SparseFit:
    """Everything the page shows for one hook and one set of contexts, at every C of the path: a C move is a
    lookup (:meth:`summary`, :meth:`neurons`, :meth:`report`, :meth:`control`), never a fit.

    Attributes:
        hook, ctx: what was probed. X: ``(n, d)`` features at ``ctx.feature_rows``.
        path: the C path (:func:`fit_sparse_path`). embed_same: the embed-only probe on the same Cs and split;
        embed_best: the embed-only probe on its own grid (None without ``hook_embed``).
        controls: :class:`ControlPath`, or None with ``control_error`` saying why it could not be formed.
    """

    hook: str
    ctx: ContextSet
    X: np.ndarray
    path: LogisticPathResult
    embed_same: LogisticPathResult | None
    embed_best: LogisticPathResult | None
    controls: ControlPath | None
    control_error: str | None = None
    _memo: dict = field(default_factory=dict, compare=False, repr=False)  # per-step tables, computed once

    def _at(self, what: str, k: int, compute: Callable[[], Any]) -> Any:
        key = (what, int(k))
        if key not in self._memo:  # two threads may both compute it: same value, no harm
            self._memo[key] = compute()
        return self._memo[key]

    def summary(self, k: int) -> SparseSummary:
        return self._at("summary", k, lambda: _summary(self.ctx, self.hook, self.path, int(k), self.embed_same,
                                                       self.embed_best))

    def neurons(self, k: int, top: int = 25) -> list[dict]:
        return self._at(f"neurons{top}", k, lambda: neuron_table(self.X, self.ctx, self.path, int(k), top=top))

    def report(self, k: int) -> dict:
        return self._at("report", k, lambda: report_at(self.X, self.ctx, self.path, int(k)))

    def control(self, k: int) -> ControlTaskResult:
        """Raises LabelError when the control task could not be formed."""
        if self.controls is None:
            raise LabelError(self.control_error or "no control task.")
        return self.controls.at(int(k))


def fit_sparse(acts: CachedActivations, hook: str, ctx: ContextSet, q: SparseQuery, *,
               embed_best: LogisticPathResult | None = None, progress: Progress | None = None) -> SparseFit:
    """The C path on ``hook``, the embed-only probe on the same Cs, and the control task along the path.

    The C grid is known before the path is fitted (:func:`default_Cs` on the features), so the path, each of its CV
    folds (:func:`~probing_core.solvers.logistic_path.fit_cv_fold`), the embed-only fits (the baseline's own folds
    too) and the control path are independent jobs: they run on one worker thread per core
    (:func:`probing_core.threads.workers`), each single-threaded, the fits on every training row first, and every
    thread has ended when this returns. Same numbers as fitting them one after the other, and as
    :func:`fit_sparse_path` / :func:`fit_embed_baseline` with their CV in one call (each fit is deterministic; tested).

    Args:
        acts, hook, ctx: the entry, the hook and the contexts (:func:`mine`). q: penalty, L1 ratio and folds.
        embed_best: :func:`fit_embed_baseline` for these contexts (fit here when None and the entry has
            ``hook_embed``): pass a kept one so a hook change does not refit it.
        progress: ``cb(fraction, message)``, called on the calling thread.

    Raises:
        HookError: the entry lacks ``hook``. LabelError: too few contexts for the split and folds.
    """
    X = features(acts, hook, ctx)
    grid = default_Cs(X, ctx.labels)  # what fit_sparse_path would pick: the embed and control fits share it
    pen = {"penalty": q.penalty, "l1_ratio": q.l1_ratio}
    folds = int(q.cv) if q.cv and int(q.cv) >= 2 else SELECT_CV

    def with_folds(name: str, Xf: np.ndarray, Cs: np.ndarray) -> None:
        jobs[name] = lambda: fit_logistic_path(Xf, ctx.labels, Cs=Cs, **pen)
        for i in range(folds):
            jobs[f"{name}, CV fold {i + 1}/{folds}"] = partial(fit_cv_fold, Xf, ctx.labels, Cs=Cs, fold=i, cv=folds,
                                                              **pen)

    def control() -> tuple[LogisticPathResult, float] | LabelError:
        try:
            return _control_fit(X, ctx, grid, test_fraction=0.3, seed=0, tol=1e-3, **pen)
        except LabelError as e:  # the rest of the page still works; the control section says why
            return e

    # Longest first (a worker that frees up takes the next): the fits on every training row, then the CV folds.
    jobs: dict[str, Callable[[], Any]] = {}
    with_folds("the C path", X, grid)
    jobs["the control task along the path"] = control
    if "hook_embed" in acts.hooks:
        Xe = features(acts, "hook_embed", ctx)
        if embed_best is None:
            with_folds("the embed-only baseline", Xe, default_Cs(Xe, ctx.labels))
        jobs["the embed-only probe at the same C values"] = lambda: fit_logistic_path(Xe, ctx.labels, Cs=grid, **pen)
    out = _run_jobs(dict(sorted(jobs.items(), key=lambda job: "CV fold" in job[0])), progress)  # stable: folds last

    def joined(name: str) -> LogisticPathResult:
        return with_cv(out[name], [out[f"{name}, CV fold {i + 1}/{folds}"] for i in range(folds)])

    path = joined("the C path")
    if "the embed-only baseline" in out:
        embed_best = joined("the embed-only baseline")
    ctrl = out["the control task along the path"]
    controls = None if isinstance(ctrl, LabelError) else _control_path(path, *ctrl)
    return SparseFit(hook, ctx, X, path, out.get("the embed-only probe at the same C values"), embed_best, controls,
                     str(ctrl) if isinstance(ctrl, LabelError) else None)


def _run_jobs(jobs: dict[str, Callable[[], Any]], progress: Progress | None) -> dict[str, Any]:
    """``{name: job()}``, on up to one worker thread per core (one BLAS/OpenMP thread each); ``progress`` on this
    thread as each job ends. A job's error is raised here once every started job has ended."""
    out: dict[str, Any] = {}
    n = min(workers(), len(jobs))
    if progress is not None:
        progress(0.0, f"{len(jobs)} fits on {n} thread{'s' * (n != 1)}")
    if n <= 1:
        for i, (name, job) in enumerate(jobs.items()):
            out[name] = job()
            if progress is not None:
                progress((i + 1) / len(jobs), f"done: {name}")
        return out
    # One BLAS thread for the whole block (the limit is process-wide): the workers' own single-threaded
    # sections then nest inside it and cannot leave a changed limit behind when they interleave.
    with single_threaded(), ThreadPoolExecutor(max_workers=n, thread_name_prefix="sparse-fit",
                                               initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {pool.submit(job): name for name, job in jobs.items()}
        for i, fut in enumerate(as_completed(futures)):
            out[futures[fut]] = fut.result()
            if progress is not None:
                progress((i + 1) / len(jobs), f"done: {futures[fut]}")
    return out


def report_at(X: np.ndarray, ctx: ContextSet, path: LogisticPathResult, k: int) -> dict:
    """scikit-learn-style classification report on the test split at path point k."""
    te = path.test_idx
    pred = path.predict(X[te], k)
    return classification_report_dict(ctx.labels[te], pred, target_names=ctx.class_names)


def neuron_table(X: np.ndarray, ctx: ContextSet, path: LogisticPathResult, k: int, *, top: int = 25) -> list[dict]:
    """Surviving neurons at path point k by |coef|: coefficient, mean activation per class, CV frequency."""
    rows = []
    for j in path.surviving(k)[:top]:
        w = path.coefs[k][:, j]
        row = {"neuron": int(j), "coef": float(w[np.abs(w).argmax()])}
        for ci, name in enumerate(ctx.class_names):
            row[f"mean act {name}"] = float(X[ctx.labels == ci, j].mean())
        if path.cv_selection_frequency is not None:
            row["selected in folds"] = float(path.cv_selection_frequency[k, j])
        rows.append(row)
    return rows


def control_task(X: np.ndarray, ctx: ContextSet, path: LogisticPathResult, C: float, *, seed: int = 0) -> ControlTaskResult:
    """Hewitt–Liang control task with the following word's token as the type, at the current C
    (the class token is chosen by the word after it, so that word is what the label is about)."""
    return fit_control_task(X, ctx.labels, ctx.next_ids, C=C, penalty=path.penalty, l1_ratio=path.l1_ratio,
                            test_fraction=len(path.test_idx) / (len(path.test_idx) + len(path.train_idx)), seed=seed)


@dataclass(frozen=True)
class LayerPoint:
    """One hook at one C: test accuracy with its n and 95 % Wilson interval, density, convergence."""

    hook: str
    test_accuracy: float
    train_accuracy: float
    density: float
    n_nonzero: int
    converged: bool
    n_test: int = 0
    ci_low: float = float("nan")
    ci_high: float = float("nan")


def fit_hook_at_C(acts: CachedActivations, hook: str, ctx: ContextSet, C: float, *, penalty: str = "l1",
                  l1_ratio: float = 0.5, test_fraction: float = 0.3, seed: int = 0) -> LayerPoint:
    """One point of the all-layers curve: the probe on ``hook`` at one C."""
    r = fit_logistic_path(features(acts, hook, ctx), ctx.labels, Cs=[C], penalty=penalty, l1_ratio=l1_ratio,
                          test_fraction=test_fraction, seed=seed)
    n_test = len(r.test_idx)
    lo, hi = accuracy_ci(round(float(r.test_accuracy[0]) * n_test), n_test)
    return LayerPoint(hook, float(r.test_accuracy[0]), float(r.train_accuracy[0]), float(r.density[0]),
                      int(r.n_nonzero[0]), bool(r.converged[0]), n_test, float(lo), float(hi))


#: Fewer held-out contexts than this: one context is worth more than half an accuracy point.
MIN_TEST = 200


def step_warnings(path: LogisticPathResult, k: int) -> list[str]:
    """What a reader must know before trusting path point ``k``: too few held-out contexts, no convergence."""
    out = []
    n_test = len(path.test_idx)
    if n_test < MIN_TEST:
        out.append(f"Only {n_test} held-out contexts: each is worth {100 / n_test:.1f} accuracy points, so this score "
                   "rests on too few examples. Use more text (a bigger cache entry) or raise “Max per class”.")
    if not path.converged[k]:
        out.append(f"Not converged at C = {path.Cs[k]:.4g} (KKT residual {path.kkt_residual[k]:.1e} > {path.tol}); "
                   "do not read its neurons as the answer — pick a smaller C.")
    return out


def layer_points(acts: CachedActivations, hooks: Sequence[str], ctx: ContextSet, C: float, q: SparseQuery, *,
                 progress: Progress | None = None) -> list[LayerPoint]:
    """The all-layers curve: :func:`fit_hook_at_C` for every hook (``progress`` once per hook)."""
    out = []
    for i, h in enumerate(hooks):
        out.append(fit_hook_at_C(acts, h, ctx, C, penalty=q.penalty, l1_ratio=q.l1_ratio))
        if progress is not None:
            progress((i + 1) / len(hooks), h)
    return out


def path_csv(path: LogisticPathResult) -> str:
    """CSV of the path table (one row per C)."""
    import pandas as pd

    return pd.DataFrame(path.table()).to_csv(index=False)


def coefs_csv(path: LogisticPathResult, k: int) -> str:
    """CSV of every non-zero coefficient at path point k (neuron, class row, coef)."""
    import pandas as pd

    W = path.coefs[k]
    nz = np.argwhere(W != 0)
    cls = [str(path.classes[1]) if W.shape[0] == 1 else str(path.classes[i]) for i in nz[:, 0]]
    return pd.DataFrame({"neuron": nz[:, 1], "class_row": cls, "coef": W[nz[:, 0], nz[:, 1]]}).to_csv(index=False)


def weights_npy(path: LogisticPathResult, k: int) -> bytes:
    """The (m, d) coefficient matrix at path point k as .npy bytes (standardized units)."""
    import io

    buf = io.BytesIO()
    np.save(buf, path.coefs[k])
    return buf.getvalue()


def manifest(path: LogisticPathResult, ctx: ContextSet, hook: str, k: int, base: dict) -> str:
    """JSON manifest of a run: inputs, options, the chosen C and its figures."""
    doc = {
        **base, "page": "sparse probe", "hook": hook, "classes": ctx.class_names, "counts": ctx.counts,
        "window": {"before": ctx.before, "after": ctx.after}, "offset": ctx.offset, "question": ctx.question,
        "C_chosen_on": "CV folds of the training rows", "chosen_index_cv": chosen_index(path),
        "n_train": len(path.train_idx), "n_test": len(path.test_idx),
        "penalty": path.penalty, "l1_ratio": path.l1_ratio,
        "Cs": path.Cs.tolist(), "chosen": path.table()[k], "standardized": True, "tol": path.tol,
    }
    return json.dumps(doc, indent=1, default=str)
