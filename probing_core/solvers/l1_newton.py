"""Binary L1 / elastic-net logistic path by an active-set (orthant-wise) Newton method.

Same objective as :mod:`probing_core.solvers.logistic_path` (scikit-learn's scaling, unpenalized intercept)::

    F(w, b) = C * sum_i log(1 + exp(-s_i (x_i w + b)))  +  a * ||w||_1  +  (1 - a) / 2 * ||w||^2

(s_i = ±1 the label.)

Why not the batched FISTA of ``logistic.py`` here (``benchmarks/bench_sparse.py``): a
first-order method needs 50–300 passes over the data per C to reach a KKT residual of 1e-3, and
at n ≤ 500 its many small torch operations cost more than liblinear's whole sweep. A sparse
probe has few non-zero neurons (at most about one per training sample), so a Newton step on
them is cheap, and along an ascending C path the solution at the previous C is an excellent
start: each C then takes 2–6 Newton steps.

One step at a given C:

1. one full-width gradient ``C X^T r`` gives every neuron's KKT residual — the exact
   convergence check (nothing is ever screened out without it);
2. the working set is the current support plus the worst KKT violators (at least 16, at most
   a fifth of the support more, never more than the samples can carry), each entering with
   the sign that lowers ``F`` — a working set grown this way needs no separate screening rule;
3. a Newton direction for the smooth problem on that working set with those signs fixed
   (Gram of the working set in float32, Cholesky in float64; a float64 Gram and a
   Levenberg–Marquardt damping where the neurons are strongly correlated);
4. a backtracking line search on the true objective, projecting onto the orthant: a
   coefficient that would change sign is set to exactly zero and leaves the support.

A C that has not reached the tolerance after ``max_newton`` steps (or whose line search
fails) is returned with its residual; :func:`probing_core.solvers.logistic_path._solve_path` recomputes every
certificate on the returned coefficients and finishes such a C with its FISTA solver.
Nothing here imports streamlit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from probing_core.threads import single_threaded

__all__ = ["L1PathSolution", "newton_l1_path"]


@dataclass(frozen=True)
class L1PathSolution:
    """Coefficients and certificates of a binary path. K = number of C values, d = features."""

    W: np.ndarray  # (K, 1, d) float32, standardized units
    b: np.ndarray  # (K, 1) float32
    kkt: np.ndarray  # (K,) relative KKT residual (units of the L1 weight a)
    n_iter: np.ndarray  # (K,) Newton steps
    objective: np.ndarray  # (K,) F at the returned point


def _kkt_residual(w: np.ndarray, G: np.ndarray, gb: float, a: float) -> float:
    """The relative KKT residual of ``logistic._kkt`` for one binary probe.

    w ``(d,)``; G ``(d,)`` gradient of the smooth part including the ridge term ``(1 - a) w``.
    """
    s = np.where(w != 0, np.abs(G + a * np.sign(w)), np.maximum(np.abs(G) - a, 0.0))
    return max(float(s.max()) if s.size else 0.0, abs(gb)) / a


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _solve_one_C(
    XT: np.ndarray,
    y: np.ndarray,
    C: float,
    a: float,
    w: np.ndarray,
    b: float,
    *,
    tol: float,
    max_newton: int,
    min_add: int = 16,
    grow: float = 0.2,
) -> tuple[np.ndarray, float, float, int, float]:
    """Active-set Newton at one C from ``(w, b)``.

    A step adds at most ``max(min_add, grow * support)`` violators, and never more than there
    are samples left to support them: adding every violator (hundreds, from a cold start at a
    weak penalty) makes most of them flip sign and leave again, with a Hessian of all of them
    computed in between — cold fits at a weak penalty were 3–4× slower that way on the
    benchmark's data.

    XT ``(d, n)`` float32 (features as rows, so a working set is a contiguous gather);
    y ``(n,)`` float64 in {0, 1}; w ``(d,)`` float64 (not modified).
    Returns ``(w, b, kkt, steps, objective)``.
    """
    d, n = XT.shape
    rho = 1.0 - a
    w = w.copy()
    S0 = np.flatnonzero(w)
    z = (w[S0] @ XT[S0].astype(np.float64) if S0.size else np.zeros(n)) + b

    def objective(z: np.ndarray, wS: np.ndarray) -> float:
        f = C * float((_softplus(z) - y * z).sum()) + a * float(np.abs(wS).sum())
        return f + 0.5 * rho * float(wS @ wS) if rho > 0 else f

    F = objective(z, w[S0])
    kkt = float("inf")
    damp = 0.0  # Levenberg-Marquardt damping, relative to the mean curvature (see the line search)
    steps = 0
    for steps in range(max_newton + 1):
        p = _sigmoid(z)
        r = p - y
        # The exact check: every neuron's gradient (one float32 GEMV over the whole width).
        G = C * (XT @ r.astype(np.float32)).astype(np.float64)
        if rho > 0:
            G += rho * w
        gb = C * float(r.sum())
        kkt = _kkt_residual(w, G, gb, a)
        if kkt <= tol or steps == max_newton:
            break
        nz = np.flatnonzero(w)
        excess = np.abs(G) - a
        excess[nz] = 0.0
        viol = np.flatnonzero(excess > 0)
        k_add = min(viol.size, max(min_add, int(grow * nz.size)), max(min_add, n - nz.size))
        add = viol[np.argpartition(-excess[viol], k_add - 1)[:k_add]] if 0 < k_add < viol.size else viol
        S = np.concatenate([nz, add])
        s = S.size
        theta = np.sign(w[S])
        theta[nz.size:] = -np.sign(G[add])
        XS32 = XT[S]  # (s, n)
        XS = XS32.astype(np.float64)
        # Gradient and Hessian of the smooth problem on S with the signs fixed (+ intercept).
        g = np.empty(s + 1)
        g[:s] = G[S] + a * theta
        g[s] = gb
        D = C * p * (1.0 - p)
        H = np.empty((s + 1, s + 1))
        H[:s, s] = H[s, :s] = XS @ D
        H[s, s] = D.sum()
        diag = np.arange(s + 1)
        step = None
        # The Gram part in float32 first (half the time of float64, the bulk of a step at a
        # wide support) with a ridge of 1e-6 of the mean curvature, as float32 sums are only
        # PSD to about that precision. A small ridge keeps H positive definite when the support
        # outgrows the samples (the problem is then not strictly convex); the line search absorbs
        # the difference. If that factorization fails (strongly correlated neurons), redo the Gram
        # in float64 with a far smaller ridge.
        for exact in (False, True):
            if exact:
                XD64 = XS * np.sqrt(D)
                H[:s, :s] = XD64 @ XD64.T
            else:
                XD = XS32 * np.sqrt(D).astype(np.float32)
                H[:s, :s] = XD @ XD.T
            if rho > 0:
                H[diag[:s], diag[:s]] += rho
            mu = max(damp, 1e-10 if exact else 1e-6) * float(np.trace(H)) / (s + 1) + 1e-12
            for _ in range(3 if exact else 1):
                Hm = H.copy()
                Hm[diag, diag] += mu
                c, info = lapack.dpotrf(Hm, lower=0, clean=0, overwrite_a=1)
                if info == 0:
                    step = -lapack.dpotrs(c, g, lower=0)[0]
                    break
                mu *= 1000.0
            if step is not None:
                break
        if step is None:
            break  # the caller's FISTA finishes this C
        dw, db = step[:s], float(step[s])
        wS = w[S]
        dz = dw @ XS + db
        t = 1.0
        accepted = False
        for halvings in range(40):
            w_new = wS + t * dw
            flip = np.sign(w_new) != theta
            w_new[flip] = 0.0
            b_new = b + t * db
            z_new = (w_new @ XS + b_new) if flip.any() else z + t * dz
            F_new = objective(z_new, w_new)
            # Armijo with the orthant-restricted gradient (OWL-QN's condition).
            decrease = float(g[:s] @ (w_new - wS)) + gb * (b_new - b)
            if F_new <= F + 1e-4 * min(decrease, 0.0):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            break
        # Strongly correlated neurons leave nearly flat directions in H, along which the Newton
        # step overshoots by orders of magnitude (many halvings, many sign flips); damp the next
        # steps then, and relax again once full steps are accepted.
        if halvings >= 3:
            damp = max(10.0 * damp, 1e-4)
        elif halvings == 0:
            damp = damp / 10.0 if damp > 1e-6 else 0.0
        w[S] = w_new
        b, z, F = b_new, z_new, F_new
    return w, b, kkt, steps, F


def newton_l1_path(
    Xs: np.ndarray,
    y: np.ndarray,
    Cs: np.ndarray,
    a: float,
    *,
    tol: float,
    W0: np.ndarray | None = None,
    b0: np.ndarray | None = None,
    max_newton: int = 100,
) -> L1PathSolution:
    """Binary L1 (``a = 1``) or elastic-net (``0 < a < 1``) logistic probes along a C path.

    The C values are solved in the given order, each warm-started from the previous solution
    (or from ``W0``/``b0``), so pass them ascending.

    Args:
        Xs: ``(n, d)`` float32 standardized training features.
        y: ``(n,)`` labels in {0, 1}.
        Cs: ``(K,)`` C values (C = 1/λ).
        a: L1 weight in (0, 1].
        tol: KKT tolerance (relative to ``a``, as in :mod:`probing_core.solvers.logistic_path`).
        W0: ``(1, 1, d)`` or ``(K, 1, d)`` warm start; b0 likewise ``(1, 1)`` / ``(K, 1)``.
            Without them the first C starts from zero coefficients and the log-odds intercept.
        max_newton: Newton steps per C before it is handed back unconverged.

    Returns:
        :class:`L1PathSolution`; entries with ``kkt > tol`` did not converge here.
    """
    if not 0.0 < a <= 1.0:
        raise ValueError(f"newton_l1_path needs an L1 weight in (0, 1]; got {a}")
    Xs = np.asarray(Xs, dtype=np.float32)
    XT = np.ascontiguousarray(Xs.T)  # (d, n): a working set is then a row gather
    yf = np.asarray(y, dtype=np.float64)
    n, d = Xs.shape
    K = len(Cs)
    W = np.zeros((K, 1, d), np.float32)
    B = np.zeros((K, 1), np.float32)
    kkt = np.zeros(K)
    its = np.zeros(K, np.int64)
    obj = np.zeros(K)
    prior = min(max(float(yf.mean()), 1e-6), 1 - 1e-6)
    w = np.zeros(d)
    b = float(np.log(prior / (1 - prior)))
    # One BLAS thread: on the shared 2-core box, two spinning OpenBLAS threads made the path
    # 2-3x slower (wall clock) whenever anything else was running (see probing_core.threads).
    with single_threaded():
        for k, C in enumerate(np.asarray(Cs, dtype=np.float64)):
            if W0 is not None:
                w = np.asarray(W0[k if W0.shape[0] == K else 0, 0], dtype=np.float64)
                if b0 is not None:
                    b = float(b0[k if b0.shape[0] == K else 0, 0])
            w, b, kkt[k], its[k], obj[k] = _solve_one_C(XT, yf, float(C), a, w, b, tol=tol, max_newton=max_newton)
            W[k, 0] = w
            B[k, 0] = b
    return L1PathSolution(W, B, kkt, its, obj)
