"""Logistic probes: agreement with scikit-learn, planted-signal recovery, path shape, errors.

The core is a numeric solver, so these tests use planted data (no model needed): features that
look like post-GELU MLP activations, with a handful of informative neurons.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from probing_core.errors import LabelError, ProbeError
from probing_core.solvers.logistic_path import LogisticProbe, classification_report_dict, default_Cs, fit_control_task, fit_logistic_path, refit_at_C, selection_frequency
from probing_core.solvers.splits import control_labels, stratified_kfold, stratified_split
from probing_core.solvers.multiclass import fit_multiclass_all_hooks


def planted_binary(n: int = 600, d: int = 300, k: int = 6, noise: float = 0.7, seed: int = 0):
    """GELU-like skewed features; y depends on k planted neurons (returned sorted)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X = np.maximum(X, -0.17 * np.abs(X))
    idx = np.sort(rng.choice(d, k, replace=False))
    w = np.zeros(d)
    w[idx] = rng.choice([-1.0, 1.0], k) * rng.uniform(1.5, 2.5, k)
    Xs = (X - X.mean(0)) / X.std(0)
    y = (Xs @ w + noise * rng.logistic(size=n) > 0).astype(int)
    return X, y, idx


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def planted():
    return planted_binary()


@pytest.fixture(scope="module")
def path(planted):
    X, y, _ = planted
    return fit_logistic_path(X, y, Cs=default_Cs(X, y, n=17, decades=2.0), penalty="l1", seed=0, tol=1e-3)


def _sk_l1(Xs: np.ndarray, y: np.ndarray, C: float) -> LogisticRegression:
    # liblinear penalizes the intercept; a large intercept_scaling makes that penalty negligible,
    # matching our unpenalized intercept. tol=1e-6 so liblinear is truly converged.
    return LogisticRegression(solver="liblinear", l1_ratio=1.0, C=C, tol=1e-6, intercept_scaling=100,
                              max_iter=10000).fit(Xs, y)


def test_l1_path_agrees_with_liblinear(planted, path):
    X, y, _ = planted
    Xs = (X - path.mean) / path.scale
    tr, te = path.train_idx, path.test_idx
    assert path.converged.all(), path.kkt_residual
    assert len(path.Cs) == 17
    jaccards = []
    for k in range(0, 17, 2):
        sk = _sk_l1(Xs[tr], y[tr], float(path.Cs[k]))
        if path.n_nonzero[k] >= 3:
            # (With 1-2 tiny coefficients, predictions hinge on the intercept, which liblinear
            # penalizes slightly; accuracy there is near chance for both and may differ.)
            assert abs(sk.score(Xs[te], y[te]) - path.test_accuracy[k]) <= 0.01 + 1e-9
        a = set(np.flatnonzero(sk.coef_[0])), set(np.flatnonzero(path.coefs[k, 0]))
        if a[0] | a[1]:
            jaccards.append(len(a[0] & a[1]) / len(a[0] | a[1]))
        # Coefficients themselves agree (same objective, same scaling of C).
        np.testing.assert_allclose(path.coefs[k, 0], sk.coef_[0], atol=0.05 * max(1.0, np.abs(sk.coef_).max()))
    # Stated tolerance: the non-zero sets agree with Jaccard >= 0.9 at every C (weakly regularized
    # end included, where tiny coefficients sit at the edge of the threshold).
    assert min(jaccards) >= 0.9, jaccards


def test_planted_sparse_signal_is_recovered(planted, path):
    X, y, idx = planted
    # The sparsest path point with good accuracy selects exactly the planted neurons.
    best = [k for k in range(len(path.Cs)) if path.test_accuracy[k] >= path.test_accuracy.max() - 0.02]
    k = min(best, key=lambda i: path.n_nonzero[i])
    top = path.surviving(k)[: len(idx)]
    assert set(top) == set(idx)
    assert path.test_accuracy[k] > 0.85


def test_density_is_monotone_in_C(path):
    assert np.all(np.diff(path.density) >= 0), path.density
    assert path.density[0] == 0.0  # default grid starts where the first neuron enters
    assert path.n_nonzero[-1] > 0


