"""Sparse-probe experiment (issue 7): contexts → features at the target → L1/L2/EN path → report.

The page and the CLI both call these; arrays come from the activation store (memmap reads).

What is held out and what a score is compared with (issue 20):

* C is chosen on k-fold CV of the training rows (:func:`chosen_index`), never on the test rows;
  the test accuracy is reported at that C, with its n and a 95 % Wilson interval.
* Beside the neuron probe: the majority baseline of the test split and the **embed-only
  baseline** — the same probe, same C grid, same split, on ``hook_embed`` at the same positions
  (:func:`summarize`). At the article itself (offset 0) the embedding alone identifies the token,
  so the task is trivial; at the token before it (offset -1, :data:`PRESETS`) the question is
  whether the layer already knows the next word will be " an".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from probing_core.store.activations import CachedActivations
from probing_core.data.contexts import ContextSet, mine_contexts, resolve_token_set
from probing_core.errors import HookError
from probing_core.solvers.logistic_path import LogisticPathResult, classification_report_dict, default_Cs, fit_control_task, fit_logistic_path, ControlTaskResult
from probing_core.solvers.splits import accuracy_ci

#: Where the features are read, relative to the class token (the page's one-click presets).
PRESETS: dict[str, int] = {
    "the token before (does layer L already know?)": -1,
    "the class token itself (the notebook)": 0,
}
#: Folds used to choose C when the caller asks for no CV.
SELECT_CV = 3


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
            {"probe": f"embed only (hook_embed, same C)", "test_accuracy": self.embed_accuracy,
             "95% CI": ci(self.embed_ci), "n_test": self.n_test},
            {"probe": f"embed only at its CV-chosen C = {self.embed_best_C:.4g}", "test_accuracy": self.embed_best_accuracy,
             "95% CI": "", "n_test": self.n_test},
            {"probe": "majority class", "test_accuracy": self.majority, "95% CI": "", "n_test": self.n_test},
        ]


def summarize(acts: CachedActivations, hook: str, ctx: ContextSet, path: LogisticPathResult, *,
              k: int | None = None, seed: int = 0, embed_path: LogisticPathResult | None = None) -> SparseSummary:
    """The chosen point of ``path`` (default: :func:`chosen_index`) with the majority and embed-only baselines.

    Args:
        acts, hook, ctx: what ``path`` was fit on. path: from :func:`fit_sparse_path`.
        k: path point to report (None: chosen on CV). seed: the path's split seed.
        embed_path: an already fitted embed-only path (same Cs); else it is fit here when the entry holds
            ``hook_embed``.

    Returns:
        SparseSummary.
    """
    k = chosen_index(path) if k is None else int(k)
    te = path.test_idx
    n_test = int(te.size)
    _, counts = np.unique(ctx.labels[te], return_counts=True)
    acc = float(path.test_accuracy[k])
    ci = tuple(accuracy_ci(round(acc * n_test), n_test).tolist())
    nan2 = (float("nan"), float("nan"))
    e_acc = e_best = e_C = float("nan")
    e_ci = nan2
    embed_hook = "hook_embed" if "hook_embed" in acts.hooks else None
    if embed_hook is not None:
        if embed_path is None:
            frac = n_test / (n_test + len(path.train_idx))
            embed_path = fit_sparse_path(features(acts, embed_hook, ctx), ctx, Cs=path.Cs, penalty=path.penalty,
                                         l1_ratio=path.l1_ratio, test_fraction=frac, seed=seed)
        e_acc = float(embed_path.test_accuracy[k])
        e_ci = tuple(accuracy_ci(round(e_acc * n_test), n_test).tolist())
        eb = chosen_index(embed_path)
        e_best, e_C = float(embed_path.test_accuracy[eb]), float(embed_path.Cs[eb])
    return SparseSummary(
        question=ctx.question, offset=int(ctx.offset), hook=hook, k=k, C=float(path.Cs[k]),
        cv_accuracy=float(path.cv_accuracy[k]) if path.cv_accuracy is not None else float("nan"),
        test_accuracy=acc, test_ci=ci, n_train=int(len(path.train_idx)), n_test=n_test,
        majority=float(counts.max() / counts.sum()), embed_hook=embed_hook, embed_accuracy=e_acc, embed_ci=e_ci,
        embed_best_accuracy=e_best, embed_best_C=e_C,
    )


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
    n_test = int(len(r.test_idx))
    lo, hi = accuracy_ci(round(float(r.test_accuracy[0]) * n_test), n_test)
    return LayerPoint(hook, float(r.test_accuracy[0]), float(r.train_accuracy[0]), float(r.density[0]),
                      int(r.n_nonzero[0]), bool(r.converged[0]), n_test, float(lo), float(hi))


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
        "n_train": int(len(path.train_idx)), "n_test": int(len(path.test_idx)),
        "penalty": path.penalty, "l1_ratio": path.l1_ratio,
        "Cs": path.Cs.tolist(), "chosen": path.table()[k], "standardized": True, "tol": path.tol,
    }
    return json.dumps(doc, indent=1, default=str)
