"""Sparse-probe experiment (issue 7): contexts → features at the target → L1/L2/EN path → report.

The page and the CLI both call these; arrays come from the activation store (memmap reads).
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
) -> ContextSet:
    """Resolve each class's token strings (one token each) and mine their contexts in ``acts``.

    Raises:
        LabelError: a string that is not one token, overlapping sets, a class with no context.
    """
    ids = [resolve_token_set(list(t), encode, decode_tokens) for t in class_texts]
    names = [" | ".join(repr(s) for s in t if s) for t in class_texts]
    return mine_contexts(acts.token_ids, acts.seq, acts.pos, acts.next_ids, lambda a: acts.text_strings(np.asarray(a)),
                         ids, names, before=before, after=after, whole_word_next=whole_word_next,
                         max_per_class=max_per_class, seed=seed)


def features(acts: CachedActivations, hook: str, ctx: ContextSet) -> np.ndarray:
    """``(n_contexts, width)`` float32 features of ``hook`` at the target positions.

    Raises:
        HookError: the entry does not hold the hook.
    """
    if hook not in acts.hooks:
        raise HookError(f"this cache entry has no {hook!r}; build one with it on the Home page "
                        f"(it holds: {', '.join(acts.hooks[:6])}{'…' if len(acts.hooks) > 6 else ''}).")
    return np.asarray(acts.hook(hook)[ctx.rows], dtype=np.float32)


def fit_sparse_path(
    X: np.ndarray, ctx: ContextSet, *, Cs: Sequence[float] | None = None, n_Cs: int = 17, penalty: str = "l1",
    l1_ratio: float = 0.5, test_fraction: float = 0.3, seed: int = 0, cv: int | None = None,
) -> LogisticPathResult:
    """The C path for one hook (default grid: 17 values over 2 decades from the first entering neuron)."""
    grid = np.asarray(Cs, float) if Cs is not None else default_Cs(X, ctx.labels, n=n_Cs)
    return fit_logistic_path(X, ctx.labels, Cs=grid, penalty=penalty, l1_ratio=l1_ratio,
                             test_fraction=test_fraction, seed=seed, cv=cv)


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
    """Hewitt–Liang control task with the following word's token as the type, at the current C."""
    return fit_control_task(X, ctx.labels, ctx.next_ids, C=C, penalty=path.penalty, l1_ratio=path.l1_ratio,
                            test_fraction=len(path.test_idx) / (len(path.test_idx) + len(path.train_idx)), seed=seed)


@dataclass(frozen=True)
class LayerPoint:
    hook: str
    test_accuracy: float
    train_accuracy: float
    density: float
    n_nonzero: int
    converged: bool


def fit_hook_at_C(acts: CachedActivations, hook: str, ctx: ContextSet, C: float, *, penalty: str = "l1",
                  l1_ratio: float = 0.5, test_fraction: float = 0.3, seed: int = 0) -> LayerPoint:
    """One point of the all-layers curve: the probe on ``hook`` at one C."""
    r = fit_logistic_path(features(acts, hook, ctx), ctx.labels, Cs=[C], penalty=penalty, l1_ratio=l1_ratio,
                          test_fraction=test_fraction, seed=seed)
    return LayerPoint(hook, float(r.test_accuracy[0]), float(r.train_accuracy[0]), float(r.density[0]),
                      int(r.n_nonzero[0]), bool(r.converged[0]))


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
        "window": {"before": ctx.before, "after": ctx.after}, "penalty": path.penalty, "l1_ratio": path.l1_ratio,
        "Cs": path.Cs.tolist(), "chosen": path.table()[k], "standardized": True, "tol": path.tol,
    }
    return json.dumps(doc, indent=1, default=str)
