"""Logistic probes: L1 / L2 / elastic-net, binary and multinomial, fast batched paths in torch.

Objective (the same scaling as scikit-learn, so C values are comparable)::

    min_{W, b}  C * sum_i loss(x_i W^T + b, y_i)  +  a * ||W||_1  +  (1 - a) / 2 * ||W||_2^2

with ``a = 1`` for L1, ``a = 0`` for L2 and ``a = l1_ratio`` for elastic net; the intercept is
not penalized (scikit-learn's lbfgs/saga convention). ``loss`` is the logistic loss for two
classes (one coefficient row, like ``LogisticRegression.coef_`` of shape ``(1, d)``) and the
multinomial cross-entropy for more (one row per class). C = 1/λ.

Why our own solver (see TECH-NOTES "Probe fitting speed" and ``benchmarks/bench_sparse.py``):
scikit-learn's ``saga`` does not converge at the C values the sparse-probing notebook uses, and
a ``liblinear`` sweep fits one C at a time. Here every C of a sweep is one column block of the
same GEMM (FISTA with per-C backtracking and adaptive restart), converged C values leave the
batch, and a slider move is a warm-started refit from the nearest stored path point. Binary L1
and elastic-net paths use the active-set Newton solver of :mod:`probing_core.l1path` instead
(several times faster than liblinear there), with FISTA finishing any C it leaves open. Every
result carries a KKT residual and a ``converged`` flag; callers must not present an
unconverged fit as the answer.

All-layers multinomial probes (issue 8) use one torch L-BFGS over all hooks at once
(:func:`fit_multiclass_all_hooks`).

Everything returned is CPU numpy; nothing here imports streamlit.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.linalg.blas import daxpy, ddot
import torch

from probing_core.errors import LabelError, ProbeError
from probing_core.l1path import newton_l1_path
from probing_core.threads import map_hooks, single_threaded

__all__ = [
    "LogisticPathResult",
    "LayerProbeResult",
    "ControlTaskResult",
    "LogisticProbe",
    "fit_logistic_path",
    "refit_at_C",
    "default_Cs",
    "fit_multiclass_all_hooks",
    "stratified_split",
    "stratified_kfold",
    "classification_report_dict",
    "selection_frequency",
    "control_labels",
    "fit_control_task",
    "validate_xy",
]

_PENALTIES = ("l1", "l2", "elasticnet")


# --------------------------------------------------------------------------- validation


def _l1_weight(penalty: str, l1_ratio: float) -> float:
    if penalty not in _PENALTIES:
        raise ProbeError(f"penalty {penalty!r} is not one of {', '.join(_PENALTIES)}; pick one of them.")
    if penalty == "l1":
        return 1.0
    if penalty == "l2":
        return 0.0
    if not (0.0 <= l1_ratio <= 1.0) or not math.isfinite(l1_ratio):
        raise ProbeError(f"l1_ratio={l1_ratio} must be between 0 (pure L2) and 1 (pure L1).")
    return float(l1_ratio)


def _check_Cs(Cs: Sequence[float] | np.ndarray | float) -> np.ndarray:
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
    codes, classes = _check_labels(y, min_per_class)
    return Xf, codes, classes


def _check_labels(y: np.ndarray, min_per_class: int) -> tuple[np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------------------- splits & reports


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


def classification_report_dict(
    y_true: np.ndarray, y_pred: np.ndarray, *, target_names: Sequence[str] | None = None
) -> dict:
    """Per-class precision/recall/F1/support plus accuracy and averages (scikit-learn's report)."""
    from sklearn.metrics import classification_report

    labels = np.unique(np.concatenate([np.asarray(y_true), np.asarray(y_pred)]))
    names = None
    if target_names is not None:
        names = [str(target_names[int(i)]) if int(i) < len(target_names) else str(i) for i in labels]
    return classification_report(
        y_true, y_pred, labels=labels, target_names=names, output_dict=True, zero_division=0
    )


def selection_frequency(coefs: np.ndarray) -> np.ndarray:
    """Fraction of fits (folds / seeds) in which each feature has a non-zero coefficient.

    Args:
        coefs: ``(fits, classes, d)`` or ``(fits, d)`` coefficients.

    Returns:
        ``(d,)`` float in [0, 1]; a feature counts as selected when any class row is non-zero.
    """
    coefs = np.asarray(coefs)
    nz = coefs != 0
    if nz.ndim == 3:
        nz = nz.any(axis=1)
    return nz.mean(axis=0)


# --------------------------------------------------------------------------- standardization


@dataclass(frozen=True)
class _Scaler:
    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,) std, 1 where a feature is constant

    @staticmethod
    def fit(X: np.ndarray, enabled: bool) -> "_Scaler":
        d = X.shape[1]
        if not enabled:
            return _Scaler(np.zeros(d, np.float32), np.ones(d, np.float32))
        mean = X.mean(axis=0, dtype=np.float64)
        std = X.std(axis=0, dtype=np.float64)
        std[std < 1e-12] = 1.0
        return _Scaler(mean.astype(np.float32), std.astype(np.float32))

    def apply(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean) / self.scale).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- the batched FISTA solver


def _sigma_max_sq(X: torch.Tensor, iters: int = 15) -> float:
    """Largest eigenvalue of X^T X by power iteration (an SVD of a 2000×3072 matrix takes seconds)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(X.shape[1], generator=g, dtype=X.dtype)
    lam = 0.0
    for _ in range(iters):
        u = (X @ v) @ X
        lam = float(u.norm())
        if lam == 0.0:
            return 0.0
        v = u / lam
    return lam * 1.05  # power iteration approaches from below; pad (backtracking covers the rest)


def _loss_and_resid(Z: torch.Tensor, T: torch.Tensor, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-losses per batch column and dLoss/dZ.

    Z: ``(n, K, m)`` decision values; T: ``(n, 1, m)`` targets (0/1 or one-hot).
    Returns ``loss (K,)`` and ``resid (n, K, m)``.
    """
    if binary:
        loss = (torch.nn.functional.softplus(Z) - T * Z).sum(dim=(0, 2))
        return loss, torch.sigmoid(Z) - T
    lse = torch.logsumexp(Z, dim=2, keepdim=True)
    loss = (lse - (T * Z).sum(dim=2, keepdim=True)).sum(dim=(0, 2))
    return loss, torch.exp(Z - lse) - T


def _penalty(W: torch.Tensor, a: float) -> torch.Tensor:
    """a*||W||_1 + (1-a)/2*||W||^2 per batch entry; W ``(K, m, d)`` -> ``(K,)``."""
    out = torch.zeros(W.shape[0], dtype=W.dtype)
    if a > 0:
        out = out + a * W.abs().sum(dim=(1, 2))
    if a < 1:
        out = out + 0.5 * (1 - a) * (W * W).sum(dim=(1, 2))
    return out


def _prox(V: torch.Tensor, t: torch.Tensor, a: float) -> torch.Tensor:
    """Proximal map of t*(a|w| + (1-a)/2 w^2); t ``(K,)`` broadcast over ``(K, m, d)``."""
    tt = t.view(-1, 1, 1)
    if a > 0:
        V = torch.sign(V) * torch.clamp(V.abs() - tt * a, min=0.0)
    if a < 1:
        V = V / (1.0 + tt * (1 - a))
    return V


def _kkt(W: torch.Tensor, G: torch.Tensor, gb: torch.Tensor, a: float) -> torch.Tensor:
    """Relative KKT residual per batch entry (inf-norm of the minimum-norm subgradient).

    Measured in units of the L1 weight ``a`` (for L1/EN: a residual of 1e-3 means every
    stationarity condition holds to 0.1 % of the penalty), or relative to ``||W||_inf`` for
    pure L2. G is the gradient of the smooth loss part ``C * X^T r``.
    """
    G2 = G + (1 - a) * W if a < 1 else G
    if a > 0:
        nz = W != 0
        s = torch.where(nz, (G2 + a * torch.sign(W)).abs(), torch.clamp(G2.abs() - a, min=0.0))
        denom = torch.full((W.shape[0],), a, dtype=W.dtype)
    else:
        s = G2.abs()
        denom = torch.clamp(W.abs().amax(dim=(1, 2)), min=1e-8)
    res = torch.maximum(s.amax(dim=(1, 2)), gb.abs().amax(dim=1))
    return res / denom


def _quad(f: torch.Tensor, G: torch.Tensor, gb: torch.Tensor, dW: torch.Tensor, db: torch.Tensor,
          step: torch.Tensor) -> torch.Tensor:
    """Upper model f + <g, d> + |d|^2/(2 step) of the smooth part (backtracking test), with slack."""
    q = f + (G * dW).sum(dim=(1, 2)) + (gb * db).sum(dim=1)
    q = q + ((dW * dW).sum(dim=(1, 2)) + (db * db).sum(dim=1)) / (2 * step)
    return q + 1e-6 * f.abs() + 1e-12


@dataclass
class _SolveOut:
    W: np.ndarray  # (K, m, d)
    b: np.ndarray  # (K, m)
    kkt: np.ndarray  # (K,)
    n_iter: np.ndarray  # (K,) Newton steps (binary L1 / elastic net, + FISTA iterations if any) or FISTA iterations
    objective: np.ndarray  # (K,)