def test_refit_at_C_matches_a_fresh_fit(planted, path):
    X, y, _ = planted
    C = float(np.sqrt(path.Cs[8] * path.Cs[9]))
    warm = refit_at_C(X, y, path, C)
    cold = fit_logistic_path(X, y, Cs=[C], seed=0, tol=1e-4)
    assert warm.converged[0] and cold.converged[0]
    assert abs(warm.objective[0] - cold.objective[0]) <= 1e-3 * abs(cold.objective[0])
    assert warm.n_nonzero[0] == pytest.approx(cold.n_nonzero[0], abs=2)
    assert warm.n_iter[0] <= cold.n_iter[0]


def test_l2_and_elasticnet_agree_with_sklearn(planted):
    X, y, _ = planted
    r = fit_logistic_path(X, y, Cs=[0.01, 0.1, 1.0], penalty="l2", tol=1e-4)
    Xs = (X - r.mean) / r.scale
    tr, te = r.train_idx, r.test_idx
    for k, C in enumerate(r.Cs):
        sk = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(Xs[tr], y[tr])
        assert abs(sk.score(Xs[te], y[te]) - r.test_accuracy[k]) <= 0.01
        np.testing.assert_allclose(r.coefs[k, 0], sk.coef_[0], atol=2e-3 * max(1, np.abs(sk.coef_).max()))
    en = fit_logistic_path(X, y, Cs=[0.05], penalty="elasticnet", l1_ratio=0.5, tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = LogisticRegression(solver="saga", l1_ratio=0.5, C=0.05, tol=1e-6, max_iter=5000).fit(Xs[tr], y[tr])
    assert abs(sk.score(Xs[te], y[te]) - en.test_accuracy[0]) <= 0.01
    np.testing.assert_allclose(en.coefs[0, 0], sk.coef_[0], atol=5e-3)


def test_multinomial_l1_path_and_estimator():
    rng = np.random.default_rng(1)
    n, d, K = 600, 60, 3
    y = rng.integers(0, K, n)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[:, :3] += 2.0 * np.eye(K)[y]
    r = fit_logistic_path(X, y, Cs=[0.01, 0.1], penalty="l1", tol=1e-4)
    assert r.coefs.shape == (2, K, d) and r.converged.all()
    assert set(r.surviving(0)[:3]) == {0, 1, 2}
    assert r.test_accuracy[1] > 0.8
    est = LogisticProbe(C=0.1, penalty="l1").fit(X, y)
    assert est is not None and est.converged_ and est.coef_.shape == (K, d)
    assert est.score(X, y) > 0.8
    # Raw-feature prediction from the path equals the estimator's (same problem, same C).
    assert np.mean(r.predict(X, 1) == est.predict(X)) > 0.97


def test_all_hooks_multiclass_agrees_with_sklearn_lbfgs():
    rng = np.random.default_rng(2)
    n, d, K, H = 1500, 24, 5, 3
    y = rng.integers(0, K, n)
    hooks = {}
    for h in range(H):
        M = rng.standard_normal((K, d)) * (0.3 + 0.3 * h)
        X = rng.standard_normal((n, d)) + M[y]
        X[:, 0] *= 25.0  # an outlier dimension, as in real residual streams
        hooks[f"blocks.{h}.hook_resid_post"] = X.astype(np.float32)
    r = fit_multiclass_all_hooks(hooks, y, C=1.0, seed=3)
    assert r.converged.all(), r.grad_norm
    assert r.hooks == list(hooks)
    tr, te = r.train_idx, r.test_idx
    for i, X in enumerate(hooks.values()):
        mu, sd = X[tr].mean(0), X[tr].std(0)
        sk = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit((X[tr] - mu) / sd, y[tr])
        assert abs(sk.score((X[te] - mu) / sd, y[te]) - r.test_accuracy[i]) <= 0.005
    assert np.all(np.diff(r.test_accuracy) > 0)  # planted signal grows with depth
    assert 0 < r.chance < 0.4
    assert sum(v["train"] + v["test"] for v in r.class_counts.values()) == n
    pre = fit_multiclass_all_hooks(hooks, y, C=1.0, seed=3, precondition=True, eig_cache={})
    np.testing.assert_allclose(pre.test_accuracy, r.test_accuracy, atol=0.005)
    warm = fit_multiclass_all_hooks(hooks, y, C=1.0, seed=3, warm_start=r)
    assert warm.n_iter <= 3


def test_binary_all_hooks():
    X, y, _ = planted_binary(n=400, d=40, k=3)
    r = fit_multiclass_all_hooks([X, X[:, ::-1].copy()], y, C=0.5)
    assert r.coefs.shape == (2, 1, 40)
    np.testing.assert_allclose(r.test_accuracy[0], r.test_accuracy[1])


def test_control_task_and_selectivity(planted):
    X, y, _ = planted
    rng = np.random.default_rng(0)
    token_ids = rng.integers(0, 40, y.size)  # word types unrelated to the planted signal
    yc = control_labels(token_ids, y, seed=1)
    for t in np.unique(token_ids):  # one label per type
        assert np.unique(yc[token_ids == t]).size == 1
    res = fit_control_task(X, y, token_ids, C=0.1, seed=0)
    assert res.accuracy > 0.8
    assert abs(res.control_accuracy - res.control_chance) < 0.12  # near chance
    assert res.selectivity > 0.2


def test_splits_and_reports():
    y = np.array([0] * 30 + [1] * 10 + [2] * 5)
    tr, te = stratified_split(y, test_fraction=0.2, seed=0)
    assert np.intersect1d(tr, te).size == 0 and tr.size + te.size == y.size
    assert set(np.unique(y[te])) == {0, 1, 2}
    folds = stratified_kfold(y, k=5, seed=0)
    allv = np.concatenate([v for _, v in folds])
    assert np.array_equal(np.sort(allv), np.arange(y.size))
    assert all(np.unique(y[v]).size == 3 for _, v in folds)
    rep = classification_report_dict(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), target_names=["the", "an"])
    assert rep["an"]["recall"] == 1.0 and rep["the"]["precision"] == 1.0
    sf = selection_frequency(np.array([[[1.0, 0.0, 0.0]], [[1.0, 2.0, 0.0]]]))
    np.testing.assert_allclose(sf, [1.0, 0.5, 0.0])


