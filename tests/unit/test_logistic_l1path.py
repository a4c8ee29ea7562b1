"""The active-set Newton L1 path (probing_core.solvers.l1_newton) against scikit-learn's liblinear.

Real data: MLP neurons (``blocks.3.mlp.hook_post``, 1,536 wide) of the embedded model on the
pydoc corpus, label = "the next token starts a new word" — fewer samples than neurons, the
regime where the working set and its KKT check matter. Plus planted data for the cold start at a
weak penalty and for the FISTA hand-over of a C that Newton leaves unconverged.
"""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from probing_core.solvers.l1_newton import newton_l1_path
from probing_core.solvers.logistic_path import _Scaler, _solve_path, default_Cs, fit_logistic_path
from tests.conftest import mlp_next_word_rows

HOOK = "blocks.3.mlp.hook_post"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def real_mlp(embedded_model, pydoc_dataset, tmp_path_factory):
    """``(X (n, 1536) float32, y (n,))`` from a real forward pass of the embedded model."""
    X, y = mlp_next_word_rows(embedded_model, pydoc_dataset, tmp_path_factory.mktemp("l1-store"), HOOK, 800)
    assert X.shape[0] < X.shape[1] and 0.2 < y.mean() < 0.8, (X.shape, y.mean())
    return X, y


def _liblinear(Xs: np.ndarray, y: np.ndarray, C: float) -> LogisticRegression:
    # A large intercept_scaling makes liblinear's intercept penalty negligible (ours is unpenalized).
    return LogisticRegression(solver="liblinear", l1_ratio=1.0, C=C, tol=1e-7, intercept_scaling=100,
                              max_iter=100_000).fit(Xs, y)


def _objective(Xs: np.ndarray, y: np.ndarray, C: float, w: np.ndarray, b: float) -> float:
    z = Xs.astype(np.float64) @ w.astype(np.float64) + b
    return C * float(np.sum(np.logaddexp(0.0, z) - y * z)) + float(np.abs(w).sum())


def test_newton_path_matches_liblinear_on_real_mlp_neurons(real_mlp):
    X, y = real_mlp
    path = fit_logistic_path(X, y, Cs=default_Cs(X, y, n=17), penalty="l1", seed=0)
    assert path.converged.all(), path.kkt_residual
    Xs = (X - path.mean) / path.scale
    tr, te = path.train_idx, path.test_idx
    assert np.all(np.diff(path.n_nonzero) >= -2)  # sparsity grows along the path (up to ties)
    for k in range(2, 17, 2):
        C = float(path.Cs[k])
        sk = _liblinear(Xs[tr], y[tr], C)
        ours, ref = path.coefs[k, 0], sk.coef_[0]
        # Screening / the working set never drops a neuron that is clearly non-zero at the optimum.
        big = np.abs(ref) > 1e-3 * max(np.abs(ref).max(), 1e-12)
        assert np.all(ours[big] != 0), (k, np.flatnonzero(big & (ours == 0)))
        a, b = set(np.flatnonzero(ours)), set(np.flatnonzero(ref))
        if a | b:
            assert len(a & b) / len(a | b) >= 0.9, (k, len(a), len(b), len(a & b))
        # Same problem: our objective is no worse than liblinear's optimum (tiny slack for its
        # intercept penalty), and the test accuracy agrees within a point.
        f_ours = _objective(Xs[tr], y[tr], C, ours, float(path.intercepts[k, 0]))
        f_sk = _objective(Xs[tr], y[tr], C, ref, float(sk.intercept_[0]))
        assert f_ours <= f_sk * (1 + 1e-5) + 1e-6, (k, f_ours, f_sk)
        if path.n_nonzero[k] >= 3:
            assert abs(sk.score(Xs[te], y[te]) - path.test_accuracy[k]) <= 0.01 + 1e-9


