"""Label checks, stratified and grouped splits and folds, Hewitt–Liang control labels (where train/test
rows come from), and the confidence intervals of held-out scores (bootstrap over test rows, Wilson)."""
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
        token_ids: ``(n,)`` type of each sample: the token the label is about (e.g. the token at the
            label's offset, or the word after the target), not necessarily the probed token.
        y: real labels whose empirical class distribution is reused (any length: e.g. the kept
            rows of the real task while ``token_ids`` covers every row of the column).
        seed: RNG seed.

    Returns:
        ``(n,)`` control labels with y's dtype/values.
    """
    token_ids = np.asarray(token_ids)
    y = np.asarray(y)
    if y.ndim != 1 or y.size == 0:
        raise ProbeError(f"labels must be a non-empty 1-D array; got shape {y.shape}.")
    classes, counts = np.unique(y, return_counts=True)
    types, inv = np.unique(token_ids, return_inverse=True)
    rng = np.random.default_rng(seed)
    per_type = rng.choice(classes.size, size=types.size, p=counts / counts.sum())
    return classes[per_type[inv]]


# --------------------------------------------------------------------------------------------
# Grouped (by token type) splits
# --------------------------------------------------------------------------------------------
def grouped_blocks(groups: np.ndarray, *, test_fraction: float = 0.2, cv: int = 5, seed: int = 0) -> np.ndarray:
    """Blocks of a split in which no group (e.g. token type) is on two sides.

    Block 0 is the test set, blocks 1..k the CV folds of the training rows (block 1 alone without
    CV): the same layout as :func:`probing_core.solvers.ridge.make_split`, but every row of a group
    lands in the same block, so a probe is scored only on types it never saw while fitting.
    Groups are shuffled with ``seed``; the test block takes whole groups until it holds about
    ``test_fraction`` of the rows, then the rest are dealt, largest first, to the fold with the
    fewest rows (balanced folds even when a few types are very frequent).

    Args:
        groups: ``(n,)`` group id of each row (any integer or string dtype).
        test_fraction: share of rows held out, in [0, 1) (0 = no test block).
        cv: folds over the training rows (0/1 = none).
        seed: shuffle seed.

    Returns:
        ``(n,)`` int16 block per row.

    Raises:
        ProbeError: a bad fraction, or too few groups / rows for a test block and the folds.
    """
    groups = np.asarray(groups)
    if not (0.0 <= float(test_fraction) < 1.0):
        raise ProbeError(f"test fraction must be in [0, 1); got {test_fraction}. Use e.g. 0.2, or 0 for no test split.")
    n_folds = int(cv) if int(cv) >= 2 else 0
    uniq, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    need = (1 if test_fraction > 0 else 0) + max(n_folds, 1)
    if uniq.size < need + (1 if n_folds == 0 else 0):
        raise ProbeError(
            f"a split by token type needs at least {need + (1 if n_folds == 0 else 0)} distinct token types; the "
            f"selection has {uniq.size}. Select more tokens, use fewer CV folds, or split by random tokens."
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(uniq.size)
    block_of_group = np.zeros(uniq.size, dtype=np.int16)
    n = groups.shape[0]
    target = float(test_fraction) * n
    taken = 0
    rest: list[int] = []
    for g in order:
        if test_fraction > 0 and (taken < 2 or taken + counts[g] / 2 <= target):
            block_of_group[g] = 0
            taken += int(counts[g])
        else:
            rest.append(int(g))
    if test_fraction > 0 and len(rest) < max(n_folds, 1):
        raise ProbeError(f"the test block took {uniq.size - len(rest)} of {uniq.size} token types, leaving too few "
                         "for training; lower the test fraction or select more tokens.")
    k = max(n_folds, 1)
    load = np.zeros(k, dtype=np.int64)
    for g in sorted(rest, key=lambda g: -counts[g]):  # stable: ties keep the shuffled order
        f = int(np.argmin(load))
        block_of_group[g] = f + 1
        load[f] += counts[g]
    block = block_of_group[inv]
    if test_fraction > 0 and int(np.count_nonzero(block == 0)) < 2:
        raise ProbeError("the split by token type leaves fewer than 2 test rows; select more tokens.")
    if n_folds and load.min() < 2:
        raise ProbeError(f"the split by token type leaves a CV fold with {int(load.min())} row(s); use fewer folds "
                         "or select more tokens.")
    return block


def seen_in_training(groups: np.ndarray, block: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: the row's group also occurs in a training block (block ≠ 0)."""
    groups = np.asarray(groups)
    train_groups = np.unique(groups[np.asarray(block) != 0])
    return np.isin(groups, train_groups)


# --------------------------------------------------------------------------------------------
# Uncertainty of held-out scores
# --------------------------------------------------------------------------------------------
def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """R² as :func:`sklearn.metrics.r2_score` (1 − RSS/TSS; a constant target: 1 if exact, else 0)."""
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if y.size == 0:
        return float("nan")
    rss = float(((y - pred) ** 2).sum())
    tss = float(((y - y.mean()) ** 2).sum())
    if tss <= 0.0:
        return 1.0 if rss == 0.0 else 0.0
    return 1.0 - rss / tss


def bootstrap_r2_ci(y: np.ndarray, pred: np.ndarray, *, n_boot: int = 1000, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of R² over the scored rows (resampled with replacement).

    Args:
        y, pred: ``(n,)`` true values and predictions of the scored rows.
        n_boot: resamples. level: coverage (0.95 = the 2.5 and 97.5 percentiles).

    Returns:
        (low, high); (nan, nan) for fewer than 3 rows.
    """
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    n = y.size
    if n < 3:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    Y, P = y[idx], pred[idx]
    rss = ((Y - P) ** 2).sum(1)
    tss = ((Y - Y.mean(1, keepdims=True)) ** 2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(tss > 0, 1.0 - rss / np.where(tss > 0, tss, 1.0), np.where(rss == 0, 1.0, 0.0))
    lo, hi = np.quantile(r2, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def bootstrap_r2_ci_many(y: np.ndarray, preds: np.ndarray, *, n_boot: int = 1000, level: float = 0.95,
                         seed: int = 0) -> np.ndarray:
    """:func:`bootstrap_r2_ci` for several predictors of the same rows at once (the same resamples).

    Each resample is a row of multiplicity counts, so every R² comes from weighted sums: one
    ``(n_boot, n) @ (n, H)`` product instead of ``H × n_boot`` gathers (a label change on the
    Regression page scores 31–91 hooks).

    Args:
        y: ``(n,)`` true values. preds: ``(H, n)`` predictions of H probes.

    Returns:
        ``(H, 2)`` (low, high); NaN for fewer than 3 rows.
    """
    y = np.asarray(y, dtype=np.float64)
    P = np.atleast_2d(np.asarray(preds, dtype=np.float64))
    n = y.size
    if n < 3:
        return np.full((P.shape[0], 2), np.nan)
    rng = np.random.default_rng(seed)
    E = np.ascontiguousarray(((P - y[None, :]) ** 2).T)  # (n, H) squared errors
    step = max(1, int(5e6 // n))  # resamples per block: ~40 MB of counts at a time
    s1, s2, rss = np.empty(n_boot), np.empty(n_boot), np.empty((n_boot, P.shape[0]))
    for b0 in range(0, n_boot, step):
        b = min(step, n_boot - b0)
        idx = rng.integers(0, n, size=(b, n))
        W = np.bincount((np.arange(b)[:, None] * n + idx).ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        s1[b0:b0 + b], s2[b0:b0 + b], rss[b0:b0 + b] = W @ y, W @ (y * y), W @ E
    tss = s2 - s1 * s1 / n  # (n_boot,)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(tss[:, None] > 1e-12 * np.maximum(s2[:, None], 1e-300), 1.0 - rss / tss[:, None],
                      np.where(rss <= 1e-12, 1.0, 0.0))
    q = np.quantile(r2, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)  # (2, H)
    return q.T


def accuracy_ci(n_correct: np.ndarray | int | float, n: np.ndarray | int, *, level: float = 0.95) -> np.ndarray:
    """Wilson score interval of an accuracy measured on ``n`` test rows (``(..., 2)``: low, high).

    The bootstrap over test rows of an accuracy is this binomial interval (Wilson keeps it inside
    [0, 1] and sensible at 0 % / 100 %, where the plain normal interval collapses to a point).
    """
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    k = np.asarray(n_correct, dtype=np.float64)
    m = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / m
        den = 1 + z * z / m
        mid = (p + z * z / (2 * m)) / den
        half = z * np.sqrt(p * (1 - p) / m + z * z / (4 * m * m)) / den
    lo = np.where(k <= 0, 0.0, mid - half)  # exact ends at 0 % and 100 % (no rounding just inside)
    hi = np.where(k >= m, 1.0, mid + half)
    out = np.stack([lo, hi], axis=-1)
    return np.where(np.asarray(m)[..., None] > 0, np.clip(out, 0.0, 1.0), np.nan)
