"""Ridge regression probes with the whole regularization path, for every hook at once.

Why not a scikit-learn loop: ``RidgeCV`` refits for every α and every fold. Here each hook costs
one pass over its activations to build per-block Gram matrices (fp32 products on globally
centred data, accumulated into fp64), then one fp64 eigendecomposition per model (the
train-split model plus one per CV fold). Every α is then arithmetic on the eigenvalues, and the
held-out R² of every fold comes from sufficient statistics (block Gram, sums), so

* a new α costs a few d² operations per hook (no pass over the data), and
* a new label (same rows) costs one ``Yᵀ X`` pass per hook (:meth:`RidgeDecomposition.path`).

When a model has fewer training rows than features the dual (n×n kernel) form is used.

Conventions: ``X`` is ``(n_samples, d_model)`` (any float dtype, converted to fp32 once), labels
``y`` are ``(n_samples,)``. R² follows :func:`sklearn.metrics.r2_score` (per block, relative to
that block's own mean; a constant block gives 1.0 if predicted exactly, else 0.0).
Rows are split by :func:`make_split` into a held-out test block (block 0) and CV folds (blocks
1..k) of the training rows; the reported coefficients are those of the model fit on all
training rows (every block but 0).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from probing_core.threads import map_hooks, single_threaded
from probing_core.errors import ProbeError

__all__ = [
    "DEFAULT_ALPHAS",
    "RidgeSplit",
    "RidgeDecomposition",
    "RidgePath",
    "RidgePathResult",
    "TransferResult",
    "make_split",
    "decompose_ridge",
    "decompose_ridge_streamed",
    "iter_row_chunks",
    "fit_ridge_path",
    "score_transfer",
    "check_alphas",
]

#: 20 α values from 1e-3 to 1e6 (absolute, like scikit-learn's ``alpha``).
DEFAULT_ALPHAS: np.ndarray = np.logspace(-3, 6, 20)

_DEFAULT_RCOND = {np.dtype(np.float32): 1e-7, np.dtype(np.float64): 1e-12}


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RidgeSplit:
    """Assignment of rows to blocks.

    Attributes:
        block: ``(n_samples,)`` int16; 0 = held-out test rows, 1..``n_train_blocks`` = CV folds
            of the training rows (a single block 1 when there is no CV).
        n_folds: number of CV folds (0 = no cross-validation).
        test_fraction: fraction of rows held out as block 0.
        seed: seed of the row permutation.
    """

    block: np.ndarray
    n_folds: int
    test_fraction: float
    seed: int

    @property
    def n_samples(self) -> int:
        return int(self.block.shape[0])

    @property
    def n_blocks(self) -> int:
        """Blocks including the (possibly empty) test block 0."""
        return max(self.n_folds, 1) + 1

    @property
    def n_test(self) -> int:
        return int(np.count_nonzero(self.block == 0))

    @property
    def n_train(self) -> int:
        return self.n_samples - self.n_test

    def same_as(self, other: "RidgeSplit") -> bool:
        return (
            self.n_folds == other.n_folds
            and self.block.shape == other.block.shape
            and bool(np.array_equal(self.block, other.block))
        )


def make_split(n_samples: int, *, test_fraction: float = 0.2, cv: int = 5, seed: int = 0) -> RidgeSplit:
    """Seeded split of ``n_samples`` rows into a test block and ``cv`` balanced folds.

    Args:
        n_samples: number of rows.
        test_fraction: fraction held out for the test R² (0 for none), in [0, 1).
        cv: number of CV folds over the training rows; 0 or 1 disables CV.
        seed: seed of the permutation (same seed, same split).

    Returns:
        RidgeSplit.

    Raises:
        ProbeError: bad fraction, fewer training samples than folds, or a test block below 2 rows.
    """
    if not (0.0 <= float(test_fraction) < 1.0) or not math.isfinite(float(test_fraction)):
        raise ProbeError(f"test fraction must be in [0, 1); got {test_fraction}. Use e.g. 0.2, or 0 for no test split.")
    cv = int(cv)
    if cv < 0:
        raise ProbeError(f"number of CV folds must be ≥ 0 (0 or 1 = no CV); got {cv}.")
    n_folds = cv if cv >= 2 else 0
    n_test = int(round(n_samples * float(test_fraction))) if test_fraction > 0 else 0
    if test_fraction > 0 and n_test < 2:
        raise ProbeError(
            f"a test fraction of {test_fraction} of {n_samples} samples leaves {n_test} test rows; "
            "R² needs at least 2. Select more tokens or set the test fraction to 0."
        )
    n_train = n_samples - n_test
    if n_train < max(n_folds, 2):
        raise ProbeError(
            f"only {n_train} training samples for {max(n_folds, 2)} folds/rows needed: fewer samples than folds. "
            "Select more tokens (positions/labels), lower the number of CV folds, or lower the test fraction."
        )
    if n_folds and n_train < 2 * n_folds:
        raise ProbeError(
            f"{n_train} training samples over {n_folds} folds leaves folds of one row (R² is undefined); "
            f"use at most {n_train // 2} folds or select more tokens."
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_samples)
    block = np.zeros(n_samples, dtype=np.int16)
    train_rows = perm[n_test:]
    block[train_rows] = (np.arange(n_train) % max(n_folds, 1)) + 1
    return RidgeSplit(block=block, n_folds=n_folds, test_fraction=float(test_fraction), seed=int(seed))


def check_alphas(alphas: Iterable[float]) -> np.ndarray:
    """Validate and sort α values (strictly positive, finite). Returns a float64 array.

    Raises:
        ProbeError: empty, non-finite or non-positive α (use ``ols`` results for α→0).
    """
    a = np.asarray(list(np.atleast_1d(np.asarray(alphas, dtype=np.float64)).ravel()), dtype=np.float64)
    if a.size == 0:
        raise ProbeError("no α given; pass at least one regularization strength, e.g. 1.0.")
    if not np.all(np.isfinite(a)):
        raise ProbeError(f"α must be finite; got {a[~np.isfinite(a)].tolist()}.")
    if np.any(a <= 0):
        raise ProbeError(
            f"α must be > 0; got {a[a <= 0].tolist()}. For plain least squares (α→0) read the OLS "
            "results (r2_*_ols, coef(hook, 0.0)) instead."
        )
    return np.unique(a)


# --------------------------------------------------------------------------------------------
# Decomposition (per hook, label-independent)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Model:
    """One ridge model of the path: trained on ``train_blocks``, scored on ``score_block``."""

    train_blocks: tuple[int, ...]
    score_block: int | None
    n: int
    mean: np.ndarray  # (d_model,) training mean, offset from the global mean
    eigvals: np.ndarray  # (r,) eigenvalues of the centred training Gram above the cutoff
    eigvecs: np.ndarray  # (d_model, r) orthonormal
    score_proj: np.ndarray | None  # dual form: (n_score, r) = (X_q - mean) @ eigvecs
    score_gram: np.ndarray | None = None  # primal form: (r, r) fp32 = Vᵀ Σ_q (x - mean)(x - mean)ᵀ V


@dataclass(frozen=True, eq=False)
class _LabelStats:
    """Per-block sufficient statistics of L labels (label shift removed)."""

    shift: np.ndarray  # (L,) subtracted from y before the sums
    xy: np.ndarray  # (n_blocks, L, d_model): Σ (x - x_mean) y per block
    y1: np.ndarray  # (n_blocks, L): Σ y
    y2: np.ndarray  # (n_blocks, L): Σ y²
    # model index → (z, tz): the label's projections on that model's eigenvectors, filled on first
    # use so a later α costs no pass over the eigenvectors (see RidgeDecomposition._proj).
    proj: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, eq=False)
class RidgePath:
    """R² of L labels along an α path for one hook (arrays are float64).

    Attributes:
        alphas: ``(alpha,)``.
        r2_train: ``(L, alpha)`` in-sample R² of the model fit on all training rows.
        r2_test: ``(L, alpha)`` R² on the held-out block (NaN if there is none).
        r2_cv: ``(L, fold, alpha)`` held-out R² of each CV fold (fold axis empty without CV).
    """

    alphas: np.ndarray
    r2_train: np.ndarray
    r2_test: np.ndarray
    r2_cv: np.ndarray


@dataclass(frozen=True, eq=False)
class RidgeDecomposition:
    """Label-independent part of the ridge path for one hook; reuse it for any label on the same rows.

    Build with :func:`decompose_ridge`. Memory: about ``(k+1) d_model² × 12`` bytes in the
    primal form (fp64 eigenvectors of each model + the scored block's fp32 Gram in that model's
    eigenbasis).

    Attributes:
        hook: hook name (for messages).
        split: the row split it was built for.
        n_features: d_model.
        form: "primal" (d×d Gram) or "dual" (n×n kernel; fewer rows than features).
        x_mean: ``(d_model,)`` float64 mean of all rows.
        block_count: ``(n_blocks,)`` rows per block.
        block_sum: ``(n_blocks, d_model)`` Σ (x - x_mean) per block.
        models: model 0 = all training rows (scored on the test block), then one per CV fold.
    """

    hook: str
    split: RidgeSplit
    n_features: int
    form: str
    x_mean: np.ndarray
    block_count: np.ndarray
    block_sum: np.ndarray
    models: tuple[_Model, ...]
    rcond: float
    gram_dtype: str = "float32"

    # ---- label statistics ------------------------------------------------------------------
    def label_stats(self, X: np.ndarray, Y: np.ndarray) -> _LabelStats:
        """One pass over X: per-block Σ x y, Σ y, Σ y² for ``Y`` of shape ``(n,)`` or ``(n, L)``."""
        X = _as_f32(X, self.hook)
        if X.shape != (self.split.n_samples, self.n_features):
            raise ProbeError(
                f"hook {self.hook!r}: activations have shape {X.shape}, the cached decomposition expects "
                f"({self.split.n_samples}, {self.n_features}); recompute it for these rows."
            )
        Y = np.asarray(Y, dtype=np.float64)
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.shape[0] != self.split.n_samples:
            raise ProbeError(f"labels have {Y.shape[0]} rows but the activations have {self.split.n_samples}.")
        if not np.all(np.isfinite(Y)):
            raise ProbeError("labels contain NaN or inf; mask those tokens out (LabelResult.mask) before fitting.")
        return self._stats_from_design(X, _block_design(self.split, Y, self.gram_dtype))

    def _stats_from_design(self, X: np.ndarray, design: "_BlockDesign") -> _LabelStats:
        dt = design.Yblk.dtype
        n_blocks, L = design.y1.shape
        raw = _xty(X.astype(dt, copy=False), design.Yblk).astype(np.float64).reshape(n_blocks, L, self.n_features)
        xy = raw - design.y1[:, :, None] * self.x_mean[None, None, :]
        return _LabelStats(shift=design.shift, xy=xy, y1=design.y1, y2=design.y2)

    # ---- path ------------------------------------------------------------------------------
    def path(self, X: np.ndarray, Y: np.ndarray, alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS) -> RidgePath:
        """R² along the α path for labels ``Y`` ``(n,)`` or ``(n, L)`` (one pass over ``X``)."""
        return self.path_from_stats(self.label_stats(X, Y), check_alphas(alphas))

    def path_from_stats(self, stats: _LabelStats, alphas: np.ndarray) -> RidgePath:
        """R² for any α (≥ 0; 0 = minimum-norm least squares) without touching the data."""
        alphas = np.asarray(alphas, dtype=np.float64)
        L = stats.y1.shape[1]
        train = _r2_train(self.models[0], self._proj(0, stats)[0], stats, alphas)
        if self.models[0].score_block is not None:
            test = self._r2_block(0, stats, alphas)
        else:
            test = np.full((L, alphas.size), np.nan)
        folds = [self._r2_block(i, stats, alphas) for i in range(1, len(self.models))]
        cv = np.stack(folds, axis=1) if folds else np.zeros((L, 0, alphas.size))
        return RidgePath(alphas=alphas, r2_train=train, r2_test=test, r2_cv=cv)

    def _proj(self, i: int, st: _LabelStats) -> tuple[np.ndarray, np.ndarray | None]:
        """``z = Vᵀ Σ (x-μ)(y-ȳ)`` of model ``i`` and ``tz = Vᵀ Σ_q (x-μ)(y-ȳ)`` of its scored block
        (both ``(L, r)``), from one product with the eigenvectors; cached in ``st``."""
        hit = st.proj.get(i)
        if hit is not None:
            return hit
        m = self.models[i]
        T = list(m.train_blocks)
        ybar = st.y1[T].sum(0) / m.n  # (L,)
        b = st.xy[T].sum(0) - m.n * ybar[:, None] * m.mean[None, :]  # Σ (x-μ)(y-ȳ), (L, d)
        q = m.score_block
        if q is None:
            out = (b @ m.eigvecs, None)
        else:
            nq = float(self.block_count[q])
            Sq = self.block_sum[q]
            t = st.xy[q] - ybar[:, None] * Sq[None, :] - st.y1[q][:, None] * m.mean[None, :] + nq * ybar[:, None] * m.mean[None, :]
            P = np.concatenate([b, t]) @ m.eigvecs
            L = b.shape[0]
            out = (P[:L], P[L:])
        st.proj[i] = out
        return out

    def _r2_block(self, i: int, st: _LabelStats, alphas: np.ndarray) -> np.ndarray:
        m = self.models[i]
        q = m.score_block
        assert q is not None
        T = list(m.train_blocks)
        ybar = st.y1[T].sum(0) / m.n  # (L,)
        z, tz = self._proj(i, st)
        C = z[:, None, :] / (m.eigvals[None, None, :] + alphas[None, :, None])  # (L, A, r)
        nq = float(self.block_count[q])
        cross = np.einsum("lar,lr->la", C, tz)
        L, A, r = C.shape
        C2 = C.reshape(L * A, r)
        if m.score_proj is not None:
            Q = C2 @ m.score_proj.T  # (L·A, nq)
            quad = np.einsum("kn,kn->k", Q, Q).reshape(L, A)
        else:
            assert m.score_gram is not None
            # fp32 product (half the bytes of H to read): R² moves by < 1e-7 (6e-8 measured at R² 0.99998).
            HC = (C2.astype(np.float32) @ m.score_gram).astype(np.float64)
            quad = np.einsum("kr,kr->k", HC, C2).reshape(L, A)
        yy = st.y2[q] - 2.0 * ybar * st.y1[q] + nq * ybar * ybar  # Σ (y - ȳ_train)²
        rss = yy[:, None] - 2.0 * cross + quad
        tss = st.y2[q] - st.y1[q] ** 2 / nq
        return _r2_from(rss, tss[:, None], (st.y2[q] + st.y1[q] ** 2 / nq)[:, None])

    # ---- coefficients ----------------------------------------------------------------------
    def coef(self, stats: _LabelStats, alpha: float, label: int = 0) -> tuple[np.ndarray, float]:
        """Coefficients ``(d_model,)`` and intercept (raw activation coordinates) of the model fit on
        all training rows at ``alpha`` (0.0 = minimum-norm least squares)."""
        m = self.models[0]
        c = self._proj(0, stats)[0][label] / (m.eigvals + float(alpha))
        w = m.eigvecs @ c
        ybar = stats.y1[list(m.train_blocks), label].sum() / m.n + stats.shift[label]
        b = float(ybar - (self.x_mean + m.mean) @ w)
        return w, b


@dataclass(frozen=True, eq=False)
class _BlockDesign:
    """Label columns spread over the split's blocks (shared by every hook of one fit)."""

    Yblk: np.ndarray  # (n, n_blocks·L): column (block, label) = centred y on that block's rows, else 0
    shift: np.ndarray  # (L,)
    y1: np.ndarray  # (n_blocks, L) Σ y per block (after the shift)
    y2: np.ndarray  # (n_blocks, L) Σ y² per block