def test_cold_start_at_a_weak_penalty_matches_liblinear(real_mlp):
    # One C far above the first entering neuron, from zero: the violator cap must still find
    # the whole support (hundreds of neurons, more than half the training samples).
    X, y = real_mlp
    C = float(default_Cs(X, y, n=2, decades=2.5)[-1])
    r = fit_logistic_path(X, y, Cs=[C], seed=0)
    assert r.converged[0], r.kkt_residual
    Xs = (X - r.mean) / r.scale
    sk = _liblinear(Xs[r.train_idx], y[r.train_idx], C)
    f_ours = _objective(Xs[r.train_idx], y[r.train_idx], C, r.coefs[0, 0], float(r.intercepts[0, 0]))
    f_sk = _objective(Xs[r.train_idx], y[r.train_idx], C, sk.coef_[0], float(sk.intercept_[0]))
    assert f_ours <= f_sk * (1 + 1e-5) + 1e-6, (f_ours, f_sk)
    big = np.abs(sk.coef_[0]) > 1e-3 * np.abs(sk.coef_).max()
    assert np.all(r.coefs[0, 0][big] != 0)
    assert r.n_nonzero[0] > 50


def _planted(n: int = 300, d: int = 800, seed: int = 3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X = np.maximum(X, -0.17 * np.abs(X))
    w = np.zeros(d)
    w[:10] = rng.choice([-1.0, 1.0], 10) * rng.uniform(1.0, 2.0, 10)
    y = (((X - X.mean(0)) / X.std(0)) @ w + rng.logistic(size=n) > 0).astype(int)
    return X, y


def test_newton_reports_unconverged_points_and_fista_finishes_them():
    X, y = _planted()
    Xs = _Scaler.fit(X, True).apply(X)
    Cs = default_Cs(X, y, n=9)
    # Newton alone with one step per C: honest residuals, most of them above the tolerance.
    short = newton_l1_path(Xs, y, Cs, 1.0, tol=1e-3, max_newton=1)
    assert (short.kkt > 1e-3).sum() >= 3, short.kkt
    assert np.all(short.n_iter <= 1)
    # The solver hands those to FISTA, which certifies them at the same optimum.
    handed = _solve_path(Xs, y, 2, Cs, 1.0, tol=1e-3, max_iter=3000, max_newton=1)
    full = _solve_path(Xs, y, 2, Cs, 1.0, tol=1e-3, max_iter=3000)
    assert np.all(handed.kkt <= 1e-3) and np.all(full.kkt <= 1e-3)
    open_ = short.kkt > 1e-3
    assert np.all(handed.n_iter[open_] > short.n_iter[open_])  # FISTA iterations were added there
    np.testing.assert_allclose(handed.objective, full.objective, rtol=1e-4)


def test_reported_kkt_is_recomputed_on_the_returned_coefficients():
    X, y = _planted(seed=4)
    Xs = _Scaler.fit(X, True).apply(X)
    Cs = default_Cs(X, y, n=5)
    out = _solve_path(Xs, y, 2, Cs, 1.0, tol=1e-3, max_iter=3000)
    for k, C in enumerate(Cs):
        w, b = out.W[k, 0].astype(np.float64), float(out.b[k, 0])
        r = 1 / (1 + np.exp(-(Xs @ w + b))) - y
        G = C * (Xs.T.astype(np.float64) @ r)
        res = np.where(w != 0, np.abs(G + np.sign(w)), np.maximum(np.abs(G) - 1, 0))
        kkt = max(res.max(), abs(C * r.sum()))
        assert kkt <= 1e-3 * 1.01 and abs(kkt - out.kkt[k]) <= 1e-4, (k, kkt, out.kkt[k])


def test_elastic_net_newton_path_matches_sklearn_saga():
    import warnings

    X, y = _planted(n=300, d=60, seed=5)
    r = fit_logistic_path(X, y, Cs=[0.02, 0.1], penalty="elasticnet", l1_ratio=0.7, tol=1e-4)
    assert r.converged.all()
    Xs = (X - r.mean) / r.scale
    tr = r.train_idx
    for k, C in enumerate(r.Cs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sk = LogisticRegression(solver="saga", l1_ratio=0.7, C=float(C), tol=1e-7, max_iter=10_000).fit(Xs[tr], y[tr])
        np.testing.assert_allclose(r.coefs[k, 0], sk.coef_[0], atol=5e-3)
