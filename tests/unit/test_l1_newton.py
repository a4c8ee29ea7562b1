"""The proximal Newton L1 path (probing_core.solvers.l1_newton, issue 16): its inner solver, its KKT
certificate, its working set, and the CV folds run as separate jobs.

Real data: MLP neurons (``blocks.3.mlp.hook_post``, 1,536 wide) of the embedded model on pydoc text,
label = "the next token starts a new word"; the path runs to 2.5 decades above the first entering
neuron, where the support grows to a large share of the training rows (the regime of the Sparse
page's " the" vs " a", where the previous solver took up to 26 Newton steps per C).
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression

from probing_core.errors import ProbeError
from probing_core.solvers import l1_newton
from probing_core.solvers.l1_newton import _chol, _l1_qp, _subset_solve, newton_l1_path
from probing_core.solvers.logistic_path import (
    _Scaler,
    _solve_path,
    default_Cs,
    fit_cv_fold,
    fit_logistic_path,
    with_cv,
)
from probing_core.solvers.splits import stratified_split
from tests.conftest import mlp_next_word_rows

HOOK = "blocks.3.mlp.hook_post"

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def neurons(embedded_model, pydoc_dataset, tmp_path_factory):
    """``(Xs, y, Cs)``: standardized training rows of real MLP neurons (n < d) and a 17-C grid over 2.5 decades."""
    X, y = mlp_next_word_rows(embedded_model, pydoc_dataset, tmp_path_factory.mktemp("l1-newton-store"), HOOK, 1200)
    tr, _ = stratified_split(y, test_fraction=0.3, seed=0)
    Xs = _Scaler.fit(X[tr], True).apply(X[tr])
    assert Xs.shape[0] < Xs.shape[1], Xs.shape
    return Xs, y[tr], default_Cs(X[tr], y[tr], n=17, decades=2.5)


def _kkt64(Xs: np.ndarray, y: np.ndarray, C: float, w: np.ndarray, b: float) -> float:
    """The relative KKT residual of an L1 logistic fit, recomputed independently in float64."""
    X64, w64 = Xs.astype(np.float64), w.astype(np.float64)
    r = 1 / (1 + np.exp(-(X64 @ w64 + b))) - y
    G = C * (X64.T @ r)
    res = np.where(w64 != 0, np.abs(G + np.sign(w64)), np.maximum(np.abs(G) - 1, 0))
    return float(max(res.max(), abs(C * r.sum())))


def _objective(Xs: np.ndarray, y: np.ndarray, C: float, w: np.ndarray, b: float) -> float:
    z = Xs.astype(np.float64) @ w.astype(np.float64) + b
    return C * float(np.sum(np.logaddexp(0.0, z) - y * z)) + float(np.abs(w).sum())


def test_a_subset_solve_from_the_whole_factor_equals_a_new_factorization():
    """_subset_solve (the whole set's Cholesky factor reused for a principal block) against numpy's solve of that
    block, with 1, 7 and 30 of 121 indices left out."""
    rng = np.random.default_rng(1)
    A = rng.standard_normal((300, 121))
    H = A.T @ A
    c, mu = _chol(H, 1e-8)
    assert mu == 1e-8
    for n_out in (1, 7, 30):
        out = np.sort(rng.choice(120, n_out, replace=False))
        keep = np.setdiff1d(np.arange(121), out)
        rhs = rng.standard_normal(keep.size)
        want = np.linalg.solve(H[np.ix_(keep, keep)] + 1e-8 * np.eye(keep.size), rhs)
        np.testing.assert_allclose(_subset_solve(c, keep, out, rhs), want, rtol=1e-9, atol=1e-12)


def test_the_inner_solver_gives_the_same_step_with_and_without_the_reused_factor(monkeypatch):
    """The factor reuse changes how a step is solved, not the step: _l1_qp on a model where coefficients leave the
    free set (every coefficient non-zero at the start, some at zero in the model's minimizer) gives the same step
    either way."""
    rng = np.random.default_rng(2)
    s = 80
    A = rng.standard_normal((200, s + 1))
    H = A.T @ A
    wS = rng.standard_normal(s)
    g = A.T @ rng.standard_normal(200) * 5
    calls = []
    real = l1_newton._subset_solve

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(l1_newton, "_subset_solve", counted)  # counts the real function's calls
    reused, it1 = _l1_qp(H, g, wS, 20.0, eps=1e-6, mu=1e-8)  # 9-11 of 80 end at zero (eps above rounding: g is ~100)
    assert calls, "no subset was solved from the whole factor: the case does not test the reuse"
    monkeypatch.setattr(l1_newton, "_SUBSET_REUSE", -1.0)  # every subset factorized anew, as before
    fresh, it2 = _l1_qp(H, g, wS, 20.0, eps=1e-6, mu=1e-8)
    assert int((wS + fresh[:s] == 0).sum()) > 0
    assert it1 == it2
    np.testing.assert_allclose(reused, fresh, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("rank", [60, 25])
def test_the_inner_solver_minimizes_the_l1_quadratic_model(rank):
    """_l1_qp against a general-purpose solver (L-BFGS-B on the split w = u - v, u, v >= 0) on a random model with an
    unpenalized last coordinate, with a full-rank Hessian and with a singular one (more coefficients than rows behind
    it), at the ridge the path solver gives it (1e-6 of the mean curvature)."""
    rng = np.random.default_rng(0)
    s, a = 40, 1.0
    A = rng.standard_normal((rank, s + 1))
    H = A.T @ A
    wS = np.where(rng.random(s) < 0.5, rng.standard_normal(s), 0.0)
    g = A.T @ rng.standard_normal(rank) * 3.0  # in the range of H, as a logistic gradient is: bounded below

    def model(d: np.ndarray) -> float:
        return float(g @ d + 0.5 * d @ H @ d + a * np.abs(wS + d[:s]).sum())

    d, iters = _l1_qp(H, g, wS, a, eps=1e-9, mu=1e-6 * np.trace(H) / (s + 1))
    assert iters < 50
    # The model's KKT conditions hold at the returned step.
    q = g + H @ d
    v = wS + d[:s]
    res = np.where(v != 0, np.abs(q[:s] + a * np.sign(v)), np.maximum(np.abs(q[:s]) - a, 0))
    assert res.max() <= 1e-6 and abs(q[s]) <= 1e-6, (res.max(), q[s])

    def split(x: np.ndarray) -> tuple[float, np.ndarray]:
        u, vv, db = x[:s], x[s:2 * s], x[2 * s]
        dd = np.append(u - vv - wS, db)
        grad_d = g + H @ dd
        f = float(g @ dd + 0.5 * dd @ H @ dd + a * (u + vv).sum())
        return f, np.concatenate([grad_d[:s] + a, -grad_d[:s] + a, grad_d[s:]])

    x0 = np.concatenate([np.maximum(wS, 0), np.maximum(-wS, 0), [0.0]])
    ref = minimize(split, x0, jac=True, method="L-BFGS-B", bounds=[(0, None)] * (2 * s) + [(None, None)],
                   options={"maxiter": 20_000, "ftol": 1e-15, "gtol": 1e-12})
    assert model(d) <= ref.fun + 1e-7 * max(1.0, abs(ref.fun)), (model(d), ref.fun)


def test_newton_path_certifies_every_C_on_real_neurons_in_few_steps(neurons):
    """Every C of a path that runs deep into the weak-penalty end converges by Newton alone (no FISTA hand-over),
    in a few steps per C, and the KKT residual recomputed here in float64 is within the tolerance."""
    Xs, y, Cs = neurons
    sol = newton_l1_path(Xs, y, Cs, 1.0, tol=1e-3)
    assert np.all(sol.kkt <= 1e-3), sol.kkt
    assert sol.n_iter.max() <= 8, sol.n_iter  # the previous one-step-per-Hessian solver: up to 26 (83 in CV folds)
    nnz = (sol.W[:, 0] != 0).sum(axis=1)
    assert nnz[-1] > 0.3 * Xs.shape[0], nnz  # the weak end: hundreds of neurons, a large share of the rows
    for k in range(0, len(Cs), 4):
        kkt = _kkt64(Xs, y, float(Cs[k]), sol.W[k, 0], float(sol.b[k, 0]))
        assert kkt <= 1e-3 * 1.01 and abs(kkt - sol.kkt[k]) <= 2e-4, (k, kkt, sol.kkt[k])


def test_newton_path_matches_liblinear_at_the_weak_end(neurons):
    """Against scikit-learn's liblinear at a tight tolerance, where the support is largest: our objective is no worse
    than its optimum, and every neuron it keeps clearly non-zero is non-zero here (and vice versa)."""
    Xs, y, Cs = neurons
    sol = newton_l1_path(Xs, y, Cs, 1.0, tol=1e-3)
    for k in (len(Cs) // 2, len(Cs) - 1):
        C = float(Cs[k])
        sk = LogisticRegression(solver="liblinear", l1_ratio=1.0, C=C, tol=1e-8, intercept_scaling=1000,
                                max_iter=100_000).fit(Xs, y)
        ours, ref = sol.W[k, 0].astype(np.float64), sk.coef_[0]
        f_ours, f_sk = _objective(Xs, y, C, ours, float(sol.b[k, 0])), _objective(Xs, y, C, ref, float(sk.intercept_[0]))
        assert f_ours <= f_sk * (1 + 1e-5) + 1e-6, (k, f_ours, f_sk)
        for u, v in ((ours, ref), (ref, ours)):
            big = np.abs(u) > 1e-2 * np.abs(u).max()
            assert np.all(v[big] != 0), (k, np.flatnonzero(big & (v == 0)))
        assert np.mean((Xs @ ours + sol.b[k, 0] > 0) == sk.predict(Xs)) >= 0.99


def test_the_working_set_gives_what_every_violator_at_once_gives(neurons):
    """The working set (at most a fifth more than the support per step) is a speed device only: letting every KKT
    violator into every step (no cap) reaches the same optimum and the same clearly non-zero neurons."""
    Xs, y, Cs = neurons
    capped = newton_l1_path(Xs, y, Cs, 1.0, tol=1e-4)
    every = newton_l1_path(Xs, y, Cs, 1.0, tol=1e-4, min_add=Xs.shape[1])
    assert np.all(capped.kkt <= 1e-4) and np.all(every.kkt <= 1e-4)
    np.testing.assert_allclose(capped.objective, every.objective, rtol=1e-6)
    for k in range(len(Cs)):
        a, b = capped.W[k, 0], every.W[k, 0]
        big = np.maximum(np.abs(a), np.abs(b)) > 1e-2 * max(np.abs(a).max(), 1e-12)
        assert np.all((a[big] != 0) & (b[big] != 0) & (np.sign(a[big]) == np.sign(b[big]))), k


def test_cv_folds_as_separate_jobs_equal_the_cv_of_one_call(neurons):
    """fit_cv_fold for each fold, joined by with_cv, gives fit_logistic_path(cv=3)'s CV fields exactly (the page fits
    the folds on separate threads), and each fold's path is the same whichever order the folds run in."""
    Xs, y, _ = neurons
    X, yy = Xs[:500], y[:500]
    grid = default_Cs(X, yy, n=9)
    one = fit_logistic_path(X, yy, Cs=grid, cv=3)
    folds = [fit_cv_fold(X, yy, Cs=grid, fold=i, cv=3) for i in (2, 0, 1)]
    joined = with_cv(fit_logistic_path(X, yy, Cs=grid), [folds[1], folds[2], folds[0]])
    assert np.array_equal(joined.cv_accuracy, one.cv_accuracy)
    assert np.array_equal(joined.cv_selection_frequency, one.cv_selection_frequency)
    assert np.array_equal(joined.cv_converged, one.cv_converged)
    assert np.array_equal(joined.coefs, one.coefs)
    with pytest.raises(ProbeError, match="fold 3 of 3"):
        fit_cv_fold(X, yy, Cs=grid, fold=3, cv=3)


def test_fista_still_finishes_what_newton_leaves_open(neurons):
    """With one Newton step per C the path is handed to FISTA, which certifies the same optimum."""
    Xs, y, Cs = neurons
    X, yy, grid = Xs[:400], y[:400], Cs[:9]
    short = newton_l1_path(X, yy, grid, 1.0, tol=1e-3, max_newton=1)
    assert (short.kkt > 1e-3).sum() >= 3, short.kkt
    handed = _solve_path(X, yy, 2, grid, 1.0, tol=1e-3, max_iter=3000, max_newton=1)
    full = _solve_path(X, yy, 2, grid, 1.0, tol=1e-3, max_iter=3000)
    assert np.all(handed.kkt <= 1e-3) and np.all(full.kkt <= 1e-3)
    np.testing.assert_allclose(handed.objective, full.objective, rtol=1e-4)
