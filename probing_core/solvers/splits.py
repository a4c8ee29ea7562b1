"""Label checks, stratified splits and folds, and Hewitt–Liang control labels: where train/test rows come from."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from probing_core.errors import LabelError, ProbeError



def check_Cs(Cs: Sequence[float] | np.ndarray | float) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(Cs, dtype=np.float64))
    if arr.size == 0:
        raise ProbeError("no C values given; pass at least one positive C (C = 1/λ), e.g. 1.0.")
    bad = arr[~np.isfinite(arr) | (arr <= 0)]
    if bad.size:
        raise ProbeError(
            f"C must be positive and finite (C = 1/λ); got {bad[:3].tolist()}. "
            "Use a small C (e.g. 0.01) for a strong penalty and a large one (e.g. 100) for a weak one."
        )
    return arr


def validate_xy(X: np.ndarray, y: np.ndarray, *, min_per_class: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check a design matrix and labels; return ``(X float32, y codes 0..K-1, classes)``.

    Args:
        X: ``(n, d)`` features.
        y: ``(n,)`` labels of any hashable dtype.
        min_per_class: fewest examples every class needs (2 for a train/test split, k for k folds).

    Raises:
        ProbeError: X is not 2-D, has NaN/inf, or does not match y.
        LabelError: one class only, more classes than samples, or a class with too few examples.
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2:
        raise ProbeError(f"features must be a 2-D array (samples × features); got shape {X.shape}.")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ProbeError(
            f"labels must be 1-D with one entry per sample; got {y.shape} for {X.shape[0]} samples."
        )
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ProbeError("no samples or no features; collect activations for at least a few examples first.")
    Xf = np.ascontiguousarray(X, dtype=np.float32)
    finite = np.isfinite(Xf)
    if not finite.all():
        rows = np.where(~finite.all(axis=1))[0]
        raise ProbeError(
            f"features contain NaN or inf in {rows.size} sample(s) (first: {rows[:5].tolist()}); "
            "re-extract the activations in float32, or drop those samples."
        )
    codes, classes = check_labels(y, min_per_class)
    return Xf, codes, classes


def check_labels(y: np.ndarray, min_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes 0..K-1, classes)`` of labels ``y``; the label checks of :func:`validate_xy`."""
    classes, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    if classes.size < 2:
        raise LabelError(
            f"only one class ({classes[0]!r}) in the labels; a probe needs at least two — "
            "widen the selection or pick a label with more than one value."
        )
    if classes.size > y.size:
        raise LabelError(f"{classes.size} classes for {y.size} samples; collect more samples.")
    few = [(c, int(k)) for c, k in zip(classes, counts) if k < min_per_class]
    if few:
        desc = ", ".join(f"{c!r}: {k}" for c, k in few[:5])
        raise LabelError(
            f"class(es) with too few examples ({desc}); each class needs at least {min_per_class} "
            "(one per fold / one in train and one in test). Collect more samples, merge rare classes, "
            "or use fewer folds."
        )
    return codes.astype(np.int64), classes




def stratified_split(y: np.ndarray, *, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices: every class keeps its proportion, at least one per side.

    Args:
        y: ``(n,)`` labels.
        test_fraction: share of each class put into the test set, in (0, 1).
        seed: RNG seed.

    Returns:
        ``(train_idx, test_idx)`` sorted int64 arrays.

    Raises:
        ProbeError: test_fraction outside (0, 1). LabelError: a class with fewer than 2 examples.
    """
    if not (0.0 < test_fraction < 1.0):
        raise ProbeError(f"test_fraction={test_fraction} must be between 0 and 1 (e.g. 0.3).")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.where(y == c)[0]
        if idx.size < 2:
            raise LabelError(f"class {c!r} has {idx.size} example; a train/test split needs at least 2 per class.")
        idx = rng.permutation(idx)
        k = int(round(test_fraction * idx.size))
        k = min(max(k, 1), idx.size - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def stratified_kfold(y: np.ndarray, *, k: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold: list of ``(train_idx, val_idx)``; each class dealt round-robin to folds.

    Raises:
        ProbeError: k < 2. LabelError: a class with fewer than k examples.
    """
    if k < 2:
        raise ProbeError(f"k={k} folds: use at least 2 folds (5 is usual).")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(y.shape[0], dtype=np.int64)
    for c in np.unique(y):
        idx = np.where(y == c)[0]
        if idx.size < k:
            raise LabelError(
                f"class {c!r} has {idx.size} example(s), fewer than the {k} folds; use fewer folds or collect more."
            )
        idx = rng.permutation(idx)
        start = int(rng.integers(k))
        fold_of[idx] = (np.arange(idx.size) + start) % k
    all_idx = np.arange(y.shape[0])
    return [(all_idx[fold_of != f], all_idx[fold_of == f]) for f in range(k)]


def control_labels(token_ids: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Hewitt–Liang control task: one random class per token type, drawn from y's class distribution.

    Every occurrence of the same token id gets the same control label, so a probe can only score
    above chance on it by memorizing token identity — the gap to the real task (selectivity)
    says how much of the accuracy comes from the representation rather than the probe.

    Args:
        token_ids: ``(n,)`` token type of each sample (e.g. the word after the target).
        y: ``(n,)`` real labels (their empirical distribution is reused).
        seed: RNG seed.

    Returns:
        ``(n,)`` control labels with y's dtype/values.
    """
    token_ids = np.asarray(token_ids)
    y = np.asarray(y)
    if token_ids.shape != y.shape:
        raise ProbeError(f"token_ids {token_ids.shape} and labels {y.shape} must have the same length.")
    classes, counts = np.unique(y, return_counts=True)
    types, inv = np.unique(token_ids, return_inverse=True)
    rng = np.random.default_rng(seed)
    per_type = rng.choice(classes.size, size=types.size, p=counts / counts.sum())
    return classes[per_type[inv]]