def _block_design(split: RidgeSplit, Y: np.ndarray, gram_dtype: str,
                  rows: np.ndarray | None = None, n_full: int = 0) -> _BlockDesign:
    """``rows``: the samples are rows ``rows`` of arrays with ``n_full`` rows (the others get 0)."""
    n_blocks = split.n_blocks
    L = Y.shape[1]
    shift = Y.mean(axis=0)
    Yc = Y - shift
    block = split.block.astype(np.intp)
    # One product for all blocks. fp32 by default (a memory-bound pass), fp64 for an fp64 decomposition.
    dt = np.float64 if gram_dtype == "float64" else np.float32
    Yblk = np.zeros((Y.shape[0], n_blocks * L), dtype=dt)
    cols = block[:, None] * L + np.arange(L)[None, :]
    np.put_along_axis(Yblk, cols, Yc.astype(dt), axis=1)
    if rows is not None:
        full = np.zeros((n_full, Yblk.shape[1]), dtype=dt)
        full[rows] = Yblk
        Yblk = full
    y1 = np.stack([np.bincount(block, weights=Yc[:, j], minlength=n_blocks) for j in range(L)], axis=1)
    y2 = np.stack([np.bincount(block, weights=Yc[:, j] * Yc[:, j], minlength=n_blocks) for j in range(L)], axis=1)
    return _BlockDesign(Yblk=Yblk, shift=shift, y1=y1, y2=y2)


