"""The all-hooks multiclass probe's machinery: precisions, worker threads, rows read in place,
folded standardization, non-finite input and progress — each checked against scikit-learn or
against a plain fit on copied rows.
"""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from probing_core.solvers import multiclass
from probing_core.errors import ProbeError
from probing_core.solvers.multiclass import fit_multiclass_all_hooks


def _hooks(n: int = 1200, d: int = 20, K: int = 4, H: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    hooks = {}
    for h in range(H):
        M = rng.standard_normal((K, d)) * (0.3 + 0.3 * h)
        hooks[f"h{h}"] = (rng.standard_normal((n, d)) + M[y]).astype(np.float32)
    return hooks, y


def _sklearn_acc(X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, C: float = 1.0) -> float:
    mu, sd = X[tr].astype(np.float64).mean(0), X[tr].astype(np.float64).std(0)
    sd[sd < 1e-6 * np.abs(mu) + 1e-12] = 1.0
    sk = LogisticRegression(C=C, max_iter=5000, tol=1e-9).fit((X[tr] - mu) / sd, y[tr])
    return sk.score((X[te] - mu) / sd, y[te])


@pytest.mark.parametrize("precision", ["mixed", "fp32"])
def test_precisions_reach_sklearns_optimum(precision):
    # bf16 data passes ("mixed") end on the exact fp32 stopping test, so both precisions agree
    # with scikit-learn's optimum; offsets of 1000 and a constant column test the folded
    # standardization (stored rows are x - shift, scaled inside the products).
    hooks, y = _hooks()
    hooks["h1"][:, 3] += 1000.0
    hooks["h2"][:, 5] = 7.0
    r = fit_multiclass_all_hooks(hooks, y, C=1.0, precision=precision, tol=1e-6)
    assert r.converged.all() and r.grad_norm.max() <= 1e-6, r.grad_norm
    for i, X in enumerate(hooks.values()):
        assert abs(_sklearn_acc(X, y, r.train_idx, r.test_idx) - r.test_accuracy[i]) <= 1 / r.test_idx.size + 1e-12
    assert r.coefs.shape == (3, 4, 20)
    np.testing.assert_allclose(r.coefs[2][:, 5], 0.0, atol=1e-6)  # a constant column gets no weight


def test_rows_gathered_in_several_blocks_give_sklearns_coefficients():
    # Narrow fp32 rows are gathered straight into place in ~1 MB blocks (4,096 rows at d = 64):
    # 4,200 training rows make a full and a partial block, with a column offset by 1000 (the
    # stored rows are x minus the first block's means). The optimum must be scikit-learn's.
    hooks, y = _hooks(n=6000, d=64, H=1)
    X = hooks["h0"]
    X[:, 2] += 1000.0
    assert multiclass._block_rows(64) < 4200 < 2 * multiclass._block_rows(64)
    r = fit_multiclass_all_hooks(hooks, y, C=1.0, precision="fp32", tol=1e-8, max_iter=1000)
    tr = r.train_idx
    mu, sd = X[tr].astype(np.float64).mean(0), X[tr].astype(np.float64).std(0)
    sk = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit((X[tr] - mu) / sd, y[tr])
    scale = np.abs(sk.coef_).max()
    np.testing.assert_allclose(r.coefs[0], sk.coef_, rtol=0, atol=2e-3 * scale)
    np.testing.assert_allclose(r.intercepts[0] - r.intercepts[0].mean(), sk.intercept_ - sk.intercept_.mean(),
                               rtol=0, atol=2e-3 * scale)


def test_workers_give_the_serial_result_and_report_progress(monkeypatch):
    hooks, y = _hooks(H=4)
    monkeypatch.setattr(multiclass, "_PARALLEL_WORK", 0)  # this small fit would otherwise run serially
    seen = []
    monkeypatch.setenv("PROBING_THREADS", "1")
    one = fit_multiclass_all_hooks(hooks, y, precision="fp32")
    monkeypatch.setenv("PROBING_THREADS", "2")
    two = fit_multiclass_all_hooks(hooks, y, precision="fp32", progress=lambda f, msg: seen.append((f, msg)))
    # Same solves; only GEMM summation order may differ between threads (buffer alignment).
    np.testing.assert_allclose(one.coefs, two.coefs, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(one.test_accuracy, two.test_accuracy)
    assert [f for f, _ in seen] == [0.25, 0.5, 0.75, 1.0]
    # One report per finished hook, in the order they finish (a slow hook holds up no worker).
    assert sorted(m.split(" ")[0] for _, m in seen) == sorted(hooks)


def test_a_slow_hook_holds_up_no_other_worker(monkeypatch):
    # Hooks are handed out as workers free up, not in order: with 2 workers, a first hook that
    # takes 0.6 s leaves the other worker to fit all the quick ones meanwhile.
    import threading
    import time

    from probing_core.threads import map_hooks

    monkeypatch.setenv("PROBING_THREADS", "2")
    names = [f"h{i}" for i in range(6)]
    ran_on: dict[str, int] = {}

    def fn(h: str, x: float) -> float:
        ran_on[h] = threading.get_ident()
        time.sleep(x)
        return 2 * x

    costs = {"h0": 0.6, **{h: 0.02 for h in names[1:]}}
    seen = []
    out = map_hooks(fn, names, costs, progress=lambda f, m: seen.append(m.split(" ")[0]))
    assert out == [2 * costs[h] for h in names]  # results in the hooks' order
    assert seen[-1] == "h0" and sorted(seen) == names
    assert len({ran_on[h] for h in names[1:]}) == 1 and ran_on["h1"] != ran_on["h0"]


def test_workers_run_torch_with_the_callers_thread_count(monkeypatch):
    # OpenMP's thread count is per thread: a fresh worker starts at the machine's default, and its
    # GEMMs then ran multithreaded under single_threaded() (two workers oversubscribed the cores).
    # threadpoolctl reads the count of the thread that asks, so each worker reports its own.
    from threadpoolctl import threadpool_info

    from probing_core.threads import map_hooks, single_threaded

    monkeypatch.setenv("PROBING_THREADS", "2")

    def omp_threads(h: str, x: int) -> list[int]:
        return [i["num_threads"] for i in threadpool_info()
                if i["user_api"] == "openmp" and "torch" in i["filepath"]]

    with single_threaded():
        counts = map_hooks(omp_threads, ["a", "b", "c"], {"a": 0, "b": 1, "c": 2})
    assert counts[0], "torch's OpenMP runtime was not found"
    assert all(c == [1] * len(counts[0]) for c in counts), counts


def test_rows_read_in_place_equal_a_fit_on_copied_rows(tmp_path):
    hooks, y = _hooks(n=1500)
    rows = np.sort(np.random.default_rng(1).choice(1500, 900, replace=False))
    mm = {}
    for h, X in hooks.items():  # store-like read-only memmaps
        np.save(tmp_path / f"{h}.npy", X)
        mm[h] = np.load(tmp_path / f"{h}.npy", mmap_mode="r")
    in_place = fit_multiclass_all_hooks(mm, y[rows], rows=rows, precision="fp32")
    copied = fit_multiclass_all_hooks({h: X[rows] for h, X in hooks.items()}, y[rows], precision="fp32")
    np.testing.assert_allclose(in_place.coefs, copied.coefs, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(in_place.test_accuracy, copied.test_accuracy)
    with pytest.raises(ProbeError, match="rows must index"):
        fit_multiclass_all_hooks(mm, y[:3], rows=np.array([0, 1, 5000]))
    with pytest.raises(ProbeError, match="one entry per sample"):
        fit_multiclass_all_hooks(mm, y, rows=rows)


@pytest.mark.parametrize("where", ["train", "test"])
def test_non_finite_features_name_the_hook(where):
    hooks, y = _hooks()
    r = fit_multiclass_all_hooks(hooks, y, precision="fp32")
    row = (r.train_idx if where == "train" else r.test_idx)[7]
    hooks["h2"][row, 4] = np.nan
    with pytest.raises(ProbeError, match="'h2'.*NaN or inf"):
        fit_multiclass_all_hooks(hooks, y, precision="fp32")


def test_warm_start_at_the_optimum_costs_no_iteration():
    hooks, y = _hooks()
    for precision in ("mixed", "fp32"):
        r = fit_multiclass_all_hooks(hooks, y, precision=precision)
        again = fit_multiclass_all_hooks(hooks, y, precision=precision, warm_start=r)
        assert again.n_iter == 0 and again.converged.all()
        np.testing.assert_array_equal(again.coefs, r.coefs)


def _exact_gradient_norm(X: np.ndarray, codes: np.ndarray, W: np.ndarray, b: np.ndarray, C: float) -> float:
    """The scaled lbfgs gradient's inf-norm in float64 NumPy (standardized X, W ``(d, m)``)."""
    X = X.astype(np.float64)
    Xs = (X - X.mean(0)) / X.std(0)
    Z = Xs @ W + b
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    P[np.arange(codes.size), codes] -= 1.0
    n = codes.size
    return float(max(np.abs(Xs.T @ P / n + W / (C * n)).max(), np.abs(P.mean(0)).max()))


def test_bf16_solve_stops_on_exact_figures_whichever_way_it_finishes():
    # On bf16 copies the solve stops only when the exact fp32 gradient passes tol. When the first
    # exact check misses, it goes on in bf16 from the exact decision values (a second check), or
    # moves to fp32 copies when bf16's error leaves no room. Strong class signal and tight tol
    # (large decision values) make the first check miss here; every way must end at tol by an
    # independent float64 gradient and at the fp32 solve's optimum.
    import torch

    n, d, K = 3000, 256, 16
    ways = set()
    for scale, tol in ((0.2, 1e-5), (0.1, 3e-5), (0.2, 1e-4)):
        rng = np.random.default_rng(0)
        y = rng.integers(0, K, n)
        X = (rng.standard_normal((n, d)) + (rng.standard_normal((K, d)) * scale)[y]).astype(np.float32)
        X[:, 0] *= 20.0
        T = torch.nn.functional.one_hot(torch.as_tensor(y), K).float()
        sols = {}
        for low in (True, False):
            data = multiclass._HookData(X, torch.arange(n), True, low, {})
            sols[low] = multiclass._lbfgs_hook(data, T, torch.as_tensor(y).view(-1, 1), 1.0, np.zeros((d, K)),
                                             np.zeros(K), P=None, bscale=1.0, tol=tol, max_iter=500)
            if low:
                ways.add("bf16 only" if data.low and sols[low].n_checks == 1 else
                         "went on in bf16" if data.low else "moved to fp32")
        s = sols[True]
        g = _exact_gradient_norm(X, y, s.W, s.b, 1.0)
        assert s.grad_norm <= tol and g <= 1.05 * tol, (scale, tol, s.grad_norm, g)
        # Both solutions are within tol of the same optimum: their decisions agree on all but a few rows.
        agree = (s.Z.argmax(1) == sols[False].Z.argmax(1)).float().mean()
        assert agree >= 0.995, agree
    if multiclass._bf16_matmul_is_fast():  # the paths taken depend on the GEMM's rounding
        assert {"went on in bf16", "moved to fp32"} <= ways, ways


@pytest.mark.parametrize("m", [3, 8, 15, 16, 40])
def test_row_softmax_equals_torchs_including_rows_that_would_overflow(m):
    import torch

    rng = np.random.default_rng(m)
    Z = torch.as_tensor(rng.standard_normal((500, m)) * 10, dtype=torch.float32)
    ref = torch.softmax(Z.double(), dim=1)
    torch.testing.assert_close(multiclass._softmax_rows(Z.clone()).double(), ref, atol=1e-6, rtol=1e-5)
    Z[7, 0] = 400.0  # max - mean > 88: exp overflows unless shifted by the max
    out = multiclass._softmax_rows(Z.clone())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), torch.softmax(Z.double(), dim=1), atol=1e-6, rtol=1e-5)
