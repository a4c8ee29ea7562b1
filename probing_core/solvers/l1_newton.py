"""Binary L1 / elastic-net logistic path by a proximal Newton method on a working set.

Same objective as :mod:`probing_core.solvers.logistic_path` (scikit-learn's scaling, unpenalized intercept)::

    F(w, b) = C * sum_i log(1 + exp(-s_i (x_i w + b)))  +  a * ||w||_1  +  (1 - a) / 2 * ||w||^2

(s_i = ±1 the label.)

Why not the batched FISTA of ``logistic_path.py`` here (``benchmarks/bench_sparse.py``): a
first-order method needs 50–300 passes over the data per C to reach a KKT residual of 1e-3, and
at n ≤ 500 its many small torch operations cost more than liblinear's whole sweep. A sparse
probe has few non-zero neurons (at most about one per training sample), so a Newton step on
them is cheap, and along an ascending C path the solution at the previous C is an excellent
start: each C then takes 1–4 Newton steps (at most 6 on the Sparse page's data).

One (outer) step at a given C — the structure of liblinear's newGLMNET (Yuan, Ho & Lin 2012),
with a different inner solver:

1. one full-width gradient ``C X^T r`` gives every neuron's KKT residual — the exact
   convergence check (nothing is ever screened out without it);
2. the working set S is the current support plus the worst KKT violators (at least 16, at most
   a fifth of the support more, never more than the samples can carry) — a working set grown
   this way needs no separate screening rule;
3. the Hessian of the smooth part on S (Gram of the working set in float32, a float64 Gram
   where that is not positive definite) and the gradient give a quadratic model of F on S;
4. the L1-penalized quadratic model is minimized on S (:func:`_l1_qp`: sign-fixed Newton steps
   on the model, projected onto the orthant, until the model's own KKT residual is small) —
   the step settles which coefficients are zero, which enter and with what sign, all on the one
   Hessian, so the outer loop needs few Hessians (each costs ``|S|² n``);
5. a backtracking line search on the true objective along that step (Armijo with the
   predicted decrease of Tseng & Yun 2009).

The previous version took one projected Newton step per Hessian: with hundreds of neurons
near the weak end of a path, each step flipped the signs of tens of them, and a C took up to
26 Hessians on the full training split and up to 83 in a CV fold (" the" vs " a", 910 contexts,
``docs/sparse.md``); now 1–6.

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


def _chol(H: np.ndarray, mu: float) -> tuple[np.ndarray, float] | None:
    """Cholesky factor of ``H + mu I`` and the ``mu`` used, raising ``mu`` 1000-fold (three times) where that is
    not positive definite; None if it never is."""
    diag = np.arange(H.shape[0])
    for _ in range(4):
        Hm = H.copy()
        Hm[diag, diag] += mu
        c, info = lapack.dpotrf(Hm, lower=0, clean=0, overwrite_a=1)
        if info == 0:
            return c, mu
        mu *= 1000.0
    return None


def _chol_solve(H: np.ndarray, rhs: np.ndarray, mu: float) -> np.ndarray | None:
    """``(H + mu I)^-1 rhs`` by Cholesky, raising ``mu`` 1000-fold (three times) where H is not positive definite."""
    f = _chol(H, mu)
    return None if f is None else lapack.dpotrs(f[0], rhs, lower=0)[0]


#: A subset solve reuses the whole set's factor while at most this fraction of the set is left out
#: (then ``1 + |out|`` triangular solves, ``2 (s+1)² (1 + |out|)`` flops, beat a new factorization).
_SUBSET_REUSE = 0.25


def _subset_solve(c: np.ndarray, keep: np.ndarray, out: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``A[keep, keep]^-1 rhs`` from the Cholesky factor ``c`` of the whole ``A`` (``keep`` and ``out`` partition
    its indices). With ``K = A^-1`` and ``y = K [rhs at keep; 0]``, the solution is ``y - K[:, out] t`` with
    ``K[out, out] t = y[out]`` (which makes it zero at ``out``): one solve with ``1 + |out|`` right-hand sides
    and an ``|out|``-sized system, no new factorization."""
    n1 = c.shape[0]
    B = np.zeros((n1, 1 + out.size))
    B[keep, 0] = rhs
    B[out, 1 + np.arange(out.size)] = 1.0
    Y = lapack.dpotrs(c, B, lower=0)[0]
    y, Kout = Y[:, 0], Y[:, 1:]
    t = np.linalg.solve(Kout[out], y[out])
    return (y - Kout @ t)[keep]