def _fista_inner(
    Xw: torch.Tensor,
    T: torch.Tensor,
    C: torch.Tensor,
    a: float,
    W: torch.Tensor,
    b: torch.Tensor,
    step: torch.Tensor,
    *,
    binary: bool,
    tol: float,
    max_iter: int,
    check_every: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """FISTA (backtracking, adaptive restart) on a working set of features, batched over C.

    Xw: ``(n, s)`` working-set columns; W ``(K, m, s)``, b ``(K, m)``, step ``(K,)`` (updated).
    A C leaves the batch once its KKT residual on the working set is ``<= tol``.
    Returns ``(W, b, step, iterations run)``.
    """
    n, s_ = Xw.shape
    m = T.shape[2]
    K = W.shape[0]
    W_out, b_out, step_out = W.clone(), b.clone(), step.clone()

    def forward(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        k = W.shape[0]
        return (Xw @ W.reshape(k * m, s_).T).view(n, k, m) + b.unsqueeze(0)

    def grad(R: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = R.shape[1]
        # r^T X is faster than X^T r here (TECH-NOTES).
        G = (R.reshape(n, k * m).T @ Xw).view(k, m, s_) * C.view(-1, 1, 1)
        return G, R.sum(dim=0) * C.view(-1, 1)

    active = torch.arange(K)
    Z_W = forward(W, b)
    F_W = C * _loss_and_resid(Z_W, T, binary)[0] + _penalty(W, a)
    Yw, Yb, Z_Y = W, b, Z_W
    theta = torch.ones(K, dtype=W.dtype)
    it = 0
    while active.numel() > 0 and it < max_iter:
        it += 1
        loss_Y, R = _loss_and_resid(Z_Y, T, binary)
        f_Y = C * loss_Y
        G, gb = grad(R, C)
        step = step * 1.25
        Wn = _prox(Yw - step.view(-1, 1, 1) * G, step, a)
        bn = Yb - step.view(-1, 1) * gb
        Zn = forward(Wn, bn)
        f_n = C * _loss_and_resid(Zn, T, binary)[0]
        ok = f_n <= _quad(f_Y, G, gb, Wn - Yw, bn - Yb, step)
        for _bt in range(60):
            if bool(ok.all()):
                break
            # Backtrack only the C values whose sufficient-decrease test failed.
            bad = torch.nonzero(~ok).squeeze(1)
            step[bad] = step[bad] * 0.5
            Wi = _prox(Yw[bad] - step[bad].view(-1, 1, 1) * G[bad], step[bad], a)
            bi = Yb[bad] - step[bad].view(-1, 1) * gb[bad]
            Zi = forward(Wi, bi)
            fi = C[bad] * _loss_and_resid(Zi, T, binary)[0]
            Wn[bad], bn[bad], Zn[:, bad], f_n[bad] = Wi, bi, Zi, fi
            ok[bad] = fi <= _quad(f_Y[bad], G[bad], gb[bad], Wi - Yw[bad], bi - Yb[bad], step[bad])
        F_n = f_n + _penalty(Wn, a)
        # Adaptive (function-value) restart: drop momentum where the objective went up.
        restart = F_n > F_W
        theta_new = (1 + torch.sqrt(1 + 4 * theta * theta)) / 2
        beta = torch.where(restart, torch.zeros_like(theta), (theta - 1) / theta_new)
        theta = torch.where(restart, torch.ones_like(theta), theta_new)
        Yw = Wn + beta.view(-1, 1, 1) * (Wn - W)
        Yb = bn + beta.view(-1, 1) * (bn - b)
        Z_Y = Zn + beta.view(1, -1, 1) * (Zn - Z_W)
        W, b, Z_W, F_W = Wn, bn, Zn, F_n
        if it % check_every == 0 or it == max_iter:
            G_W, gb_W = grad(_loss_and_resid(Z_W, T, binary)[1], C)
            done = (_kkt(W, G_W, gb_W, a) <= tol) | (it == max_iter)
            if bool(done.any()):
                gi = active[done]
                W_out[gi], b_out[gi], step_out[gi] = W[done], b[done], step[done]
                keep = ~done
                active = active[keep]
                W, b, Z_W, F_W = W[keep], b[keep], Z_W[:, keep], F_W[keep]
                Yw, Yb, Z_Y = Yw[keep], Yb[keep], Z_Y[:, keep]
                theta, step, C = theta[keep], step[keep], C[keep]
    if active.numel() > 0:
        W_out[active], b_out[active], step_out[active] = W, b, step
    return W_out, b_out, step_out, it


def _fista(
    Xt: torch.Tensor,
    T: torch.Tensor,
    Cs: np.ndarray,
    a: float,
    *,
    binary: bool,
    W0: np.ndarray | None,
    b0: np.ndarray | None,
    tol: float,
    max_iter: int,
    inner_iter: int = 200,
    margin: float = 0.2,
) -> _SolveOut:
    """Batched FISTA over all C at once, with a working set of features for L1/elastic net.

    Outer loop: one full-width gradient GEMM gives every C's KKT residual; converged C values
    leave the batch; the working set is every feature that is non-zero for some C or whose
    gradient is within ``margin`` of entering. Inner loop: FISTA on those columns only (a
    sparse probe touches a fraction of the 3,072 neurons, so each step is that much cheaper).
    Convergence is always certified on the full feature set.

    Xt: ``(n, d)`` float32 standardized features; T: ``(n, 1, m)`` targets.
    W0/b0: ``(K, m, d)`` / ``(K, m)`` warm starts (zeros / log priors when None).
    """
    n, d = Xt.shape
    m = T.shape[2]
    K = Cs.size
    dt = Xt.dtype
    C_all = torch.as_tensor(Cs, dtype=dt)
    W = torch.zeros(K, m, d, dtype=dt) if W0 is None else torch.as_tensor(W0, dtype=dt).clone()
    if W.shape[0] != K:
        W = W[:1].expand(K, m, d).clone()
    if b0 is None or W0 is None:
        prior = T.mean(dim=0).squeeze(0).clamp(1e-6, 1 - 1e-6)
        binit = torch.log(prior / (1 - prior)) if binary else torch.log(prior)
        b = binit.expand(K, m).clone()
    else:
        b = torch.as_tensor(b0, dtype=dt).clone()
        b = b[:1].expand(K, m).clone() if b.shape[0] != K else b
    kkt_out = torch.full((K,), float("inf"), dtype=dt)
    it_out = np.zeros(K, dtype=np.int64)
    obj_out = torch.zeros(K, dtype=dt)

    # Safe Lipschitz constant of C * loss: c * sigma_max([X, 1])^2 (Böhning's bound for softmax);
    # sigma_max([X, 1])^2 <= sigma_max(X)^2 + n. Start optimistic, backtracking corrects it.
    lip0 = (0.25 if binary else 0.5) * (_sigma_max_sq(Xt) + n)
    step = 4.0 / (C_all * lip0)

    active = torch.arange(K)
    total = 0
    while True:
        Wa, ba, Ca = W[active], b[active], C_all[active]
        k = active.numel()
        Z = (Xt @ Wa.reshape(k * m, d).T).view(n, k, m) + ba.unsqueeze(0)
        loss, R = _loss_and_resid(Z, T, binary)
        G = (R.reshape(n, k * m).T @ Xt).view(k, m, d) * Ca.view(-1, 1, 1)
        gb = R.sum(dim=0) * Ca.view(-1, 1)
        kkt = _kkt(Wa, G, gb, a)
        done = (kkt <= tol) | (total >= max_iter)
        if bool(done.any()):
            gi = active[done]
            kkt_out[gi] = kkt[done]
            obj_out[gi] = (Ca * loss + _penalty(Wa, a))[done]
            it_out[gi.numpy()] = total
            active = active[~done]
            Wa, ba, Ca, G = Wa[~done], ba[~done], Ca[~done], G[~done]
        if active.numel() == 0:
            break
        if a > 0:
            G2 = G + (1 - a) * Wa if a < 1 else G
            cand = ((Wa != 0) | (G2.abs() >= a * (1 - margin))).any(dim=1).any(dim=0)
            ws = torch.nonzero(cand).squeeze(1)
            if ws.numel() == 0:
                ws = torch.arange(min(d, 1))
        else:
            ws = torch.arange(d)
        full = ws.numel() == d
        Xw = Xt if full else Xt[:, ws].contiguous()
        Ww = Wa if full else Wa[:, :, ws].contiguous()
        Ww, bw, st, used = _fista_inner(Xw, T, Ca, a, Ww, ba, step[active].clone(), binary=binary,
                                        tol=tol * 0.5, max_iter=min(inner_iter, max_iter - total))
        total += max(used, 1)
        if full:
            W[active] = Ww
        else:
            Wa = torch.zeros_like(Wa)
            Wa[:, :, ws] = Ww
            W[active] = Wa
        b[active] = bw
        step[active] = st
    return _SolveOut(W.numpy(), b.numpy(), kkt_out.numpy().astype(np.float64), it_out,
                     obj_out.numpy().astype(np.float64))


# --------------------------------------------------------------------------- path result


@dataclass(frozen=True)
class LogisticPathResult:
    """A logistic probe fitted at every C of a sweep (C = 1/λ), scored on a held-out split.

    Shapes: K = number of C values, m = 1 for two classes else number of classes, d = features.
    Coefficients are in standardized-feature units (comparable across neurons); ``mean`` and
    ``scale`` convert: raw coef = coef / scale, raw intercept = intercept - (coef/scale) @ mean.
    """

    Cs: np.ndarray  # (K,) ascending
    penalty: str
    l1_ratio: float
    classes: np.ndarray  # (n_classes,)
    coefs: np.ndarray  # (K, m, d) float32
    intercepts: np.ndarray  # (K, m)
    train_accuracy: np.ndarray  # (K,)
    test_accuracy: np.ndarray  # (K,)
    density: np.ndarray  # (K,) percent of features with a non-zero coefficient (any class)
    n_nonzero: np.ndarray  # (K,) int
    kkt_residual: np.ndarray  # (K,) relative KKT residual (see _kkt)
    converged: np.ndarray  # (K,) bool: kkt_residual <= tol
    n_iter: np.ndarray  # (K,) Newton steps (binary L1 / elastic net, + FISTA iterations if any) or FISTA iterations
    objective: np.ndarray  # (K,) primal objective on the training split
    tol: float
    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    train_idx: np.ndarray
    test_idx: np.ndarray
    cv_accuracy: np.ndarray | None = None  # (K,) mean validation accuracy over folds
    cv_selection_frequency: np.ndarray | None = None  # (K, d) share of folds selecting each feature
    cv_converged: np.ndarray | None = None  # (K,) all folds converged
    fit_seconds: float = 0.0

    @property
    def lambdas(self) -> np.ndarray:
        """λ = 1/C for each path point."""
        return 1.0 / self.Cs

    def nearest_index(self, C: float) -> int:
        """Index of the path point nearest to C on a log scale."""
        return int(np.argmin(np.abs(np.log(self.Cs) - math.log(C))))

    def raw_coefs(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Coefficients/intercepts of path point k for unstandardized features: ``(m, d)``, ``(m,)``."""
        w = self.coefs[k] / self.scale
        return w, self.intercepts[k] - w @ self.mean

    def decision_function(self, X: np.ndarray, k: int) -> np.ndarray:
        """Decision values of path point k on raw features X ``(n, d)`` -> ``(n, m)``."""
        w, b = self.raw_coefs(k)
        return np.asarray(X, dtype=np.float32) @ w.T + b

    def predict(self, X: np.ndarray, k: int) -> np.ndarray:
        """Predicted class labels (values of ``classes``) of path point k."""
        z = self.decision_function(X, k)
        codes = (z[:, 0] > 0).astype(np.int64) if z.shape[1] == 1 else z.argmax(axis=1)
        return self.classes[codes]

    def surviving(self, k: int) -> np.ndarray:
        """Indices of features with a non-zero coefficient at path point k, by |coef| descending."""
        mag = np.abs(self.coefs[k]).max(axis=0)
        idx = np.where(mag > 0)[0]
        return idx[np.argsort(-mag[idx], kind="stable")]

    def table(self) -> list[dict]:
        """One row per C: the figures a page or the CLI prints."""
        return [
            {
                "C": float(c),
                "lambda": float(1 / c),
                "train_accuracy": float(self.train_accuracy[i]),
                "test_accuracy": float(self.test_accuracy[i]),
                "density_pct": float(self.density[i]),
                "n_nonzero": int(self.n_nonzero[i]),
                "kkt_residual": float(self.kkt_residual[i]),
                "converged": bool(self.converged[i]),
                "n_iter": int(self.n_iter[i]),
            }
            for i, c in enumerate(self.Cs)
        ]


def default_Cs(
    X: np.ndarray, y: np.ndarray, *, n: int = 17, decades: float = 2.0, standardize: bool = True
) -> np.ndarray:
    """A log-spaced C grid starting just above the C where L1 selects the first feature.

    Below ``C_min = 1 / max_j |x_j^T (y - p0)|`` the L1 probe is all zeros; the grid spans
    ``decades`` decades above it (from 0.9·C_min).

    Returns:
        ``(n,)`` ascending C values.
    """
    Xf, codes, classes = validate_xy(X, y, min_per_class=1)
    Xs = _Scaler.fit(Xf, standardize).apply(Xf)
    Xs = Xs - Xs.mean(axis=0)
    T = np.eye(classes.size, dtype=np.float32)[codes]
    if classes.size == 2:
        T = T[:, 1:]
    r = T - T.mean(axis=0)
    gmax = float(np.abs(r.T @ Xs).max())
    c_min = 1.0 / max(gmax, 1e-12)
    return np.logspace(math.log10(0.9 * c_min), math.log10(0.9 * c_min) + decades, n)


def _targets(codes: np.ndarray, n_classes: int) -> tuple[torch.Tensor, bool]:
    binary = n_classes == 2
    if binary:
        T = torch.as_tensor(codes == 1, dtype=torch.float32).view(-1, 1, 1)
    else:
        T = torch.nn.functional.one_hot(torch.as_tensor(codes), n_classes).float().unsqueeze(1)
    return T, binary


def _accuracy(Xs: np.ndarray, codes: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Accuracy of every path point. Xs ``(n, d)``, W ``(K, m, d)``, b ``(K, m)`` -> ``(K,)``."""
    if Xs.shape[0] == 0:
        return np.full(W.shape[0], np.nan)
    K, m, d = W.shape
    Z = torch.as_tensor(Xs) @ torch.as_tensor(W).reshape(K * m, d).T
    Z = Z.view(-1, K, m) + torch.as_tensor(b).unsqueeze(0)
    pred = (Z[:, :, 0] > 0).long() if m == 1 else Z.argmax(dim=2)
    return (pred == torch.as_tensor(codes).view(-1, 1)).double().mean(dim=0).numpy()


def _solve_path(
    Xs_tr: np.ndarray,
    codes_tr: np.ndarray,
    n_classes: int,
    Cs: np.ndarray,
    a: float,
    *,
    tol: float,
    max_iter: int,
    W0: np.ndarray | None = None,
    b0: np.ndarray | None = None,
    chunk: int = 6,
    max_newton: int = 100,
) -> _SolveOut:
    """Solve an ascending C path.

    Binary L1 / elastic net: the active-set Newton path of :mod:`probing_core.l1path` (each C
    warm-started from the previous one); any C it leaves above ``tol`` is finished here by
    FISTA from where Newton stopped, so every returned point carries the same certificate.
    Otherwise (L2, multinomial) in chunks of ``chunk`` consecutive C values: each chunk is one
    batched FISTA; a chunk without its own warm start starts from the last (largest-C) solution
    of the previous chunk — batching and path warm starts together.
    """
    T, binary = _targets(codes_tr, n_classes)
    Xt = torch.as_tensor(Xs_tr)
    if binary and a > 0:
        nt = newton_l1_path(Xs_tr, codes_tr, Cs, a, tol=tol, W0=W0, b0=b0, max_newton=max_newton)
        W, b, its = nt.W.copy(), nt.b.copy(), nt.n_iter.copy()
        # The certificate is recomputed here, on the float32 coefficients actually returned,
        # with the same KKT measure as the FISTA path (one GEMM for all C values).
        with torch.no_grad():
            Wt, bt, Ct = torch.as_tensor(W), torch.as_tensor(b), torch.as_tensor(Cs, dtype=Xt.dtype)
            Z = (Xt @ Wt[:, 0].T).unsqueeze(2) + bt.unsqueeze(0)
            loss, R = _loss_and_resid(Z, T, True)
            G = (R[:, :, 0].T @ Xt).unsqueeze(1) * Ct.view(-1, 1, 1)
            kkt = _kkt(Wt, G, R.sum(dim=0) * Ct.view(-1, 1), a).double().numpy()
            obj = (Ct * loss + _penalty(Wt, a)).double().numpy()
        for k in np.flatnonzero(kkt > tol):
            with torch.no_grad():
                o = _fista(Xt, T, Cs[k : k + 1], a, binary=True, W0=W[k : k + 1], b0=b[k : k + 1], tol=tol,
                           max_iter=max_iter)
            W[k], b[k], kkt[k], obj[k] = o.W[0], o.b[0], o.kkt[0], o.objective[0]
            its[k] += o.n_iter[0]
        return _SolveOut(W, b, kkt, its, obj)
    outs: list[_SolveOut] = []
    with torch.no_grad():
        for s0 in range(0, Cs.size, chunk):
            sl = slice(s0, s0 + chunk)
            if W0 is not None:
                w0 = W0[sl] if W0.shape[0] == Cs.size else W0
                bb = b0[sl] if b0 is not None and b0.shape[0] == Cs.size else b0
            elif outs:
                w0, bb = outs[-1].W[-1:], outs[-1].b[-1:]
            else:
                w0 = bb = None
            outs.append(_fista(Xt, T, Cs[sl], a, binary=binary, W0=w0, b0=bb, tol=tol, max_iter=max_iter))
    return _SolveOut(*(np.concatenate([getattr(o, f) for o in outs]) for f in ("W", "b", "kkt", "n_iter", "objective")))


def fit_logistic_path(
    X: np.ndarray,
    y: np.ndarray,
    *,
    Cs: Sequence[float] | np.ndarray | None = None,
    penalty: str = "l1",
    l1_ratio: float = 0.5,
    test_fraction: float = 0.3,
    seed: int = 0,
    cv: int | None = None,
    standardize: bool = True,
    tol: float = 1e-3,
    max_iter: int = 1500,
) -> LogisticPathResult:
    """Fit a logistic probe at every C of a sweep at once (batched FISTA in torch).

    Args:
        X: ``(n, d)`` activations (e.g. ``blocks.L.mlp.hook_post`` at the target position).
        y: ``(n,)`` class labels (2 classes: one logistic row; more: multinomial).
        Cs: C values (C = 1/λ, multiplies the summed log-loss as in scikit-learn); default
            :func:`default_Cs` (17 log-spaced values).
        penalty: ``"l1"``, ``"l2"`` or ``"elasticnet"`` (mixing ``l1_ratio``).
        test_fraction: share held out (stratified) for test accuracy.
        seed: split / fold seed.
        cv: if set, also k-fold CV accuracy and per-feature selection frequency across folds.
        standardize: scale features to zero mean / unit variance on the training split (the
            penalty then treats every neuron alike); coefficients are in standardized units.
        tol: KKT tolerance for ``converged`` (relative to the L1 weight; see module doc).
        max_iter: FISTA iteration cap per C.

    Returns:
        :class:`LogisticPathResult` with C sorted ascending.

    Raises:
        ProbeError: bad C / penalty / test_fraction, NaN or inf in X.
        LabelError: one class, more classes than samples, a class with too few examples.
    """
    import time

    t0 = time.perf_counter()
    a = _l1_weight(penalty, l1_ratio)
    if not (0.0 < test_fraction < 1.0):
        raise ProbeError(f"test_fraction={test_fraction} must be between 0 and 1 (e.g. 0.3).")
    Xf, codes, classes = validate_xy(X, y, min_per_class=max(2, cv or 2))
    if classes.size > Xf.shape[0] * (1 - test_fraction):
        raise LabelError(f"{classes.size} classes but only ~{int(Xf.shape[0] * (1 - test_fraction))} training samples.")
    Cs_arr = np.sort(_check_Cs(Cs)) if Cs is not None else default_Cs(Xf, codes, standardize=standardize)
    tr, te = stratified_split(codes, test_fraction=test_fraction, seed=seed)
    scaler = _Scaler.fit(Xf[tr], standardize)
    Xs = scaler.apply(Xf)
    out = _solve_path(Xs[tr], codes[tr], classes.size, Cs_arr, a, tol=tol, max_iter=max_iter)
    nz = (out.W != 0).any(axis=1)  # (K, d)
    cv_acc = cv_sel = cv_conv = None
    if cv:
        folds = stratified_kfold(codes[tr], k=cv, seed=seed)
        accs, sels, convs = [], [], []
        Xtr = Xf[tr]
        for f_tr, f_va in folds:
            sc = _Scaler.fit(Xtr[f_tr], standardize)
            Xf_s = sc.apply(Xtr)
            o = _solve_path(Xf_s[f_tr], codes[tr][f_tr], classes.size, Cs_arr, a, tol=tol, max_iter=max_iter,
                            W0=out.W, b0=out.b)
            accs.append(_accuracy(Xf_s[f_va], codes[tr][f_va], o.W, o.b))
            sels.append((o.W != 0).any(axis=1))
            convs.append(o.kkt <= tol)
        cv_acc = np.mean(accs, axis=0)
        cv_sel = np.mean(sels, axis=0)
        cv_conv = np.all(convs, axis=0)
    return LogisticPathResult(
        Cs=Cs_arr,
        penalty=penalty,
        l1_ratio=float(l1_ratio if penalty == "elasticnet" else a),
        classes=classes,
        coefs=out.W,
        intercepts=out.b,
        train_accuracy=_accuracy(Xs[tr], codes[tr], out.W, out.b),
        test_accuracy=_accuracy(Xs[te], codes[te], out.W, out.b),
        density=100.0 * nz.mean(axis=1),
        n_nonzero=nz.sum(axis=1),
        kkt_residual=out.kkt,
        converged=out.kkt <= tol,
        n_iter=out.n_iter,
        objective=out.objective,
        tol=tol,
        mean=scaler.mean,
        scale=scaler.scale,
        train_idx=tr,
        test_idx=te,
        cv_accuracy=cv_acc,
        cv_selection_frequency=cv_sel,
        cv_converged=cv_conv,
        fit_seconds=time.perf_counter() - t0,
    )


def refit_at_C(
    X: np.ndarray,
    y: np.ndarray,
    path: LogisticPathResult,
    C: float,
    *,
    max_iter: int = 3000,
) -> LogisticPathResult:
    """Fit one new C, warm-started from the nearest point of a stored path (a slider move).

    Uses the path's split, scaling, penalty and tolerance, so the result is directly comparable.

    Args:
        X, y: the same data the path was fitted on.
        path: a :class:`LogisticPathResult` from :func:`fit_logistic_path`.
        C: the new C (> 0).

    Returns:
        A one-point :class:`LogisticPathResult`.
    """
    import time

    t0 = time.perf_counter()
    C_arr = _check_Cs(C)[:1]
    Xf, codes, classes = validate_xy(X, y, min_per_class=2)
    if not np.array_equal(classes, path.classes) or Xf.shape[1] != path.coefs.shape[2]:
        raise ProbeError("refit_at_C got different data than the path was fitted on; refit the whole path.")
    k = path.nearest_index(float(C_arr[0]))
    a = _l1_weight(path.penalty, path.l1_ratio)
    Xs = ((Xf - path.mean) / path.scale).astype(np.float32)
    tr, te = path.train_idx, path.test_idx
    out = _solve_path(Xs[tr], codes[tr], classes.size, C_arr, a, tol=path.tol, max_iter=max_iter,
                      W0=path.coefs[k : k + 1], b0=path.intercepts[k : k + 1])
    nz = (out.W != 0).any(axis=1)
    return LogisticPathResult(
        Cs=C_arr, penalty=path.penalty, l1_ratio=path.l1_ratio, classes=classes, coefs=out.W,
        intercepts=out.b, train_accuracy=_accuracy(Xs[tr], codes[tr], out.W, out.b),
        test_accuracy=_accuracy(Xs[te], codes[te], out.W, out.b), density=100.0 * nz.mean(axis=1),
        n_nonzero=nz.sum(axis=1), kkt_residual=out.kkt, converged=out.kkt <= path.tol, n_iter=out.n_iter,
        objective=out.objective, tol=path.tol, mean=path.mean, scale=path.scale, train_idx=tr, test_idx=te,
        fit_seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- estimator


class LogisticProbe:
    """scikit-learn-style logistic probe (L1 / L2 / elastic net) backed by the FISTA solver.

    ``fit`` returns self; learned attributes end in ``_``: ``classes_``, ``coef_`` ``(m, d)`` and
    ``intercept_`` ``(m,)`` for raw (unstandardized) features, ``coef_std_`` in standardized
    units, ``n_iter_``, ``kkt_residual_``, ``converged_``.
    """

    def __init__(self, C: float = 1.0, *, penalty: str = "l1", l1_ratio: float = 0.5,
                 standardize: bool = True, tol: float = 1e-3, max_iter: int = 3000) -> None:
        self.C = C
        self.penalty = penalty
        self.l1_ratio = l1_ratio
        self.standardize = standardize
        self.tol = tol
        self.max_iter = max_iter

    def get_params(self, deep: bool = True) -> dict:
        return {k: getattr(self, k) for k in ("C", "penalty", "l1_ratio", "standardize", "tol", "max_iter")}

    def set_params(self, **params: object) -> "LogisticProbe":
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def fit(self, X: np.ndarray, y: np.ndarray) -> "LogisticProbe":
        a = _l1_weight(self.penalty, self.l1_ratio)
        C = _check_Cs(self.C)[:1]
        Xf, codes, classes = validate_xy(X, y, min_per_class=1)
        sc = _Scaler.fit(Xf, self.standardize)
        out = _solve_path(sc.apply(Xf), codes, classes.size, C, a, tol=self.tol, max_iter=self.max_iter)
        self.classes_ = classes
        self.coef_std_ = out.W[0]
        self.coef_ = out.W[0] / sc.scale
        self.intercept_ = out.b[0] - self.coef_ @ sc.mean
        self.n_iter_ = int(out.n_iter[0])
        self.kkt_residual_ = float(out.kkt[0])
        self.converged_ = bool(out.kkt[0] <= self.tol)
        self.n_features_in_ = Xf.shape[1]
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        z = np.asarray(X, dtype=np.float32) @ self.coef_.T + self.intercept_
        return z[:, 0] if z.shape[1] == 1 else z

    def predict(self, X: np.ndarray) -> np.ndarray:
        z = self.decision_function(X)
        return self.classes_[(z > 0).astype(np.int64) if z.ndim == 1 else z.argmax(axis=1)]

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(X) == np.asarray(y)))


# --------------------------------------------------------------------------- all hooks at once


@dataclass(frozen=True)
class LayerProbeResult:
    """An L2 logistic probe per hook (one L-BFGS per hook, hooks spread over worker threads).

    H = hooks, m = 1 (two classes) or number of classes, d = features per hook.
    """

    hooks: list[str]
    classes: np.ndarray  # (n_classes,)
    class_counts: dict  # class -> {"train": int, "test": int}
    train_accuracy: np.ndarray  # (H,)
    test_accuracy: np.ndarray  # (H,)
    chance: float  # majority-class accuracy on the test split
    C: float
    coefs: np.ndarray  # (H, m, d) standardized units
    intercepts: np.ndarray  # (H, m)
    grad_norm: np.ndarray  # (H,) inf-norm of the gradient w.r.t. (W, b) of objective / (C n)
    converged: np.ndarray  # (H,) bool: grad_norm <= 10 * tol
    n_iter: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    fit_seconds: float = 0.0

    def table(self) -> list[dict]:
        return [
            {"hook": h, "train_accuracy": float(self.train_accuracy[i]), "test_accuracy": float(self.test_accuracy[i]),
             "chance": self.chance, "converged": bool(self.converged[i])}
            for i, h in enumerate(self.hooks)
        ]


def _bf16_matmul_is_fast() -> bool:
    """True where bf16 GEMMs run natively (AMX / AVX-512 BF16); elsewhere they are emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _scratch(store: dict, key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reusable buffer of ``shape`` from ``store`` (one store per worker thread and fit).

    Writing into a fresh 16 MB tensor costs ~10 ms of page faults here, more than the pass that
    fills it; hooks fitted one after another on a worker reuse its buffers instead.
    """
    size = math.prod(shape)
    buf = store.get((key, dtype))
    if buf is None or buf.numel() < size:
        buf = store[(key, dtype)] = torch.empty(size, dtype=dtype)
    return buf[:size].view(shape)


class _NonFinite(Exception):
    """A hook's features hold NaN or inf (reported with the hook's name by the caller)."""


_ONE_LAYOUT_BELOW = 256  # fp32 data narrower keeps only the row layout (X.T for X^T R): in-process
# A/B, 2 workers: d=128 1.06x faster (half the working set, no transpose); d=256 0.86x, d=576 0.71x;
# after the per-thread OpenMP fix two layouts at d=128 were still 0.98x (20 alternations)
_CHUNK = 512  # rows per block in the row-wise passes: 512 × d fp32 stays in a 2 MB L2 up to d ≈ 1000
_BLOCK_BYTES = 1 << 20  # ... and narrower rows go in blocks of ~1 MB (fewer calls per pass)


def _block_rows(d: int) -> int:
    return max(_CHUNK, _BLOCK_BYTES // (4 * d))


class _HookData:
    """One hook's training rows for the solver, in both layouts (rows ``(n, d)`` and ``(d, n)``;
    fp32 rows narrower than ``_ONE_LAYOUT_BELOW`` keep the row layout only).

    One pass reads the rows from the hook's array (a memmap is read in place) a block at a time,
    accumulates the column statistics and writes the rows, less a shift (the first block's
    column means, so bf16 keeps the variation and not the offset), in bf16 (``low``) or fp32.
    The standardization ``(x - mu) / sd`` is folded into :meth:`fwd` and :meth:`grad` (a rank-one
    correction and a column scale), so no second pass is needed. The row layout serves ``X W``
    and the transposed one ``X^T R``: each GEMM with its big operand unpacked, 2-4x faster
    here than either product on one layout. Exact figures (fp32 decision values, gradient,
    test predictions) come from :meth:`exact_grad` and :meth:`predict_rows`, which re-read the
    fp32 rows a block at a time (one read for both products).
    """

    def __init__(self, a_: np.ndarray, rows: torch.Tensor, standardize: bool, low: bool, bufs: dict):
        self.src = a_ if a_.flags.c_contiguous else np.ascontiguousarray(a_)
        self.rows, self.bufs = rows, bufs
        n, d = rows.numel(), self.src.shape[1]
        self.n, self.d = n, d
        self.chunk = _block_rows(d)
        self.blk = _scratch(bufs, "block", (min(self.chunk, max(n, 1)), d))
        self.shift = None
        self._store(torch.bfloat16 if low else torch.float32, stats=True)
        m1 = self._s1[0] / n  # mean of (x - shift)
        if not bool(torch.isfinite(m1).all() and torch.isfinite(self._s2).all()):
            raise _NonFinite()
        if standardize:
            self.mu = self.shift + m1
            sd = (self._s2[0] / n - m1 * m1).clamp_(min=0).sqrt_()
            # A column constant to fp32 rounding keeps scale 1 (like scikit-learn's StandardScaler).
            self.sd = torch.where(sd <= 1e-6 * self.mu.abs() + 1e-12, torch.ones_like(sd), sd)
        else:
            self.mu, self.sd = torch.zeros(d), torch.ones(d)
        self.delta = (self.mu - self.shift).unsqueeze(1)  # (d, 1): x - mu = stored - delta
        self.inv_sd = (1.0 / self.sd).unsqueeze(1)  # (d, 1)
        self.delta_n = self.delta[:, 0].double().numpy()  # the same in NumPy (d,), float64
        self.inv_sd_n = self.inv_sd[:, 0].double().numpy()
        self.low = low

    def _blocks(self, rows: torch.Tensor, shift: torch.Tensor | None = None, into: torch.Tensor | None = None):
        """``(start, block)``: fp32 rows ``rows[start:start+c]`` of the source, less ``shift``;
        gathered into ``into[start:start+c]`` (fp32) if given, else into a reused block."""
        for s0 in range(0, rows.numel(), self.chunk):
            idx = rows[s0:s0 + self.chunk].numpy()
            b = self.blk[: idx.size] if into is None else into[s0:s0 + idx.size]
            # Indices were checked by the caller; mode="raise" with out= gathers into a temporary
            # and copies it (2x slower here).
            if self.src.dtype == np.float32:  # NumPy's gather reads a memmap in place
                np.take(self.src, idx, axis=0, out=b.numpy(), mode="clip")
            else:
                b.copy_(torch.from_numpy(np.take(self.src, idx, axis=0, mode="clip")))
            if shift is not None:
                b.sub_(shift)
            yield s0, b

    def _store(self, dtype: torch.dtype, stats: bool) -> None:
        """Write ``x - shift`` of the training rows in ``dtype`` (both layouts); optionally sum it."""
        X = _scratch(self.bufs, "rows", (self.n, self.d), dtype)
        one = dtype == torch.float32 and self.d < _ONE_LAYOUT_BELOW
        XT = None if one else _scratch(self.bufs, "cols", (self.d, self.n), dtype)
        ones = torch.ones(1, self.blk.shape[0])
        sq = _scratch(self.bufs, "square", tuple(self.blk.shape)) if stats else None
        self._s1, self._s2 = torch.zeros(1, self.d), torch.zeros(1, self.d)
        direct = dtype == torch.float32  # fp32 rows are gathered straight into place
        for s0, b in self._blocks(self.rows, into=X if direct else None):
            c = b.shape[0]
            if self.shift is None:
                self.shift = b.mean(dim=0)
            b.sub_(self.shift)
            if stats:
                self._s1.addmm_(ones[:, :c], b)
                self._s2.addmm_(ones[:, :c], torch.mul(b, b, out=sq[:c]))
            rows_ = b if direct else X[s0:s0 + c].copy_(b)
            if XT is not None:
                XT[:, s0:s0 + c].copy_(rows_.T)
        self.X, self.XT = X, (X.T if XT is None else XT)

    def to_exact(self) -> None:
        """Continue on fp32 copies (the bf16 ones could not reach the tolerance)."""
        if self.low:
            self.low = False
            self._store(torch.float32, stats=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.X.dtype

    def fwd(self, W: np.ndarray, bias: np.ndarray) -> torch.Tensor:
        """``X W + bias`` ``(n, m)`` fp32 for standardized X; ``W (d, m)``, ``bias (m,)`` NumPy.

        The small matrices are folded in NumPy; the pass over the data is one torch call (fp32).
        """
        Ws = (W * self.inv_sd_n[:, None]).astype(np.float32)
        row = torch.from_numpy((bias - self.delta_n @ Ws).astype(np.float32))
        if self.X.dtype == torch.float32:
            return torch.addmm(row, self.X, torch.from_numpy(Ws))
        return torch.mm(self.X, torch.from_numpy(Ws).to(self.X.dtype)).float().add_(row)

    def grad(self, R: torch.Tensor, rsum: np.ndarray) -> np.ndarray:
        """``X^T R`` ``(d, m)`` float64 NumPy for standardized X, ``R (n, m)`` (in :attr:`dtype`) and
        its column sums ``rsum (m,)``."""
        G = torch.mm(self.XT, R)
        G = (G if G.dtype == torch.float32 else G.float()).numpy().astype(np.float64)
        G -= np.outer(self.delta_n, rsum)
        G *= self.inv_sd_n[:, None]
        return G

    def _raw_rows(self) -> tuple[torch.Tensor | None, np.ndarray]:
        """``(shift, delta (d,))`` for the exact passes over the source rows: the standardization
        is folded into the small matrices (``x W' + c``), so a block is only gathered, not
        rescaled. The shift is subtracted only where a column's mean is large next to its spread
        (folding it would then cancel digits); otherwise the raw rows go straight into the GEMM."""
        if bool((self.mu.abs() <= 8.0 * self.sd).all()):
            return None, self.mu.double().numpy()
        return self.shift, self.delta_n

    def _folded(self, W: np.ndarray, b: np.ndarray):
        """``(shift, delta, Ws, bias)``: standardized ``x W + b`` = ``(x - shift) Ws + bias``
        (``Ws``, ``bias`` fp32 tensors)."""
        shift, delta = self._raw_rows()
        Ws = W * self.inv_sd_n[:, None]
        bias = b - delta @ Ws
        return shift, delta, torch.from_numpy(Ws.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))

    def predict_rows(self, rows: torch.Tensor, W: np.ndarray, b: np.ndarray) -> torch.Tensor:
        """Exact fp32 decision values ``(len(rows), m)`` of any rows (e.g. the test split)."""
        shift, _, Ws, bias = self._folded(W, b)
        Z = torch.empty(rows.numel(), W.shape[1])
        for s0, blk in self._blocks(rows, shift):
            torch.addmm(bias, blk, Ws, out=Z[s0:s0 + blk.shape[0]])
        return Z

    def exact_grad(self, Z: torch.Tensor, T: torch.Tensor, probs, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Fill ``Z`` with exact decision values of the training rows; return ``X^T (P - T)``
        (float64 NumPy).

        One read of the fp32 rows: each block's decision values, residual and gradient share
        the block while it is in cache.
        """
        shift, delta, Ws, bias = self._folded(W, b)
        G = torch.zeros(self.d, W.shape[1])
        rsum = torch.zeros(1, W.shape[1])
        for s0, blk in self._blocks(self.rows, shift):
            c = blk.shape[0]
            Zc = torch.addmm(bias, blk, Ws, out=Z[s0:s0 + c])
            Rc = probs(Zc).sub_(T[s0:s0 + c])
            G.addmm_(blk.T, Rc)
            rsum.add_(Rc.sum(dim=0))
        Gn = G.numpy().astype(np.float64)
        Gn -= np.outer(delta, rsum.numpy()[0])
        Gn *= self.inv_sd_n[:, None]
        return Gn

    def covariance_sample(self, max_rows: int = 2048) -> torch.Tensor:
        """Standardized covariance ``(d, d)`` from a row subsample (for a preconditioner)."""
        Xs = self.XT[:, :: max(1, self.n // max_rows)].float()
        Xs = (Xs - Xs.mean(dim=1, keepdim=True)).mul_(self.inv_sd)
        return torch.mm(Xs, Xs.T).div_(Xs.shape[1])


def _hook_eigs(data: _HookData) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of one hook's feature covariance: fp64 eigh of a subsample's fp32 Gram.

    Only a preconditioner. -> ``(evals (d,), evecs (d, d))``.
    """
    ev, U = torch.linalg.eigh(data.covariance_sample().double())
    return ev.clamp(min=0).float(), U.float()


_MEAN_SHIFT_MAX_CLASSES = 15


def _softmax_rows(Z: torch.Tensor) -> torch.Tensor:
    """Row softmax of ``Z (n, m)``; for m < 16 shifted by the row mean instead of the row max.

    torch's softmax over a short last dimension is slow here except at m = 16 (a fast path);
    with the row means and sums as matrix-vector products, the all-hooks fit (d = 128, 7 hooks,
    in-process A/B) ran 1.21x (m = 4), 1.42x (8) and 1.41x (12) faster, but 0.95x (16), 0.91x (20)
    and 0.99x (32), hence the bound. The largest term is >= 1 (no division by an underflowed
    sum); a row whose max is more than ~88 above its mean overflows, and then the call falls
    back to torch's softmax.
    """
    n, m = Z.shape
    if m > _MEAN_SHIFT_MAX_CLASSES:
        return torch.softmax(Z, dim=1)
    v = torch.mv(Z, torch.full((m,), 1.0 / m, dtype=Z.dtype))
    E = torch.sub(Z, v.unsqueeze(1)).exp_()
    torch.mv(E, torch.ones(m, dtype=Z.dtype), out=v)
    if not bool(v.max() < math.inf):
        return torch.softmax(Z, dim=1)
    return E.div_(v.unsqueeze(1))


def _dot(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Inner product of two contiguous fp32 arrays, in NumPy (~2x less per-call cost than torch's
    here)."""
    a = a.numpy() if isinstance(a, torch.Tensor) else a  # a view: no copy
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    return float(np.dot(a.reshape(-1), b.reshape(-1)))


@dataclass
class _HookSolve:
    W: np.ndarray  # (d, m) float64, standardized units
    b: np.ndarray  # (m,) float64
    Z: torch.Tensor  # (n, m) fp32 train decision values at (W, b)
    grad_norm: float  # exact gradient inf-norm / (C n)
    n_iter: int  # L-BFGS iterations
    n_low: int  # of which run on bf16 data
    n_checks: int = 0  # exact checks of bf16 figures


def _lbfgs_hook(
    data: _HookData,
    T: torch.Tensor,
    target: torch.Tensor | None,
    C: float,
    W0: np.ndarray,
    b0: np.ndarray,
    *,
    P: np.ndarray | None,
    bscale: float,
    tol: float,
    max_iter: int,
    exact_first: bool = False,
    memory: int = 10,
    c2: float = 0.5,
    max_ls: int = 6,
) -> _HookSolve:
    """L-BFGS on one hook: ``min 0.5/(C n) ||W||^2 + loss / n`` (scikit-learn's scaled lbfgs objective).

    Variables ``W = P V``, ``b = bscale * beta`` (``P (d, d)`` a preconditioner or None). ``T (n, m)``
    one-hot targets (``m = 1``: 0/1 targets of a binary logistic); ``target (n, 1)`` class codes
    for the multinomial case (None when binary). ``W0 (d, m)``, ``b0 (m,)``: the start (NumPy).
    ``exact_first``: start with the exact figures (a warm start that is already within ``tol``
    then costs no iteration).

    Every iteration touches the data exactly twice: ``X D`` for the search direction and
    ``X^T R`` for the new gradient. The line search (safeguarded Newton on the convex 1-D
    function) runs on ``Z + alpha X D``: no data passes. Only the ``(n, m)`` work is done in
    torch (a handful of calls per iteration); the ``(d, m)`` algebra, the inner products and
    the L-BFGS recursion run in NumPy, where a call costs less (in-process A/B: 1.08x at
    d = 576, neutral at d = 128).

    With bf16 data (``data.low``: AMX GEMMs, 2-4x faster than fp32 here) the solve runs on it
    until the gradient passes ``tol``; then decision values and gradient are recomputed from
    the fp32 rows (:meth:`_HookData.exact_grad`) and the solve stops, or goes on (``certify``):
    on bf16 data from the exact decision values with a tighter bf16 target, or on fp32 copies
    when bf16's error leaves no room. The stopping test is always on exact figures; a warm
    start checks them first and goes on in bf16 too.
    """
    n, d = data.n, data.d
    m = T.shape[1]
    binary = target is None
    inv = 1.0 / (C * n)
    t_sum = T.sum(dim=0).double().numpy()
    r_bufs: dict = {}

    def probs(Z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(Z) if binary else _softmax_rows(Z)

    W, b = np.array(W0, dtype=np.float64), np.array(b0, dtype=np.float64)

    def gradient(prob: torch.Tensor, G: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """``(gW, gb, inf-norm)`` at probabilities ``prob``; ``G = X^T (prob - T)`` if already known."""
        rsum = prob.sum(dim=0).double().numpy() - t_sum
        if G is None:  # the residual goes straight into the GEMM's dtype: one pass
            R = r_bufs.get(data.dtype)
            if R is None:
                R = r_bufs[data.dtype] = torch.empty(n, m, dtype=data.dtype)
            G = data.grad(torch.sub(prob, T, out=R), rsum)
        gW = G / n + inv * W
        gb = rsum / n
        return gW, gb, max(float(np.abs(gW).max()), float(np.abs(gb).max()))

    def state():
        if data.low:  # exact figures from the fp32 rows
            Z = torch.empty(T.shape)
            G = data.exact_grad(Z, T, probs, W, b)
            prob = probs(Z)
            return (Z, prob, *gradient(prob, G))
        Z = data.fwd(W, b)
        prob = probs(Z)
        return (Z, prob, *gradient(prob))

    def to_v(gW: np.ndarray, gb: np.ndarray) -> np.ndarray:
        """The gradient in the solver's variables, flat float64."""
        v = np.empty((d + 1) * m)
        v[: d * m] = (P.T @ gW if P is not None else gW).reshape(-1)
        v[d * m:] = bscale * gb
        return v

    n_iter = n_low = n_checks = 0
    low_tol = tol  # bf16 figures at or below it call for an exact check
    next_check = max_iter  # ... and so does this iteration (bf16 may stall above a tightened low_tol)

    def certify():
        """bf16 figures passed ``low_tol``: exact figures at the same point decide.

        -> ``(figures, exact)``: the exact figures if they pass ``tol`` (or the solve leaves bf16
        data: then on fp32 copies). Otherwise the solve goes on with bf16 data from the exact
        decision values (which drop the drift ``Z + alpha X D`` picked up from bf16-rounded
        products) and the bf16 gradient there, until that is below ``tol`` less 1.5 times its
        measured gap to the exact one (X's rounding: ~1e-5 here), or for 10 iterations at most.
        Falls back to fp32 data when that gap leaves no room, or after six checks.
        """
        nonlocal low_tol, n_checks, next_check
        n_checks += 1
        ex = state()
        if ex[4] <= tol or not data.low:
            return ex, True
        gWl, gbl, gnl = gradient(ex[1])  # bf16 gradient at the exact decision values
        err = float(max(np.abs(ex[2] - gWl).max(), np.abs(ex[3] - gbl).max()))
        if n_checks < 6 and err < 0.5 * tol:
            low_tol = min(low_tol, tol - 1.5 * err, 0.9 * gnl)
            next_check = n_iter + 10
            return (ex[0], ex[1], gWl, gbl, gnl), False
        data.to_exact()
        return ex, True

    if exact_first:  # a warm start may already be within tol on the exact figures
        Z, prob, gW, gb, gnorm = state()
        exact = True
        if gnorm > tol and data.low:  # go on from bf16 figures at the same point
            Z = data.fwd(W, b)
            prob = probs(Z)
            gW, gb, gnorm = gradient(prob)
            exact = False
            low_tol = min(tol, 0.9 * gnorm)
    else:
        if W.any():
            Z = data.fwd(W, b)
        else:  # a cold start: X 0 + b needs no pass over the data
            Z = torch.from_numpy(b.astype(np.float32)).expand(n, m).clone()
        prob = probs(Z)
        gW, gb, gnorm = gradient(prob)
        exact = not data.low  # are (Z, gW, gb) from fp32 data?
    if not exact and gnorm <= low_tol:
        (Z, prob, gW, gb, gnorm), exact = certify()
    g = to_v(gW, gb)
    hist: list[tuple[np.ndarray, np.ndarray, float]] = []
    gamma = 1.0
    while (not exact or gnorm > tol) and n_iter < max_iter:  # bf16 figures never stop it
        q = g.copy()
        alphas = []
        for s_, y_, rho in reversed(hist):  # two-loop recursion (BLAS level 1, in place)
            a = rho * ddot(s_, q)
            alphas.append(a)
            daxpy(y_, q, a=-a)
        q *= gamma
        for (s_, y_, rho), a in zip(hist, reversed(alphas)):
            daxpy(s_, q, a=a - rho * ddot(y_, q))
        D = np.negative(q, out=q)
        DV = D[: d * m].reshape(d, m)
        DW = P @ DV if P is not None else DV
        Db = bscale * D[d * m:]
        XD = data.fwd(DW, Db)
        wdw, dwdw = float(np.vdot(W, DW)), float(np.vdot(DW, DW))
        # (P - T) . XD, with T . XD (the true classes' entries) fixed along the line
        txd = _dot(T, XD)
        d0 = inv * wdw + (_dot(prob, XD) - txd) / n
        if not d0 < 0:  # rounding made the direction uphill
            if data.low:  # bf16 data cannot go further: exact figures, then fp32 data if needed
                Z, prob, gW, gb, gnorm = state()
                exact = True
                if gnorm > tol:
                    data.to_exact()
                g = to_v(gW, gb)
                hist.clear()
                gamma = 1.0
                continue
            if not hist:
                break  # steepest descent is not downhill: at the optimum to rounding
            hist.clear()
            gamma = 1.0
            continue
        alpha, lo, hi = 1.0, 0.0, math.inf
        for ls in range(max_ls):
            Za = torch.add(Z, XD, alpha=alpha)
            pa = probs(Za)
            phi1 = inv * (wdw + alpha * dwdw) + (_dot(pa, XD) - txd) / n
            if abs(phi1) <= c2 * abs(d0) or ls == max_ls - 1:
                break
            pxd = pa * XD
            if binary:
                curv = _dot((1 - pa) * pxd, XD)
            else:
                curv = _dot(pxd, XD) - float(pxd.sum(dim=1).square().sum())
            phi2 = inv * dwdw + curv / n
            if phi1 < 0:
                lo = alpha
            else:
                hi = alpha
            newt = alpha - phi1 / max(phi2, 1e-30)
            if not lo < newt < hi:
                newt = 4 * alpha if math.isinf(hi) else 0.5 * (lo + hi)
            alpha = newt
        W += alpha * DW
        b += alpha * Db
        was_low = data.low
        Z, prob = Za, pa
        gW, gb, gnorm = gradient(prob)
        n_iter += 1
        n_low += int(was_low)
        exact = not was_low
        checked = was_low and (gnorm <= low_tol or n_iter >= next_check)
        if checked:
            (Z, prob, gW, gb, gnorm), exact = certify()
        gn = to_v(gW, gb)
        if not checked:  # no curvature pair across a check (new precision or decision values)
            s_, y_ = D * alpha, gn - g
            sy, yy = ddot(s_, y_), ddot(y_, y_)
            if sy > 1e-10 * yy:
                hist.append((s_, y_, 1.0 / sy))
                gamma = sy / yy
                if len(hist) > memory:
                    hist.pop(0)
        g = gn
    if not exact:  # stopped by max_iter on bf16 data: report exact figures
        Z, prob, gW, gb, gnorm = state()
    return _HookSolve(W=W, b=b, Z=Z, grad_norm=gnorm, n_iter=n_iter, n_low=n_low, n_checks=n_checks)


_PARALLEL_WORK = 2e5  # training values per hook above which hooks go to worker threads
_BF16_MIN_FEATURES = 256  # "auto" precision uses bf16 data passes from this width on


def fit_multiclass_all_hooks(
    X_by_hook: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray,
    y: np.ndarray,
    *,
    C: float = 1.0,
    test_fraction: float = 0.3,
    seed: int = 0,
    standardize: bool = True,
    precondition: bool = False,
    eig_cache: dict | None = None,
    tol: float = 1e-4,
    max_iter: int = 200,
    warm_start: LayerProbeResult | None = None,
    precision: str = "auto",
    curvature: float | None = None,
    progress: Callable[[float, str], None] | None = None,
    rows: np.ndarray | None = None,
) -> LayerProbeResult:
    """L2 logistic probe (multinomial, or logistic for two classes) on every hook.

    Minimizes, per hook, ``0.5 ||W_h||^2 + C * sum_i loss`` (scikit-learn's lbfgs objective,
    intercept unpenalized) with an L-BFGS per hook (:func:`_lbfgs_hook`), hooks spread over
    worker threads, one per core, each single-threaded (:func:`probing_core.threads.map_hooks`;
    ``PROBING_THREADS`` sets their number). A hook's data is gathered, standardized and fitted
    by one worker and then dropped, so at most ``workers + 1`` hooks are in memory.

    With ``precondition`` the variables are ``W = U (s Λ + 1/(C n))^(-1/2) V`` (U, Λ: the hook's
    feature covariance eigendecomposition, s: a softmax curvature estimate), the inverse square
    root of an approximation of the Hessian, so both the data term and the penalty are close to
    the identity. That helps on ill-conditioned activations; on well-conditioned ones it saves
    little, and at d≈576 the decomposition costs more than it saves unless it is cached
    (``eig_cache``), so it is off by default.

    Args:
        X_by_hook: ``{hook: (n, d)}`` or ``(H, n, d)``; every hook needs the same n and d.
        y: ``(n,)`` labels.
        C: inverse L2 strength (> 0).
        test_fraction, seed: stratified split.
        standardize: per-hook standardization on the training split.
        precondition: use the eigendecomposition preconditioner.
        eig_cache: dict filled with / read from ``{(hook, key): (evals, evecs)}``; keep it next to
            the activations so a new label or C costs no decomposition. It is only a
            preconditioner: a stale entry (e.g. a label change moved the split) slows the fit
            but never changes the optimum.
        tol: stop a hook when the inf-norm of its gradient w.r.t. (W, b) divided by ``C n`` (the
            scaling and default of scikit-learn's lbfgs ``tol``) is ``<= tol``, measured on the
            fp32 data; ``converged`` is that norm being ``<= 10 * tol``.
        max_iter: L-BFGS iterations per hook.
        warm_start: a previous result on the same data/hooks (e.g. after a C slider move or a
            label change with the same classes).
        precision: ``"mixed"`` runs the data passes on a bf16 copy of X until a hook is within
            ``tol``, then checks (and if needed finishes) on fp32 (same optimum and stopping
            test); ``"fp32"`` never uses bf16; ``"auto"`` picks mixed where the CPU has native
            bf16 GEMMs and hooks have at least 256 features.
        curvature: the softmax curvature ``s`` of the preconditioner (default ``1/m`` for m > 2
            classes, 1/4 for two).
        progress: ``progress(fraction, message)`` once per hook, on the calling thread.
        rows: sample ``i`` is row ``rows[i]`` of every array (e.g. store memmaps, read in place
            and never copied whole); ``y`` then has one entry per row. ``train_idx`` /
            ``test_idx`` index samples (positions in ``rows``).

    Returns:
        :class:`LayerProbeResult` (``n_iter``: the most iterations any hook took).

    Raises:
        ProbeError, LabelError: see :func:`validate_xy` (NaN or inf in a hook's features is
            reported with the hook's name); hooks of different shapes; unknown precision.
    """
    import time

    t0 = time.perf_counter()
    C_val = float(_check_Cs(C)[0])
    if precision not in ("auto", "mixed", "fp32"):
        raise ProbeError(f"precision={precision!r} is not one of 'auto', 'mixed', 'fp32'; use 'auto'.")
    if isinstance(X_by_hook, Mapping):
        hooks = list(X_by_hook.keys())
        arrays = dict(X_by_hook)
    else:
        seq = list(X_by_hook)
        hooks = [f"hook_{i}" for i in range(len(seq))]
        arrays = dict(zip(hooks, seq))
    if not hooks:
        raise ProbeError("no hooks given; pick at least one hook to probe.")
    shapes = {tuple(np.shape(a_)) for a_ in arrays.values()}
    if len(shapes) != 1:
        raise ProbeError(f"all hooks need the same (samples, features) shape; got {sorted(shapes)}.")
    shape = shapes.pop()
    if len(shape) != 2 or 0 in shape:
        raise ProbeError(f"features must be 2-D (samples × features) and non-empty; got shape {shape}.")
    y = np.asarray(y)
    n_rows = shape[0] if rows is None else len(rows)
    if y.ndim != 1 or y.shape[0] != n_rows:
        raise ProbeError(f"labels must be 1-D with one entry per sample; got {y.shape} for {n_rows} samples.")
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= shape[0]):
            raise ProbeError(f"rows must index the {shape[0]} stored rows; got {rows.min()}..{rows.max()}.")
    codes, classes = _check_labels(y, min_per_class=2)
    tr, te = stratified_split(codes, test_fraction=test_fraction, seed=seed)
    tr, te = np.sort(tr), np.sort(te)  # ascending gathers; the order does not change the optimum
    H, (n, d) = len(hooks), (n_rows, shape[1])
    src_tr = tr if rows is None else rows[tr]  # rows of the arrays
    src_te = te if rows is None else rows[te]
    binary = classes.size == 2
    m = 1 if binary else classes.size
    tr_t, te_t = torch.as_tensor(src_tr), torch.as_tensor(src_te)
    ctr, cte = torch.as_tensor(codes[tr]), torch.as_tensor(codes[te])
    T = (ctr == 1).float().view(-1, 1) if binary else torch.nn.functional.one_hot(ctr, m).float()
    target = None if binary else ctr.view(-1, 1)
    ntr = tr.size
    s = float(curvature) if curvature is not None else (0.25 if binary else 1.0 / m)
    split_key = (int(seed), float(test_fraction), bool(standardize), n, d)
    # bf16 passes pay for their exact fp32 check from d ≈ 256 on (bench_layers: at d = 128 fp32 was
    # as fast or faster, at d = 576 bf16 1.3-1.4x faster).
    mixed = precision == "mixed" or (precision == "auto" and d >= _BF16_MIN_FEATURES and _bf16_matmul_is_fast())
    warm = warm_start is not None and warm_start.coefs.shape == (H, m, d)
    prior = T.mean(dim=0).clamp(min=1e-12)
    b_prior = (torch.log(prior / (1 - prior)) if binary else prior.log() - prior.log().mean()).double().numpy()
    index = {h: i for i, h in enumerate(hooks)}

    scratch: dict[int, dict] = {}  # per worker thread, freed with this call

    ctr_n, cte_n = codes[tr], codes[te]

    def accuracy(Z: torch.Tensor, truth: np.ndarray) -> float:
        """Share of rows whose top decision value is the true class (NumPy's argmax: faster
        than torch's over 16 columns here)."""
        z = Z.numpy()
        pred = (z[:, 0] > 0).astype(np.int64) if binary else z.argmax(axis=1)
        return float((pred == truth).mean())

    def one(h: str, a_: np.ndarray) -> tuple:
        bufs = scratch.setdefault(threading.get_ident(), {})
        # Confident softmax outputs underflow to subnormals, 10x slower to compute with on x86;
        # flush them to zero on this thread while it fits (no figure here is that small).
        torch.set_flush_denormal(True)
        try:
            return fit_one(h, a_, bufs)
        finally:
            torch.set_flush_denormal(False)

    def fit_one(h: str, a_: np.ndarray, bufs: dict) -> tuple:
        i = index[h]
        with torch.no_grad():
            try:
                data = _HookData(a_, tr_t, standardize, mixed, bufs)
            except _NonFinite:
                raise ProbeError(f"features of hook {h!r} contain NaN or inf; re-extract them in float32.") from None
            P = None
            if precondition:
                key = (h, split_key)
                cached = eig_cache.get(key) if eig_cache is not None else None
                ev, U = cached if cached is not None else _hook_eigs(data)
                if eig_cache is not None and cached is None:
                    eig_cache[key] = (ev, U)
                P = (U * torch.rsqrt(s * ev + 1.0 / (C_val * ntr)).unsqueeze(0)).double().numpy()
            if warm:
                W0 = np.asarray(warm_start.coefs[i], dtype=np.float64).T
                b0 = np.asarray(warm_start.intercepts[i], dtype=np.float64)
            else:  # W = 0 with the intercept that is optimal there (log class priors)
                W0, b0 = np.zeros((d, m)), b_prior
            # With P the W-curvature is ~1, so scale the intercept (curvature ~s) to match; without
            # it both are ~s already (standardized features).
            sol = _lbfgs_hook(data, T, target, C_val, W0, b0, P=P,
                              bscale=s ** -0.5 if P is not None else 1.0, tol=tol, max_iter=max_iter,
                              exact_first=warm)
            tr_acc = accuracy(sol.Z, ctr_n)
            Zte = data.predict_rows(te_t, sol.W, sol.b)
            if not bool(torch.isfinite(Zte).all()):
                raise ProbeError(f"features of hook {h!r} contain NaN or inf; re-extract them in float32.")
            te_acc = accuracy(Zte, cte_n) if te.size else float("nan")
        return (sol.W.T.astype(np.float32), sol.b.astype(np.float32), tr_acc, te_acc, sol.grad_norm,
                sol.n_iter)

    with single_threaded():
        outs = map_hooks(one, hooks, arrays, parallel=ntr * d >= _PARALLEL_WORK, progress=progress)
    rel = np.array([o[4] for o in outs], dtype=np.float64)
    counts = {
        (classes[i].item() if hasattr(classes[i], "item") else classes[i]): {
            "train": int((codes[tr] == i).sum()), "test": int((codes[te] == i).sum())}
        for i in range(classes.size)
    }
    chance = float(np.bincount(codes[te], minlength=classes.size).max() / te.size)
    return LayerProbeResult(
        hooks=hooks, classes=classes, class_counts=counts,
        train_accuracy=np.array([o[2] for o in outs]), test_accuracy=np.array([o[3] for o in outs]),
        chance=chance, C=C_val, coefs=np.stack([o[0] for o in outs]), intercepts=np.stack([o[1] for o in outs]),
        grad_norm=rel, converged=rel <= 10 * tol, n_iter=max(o[5] for o in outs), train_idx=tr, test_idx=te,
        fit_seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- control task


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


@dataclass(frozen=True)
class ControlTaskResult:
    """Real-task vs control-task test accuracy at the same C, and their difference."""

    C: float
    accuracy: float
    control_accuracy: float
    selectivity: float
    control_chance: float
    converged: bool


def fit_control_task(
    X: np.ndarray,
    y: np.ndarray,
    token_ids: np.ndarray,
    *,
    C: float,
    penalty: str = "l1",
    l1_ratio: float = 0.5,
    test_fraction: float = 0.3,
    seed: int = 0,
    tol: float = 1e-3,
) -> ControlTaskResult:
    """Selectivity = real accuracy − control-task accuracy at one C (Hewitt & Liang 2019).

    Raises:
        LabelError: the control labels collapse to one class (too few token types).
    """
    real = fit_logistic_path(X, y, Cs=[C], penalty=penalty, l1_ratio=l1_ratio, test_fraction=test_fraction,
                             seed=seed, tol=tol)
    yc = control_labels(token_ids, y, seed=seed)
    if np.unique(yc).size < 2 or np.unique(yc, return_counts=True)[1].min() < 2:
        raise LabelError(
            "the control task has fewer than two usable classes (too few distinct token types); "
            "collect more contexts or use a token type with more variety."
        )
    ctrl = fit_logistic_path(X, yc, Cs=[C], penalty=penalty, l1_ratio=l1_ratio, test_fraction=test_fraction,
                             seed=seed, tol=tol)
    _, counts = np.unique(yc, return_counts=True)
    return ControlTaskResult(
        C=float(C), accuracy=float(real.test_accuracy[0]), control_accuracy=float(ctrl.test_accuracy[0]),
        selectivity=float(real.test_accuracy[0] - ctrl.test_accuracy[0]),
        control_chance=float(counts.max() / counts.sum()),
        converged=bool(real.converged[0] and ctrl.converged[0]),
    )
