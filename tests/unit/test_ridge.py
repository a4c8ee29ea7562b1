"""Ridge path vs scikit-learn on the same data, planted signal, noise, transfer, bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression, Ridge, RidgeCV
from sklearn.model_selection import PredefinedSplit, cross_val_score

from probing_core.solvers import ridge
from probing_core.errors import ProbeError
from probing_core.solvers.ridge import (
    check_alphas,
    decompose_ridge,
    fit_ridge_path,
    make_split,
    score_transfer,
)

REPO = Path(__file__).resolve().parents[2]
ALPHAS = np.array([1e-3, 1e-1, 10.0, 1e3, 1e5])
# Agreement tolerances (fp32 Gram/Xᵀy products on fp32 activations vs scikit-learn in fp64).
R2_TOL = 2e-6
COEF_RTOL = 1e-4


def _data(n=1500, d=48, seed=0, noise=1.0, offset=True):
    """Activations with outlier dimensions (large scale and mean), like a residual stream."""
    rng = np.random.default_rng(seed)
    scale = np.ones(d)
    scale[:3] = 25.0
    mean = np.zeros(d)
    if offset:
        mean[:3] = 150.0
    X = (rng.standard_normal((n, d)) * scale + mean).astype(np.float32)
    w = rng.standard_normal(d) / scale
    y = X.astype(np.float64) @ w + noise * rng.standard_normal(n) + 3.0
    return X, y


def _blocks(n, test_fraction=0.2, cv=5, seed=0):
    sp = make_split(n, test_fraction=test_fraction, cv=cv, seed=seed)
    return sp, sp.block != 0, sp.block == 0


@pytest.mark.parametrize("gram_dtype", ["float32", "float64"])
def test_path_matches_sklearn_ridge_train_test_and_coef(gram_dtype):
    X, y = _data()
    res = fit_ridge_path({"h": X}, y, alphas=ALPHAS, test_fraction=0.2, cv=5, seed=3, gram_dtype=gram_dtype)
    sp, tr, te = _blocks(len(y), seed=3)
    X64 = X.astype(np.float64)
    for i, a in enumerate(res.alphas):
        m = Ridge(alpha=a).fit(X64[tr], y[tr])
        assert res.r2_train[0, i] == pytest.approx(m.score(X64[tr], y[tr]), abs=R2_TOL)
        assert res.r2_test[0, i] == pytest.approx(m.score(X64[te], y[te]), abs=R2_TOL)
        np.testing.assert_allclose(res.coef("h", a), m.coef_, rtol=COEF_RTOL, atol=COEF_RTOL * np.abs(m.coef_).max())
        assert res.intercept("h", a) == pytest.approx(m.intercept_, rel=1e-4, abs=1e-4)
        np.testing.assert_allclose(res.predict("h", X[te], a), m.predict(X64[te]), rtol=1e-4, atol=1e-3)


def test_cv_folds_and_best_alpha_match_sklearn():
    X, y = _data(noise=8.0, seed=1)  # noisy enough that α matters
    alphas = np.logspace(-2, 5, 12)
    res = fit_ridge_path({"h": X}, y, alphas=alphas, test_fraction=0.2, cv=4, seed=0)
    sp, tr, te = _blocks(len(y), cv=4, seed=0)
    X64 = X.astype(np.float64)
    folds = PredefinedSplit(sp.block[tr] - 1)
    for i, a in enumerate(res.alphas):
        sk = cross_val_score(Ridge(alpha=a), X64[tr], y[tr], cv=folds)
        np.testing.assert_allclose(res.r2_cv[0, :, i], sk, atol=R2_TOL)
        assert res.r2_cv_mean[0, i] == pytest.approx(sk.mean(), abs=R2_TOL)
        assert res.r2_cv_std[0, i] == pytest.approx(sk.std(), abs=R2_TOL)
    cv_model = RidgeCV(alphas=alphas, cv=folds).fit(X64[tr], y[tr])
    assert res.best_alpha[0] == pytest.approx(cv_model.alpha_)


def test_ols_matches_linear_regression_and_handles_rank_deficiency():
    X, y = _data(n=800, d=20, seed=2, offset=False)
    # Duplicate columns: rank deficient; LinearRegression gives the minimum-norm solution.
    Xd = np.concatenate([X, X[:, :5], 2 * X[:, 5:7]], axis=1)
    res = fit_ridge_path({"h": Xd}, y, alphas=[1.0], test_fraction=0.25, cv=0, seed=0, gram_dtype="float64")
    sp, tr, te = _blocks(len(y), test_fraction=0.25, cv=0)
    X64 = Xd.astype(np.float64)
    lr = LinearRegression().fit(X64[tr], y[tr])
    assert res.r2_train_ols[0] == pytest.approx(lr.score(X64[tr], y[tr]), abs=1e-7)
    assert res.r2_test_ols[0] == pytest.approx(lr.score(X64[te], y[te]), abs=1e-7)
    np.testing.assert_allclose(res.coef("h", 0.0), lr.coef_, rtol=1e-5, atol=1e-7)
    assert np.isnan(res.r2_cv_mean).all() and res.n_folds == 0


def test_dual_form_matches_primal_and_sklearn_when_fewer_rows_than_features():
    X, y = _data(n=60, d=120, seed=4)
    sp, tr, te = _blocks(60, test_fraction=0.2, cv=3, seed=1)
    dual = decompose_ridge(X, sp, form="auto", gram_dtype="float64")
    primal = decompose_ridge(X, sp, form="primal", gram_dtype="float64")
    assert dual.form == "dual" and primal.form == "primal"
    pd, pp = dual.path(X, y, ALPHAS), primal.path(X, y, ALPHAS)
    np.testing.assert_allclose(pd.r2_train, pp.r2_train, atol=1e-6)
    np.testing.assert_allclose(pd.r2_test, pp.r2_test, atol=1e-6)
    np.testing.assert_allclose(pd.r2_cv, pp.r2_cv, atol=1e-6)
    X64 = X.astype(np.float64)
    for i, a in enumerate(ALPHAS):
        m = Ridge(alpha=a).fit(X64[tr], y[tr])
        assert pd.r2_test[0, i] == pytest.approx(m.score(X64[te], y[te]), abs=1e-5)


def test_planted_signal_gives_r2_near_one_and_noise_near_zero():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((3000, 64)).astype(np.float32)
    y_sig = X @ rng.standard_normal(64) + 0.01 * rng.standard_normal(3000)
    y_noise = rng.standard_normal(3000)
    res = fit_ridge_path({"a": X, "b": X[:, ::-1].copy()}, y_sig, alphas=np.logspace(-3, 4, 8), seed=0)
    assert np.all(res.r2_test[np.arange(2), res.best_index] > 0.999)
    assert np.all(np.abs(res.baseline_r2) < 0.05)  # shuffled labels: nothing to find
    noise = fit_ridge_path({"a": X}, y_noise, alphas=np.logspace(-3, 4, 8), seed=0)
    assert abs(noise.r2_test[0, noise.best_index[0]]) < 0.05
    assert noise.r2_train[0, 0] > noise.r2_test[0, 0]  # in-sample fit overfits noise


def test_decomposition_reuse_for_new_label_and_new_alpha_agree_with_fresh_fit():
    X, y = _data(seed=6)
    y2 = np.sin(X[:, 3].astype(np.float64)) + 0.1 * X[:, 10]
    first = fit_ridge_path({"h": X}, y, alphas=ALPHAS, seed=0)
    reused = fit_ridge_path({"h": X}, y2, alphas=ALPHAS, seed=0, decompositions=first.decompositions)
    fresh = fit_ridge_path({"h": X}, y2, alphas=ALPHAS, seed=0)
    assert reused.decompositions["h"] is first.decompositions["h"]
    np.testing.assert_allclose(reused.r2_test, fresh.r2_test, atol=1e-10)
    # New α from stored statistics equals a fit at that α.
    ev = first.evaluate([3.0])
    direct = fit_ridge_path({"h": X}, y, alphas=[3.0], seed=0)
    np.testing.assert_allclose(ev["r2_test"][:, 0], direct.r2_test[:, 0], atol=1e-10)
    np.testing.assert_allclose(ev["r2_cv_mean"][:, 0], direct.r2_cv_mean[:, 0], atol=1e-10)
    # Several labels at once (batched) equal one at a time.
    sp = first.decompositions["h"].split
    # fp32 products: torch sums in another order for 2 label columns than for 1 (3e-7 seen).
    both = first.decompositions["h"].path(X, np.column_stack([y, y2]), ALPHAS)
    np.testing.assert_allclose(both.r2_test[1], fresh.r2_test[0], atol=1e-6)


def test_transfer_to_own_hook_equals_in_sample_score_and_sklearn():
    X, y = _data(seed=7)
    res = fit_ridge_path({"hook_embed": X}, y, alphas=[10.0], test_fraction=0.0, cv=0)
    w, b = res.coef("hook_embed", 10.0), res.intercept("hook_embed", 10.0)
    rng = np.random.default_rng(0)
    other = (X + rng.standard_normal(X.shape).astype(np.float32) * 5).astype(np.float32)
    tr = score_transfer(w, b, {"hook_embed": X, "blocks.0.hook_resid_post": other}, y)
    assert tr.hooks == ("hook_embed", "blocks.0.hook_resid_post")
    assert tr.r2[0] == pytest.approx(res.r2_train[0, 0], abs=1e-6)
    m = Ridge(alpha=10.0).fit(X.astype(np.float64), y)
    assert tr.r2[1] == pytest.approx(m.score(other.astype(np.float64), y), abs=1e-5)
    assert tr.r2[1] < tr.r2[0]
    np.testing.assert_allclose(tr.abs_r2, np.abs(tr.r2))


def test_split_is_seeded_and_balanced():
    a, b = make_split(103, test_fraction=0.2, cv=5, seed=1), make_split(103, test_fraction=0.2, cv=5, seed=1)
    assert np.array_equal(a.block, b.block)
    assert a.n_test == 21 and a.n_train == 82
    counts = np.bincount(a.block)[1:]
    assert counts.max() - counts.min() <= 1
    assert not np.array_equal(a.block, make_split(103, test_fraction=0.2, cv=5, seed=2).block)


# ---- bad input ------------------------------------------------------------------------------
def test_fewer_samples_than_folds_raises():
    X, y = _data(n=12, d=4)
    with pytest.raises(ProbeError, match="fewer samples than folds"):
        fit_ridge_path({"h": X[:6]}, y[:6], cv=10, test_fraction=0.0)


@pytest.mark.parametrize("bad", [[0.0], [-1.0], [np.nan], [np.inf], []])
def test_bad_alpha_raises(bad):
    X, y = _data(n=100, d=4)
    with pytest.raises(ProbeError, match="α"):
        fit_ridge_path({"h": X}, y, alphas=bad)
    with pytest.raises(ProbeError):
        check_alphas(bad)


def test_nan_in_activations_names_hook_and_suggests_float32():
    X, y = _data(n=100, d=4)
    X[5, 2] = np.inf
    with pytest.raises(ProbeError, match=r"blocks\.3\.hook_resid_post.*float32"):
        fit_ridge_path({"blocks.3.hook_resid_post": X}, y)


def test_bad_labels_raise():
    X, y = _data(n=100, d=4)
    with pytest.raises(ProbeError, match="constant"):
        fit_ridge_path({"h": X}, np.ones(100))
    y2 = y.copy()
    y2[3] = np.nan
    with pytest.raises(ProbeError, match="NaN"):
        fit_ridge_path({"h": X}, y2)
    with pytest.raises(ProbeError, match="rows"):
        fit_ridge_path({"h": X[:50]}, y)
    with pytest.raises(ProbeError, match="no hooks"):
        fit_ridge_path({}, y)


def test_transfer_with_mixed_widths_raises():
    X, y = _data(n=100, d=8)
    with pytest.raises(ProbeError, match="width"):
        score_transfer(np.ones(8), 0.0, {"hook_embed": X, "blocks.0.mlp.hook_post": np.ones((100, 32), np.float32)}, y)


def test_coef_for_unknown_hook_raises():
    X, y = _data(n=100, d=4)
    res = fit_ridge_path({"h": X}, y, alphas=[1.0], cv=0)
    with pytest.raises(ProbeError, match="not fit"):
        res.coef("other")


def test_benchmark_quick_runs():
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_ridge.py"), "--quick"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert "speed-up" in out.stdout


def test_regression_figures_carry_the_numbers():
    from probing_core.plots import regression as P

    X, y = _data(n=400, d=8, seed=9)
    res = fit_ridge_path({"hook_embed": X, "blocks.0.hook_resid_post": X * 2}, y, alphas=[0.1, 10.0, 1e3], cv=3)
    fig = P.r2_curve(res)
    test = next(t for t in fig.data if t.name == "test")
    np.testing.assert_allclose(test.y, res.r2_test[[0, 1], res.best_index])
    assert any(t.name == "shuffled-label baseline" for t in fig.data)
    assert P.abs_r2_log(res.hooks, -res.r2_test[:, 0]).layout.yaxis.type == "log"
    tr = score_transfer(res.coef("hook_embed"), res.intercept("hook_embed"), {"hook_embed": X}, y)
    assert P.transfer_curve(tr, log_abs=True).data[0].y[0] == pytest.approx(abs(tr.r2[0]))
    box = P.predicted_vs_true(np.round(y), res.predict("hook_embed", X))
    assert box.layout.shapes[0].x0 == pytest.approx(np.round(y).min())
    assert P.label_histogram(y).data[0].type == "histogram"
    assert P.r2_vs_alpha(res, "hook_embed").layout.xaxis.type == "log"


def test_hooks_fitted_in_parallel_equal_one_at_a_time(monkeypatch):
    """Worker threads (one hook each) give exactly the serial result; a bad hook's error surfaces."""
    X, y = _data(n=600, d=24, seed=11)
    hooks = {f"blocks.{i}.hook_resid_post": (X * np.float32(1.0 + 0.1 * i)) for i in range(7)}
    hooks["blocks.2.hook_resid_post"][:, 4] += X[:, 0]  # a hook that differs beyond scale
    monkeypatch.setenv("PROBING_THREADS", "1")
    serial = fit_ridge_path(hooks, y, alphas=ALPHAS, seed=3)
    monkeypatch.setenv("PROBING_THREADS", "3")
    monkeypatch.setattr(ridge, "_PARALLEL_WORK", 0)  # this small fit would otherwise run serially
    parallel = fit_ridge_path(hooks, y, alphas=ALPHAS, seed=3)
    for name in ("r2_train", "r2_test", "r2_cv", "baseline_r2", "r2_test_ols"):
        np.testing.assert_array_equal(getattr(parallel, name), getattr(serial, name), err_msg=name)
    assert parallel.hooks == serial.hooks
    np.testing.assert_array_equal(parallel.evaluate([7.0])["r2_cv_mean"], serial.evaluate([7.0])["r2_cv_mean"])
    bad = dict(hooks)
    bad["blocks.5.hook_resid_post"] = bad["blocks.5.hook_resid_post"].copy()
    bad["blocks.5.hook_resid_post"][9, 1] = np.nan
    with pytest.raises(ProbeError, match=r"blocks\.5\.hook_resid_post"):
        fit_ridge_path(bad, y, alphas=ALPHAS, seed=3)


