"""Ridge path speed: probing_core.solvers.ridge.fit_ridge_path vs a scikit-learn RidgeCV loop.

Planted-signal data, n samples × d features × H hooks, 20 α, 5-fold CV (+ a 20% test split,
a shuffled baseline and OLS, which the scikit-learn side does not even compute).

    python benchmarks/bench_ridge.py            # n=20000, d=576 and 768, 31 hooks
    python benchmarks/bench_ridge.py --quick    # seconds; smoke test

scikit-learn is timed on ``--sk-hooks`` hooks and extrapolated linearly to all hooks (each hook
is an independent fit, so the loop is linear in the number of hooks); the output says so.
Goals: ≥ 30× faster than RidgeCV(cv=5); warm refit after a label or α change < 100 ms.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.linear_model import RidgeCV  # noqa: E402
from sklearn.model_selection import PredefinedSplit  # noqa: E402

from probing_core.solvers.ridge import fit_ridge_path, make_split  # noqa: E402


def _hooks(n: int, d: int, n_hooks: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    y = base @ w + rng.standard_normal(n).astype(np.float32) * 2.0
    y2 = base[:, : d // 2] @ w[: d // 2] + rng.standard_normal(n).astype(np.float32)
    X = {}
    for h in range(n_hooks):
        Xh = base * np.float32(1.0 + 0.05 * h)  # a fresh array per hook, as from the store
        Xh[:, h % d] += np.float32(3.0)
        X["hook_embed" if h == 0 else f"blocks.{(h - 1) // 3}.hook_resid_{('pre', 'mid', 'post')[(h - 1) % 3]}"] = Xh
    return X, y.astype(np.float64), y2.astype(np.float64)


def _time(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run(n: int, d: int, n_hooks: int, sk_hooks: int, gcv: bool) -> None:
    alphas = np.logspace(-3, 6, 20)
    X, y, y2 = _hooks(n, d, n_hooks, seed=d)
    hooks = list(X)
    print(f"\n== n={n}, d={d}, hooks={n_hooks}, {alphas.size} α, 5-fold CV + 20% test split ==")

    t_cold, res = _time(lambda: fit_ridge_path(X, y, alphas=alphas, cv=5, test_fraction=0.2, seed=0))
    best = res.r2_test[np.arange(n_hooks), res.best_index]
    print(f"ours, cold (all hooks):            {t_cold:8.2f} s   ({t_cold / n_hooks * 1e3:.0f} ms/hook); "
          f"test R² at best α {best.min():.4f}..{best.max():.4f}, baseline max |R²| {np.abs(res.baseline_r2).max():.4f}")
    t_label, res2 = _time(lambda: fit_ridge_path(X, y2, alphas=alphas, cv=5, test_fraction=0.2, seed=0,
                                                 decompositions=res.decompositions), repeat=3)
    print(f"ours, warm label change:           {t_label * 1e3:8.1f} ms  (one Yᵀ X pass over {n_hooks} × {n}×{d} fp32 "
          f"= {n_hooks * n * d * 4 / 1e9:.2f} GB, label + shuffled baseline)")
    t_label1, _ = _time(lambda: fit_ridge_path(X, y2, alphas=alphas, cv=5, test_fraction=0.2, seed=0, baseline=False,
                                               decompositions=res.decompositions), repeat=3)
    print(f"ours, warm label change, no baseline: {t_label1 * 1e3:5.1f} ms")
    t_alpha, _ = _time(lambda: res.evaluate([1234.5]), repeat=3)
    print(f"ours, warm α change (1 new α):     {t_alpha * 1e3:8.1f} ms  (no pass over the data)")
    t_grid, _ = _time(lambda: res.r2_test[:, 7].copy(), repeat=3)
    print(f"ours, α slider on the grid:        {t_grid * 1e3:8.3f} ms  (the stored path)")
    # What any exact refit after a label change must at least do: read every activation once.
    t_read, _ = _time(lambda: [float(Xh.sum(dtype=np.float32)) for Xh in X.values()], repeat=3)
    gb = n_hooks * n * d * 4 / 1e9
    print(f"memory floor: one plain read of the {gb:.2f} GB (X.sum per hook, 1 thread): {t_read * 1e3:.0f} ms "
          f"({gb / t_read:.1f} GB/s); warm label change / floor = {t_label / t_read:.1f}")

    # scikit-learn: RidgeCV with the same 5 folds of the same training rows.
    sp = make_split(n, test_fraction=0.2, cv=5, seed=0)
    tr = sp.block != 0
    folds = PredefinedSplit(sp.block[tr] - 1)
    k = min(sk_hooks, n_hooks)
    t0 = time.perf_counter()
    for h in hooks[:k]:
        m = RidgeCV(alphas=alphas, cv=folds).fit(X[h][tr], y[tr])
    t_sk = (time.perf_counter() - t0) / k * n_hooks
    ours_alpha = res.best_alpha[hooks.index(hooks[k - 1])]
    note = "" if k == n_hooks else f" (measured on {k} hook{'s' if k > 1 else ''}, extrapolated ×{n_hooks / k:.1f})"
    print(f"sklearn RidgeCV(cv=5) loop:        {t_sk:8.2f} s{note}; best α {m.alpha_:g} (ours {ours_alpha:g})")
    print(f"speed-up vs RidgeCV(cv=5):         {t_sk / t_cold:8.1f}×   (goal ≥ 30×)")
    if gcv:
        t0 = time.perf_counter()
        for h in hooks[:k]:
            RidgeCV(alphas=alphas).fit(X[h][tr], y[tr])
        t_gcv = (time.perf_counter() - t0) / k * n_hooks
        print(f"sklearn RidgeCV(GCV/leave-one-out) loop: {t_gcv:6.2f} s{note}; speed-up {t_gcv / t_cold:.1f}× "
              "(a cheaper, different protocol: no folds, no test split)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dims", type=int, nargs="+", default=[576, 768])
    ap.add_argument("--hooks", type=int, default=31)
    ap.add_argument("--sk-hooks", type=int, default=1, help="hooks to time scikit-learn on (extrapolated to all)")
    ap.add_argument("--no-gcv", action="store_true", help="skip the RidgeCV leave-one-out comparison")
    a = ap.parse_args()
    if a.quick:
        a.n, a.dims, a.hooks, a.sk_hooks, a.no_gcv = 400, [16], 3, 1, True
    print(f"bench_ridge: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at start "
          "(a shared machine: other jobs inflate all timings, both sides alike only roughly)")
    for d in a.dims:
        run(a.n, d, a.hooks, a.sk_hooks, gcv=not a.no_gcv)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
