"""Logistic probe paths over C: L1 / L2 / elastic-net, binary and multinomial, batched FISTA in torch.

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
and elastic-net paths use the active-set Newton solver of :mod:`probing_core.solvers.l1_newton` instead
(several times faster than liblinear there), with FISTA finishing any C it leaves open. Every
result carries a KKT residual and a ``converged`` flag; callers must not present an
unconverged fit as the answer.

All-hooks multinomial probes live in :mod:`probing_core.solvers.multiclass`; splits, folds and
control labels in :mod:`probing_core.solvers.splits`.

Everything returned is CPU numpy; nothing here imports streamlit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from probing_core.errors import LabelError, ProbeError
from probing_core.solvers.l1_newton import newton_l1_path
from probing_core.solvers.splits import (
    check_Cs,
    control_labels,
    stratified_kfold,
    stratified_split,
    validate_xy,
)

_PENALTIES = ("l1", "l2", "elasticnet")




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




@dataclass(frozen=True)
class _Scaler:
    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,) std, 1 where a feature is constant

    @staticmethod
    def fit(X: np.ndarray, enabled: bool) -> _Scaler:
        d = X.shape[1]
        if not enabled:
            return _Scaler(np.zeros(d, np.float32), np.ones(d, np.float32))
        mean = X.mean(axis=0, dtype=np.float64)
        std = X.std(axis=0, dtype=np.float64)
        std[std < 1e-12] = 1.0
        return _Scaler(mean.astype(np.float32), std.astype(np.float32))

    def apply(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean) / self.scale).astype(np.float32, copy=False)




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
    """Accuracy of every path point. Xs ``(n, d)``, W ``(K, m, d)``, b ``(K, m)`` -> ``(K,)``.

    NumPy, like the Newton path and its certificate: handing a small GEMM to torch's thread pool and back cost
    more than the GEMM (TECH-NOTES: 4-6 ms per switch; 7 ms per call here, 14 calls per Sparse label change).
    """
    if Xs.shape[0] == 0:
        return np.full(W.shape[0], np.nan)
    K, m, d = W.shape
    Z = (np.asarray(Xs, np.float32) @ np.asarray(W, np.float32).reshape(K * m, d).T).reshape(-1, K, m) + b[None]
    pred = Z[:, :, 0] > 0 if m == 1 else Z.argmax(axis=2)
    return (pred == np.asarray(codes).reshape(-1, 1)).mean(axis=0)


def _binary_certificate(Xs: np.ndarray, codes: np.ndarray, Cs: np.ndarray, a: float, W: np.ndarray,
                        b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The relative KKT residual (:func:`_kkt`'s measure) and the objective of every binary path point, recomputed on
    the float32 coefficients actually returned: one GEMM each way for all C values, in NumPy.

    Xs ``(n, d)`` float32, codes ``(n,)`` in {0, 1}, Cs ``(K,)``, W ``(K, 1, d)``, b ``(K, 1)`` -> ``(K,)``, ``(K,)``.
    """
    Wk = np.asarray(W[:, 0], np.float32)
    Cs = np.asarray(Cs, np.float64)
    Z = (Xs @ Wk.T).astype(np.float64) + np.asarray(b[:, 0], np.float64)  # (n, K)
    yk = (np.asarray(codes) == 1)[:, None]
    R = 0.5 * (1.0 + np.tanh(0.5 * Z)) - yk
    loss = (np.logaddexp(0.0, Z) - yk * Z).sum(axis=0)
    G = (R.T.astype(np.float32) @ Xs).astype(np.float64) * Cs[:, None]  # (K, d)
    W64 = Wk.astype(np.float64)
    if a < 1:
        G += (1 - a) * W64
    if a > 0:
        res = np.where(W64 != 0, np.abs(G + a * np.sign(W64)), np.maximum(np.abs(G) - a, 0.0)).max(axis=1)
        kkt = np.maximum(res, np.abs(R.sum(axis=0) * Cs)) / a
    else:
        kkt = np.maximum(np.abs(G).max(axis=1), np.abs(R.sum(axis=0) * Cs)) / np.maximum(np.abs(W64).max(axis=1), 1e-8)
    penalty = a * np.abs(W64).sum(axis=1) + 0.5 * (1 - a) * (W64 * W64).sum(axis=1)
    return kkt, Cs * loss + penalty


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

    Binary L1 / elastic net: the active-set Newton path of :mod:`probing_core.solvers.l1_newton` (each C
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
        kkt, obj = _binary_certificate(Xs_tr, codes_tr, Cs, a, W, b)
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


@dataclass(frozen=True)
class FoldPath:
    """One CV fold's path, reduced to what :class:`LogisticPathResult` keeps of it (K = C values, d = features)."""

    accuracy: np.ndarray  # (K,) validation accuracy
    selected: np.ndarray  # (K, d) bool: non-zero coefficient (any class)
    converged: np.ndarray  # (K,) bool


def _fold_path(Xtr: np.ndarray, codes_tr: np.ndarray, n_classes: int, Cs: np.ndarray, a: float, f_tr: np.ndarray,
               f_va: np.ndarray, *, standardize: bool, tol: float, max_iter: int) -> FoldPath:
    """The path on one fold's training rows (scaled on them; each C warm-started from the previous C of this
    fold, as the main path is), scored on its validation rows."""
    Xf_s = _Scaler.fit(Xtr[f_tr], standardize).apply(Xtr)
    o = _solve_path(Xf_s[f_tr], codes_tr[f_tr], n_classes, Cs, a, tol=tol, max_iter=max_iter)
    return FoldPath(_accuracy(Xf_s[f_va], codes_tr[f_va], o.W, o.b), (o.W != 0).any(axis=1), o.kkt <= tol)


def _combine_folds(folds: Sequence[FoldPath]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cv_accuracy, cv_selection_frequency, cv_converged)`` over the folds."""
    return (np.mean([f.accuracy for f in folds], axis=0), np.mean([f.selected for f in folds], axis=0),
            np.all([f.converged for f in folds], axis=0))


def fit_cv_fold(X: np.ndarray, y: np.ndarray, *, Cs: Sequence[float] | np.ndarray, fold: int, cv: int,
                penalty: str = "l1", l1_ratio: float = 0.5, test_fraction: float = 0.3, seed: int = 0,
                standardize: bool = True, tol: float = 1e-3, max_iter: int = 1500) -> FoldPath:
    """Fold ``fold`` of the ``cv`` folds that :func:`fit_logistic_path` (same arguments, ``cv=cv``) fits: the same
    split, folds, scaling and solver, so :func:`with_cv` of all of them gives that call's CV fields exactly. The
    folds are independent: a caller may fit them on separate threads.

    Args:
        X, y, Cs, penalty, l1_ratio, test_fraction, seed, standardize, tol, max_iter: as :func:`fit_logistic_path`.
        fold: which fold, ``0 <= fold < cv``. cv: the number of folds (>= 2).

    Returns:
        :class:`FoldPath`.

    Raises:
        ProbeError / LabelError: as :func:`fit_logistic_path`.
    """
    a = _l1_weight(penalty, l1_ratio)
    if not 2 <= cv or not 0 <= fold < cv:
        raise ProbeError(f"fold {fold} of {cv} CV folds does not exist; use 0 <= fold < cv and cv >= 2.")
    Xf, codes, classes = validate_xy(X, y, min_per_class=max(2, cv))
    tr, _ = stratified_split(codes, test_fraction=test_fraction, seed=seed)
    f_tr, f_va = stratified_kfold(codes[tr], k=cv, seed=seed)[fold]
    return _fold_path(Xf[tr], codes[tr], classes.size, np.sort(check_Cs(Cs)), a, f_tr, f_va, standardize=standardize,
                      tol=tol, max_iter=max_iter)


def with_cv(path: LogisticPathResult, folds: Sequence[FoldPath]) -> LogisticPathResult:
    """``path`` (fitted without CV) with the CV fields of ``folds`` (:func:`fit_cv_fold`, every fold once)."""
    acc, sel, conv = _combine_folds(folds)
    return replace(path, cv_accuracy=acc, cv_selection_frequency=sel, cv_converged=conv)


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
    Cs_arr = np.sort(check_Cs(Cs)) if Cs is not None else default_Cs(Xf, codes, standardize=standardize)
    tr, te = stratified_split(codes, test_fraction=test_fraction, seed=seed)
    scaler = _Scaler.fit(Xf[tr], standardize)
    Xs = scaler.apply(Xf)
    out = _solve_path(Xs[tr], codes[tr], classes.size, Cs_arr, a, tol=tol, max_iter=max_iter)
    nz = (out.W != 0).any(axis=1)  # (K, d)
    cv_acc = cv_sel = cv_conv = None
    if cv:
        cv_acc, cv_sel, cv_conv = _combine_folds([_fold_path(Xf[tr], codes[tr], classes.size, Cs_arr, a, f_tr, f_va,
                                                             standardize=standardize, tol=tol, max_iter=max_iter)
                                                  for f_tr, f_va in stratified_kfold(codes[tr], k=cv, seed=seed)])
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
    C_arr = check_Cs(C)[:1]
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

    def set_params(self, **params: object) -> LogisticProbe:
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def fit(self, X: np.ndarray, y: np.ndarray) -> LogisticProbe:
        a = _l1_weight(self.penalty, self.l1_ratio)
        C = check_Cs(self.C)[:1]
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