def _l1_qp(H: np.ndarray, g: np.ndarray, wS: np.ndarray, a: float, *, eps: float, mu: float,
           max_inner: int = 50) -> tuple[np.ndarray, int]:
    """Minimize the model ``m(d) = g·d + ½ dᵀ H d + a ||wS + d_w||_1`` over ``d = (d_w, d_b)``.

    H ``(s+1, s+1)`` (the last row/column is the unpenalized intercept), g ``(s+1,)``, wS ``(s,)``.
    Each iteration takes the coefficients that are non-zero or whose model gradient exceeds ``a``
    (those enter with the sign that lowers ``m``), solves the model with those signs fixed (one
    Cholesky, ``mu`` of ridge), and halves the step until ``m`` decreases, setting a coefficient
    that would change sign to exactly zero; a direction with no decrease is recomputed with a
    1000-fold ridge (at most six times). Stops when the model's KKT residual is ``<= eps``.
    Only ``(s+1)``-sized work: no pass over the samples.

    Returns ``(d, iterations)``.
    """
    s = wS.size
    d = np.zeros(s + 1)
    Hd = np.zeros(s + 1)
    v = wS.copy()  # wS + d_w
    m0 = 0.0  # m(0) without the constant a ||wS||_1, kept out of every comparison below
    l1_0 = float(np.abs(wS).sum())
    raises = 6
    whole: tuple[np.ndarray, float] | None = None  # Cholesky factor of H + mu I on every coefficient, and its mu
    it = 0
    for it in range(max_inner):
        q = g + Hd  # the model's smooth gradient at d
        qw = q[:s]
        nzv = v != 0
        res = np.where(nzv, np.abs(qw + a * np.sign(v)), np.maximum(np.abs(qw) - a, 0.0))
        if max(float(res.max()) if s else 0.0, abs(float(q[s]))) <= eps:
            break
        F = np.flatnonzero(nzv | (np.abs(qw) > a))
        theta = np.where(nzv[F], np.sign(v[F]), -np.sign(qw[F]))
        if F.size == s:  # every coefficient free (the usual first iteration): no gather; the factor is kept
            rhs = -q
            rhs[:-1] -= a * theta
            whole = _chol(H, mu)
            step = None if whole is None else lapack.dpotrs(whole[0], rhs, lower=0)[0]
        else:
            idx = np.append(F, s)
            rhs = -q[idx]
            rhs[:-1] -= a * theta
            # Reused only when the whole set's factor needed no raised mu: a principal block of a positive definite
            # H + mu I is positive definite, so a new factorization would use that same mu (same step, exactly).
            if whole is not None and whole[1] == mu and s - F.size <= _SUBSET_REUSE * (s + 1):
                step = _subset_solve(whole[0], idx, np.setdiff1d(np.arange(s), F, assume_unique=True), rhs)
            else:
                step = _chol_solve(H[np.ix_(idx, idx)], rhs, mu)
        if step is None:
            break
        vF, bF = v[F], d[s]
        t = 1.0
        for _ in range(30):
            vn = vF + t * step[:-1]
            vn[np.sign(vn) != theta] = 0.0  # would change sign: exactly zero (leaves the support)
            dn = d.copy()
            dn[F] = vn - wS[F]
            dn[s] = bF + t * step[-1]
            Hdn = H @ dn
            mn = float(g @ dn) + 0.5 * float(dn @ Hdn) + a * (float(np.abs(wS + dn[:s]).sum()) - l1_0)
            if mn < m0:
                break
            t *= 0.5
        else:
            # No decrease along this direction: where H is singular (more coefficients than the rows can tell
            # apart) a tiny ridge leaves steps of enormous length along its null space. A stronger ridge
            # shortens the step (Levenberg-Marquardt); the model's gradient, and so its minimizer, is unchanged.
            if raises == 0:
                break
            raises -= 1
            mu = max(1000.0 * mu, 1e-9 * float(np.trace(H)) / (s + 1))
            continue
        d, Hd, m0 = dn, Hdn, mn
        v = wS + d[:s]
    return d, it


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
    """Proximal Newton on a working set at one C from ``(w, b)`` (see the module docstring).

    A step adds at most ``max(min_add, grow * support)`` violators, and never more than there
    are samples left to support them: adding every violator (hundreds, from a cold start at a
    weak penalty) costs a Hessian of all of them while most never enter.

    XT ``(d, n)`` float32 (features as rows, so a working set is a contiguous gather);
    y ``(n,)`` float64 in {0, 1}; w ``(d,)`` float64 (not modified).
    Returns ``(w, b, kkt, steps, objective)``.
    """
    n = XT.shape[1]
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
        XS32 = XT[S]  # (s, n)
        XS = XS32.astype(np.float64)
        D = C * p * (1.0 - p)
        H = np.empty((s + 1, s + 1))
        H[:s, s] = H[s, :s] = XS @ D
        H[s, s] = D.sum()
        diag = np.arange(s)
        g = np.empty(s + 1)
        g[:s] = G[S]
        g[s] = gb
        wS = w[S]
        # The Gram part in float32 first (half the time of float64, the bulk of a step at a wide
        # support) with a ridge of 1e-6 of the mean curvature, as float32 sums are only PSD to
        # about that precision; a small ridge also keeps the model bounded when the support
        # outgrows the samples (the problem is then not strictly convex), and the line search
        # absorbs the difference. If that factorization fails (strongly correlated neurons), the
        # Gram is redone in float64 with a far smaller ridge.
        step = None
        for exact in (False, True):
            if exact:
                XD64 = XS * np.sqrt(D)
                H[:s, :s] = XD64 @ XD64.T
            else:
                XD = XS32 * np.sqrt(D).astype(np.float32)
                H[:s, :s] = XD @ XD.T
            if rho > 0:
                H[diag, diag] += rho
            mu = max(damp, 1e-10 if exact else 1e-6) * float(np.trace(H)) / (s + 1) + 1e-12
            step, _ = _l1_qp(H, g, wS, a, eps=max(0.3 * tol, 0.1 * kkt) * a, mu=mu)
            if np.any(step):
                break
        dw, db = step[:s], float(step[s])
        # Predicted decrease (Tseng & Yun): linear model of the smooth part plus the change of the L1 term.
        l1_S = float(np.abs(wS).sum())
        pred = float(g @ step) + a * (float(np.abs(wS + dw).sum()) - l1_S)
        if not pred < 0:
            break  # the caller's FISTA finishes this C
        dz = dw @ XS + db
        t = 1.0
        accepted = False
        for halvings in range(40):
            w_new = wS + t * dw
            F_new = objective(z + t * dz, w_new)
            if F_new <= F + 1e-4 * t * pred:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            break
        # Strongly correlated neurons leave nearly flat directions in H, along which the model's
        # minimizer overshoots by orders of magnitude (many halvings); damp the next steps then,
        # and relax again once full steps are accepted.
        if halvings >= 3:
            damp = max(10.0 * damp, 1e-4)
        elif halvings == 0:
            damp = damp / 10.0 if damp > 1e-6 else 0.0
        w[S] = w_new
        b, z, F = b + t * db, z + t * dz, F_new
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
    min_add: int = 16,
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
        min_add: violators a step may add to the working set at least (``d``: every violator, no cap).

    Returns:
        :class:`L1PathSolution`; entries with ``kkt > tol`` did not converge here.
    """
    if not 0.0 < a <= 1.0:
        raise ValueError(f"newton_l1_path needs an L1 weight in (0, 1]; got {a}")
    Xs = np.asarray(Xs, dtype=np.float32)
    XT = np.ascontiguousarray(Xs.T)  # (d, n): a working set is then a row gather
    yf = np.asarray(y, dtype=np.float64)
    d = Xs.shape[1]
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
            w, b, kkt[k], its[k], obj[k] = _solve_one_C(XT, yf, float(C), a, w, b, tol=tol, max_newton=max_newton,
                                                        min_add=min_add)
            W[k, 0] = w
            B[k, 0] = b
    return L1PathSolution(W, B, kkt, its, obj)