def test_cv_selection_frequency(planted):
    X, y, idx = planted
    r = fit_logistic_path(X, y, Cs=[0.05, 0.1], cv=3, tol=1e-3)
    assert r.cv_selection_frequency.shape == (2, X.shape[1])
    assert r.cv_selection_frequency[0, idx].min() == 1.0  # planted neurons chosen in every fold
    assert r.cv_selection_frequency[0].sum() < 3 * len(idx)
    assert r.cv_accuracy[1] > 0.8


@pytest.mark.parametrize(
    "kwargs, err, text",
    [
        ({"Cs": [0.0]}, ProbeError, "positive"),
        ({"Cs": [float("nan")]}, ProbeError, "finite"),
        ({"Cs": [-1.0]}, ProbeError, "positive"),
        ({"penalty": "l0"}, ProbeError, "pick one"),
        ({"test_fraction": 1.5}, ProbeError, "between 0 and 1"),
    ],
)
def test_bad_options_raise(planted, kwargs, err, text):
    X, y, _ = planted
    with pytest.raises(err, match=text):
        fit_logistic_path(X[:50], y[:50], **{"Cs": [1.0], **kwargs})


def test_bad_data_raise():
    X = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    y = np.array([0] * 10 + [1] * 10)
    Xn = X.copy()
    Xn[3, 1] = np.nan
    with pytest.raises(ProbeError, match="NaN or inf"):
        fit_logistic_path(Xn, y, Cs=[1.0])
    Xi = X.copy()
    Xi[0, 0] = np.inf
    with pytest.raises(ProbeError, match="NaN or inf"):
        fit_multiclass_all_hooks([X, Xi], y)
    with pytest.raises(LabelError, match="only one class"):
        fit_logistic_path(X, np.zeros(20, int), Cs=[1.0])
    with pytest.raises(LabelError, match="too few examples"):
        fit_logistic_path(X, np.array([0] * 19 + [1]), Cs=[1.0])
    with pytest.raises(LabelError, match="fewer folds|too few"):
        fit_logistic_path(X, np.array([0] * 17 + [1] * 3), Cs=[1.0], cv=5)
    with pytest.raises(LabelError, match="classes"):
        fit_logistic_path(X[:3], np.array([0, 1, 2]), Cs=[1.0])
    with pytest.raises(ProbeError, match="same"):
        fit_multiclass_all_hooks([X, X[:, :2]], y)
    with pytest.raises(ProbeError, match="2-D"):
        fit_logistic_path(X[:, 0], y, Cs=[1.0])