def _r2_train(m: _Model, z: np.ndarray, st: _LabelStats, alphas: np.ndarray) -> np.ndarray:
    T = list(m.train_blocks)
    ybar = st.y1[T].sum(0) / m.n
    yy = st.y2[T].sum(0) - m.n * ybar * ybar
    z2 = z**2  # (L, r)
    inv = 1.0 / (m.eigvals[None, :] + alphas[:, None])  # (A, r)
    rss = yy[:, None] - 2.0 * (z2 @ inv.T) + z2 @ (m.eigvals[None, :] * inv * inv).T
    return _r2_from(rss, yy[:, None], st.y2[T].sum(0)[:, None])


def _r2_from(rss: np.ndarray, tss: np.ndarray, sumsq: np.ndarray | float = 0.0) -> np.ndarray:
    """R² = 1 - RSS/TSS; ``sumsq`` (Σ y² of the block) sets the scale below which TSS counts as 0."""
    rss = np.maximum(rss, 0.0)
    tss_b = np.broadcast_to(tss, rss.shape)
    scale = np.maximum(np.abs(tss_b), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - rss / scale
    const = tss_b <= 1e-13 * np.broadcast_to(np.asarray(sumsq, dtype=np.float64), rss.shape) + 1e-300
    # scikit-learn's convention for a constant target block: 1 if predicted exactly, else 0.
    return np.where(const, np.where(rss <= 1e-12, 1.0, 0.0), r2)


def _xty(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """``Yᵀ X`` for a tall ``X`` ``(n, d)`` and a thin ``Y`` ``(n, k)`` of the same dtype, ``(k, d)``.

    torch's kernel for this memory-bound shape ran at 1.7–2× NumPy's (OpenBLAS) speed on fp32 here.
    """
    if X.flags.c_contiguous and Y.flags.c_contiguous:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memmaps: torch only reads them
            Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
        return (Yt.T @ Xt).numpy()
    return Y.T @ X


def _as_f32(X: np.ndarray, hook: str) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ProbeError(f"hook {hook!r}: activations must be 2-D (samples, d_model); got shape {X.shape}.")
    if X.dtype != np.float32:
        if not np.issubdtype(X.dtype, np.floating):
            raise ProbeError(f"hook {hook!r}: activations must be floating point; got {X.dtype}.")
        X = X.astype(np.float32)
    return X


def _eigh(mats: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """fp64 eigendecompositions (ascending), single-threaded (see probing_core.threads).

    torch's LAPACK ``syevd`` took 57 / 107 ms at d = 576 / 768 here, NumPy's 71 / 127 ms.
    """
    out = []
    with single_threaded():
        for M in mats:
            w, V = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(M, dtype=np.float64)))
            out.append((w.numpy(), V.numpy()))
    return out


def _truncate(w: np.ndarray, V: np.ndarray, rcond: float) -> tuple[np.ndarray, np.ndarray]:
    top = float(w[-1]) if w.size else 0.0
    keep = w > rcond * max(top, 0.0) if top > 0 else np.zeros(w.shape, bool)
    return np.ascontiguousarray(w[keep]), np.ascontiguousarray(V[:, keep])


def _model_specs(split: RidgeSplit, counts: np.ndarray) -> list[tuple[tuple[int, ...], int | None]]:
    """(training blocks, scored block) of every model: all training rows on the test block, then each fold."""
    train_blocks = tuple(range(1, split.n_blocks))
    specs: list[tuple[tuple[int, ...], int | None]] = [(train_blocks, 0 if counts[0] > 0 else None)]
    if split.n_folds:
        for k in train_blocks:
            specs.append((tuple(j for j in train_blocks if j != k), k))
    return specs


def _primal_models(specs: list[tuple[tuple[int, ...], int | None]], counts: np.ndarray, block_sum: np.ndarray,
                   block_gram: np.ndarray, rc: float) -> list[_Model]:
    """Each model's eigendecomposition from the per-block sums and Gram matrices (no data pass)."""
    out: list[_Model] = []
    mats, means, ns = [], [], []
    for T, _q in specs:
        nm = int(counts[list(T)].sum())
        mu = block_sum[list(T)].sum(0) / nm
        G = block_gram[list(T)].sum(0) - nm * np.outer(mu, mu)
        mats.append((G + G.T) * 0.5)
        means.append(mu)
        ns.append(nm)
    for (T, q), mu, nm, (w, V) in zip(specs, means, ns, _eigh(mats)):
        w, V = _truncate(w, V, rc)
        H = None
        if q is not None:
            # Gram of the scored block about this model's mean, in its eigenbasis: the held-out
            # Σ (ŷ - ȳ)² of any coefficients c is then cᵀ H c (r² per α, no d² products).
            Sq = block_sum[q]
            Gq = block_gram[q] - np.outer(mu, Sq) - np.outer(Sq, mu) + counts[q] * np.outer(mu, mu)
            V32 = V.astype(np.float32)
            H = V32.T @ (Gq.astype(np.float32) @ V32)  # fp32 products: half the time of fp64
            H = (H + H.T) * np.float32(0.5)
        out.append(_Model(T, q, nm, mu, w, V, None, H))
    return out


def decompose_ridge(
    X: np.ndarray,
    split: RidgeSplit,
    *,
    hook: str = "",
    gram_dtype: str | np.dtype = "float32",
    rcond: float | None = None,
    form: str = "auto",
) -> RidgeDecomposition:
    """Eigendecompose the centred training Gram of every model of the split (one pass over X).

    Args:
        X: ``(n_samples, d_model)`` activations of one hook.
        split: from :func:`make_split` (same ``n_samples``).
        hook: name used in error messages.
        gram_dtype: dtype of the Gram products ("float32": fast, R² within ~1e-6 of fp64 on
            centred data; "float64": slower, exact).
        rcond: eigenvalues below ``rcond × largest`` are dropped (pinv-like; matters only as α→0).
            Default 1e-7 for an fp32 Gram, 1e-12 for fp64.
        form: "primal" (d×d Gram), "dual" (n×n kernel) or "auto" (dual when training rows < d_model).

    Returns:
        RidgeDecomposition.

    Raises:
        ProbeError: NaN/inf in the activations, shape mismatch with the split.
    """
    X = _as_f32(X, hook)
    n, d = X.shape
    if n != split.n_samples:
        raise ProbeError(f"hook {hook!r}: {n} activation rows but the split has {split.n_samples}.")
    gdt = np.dtype(gram_dtype)
    rc = float(rcond) if rcond is not None else _DEFAULT_RCOND[gdt]
    x_mean = X.mean(axis=0, dtype=np.float64)
    if not np.all(np.isfinite(x_mean)):
        bad = int(np.count_nonzero(~np.isfinite(x_mean)))
        raise ProbeError(
            f"hook {hook!r}: activations contain NaN or inf ({bad} of {d} dimensions affected). "
            "This usually means fp16 overflow: store activations as float32 and re-extract."
        )
    n_blocks = split.n_blocks
    rows = [np.flatnonzero(split.block == j) for j in range(n_blocks)]
    counts = np.array([r.size for r in rows], dtype=np.int64)
    mean32 = x_mean.astype(np.float32)
    n_train_min = min(split.n_train - (counts[j] if split.n_folds else 0) for j in range(1, n_blocks))
    use_dual = form == "dual" or (form == "auto" and n_train_min < d)
    if form not in ("auto", "primal", "dual"):
        raise ProbeError(f"form must be 'auto', 'primal' or 'dual'; got {form!r}.")

    block_sum = np.zeros((n_blocks, d))
    block_gram = None if use_dual else np.zeros((n_blocks, d, d))
    buf = np.empty((int(counts.max()), d), dtype=np.float32)
    for j, r in enumerate(rows):
        if r.size == 0:
            continue
        Xj = buf[: r.size]
        np.take(X, r, axis=0, out=Xj)
        Xj -= mean32
        block_sum[j] = Xj.sum(axis=0, dtype=np.float64)
        if block_gram is not None:
            A = Xj if gdt == np.float32 else Xj.astype(np.float64)
            block_gram[j] = A.T @ A

    specs = _model_specs(split, counts)
    models: list[_Model] = []
    if not use_dual:
        models = _primal_models(specs, counts, block_sum, block_gram, rc)
    else:
        for T, q in specs:
            R = np.concatenate([rows[j] for j in T])
            nm = R.size
            mu = block_sum[list(T)].sum(0) / nm
            Xt = (X[R] - mean32 - mu.astype(np.float32)).astype(gdt)
            K = (Xt @ Xt.T).astype(np.float64)
            w, U = _eigh([(K + K.T) * 0.5])[0]
            w, U = _truncate(w, U, rc)
            V = (Xt.T.astype(np.float64) @ U) / np.sqrt(w)[None, :]
            proj = None
            if q is not None:
                Xq = X[rows[q]].astype(np.float64) - x_mean - mu
                proj = Xq @ V
            models.append(_Model(T, q, nm, mu, w, V, proj))
    return RidgeDecomposition(
        hook=hook,
        split=split,
        n_features=d,
        form="dual" if use_dual else "primal",
        x_mean=x_mean,
        block_count=counts,
        block_sum=block_sum,
        models=tuple(models),
        rcond=rc,
        gram_dtype=gdt.name,
    )


# --------------------------------------------------------------------------------------------
# Streamed: entries larger than memory, one shard (chunk of rows) at a time
# --------------------------------------------------------------------------------------------
#: Rows per chunk when a plain array is streamed (``stream=True``): 64k rows × d=576 fp32 ≈ 150 MB.
STREAM_ROWS = 65_536


def _streams(X: object) -> bool:
    """Whether ``X`` hands out its rows in chunks (a sharded store hook: ``X.iter_chunks()``)."""
    return callable(getattr(X, "iter_chunks", None))


def iter_row_chunks(X: np.ndarray, chunk_rows: int = STREAM_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, rows)`` blocks of ``X`` in order: a sharded hook's own shards, else consecutive
    slices of ``chunk_rows`` rows (views of a memmap: no copy)."""
    if _streams(X):
        yield from X.iter_chunks()  # type: ignore[attr-defined]
        return
    for a in range(0, int(np.shape(X)[0]), chunk_rows):
        yield a, X[a : a + chunk_rows]


class _Selection:
    """Which rows of the full array are the samples, chunk by chunk (``rows=None``: every row)."""

    def __init__(self, rows: np.ndarray | None) -> None:
        self.rows = rows
        if rows is not None:
            self.order = np.argsort(rows, kind="stable")
            self.sorted = rows[self.order]

    def in_chunk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(sample indices, their rows within the chunk — None for all of them, in order)."""
        if self.rows is None:
            return np.arange(start, stop), None
        lo, hi = np.searchsorted(self.sorted, [start, stop])
        return self.order[lo:hi], self.sorted[lo:hi] - start


def _chunk_rows_f32(C: np.ndarray, local: np.ndarray | None, hook: str) -> np.ndarray:
    return _as_f32(np.asarray(C) if local is None else np.asarray(C)[local], hook)


def decompose_ridge_streamed(
    X: np.ndarray,
    split: RidgeSplit,
    *,
    rows: np.ndarray | None = None,
    hook: str = "",
    gram_dtype: str | np.dtype = "float32",
    rcond: float | None = None,
    chunk_rows: int = STREAM_ROWS,
) -> RidgeDecomposition:
    """:func:`decompose_ridge` reading ``X`` one chunk at a time (a sharded hook's shards).

    Memory: one chunk plus the per-block ``d×d`` Gram matrices, whatever the number of rows. Two
    passes (the mean, then the centred per-block sums and Grams: fp32 products per chunk,
    accumulated in fp64). With fewer training rows than features the selected rows are small
    (n < d) and go to the in-memory dual form.

    Args:
        X: ``(n_rows, d_model)`` with ``iter_chunks()`` or any array (sliced in ``chunk_rows``).
        rows: the samples are these rows of ``X`` (default: every row, ``n_rows == split.n_samples``).
    Raises:
        ProbeError: as :func:`decompose_ridge`.
    """
    n_full, d = (int(v) for v in np.shape(X))
    n = split.n_samples
    if (rows is None and n_full != n) or (rows is not None and rows.shape[0] != n):
        raise ProbeError(f"hook {hook!r}: {n_full if rows is None else rows.shape[0]} activation rows but the split has {n}.")
    gdt = np.dtype(gram_dtype)
    rc = float(rcond) if rcond is not None else _DEFAULT_RCOND[gdt]
    n_blocks = split.n_blocks
    counts = np.bincount(split.block.astype(np.intp), minlength=n_blocks).astype(np.int64)
    n_train_min = min(split.n_train - (counts[j] if split.n_folds else 0) for j in range(1, n_blocks))
    if n_train_min < d:
        Xs = np.take(X, rows, axis=0) if rows is not None else np.asarray(X)
        return decompose_ridge(Xs, split, hook=hook, gram_dtype=gdt, rcond=rcond, form="dual")
    sel = _Selection(rows)
    total = np.zeros(d)
    for start, C in iter_row_chunks(X, chunk_rows):
        samples, local = sel.in_chunk(start, start + C.shape[0])
        if samples.size:
            total += _chunk_rows_f32(C, local, hook).sum(axis=0, dtype=np.float64)
    x_mean = total / n
    if not np.all(np.isfinite(x_mean)):
        raise ProbeError(f"hook {hook!r}: activations contain NaN or inf ({int(np.count_nonzero(~np.isfinite(x_mean)))} "
                         f"of {d} dimensions affected). This usually means fp16 overflow: store activations as float32 and re-extract.")
    mean32 = x_mean.astype(np.float32)
    block_sum = np.zeros((n_blocks, d))
    block_gram = np.zeros((n_blocks, d, d))
    for start, C in iter_row_chunks(X, chunk_rows):
        samples, local = sel.in_chunk(start, start + C.shape[0])
        if not samples.size:
            continue
        A = _chunk_rows_f32(C, local, hook) - mean32
        blk = split.block[samples]
        for j in np.unique(blk):
            Aj = A[blk == j]
            block_sum[j] += Aj.sum(axis=0, dtype=np.float64)
            B = Aj if gdt == np.float32 else Aj.astype(np.float64)
            block_gram[j] += B.T @ B
        del A
    models = _primal_models(_model_specs(split, counts), counts, block_sum, block_gram, rc)
    return RidgeDecomposition(hook=hook, split=split, n_features=d, form="primal", x_mean=x_mean, block_count=counts,
                              block_sum=block_sum, models=tuple(models), rcond=rc, gram_dtype=gdt.name)


def _stats_from_chunks(dec: RidgeDecomposition, X: np.ndarray, design: "_BlockDesign", rows: np.ndarray | None,
                       chunk_rows: int = STREAM_ROWS) -> _LabelStats:
    """:meth:`RidgeDecomposition._stats_from_design` one chunk at a time (``design`` per sample)."""
    dt = design.Yblk.dtype
    n_blocks, L = design.y1.shape
    sel = _Selection(rows)
    raw = np.zeros((design.Yblk.shape[1], dec.n_features))
    for start, C in iter_row_chunks(X, chunk_rows):
        samples, local = sel.in_chunk(start, start + C.shape[0])
        if samples.size:
            A = np.ascontiguousarray(_chunk_rows_f32(C, local, dec.hook).astype(dt, copy=False))
            raw += _xty(A, np.ascontiguousarray(design.Yblk[samples]))
    xy = raw.reshape(n_blocks, L, dec.n_features) - design.y1[:, :, None] * dec.x_mean[None, None, :]
    return _LabelStats(shift=design.shift, xy=xy, y1=design.y1, y2=design.y2)


# --------------------------------------------------------------------------------------------
# All hooks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RidgePathResult:
    """Ridge path of one label over several hooks.

    Attributes (``hook`` axis follows ``hooks``; ``alpha`` axis follows ``alphas``, ascending):
        hooks: hook names.
        alphas: ``(alpha,)``.
        r2_train, r2_test: ``(hook, alpha)`` (test is NaN without a test split).
        r2_cv: ``(hook, fold, alpha)``; r2_cv_mean / r2_cv_std: ``(hook, alpha)`` (NaN without CV).
        best_index, best_alpha: ``(hook,)`` α with the best mean CV R² (else test, else train R²).
        baseline_r2: ``(hook,)`` the same selection on a shuffled copy of the label, scored like
            ``r2_test`` at its own best α (CV mean without a test split): what noise achieves.
        r2_train_ols, r2_test_ols: ``(hook,)`` minimum-norm least squares (α→0).
        n_train, n_test, n_folds, seed, test_fraction: split description.
        decompositions: the per-hook :class:`RidgeDecomposition` (reuse for another label).
    """

    hooks: tuple[str, ...]
    alphas: np.ndarray
    r2_train: np.ndarray
    r2_test: np.ndarray
    r2_cv: np.ndarray
    r2_cv_mean: np.ndarray
    r2_cv_std: np.ndarray
    best_index: np.ndarray
    best_alpha: np.ndarray
    baseline_r2: np.ndarray
    r2_train_ols: np.ndarray
    r2_test_ols: np.ndarray
    n_train: int
    n_test: int
    n_folds: int
    seed: int
    test_fraction: float
    decompositions: Mapping[str, RidgeDecomposition] = field(repr=False)
    _stats: Mapping[str, _LabelStats] = field(repr=False)

    def _hook(self, hook: str) -> str:
        if hook not in self.decompositions:
            raise ProbeError(f"hook {hook!r} was not fit; fitted hooks: {', '.join(self.hooks)}.")
        return hook

    def coef(self, hook: str, alpha: float | None = None) -> np.ndarray:
        """``(d_model,)`` coefficients of the model fit on all training rows at ``alpha``
        (None = this hook's best α; 0.0 = least squares)."""
        return self._coef(hook, alpha)[0]

    def intercept(self, hook: str, alpha: float | None = None) -> float:
        """Intercept matching :meth:`coef` (raw activation coordinates)."""
        return self._coef(hook, alpha)[1]

    def _coef(self, hook: str, alpha: float | None) -> tuple[np.ndarray, float]:
        h = self._hook(hook)
        a = float(self.best_alpha[self.hooks.index(h)]) if alpha is None else float(alpha)
        if not math.isfinite(a) or a < 0:
            raise ProbeError(f"α must be ≥ 0 and finite; got {alpha}.")
        return self.decompositions[h].coef(self._stats[h], a)

    def predict(self, hook: str, X: np.ndarray, alpha: float | None = None) -> np.ndarray:
        """Predictions ``(n,)`` of this hook's probe on activations ``X`` ``(n, d_model)``."""
        w, b = self._coef(hook, alpha)
        return _as_f32(X, hook) @ w.astype(np.float32) + b

    def evaluate(self, alphas: Sequence[float] | float) -> dict[str, np.ndarray]:
        """R² at other α without touching the data (a few ms).

        Returns:
            dict with "alphas" ``(alpha,)`` and "r2_train", "r2_test", "r2_cv_mean", "r2_cv_std"
            of shape ``(hook, alpha)``.
        """
        a = check_alphas(alphas)
        with single_threaded():
            work = max(d.n_features for d in self.decompositions.values()) ** 2 * len(self.decompositions[self.hooks[0]].models)
            paths = map_hooks(lambda h, st: self.decompositions[h].path_from_stats(st, a), self.hooks, self._stats,
                              parallel=work >= _PARALLEL_WORK)
        cv = np.stack([p.r2_cv[0] for p in paths])
        mean, std = _cv_mean_std(cv, a.size)
        return {
            "alphas": a,
            "r2_train": np.stack([p.r2_train[0] for p in paths]),
            "r2_test": np.stack([p.r2_test[0] for p in paths]),
            "r2_cv_mean": mean,
            "r2_cv_std": std,
        }


def _cv_mean_std(cv: np.ndarray, n_alpha: int) -> tuple[np.ndarray, np.ndarray]:
    if cv.shape[1] == 0:
        nan = np.full((cv.shape[0], n_alpha), np.nan)
        return nan, nan.copy()
    return cv.mean(axis=1), cv.std(axis=1)


def _select(cv_mean: np.ndarray, test: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Index of the best α per row: mean CV R², else test R², else train R²."""
    for crit in (cv_mean, test, train):
        if not np.all(np.isnan(crit)):
            return np.argmax(np.nan_to_num(crit, nan=-np.inf), axis=-1)
    return np.zeros(cv_mean.shape[0], dtype=np.intp)


_PARALLEL_WORK = 2e5  # values touched per hook above which hooks go to worker threads


@single_threaded()
def fit_ridge_path(
    X_by_hook: Mapping[str, np.ndarray],
    y: np.ndarray,
    *,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    test_fraction: float = 0.2,
    cv: int = 5,
    seed: int = 0,
    baseline: bool = True,
    gram_dtype: str = "float32",
    decompositions: Mapping[str, RidgeDecomposition] | None = None,
    rows: np.ndarray | None = None,
    progress: Callable[[float, str], None] | None = None,
    split: RidgeSplit | None = None,
    stream: bool | None = None,
) -> RidgePathResult:
    """Fit ridge probes for every α and every hook at once.

    Args:
        X_by_hook: hook name → ``(n_samples, d_model)`` activations (same rows for all hooks;
            widths may differ).
        y: ``(n_samples,)`` float label.
        alphas: α grid (> 0, finite); sorted ascending in the result.
        test_fraction: held-out fraction for ``r2_test`` (0 = none).
        cv: CV folds over the training rows (0/1 = none).
        seed: split and shuffled-baseline seed.
        baseline: also fit a shuffled copy of ``y`` (costs nothing extra: batched with ``y``).
        gram_dtype: "float32" (default) or "float64" Gram products.
        decompositions: cached decompositions from an earlier result on the same rows/split;
            hooks found there are not decomposed again (a new label then costs one pass).
        rows: when given, the samples are rows ``rows`` of each ``X_by_hook`` array (e.g. a store
            memmap of every token): a new label then reads each hook in place, without copying
            the selected rows out first.
        progress: called as ``progress(fraction, message)`` after each hook, on the calling thread.
        stream: read each hook one chunk at a time (memory bounded by a chunk, not the entry:
            :func:`decompose_ridge_streamed`); None = when a hook hands out chunks (a sharded store
            entry), True = also plain arrays (memmaps) in chunks of ``STREAM_ROWS`` rows.
        split: a ready-made row split (e.g. grouped by token type, see
            :func:`probing_core.solvers.splits.grouped_blocks`); replaces ``test_fraction``/``cv``/``seed``'s split.

    Returns:
        RidgePathResult.

    Raises:
        ProbeError: no hooks, row-count mismatch, fewer samples than folds, bad α, NaN/inf in
            activations or labels, constant label.
    """
    if not X_by_hook:
        raise ProbeError("no hooks selected; pick at least one hook to probe.")
    a = check_alphas(alphas)
    y = np.asarray(y, dtype=np.float64).ravel()
    n = y.shape[0]
    if rows is not None:
        rows = np.asarray(rows, dtype=np.intp).ravel()
        if rows.shape[0] != n:
            raise ProbeError(f"{rows.shape[0]} selected rows but the label has {n} values; select the same tokens for both.")
    if not np.all(np.isfinite(y)):
        raise ProbeError("the label contains NaN or inf; mask those tokens out before fitting.")
    if n and float(np.ptp(y)) == 0.0:
        raise ProbeError(f"the label is constant ({y[0]:g}) over the {n} selected samples; R² is undefined. Pick another label or more tokens.")
    if split is None:
        split = make_split(n, test_fraction=test_fraction, cv=cv, seed=seed)
    elif split.n_samples != n:
        raise ProbeError(f"the split has {split.n_samples} rows but the label has {n}; build it for these rows.")
    Y = y[:, None]
    if baseline:
        Y = np.column_stack([y, np.random.default_rng(seed + 1).permutation(y)])
    ols = np.concatenate([[0.0], a])
    hooks = tuple(X_by_hook)
    decs: dict[str, RidgeDecomposition] = {}
    stats: dict[str, _LabelStats] = {}
    designs: dict[tuple[str, int], _BlockDesign] = {}

    def one(h: str, X: np.ndarray) -> tuple[RidgeDecomposition, _LabelStats, RidgePath]:
        n_x = np.shape(X)[0]
        if (n_x != n) if rows is None else (n_x <= int(rows.max(initial=-1))):
            # checked here: reading every hook up front would cost a pass
            raise ProbeError(f"hook {h!r} has {n_x} rows but the label has {n}; select the same tokens for both.")
        dec = None
        if decompositions is not None and h in decompositions:
            cand = decompositions[h]
            if cand.split.same_as(split) and cand.n_features == np.shape(X)[1]:
                dec = cand
        streamed = _streams(X) if stream is None else bool(stream)
        if dec is None and streamed:
            dec = decompose_ridge_streamed(X, split, rows=rows, hook=h, gram_dtype=gram_dtype)
        elif dec is None:
            dec = decompose_ridge(X if rows is None else np.take(X, rows, axis=0), split, hook=h, gram_dtype=gram_dtype)
        dkey = (dec.gram_dtype, -1 if streamed else n_x)
        if dkey not in designs:  # the same for every hook: build it once
            designs.setdefault(dkey, _block_design(split, Y, dec.gram_dtype, None if streamed else rows, n_x))
        if streamed:
            st = _stats_from_chunks(dec, X, designs[dkey], rows)
        else:
            st = dec._stats_from_design(_as_f32(X, h), designs[dkey])
        if not (np.all(np.isfinite(st.xy))):
            raise ProbeError(f"hook {h!r}: activations contain NaN or inf (float16 overflow?); store them as float32 "
                             "and rebuild the cache entry.")
        return dec, st, dec.path_from_stats(st, ols)

    tr, te, cvs, tr0, te0 = [], [], [], [], []
    first = X_by_hook[hooks[0]]  # a store-backed mapping keeps it for the first task
    work = n * (int(np.shape(first)[1]) if np.ndim(first) == 2 else 1)
    for h, (dec, st, p) in zip(hooks, map_hooks(one, hooks, X_by_hook, parallel=work >= _PARALLEL_WORK,
                                                             progress=progress)):
        decs[h], stats[h] = dec, st
        tr.append(p.r2_train[:, 1:])
        te.append(p.r2_test[:, 1:])
        cvs.append(p.r2_cv[:, :, 1:])
        tr0.append(p.r2_train[0, 0])
        te0.append(p.r2_test[0, 0])
    r2_train = np.stack([t[0] for t in tr])
    r2_test = np.stack([t[0] for t in te])
    r2_cv = np.stack([c[0] for c in cvs])
    mean, std = _cv_mean_std(r2_cv, a.size)
    best = _select(mean, r2_test, r2_train)
    if baseline:
        b_cv = np.stack([c[1] for c in cvs])
        b_mean, _ = _cv_mean_std(b_cv, a.size)
        b_test = np.stack([t[1] for t in te])
        b_best = _select(b_mean, b_test, np.stack([t[1] for t in tr]))
        src = b_test if split.n_test else b_mean
        baseline_r2 = src[np.arange(len(hooks)), b_best]
    else:
        baseline_r2 = np.full(len(hooks), np.nan)
    return RidgePathResult(
        hooks=hooks,
        alphas=a,
        r2_train=r2_train,
        r2_test=r2_test,
        r2_cv=r2_cv,
        r2_cv_mean=mean,
        r2_cv_std=std,
        best_index=best,
        best_alpha=a[best],
        baseline_r2=baseline_r2,
        r2_train_ols=np.asarray(tr0),
        r2_test_ols=np.asarray(te0),
        n_train=split.n_train,
        n_test=split.n_test,
        n_folds=split.n_folds,
        seed=int(seed),
        test_fraction=float(test_fraction),
        decompositions=decs,
        _stats=stats,
    )


# --------------------------------------------------------------------------------------------
# Transfer
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransferResult:
    """R² of one fixed probe scored on several hooks.

    Attributes:
        hooks: hook names; r2: ``(hook,)`` R² (can be very negative); n_samples: rows scored.
    """

    hooks: tuple[str, ...]
    r2: np.ndarray
    n_samples: int

    @property
    def abs_r2(self) -> np.ndarray:
        return np.abs(self.r2)


def score_transfer(
    coef: np.ndarray, intercept: float, X_by_hook: Mapping[str, np.ndarray], y: np.ndarray
) -> TransferResult:
    """Score a fixed linear probe (e.g. fit on ``hook_embed`` or ``W_E``) on every hook.

    Args:
        coef: ``(d_model,)`` probe weights; intercept: its bias.
        X_by_hook: hook → ``(n, d_model)`` activations (all hooks must have the probe's width).
        y: ``(n,)`` true label.

    Returns:
        TransferResult with R² per hook (``sklearn.metrics.r2_score`` convention).

    Raises:
        ProbeError: no hooks, widths that differ from the probe's, NaN/inf, row-count mismatch.
    """
    w = np.asarray(coef, dtype=np.float64).ravel()
    if not X_by_hook:
        raise ProbeError("no hooks selected for the transfer; pick at least one hook.")
    widths = {h: int(np.shape(X)[1]) if np.ndim(X) == 2 else -1 for h, X in X_by_hook.items()}
    bad = {h: k for h, k in widths.items() if k != w.size}
    if bad:
        raise ProbeError(
            f"a probe with {w.size} weights cannot be scored on hooks of another width: "
            + ", ".join(f"{h} ({k})" for h, k in bad.items())
            + ". Select only hooks of the residual stream (same d_model) for a transfer."
        )
    y = np.asarray(y, dtype=np.float64).ravel()
    if not np.all(np.isfinite(y)) or not np.all(np.isfinite(w)) or not math.isfinite(float(intercept)):
        raise ProbeError("label or probe weights contain NaN or inf; mask those tokens out and refit.")
    tss = float(((y - y.mean()) ** 2).sum())
    w32 = w.astype(np.float32)
    r2 = []
    for h, X in X_by_hook.items():
        X = _as_f32(X, h)
        if X.shape[0] != y.shape[0]:
            raise ProbeError(f"hook {h!r} has {X.shape[0]} rows but the label has {y.shape[0]}.")
        pred = (X @ w32).astype(np.float64) + float(intercept)
        if not np.all(np.isfinite(pred)):
            raise ProbeError(f"hook {h!r}: activations contain NaN or inf (fp16 overflow?); store them as float32.")
        rss = float(((y - pred) ** 2).sum())
        r2.append(_r2_from(np.array([rss]), np.array([tss]), float((y * y).sum()))[0])
    return TransferResult(hooks=tuple(X_by_hook), r2=np.asarray(r2), n_samples=int(y.shape[0]))
