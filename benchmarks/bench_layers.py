"""All-hooks multiclass probe: our per-hook L-BFGS (torch, worker threads) vs a scikit-learn lbfgs loop.

16 classes, planted class means whose strength grows with depth, plus an outlier dimension.
Cases: n=10,000, d=128, 7 hooks; n=10,000, d=576, 31 hooks (SmolLM2's resid width/count).
Both sides use the same standardized split, C=1, tolerance 1e-4 (scikit-learn's default), the
same objective (C * summed log-loss + ½‖W‖², intercept unpenalized).

Rows per case (all timed in one process, so the ratios share whatever load the machine has):
  default      fit_multiclass_all_hooks(...) as the app calls it: one worker thread per core
               (PROBING_THREADS), precision="auto" (bf16 data passes where the CPU has native
               bf16 GEMMs, exact fp32 stopping test), no eigen-preconditioner
  1 worker     the same on one thread
  fp32         precision="fp32" (no bf16 anywhere)
  precond      precondition=True, cold: includes the eigendecompositions, fills eig_cache
  label change new labels (classes merged in pairs) reusing the cached eigendecompositions
  C move       warm start from the default fit at C=1.3
sklearn: LogisticRegression(C=1, lbfgs, tol=1e-4) per hook on the same standardized split, with
NumPy's BLAS on its default threads (all cores). With --sk-hooks k it runs on k evenly spaced
hooks and the time is extrapolated linearly to all hooks (the output says so); accuracy gaps are
over the hooks it ran on.

    python benchmarks/bench_layers.py [--quick] [--sk-hooks 31]

The machine may be shared: figures are wall-clock under whatever load there is.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def planted(n: int, d: int, H: int, K: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    hooks = {}
    for h in range(H):
        M = rng.standard_normal((K, d)) * (0.05 + 0.3 * h / H)
        X = rng.standard_normal((n, d)) + M[y]
        X[:, 0] *= 20.0
        hooks[f"blocks.{h}.hook_resid_post"] = X.astype(np.float32)
    return hooks, y


def sklearn_loop(hooks: dict, y: np.ndarray, tr: np.ndarray, te: np.ndarray, which: list[int]):
    from sklearn.linear_model import LogisticRegression

    Xs = list(hooks.values())
    acc, its = [], []
    t = time.perf_counter()
    for i in which:
        X = Xs[i]
        mu, sd = X[tr].mean(0), X[tr].std(0)
        m = LogisticRegression(C=1.0, max_iter=1000).fit((X[tr] - mu) / sd, y[tr])
        acc.append(m.score((X[te] - mu) / sd, y[te]))
        its.append(int(m.n_iter_[0]))
    return time.perf_counter() - t, np.array(acc), its


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small case only")
    ap.add_argument("--sk-hooks", type=int, default=31, help="scikit-learn hooks to time (fewer: extrapolated)")
    args = ap.parse_args()
    import os

    from probing_core.logistic import fit_multiclass_all_hooks
    from probing_core.threads import workers

    warm_h, warm_y = planted(200, 8, 2, K=3)
    fit_multiclass_all_hooks(warm_h, warm_y)
    fit_multiclass_all_hooks(warm_h, warm_y, precision="fp32", precondition=True)
    cases = [(3000, 64, 4)] if args.quick else [(10000, 128, 7), (10000, 576, 31)]
    n_workers = workers()
    print(f"{os.cpu_count()} cores, {n_workers} worker threads by default; 16 classes, C=1, tol=1e-4, test 30 %")
    for n, d, H in cases:
        hooks, y = planted(n, d, H)
        y2 = y // 2  # a label change on the same activations: classes merged in pairs
        r = fit_multiclass_all_hooks(hooks, y, C=1.0)
        os.environ["PROBING_THREADS"] = "1"
        r1 = fit_multiclass_all_hooks(hooks, y, C=1.0)
        del os.environ["PROBING_THREADS"]
        r32 = fit_multiclass_all_hooks(hooks, y, C=1.0, precision="fp32")
        cache: dict = {}
        rp = fit_multiclass_all_hooks(hooks, y, C=1.0, precondition=True, eig_cache=cache)
        rl = fit_multiclass_all_hooks(hooks, y2, C=1.0, precondition=True, eig_cache=cache)
        rl0 = fit_multiclass_all_hooks(hooks, y2, C=1.0)
        t = time.perf_counter()
        rc = fit_multiclass_all_hooks(hooks, y, C=1.3, warm_start=r)
        t_c = time.perf_counter() - t
        which = list(range(H))
        if H > 8 and args.sk_hooks < H:
            which = sorted({int(round(v)) for v in np.linspace(0, H - 1, args.sk_hooks)})
        t_sk, sk_acc, sk_its = sklearn_loop(hooks, y, r.train_idx, r.test_idx, which)
        t_sk_all = t_sk * H / len(which)
        note = "" if len(which) == H else f" (timed on {len(which)} of {H} hooks, extrapolated linearly)"
        print(f"\nn={n} d={d} hooks={H}: sklearn lbfgs loop {t_sk_all:.2f} s{note}, "
              f"its per hook {sk_its}")

        def row(name: str, res, secs: float, ref=None) -> None:
            line = (f"  {name:<14} {secs:6.2f} s  ratio {t_sk_all / secs:5.1f}x  its (max over hooks) "
                    f"{res.n_iter:3d}  converged {int(res.converged.sum())}/{H}")
            if ref is None:
                gap = np.abs(sk_acc - res.test_accuracy[which]).max()
                line += f"  max |test acc gap| vs sklearn {100 * gap:.2f} points"
            else:
                line += f"  max |test acc gap| vs {ref[0]} {100 * np.abs(ref[1].test_accuracy - res.test_accuracy).max():.2f} points"
            print(line)

        row(f"default ({n_workers}w)", r, r.fit_seconds)
        row("1 worker", r1, r1.fit_seconds)
        row("fp32", r32, r32.fit_seconds)
        row("precond cold", rp, rp.fit_seconds)
        row("label change", rl, rl.fit_seconds, ref=("default fit on the new labels", rl0))
        row("  (no cache)", rl0, rl0.fit_seconds, ref=("itself", rl0))
        row("C move", rc, t_c, ref=("C=1 fit", r))
        print("  test acc per hook (default):", np.round(r.test_accuracy, 3).tolist())
        print("  test acc per hook (sklearn):", np.round(sk_acc, 3).tolist())


if __name__ == "__main__":
    main()