def test_sparse_figures_build(planted, path):
    from probing_core.plots import sparse as plots

    X, y, idx = planted
    k = 8
    fig = plots.coefficients(path, k)
    nz_trace = [t for t in fig.data if t.name.startswith("non-zero")][0]
    assert len(nz_trace.x) == path.n_nonzero[k]
    assert plots.nonzero_histogram(path, k).data[0].x.size == path.n_nonzero[k]
    assert len(plots.activation_strips(X, y, idx[:3], class_names=["the", "an"]).data) == 2
    assert len(plots.density_vs_C(path, float(path.Cs[k])).data) == 4
    assert len(plots.layers_curve(["a", "b"], np.array([0.6, 0.8]), np.array([1.0, 2.0]), chance=0.5).data) == 2
    bars = plots.selection_frequency_bars(np.array([0.0, 1.0, 0.5]))
    assert list(bars.data[0].x) == ["1", "2"]


def test_preconditioned_all_hooks_agree_on_ill_conditioned_features():
    # Correlated features (covariance eigenvalues spanning 1e-4..1 after standardization): the
    # case the eigen-preconditioner is for. Same objective as scikit-learn, so same optimum;
    # tol=1e-5 because flat directions leave a tol=1e-4 point a few test samples away from it.
    rng = np.random.default_rng(5)
    n, d, K, H = 3000, 40, 4, 2
    y = rng.integers(0, K, n)
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    A = Q @ np.diag(np.logspace(0, -2, d)) @ Q.T
    hooks = {}
    for h in range(H):
        M = rng.standard_normal((K, d)) * (0.4 + 0.4 * h)
        hooks[f"h{h}"] = ((rng.standard_normal((n, d)) + M[y]) @ A).astype(np.float32)
    cache: dict = {}
    pre = fit_multiclass_all_hooks(hooks, y, C=10.0, seed=1, precondition=True, eig_cache=cache, tol=1e-5)
    plain = fit_multiclass_all_hooks(hooks, y, C=10.0, seed=1, precision="fp32", tol=1e-5)
    assert pre.converged.all() and plain.converged.all(), (pre.grad_norm, plain.grad_norm)
    assert len(cache) == H
    tr, te = pre.train_idx, pre.test_idx
    for i, X in enumerate(hooks.values()):
        mu, sd = X[tr].mean(0), X[tr].std(0)
        sk = LogisticRegression(C=10.0, max_iter=20000, tol=1e-8).fit((X[tr] - mu) / sd, y[tr])
        acc = sk.score((X[te] - mu) / sd, y[te])
        assert abs(acc - pre.test_accuracy[i]) <= 0.005, (acc, pre.test_accuracy[i])
        assert abs(acc - plain.test_accuracy[i]) <= 0.005, (acc, plain.test_accuracy[i])
    # A label change reuses the cached decompositions (no new entries) and still converges.
    again = fit_multiclass_all_hooks(hooks, (y + 1) % K, C=10.0, seed=1, precondition=True, eig_cache=cache)
    assert len(cache) == H and again.converged.all()
    print("iterations: preconditioned", pre.n_iter, "plain", plain.n_iter)