def test_rows_of_a_larger_array_equal_a_fit_on_the_copied_rows():
    """``rows=`` reads the selected rows in place (the page passes store memmaps): same result."""
    X, y = _data(n=900, d=20, seed=12)
    rows = np.sort(np.random.default_rng(0).choice(900, size=700, replace=False))
    full = {"a": X, "b": X * np.float32(2.0) + np.float32(1.0)}
    copied = fit_ridge_path({h: A[rows] for h, A in full.items()}, y[rows], alphas=ALPHAS, seed=4)
    in_place = fit_ridge_path(full, y[rows], alphas=ALPHAS, seed=4, rows=rows)
    for name in ("r2_train", "r2_test", "r2_cv", "baseline_r2", "best_alpha"):
        np.testing.assert_allclose(getattr(in_place, name), getattr(copied, name), atol=1e-6, err_msg=name)
    np.testing.assert_allclose(in_place.coef("b"), copied.coef("b"), rtol=COEF_RTOL, atol=1e-8)
    # A new label on the same rows reuses the decompositions and still reads in place.
    y2 = X[:, 3].astype(np.float64) ** 2
    again = fit_ridge_path(full, y2[rows], alphas=ALPHAS, seed=4, rows=rows, decompositions=in_place.decompositions)
    fresh = fit_ridge_path({h: A[rows] for h, A in full.items()}, y2[rows], alphas=ALPHAS, seed=4)
    np.testing.assert_allclose(again.r2_test, fresh.r2_test, atol=1e-6)
    with pytest.raises(ProbeError, match="selected rows"):
        fit_ridge_path(full, y[rows][:-1], alphas=ALPHAS, rows=rows)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_progress_reports_every_hook_once_rising(monkeypatch, threads):
    X, y = _data(n=400, d=12, seed=13)
    hooks = {f"blocks.{i}.hook_resid_post": X * np.float32(1.0 + i) for i in range(5)}
    monkeypatch.setenv("PROBING_THREADS", threads)
    monkeypatch.setattr(ridge, "_PARALLEL_WORK", 0)
    seen: list[tuple[float, str]] = []
    fit_ridge_path(hooks, y, alphas=ALPHAS, progress=lambda f, msg: seen.append((f, msg)))
    assert [f for f, _ in seen] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    names = [m.split(" ")[0] for _, m in seen]
    # In finishing order with 2 workers (a hook goes to whichever worker frees up), so only the
    # serial run is in the hooks' order.
    assert (names if threads == "1" else sorted(names)) == (list(hooks) if threads == "1" else sorted(hooks))
