"""Sparse (L1) logistic path: our batched FISTA vs a scikit-learn liblinear sweep.

Planted data shaped like post-GELU MLP activations (a handful of informative neurons).
For each (n, d): a 17-value C path (C = 1/λ, same objective scaling as scikit-learn) fitted
at once, vs liblinear fitted once per C on the same standardized training split. Reports
time, speed-up, the largest test-accuracy gap, the non-zero-set Jaccard range, convergence,
and the warm-started refit to a new C (a slider move). Optionally (full run) the notebook's
saga C=10 fit, which does not converge.

    python benchmarks/bench_sparse.py [--quick] [--threads 1]

The machine may be shared: figures are wall-clock on whatever load there is; the ratio is
what matters (both sides run in the same process, one after the other).
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def planted(n: int, d: int, k: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X = np.maximum(X, -0.17 * np.abs(X))  # GELU-like skew
    w = np.zeros(d)
    idx = rng.choice(d, k, replace=False)
    w[idx] = rng.choice([-1, 1], k) * rng.uniform(1, 2, k)
    y = (((X - X.mean(0)) / X.std(0)) @ w + rng.logistic(size=n) > 0).astype(int)
    return X, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small size, no saga")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is best on a shared 2-core box)")
    args = ap.parse_args()
    import torch
    from sklearn.linear_model import LogisticRegression

    from probing_core.logistic import default_Cs, fit_logistic_path, refit_at_C

    torch.set_num_threads(args.threads)
    sizes = [(300, 1536)] if args.quick else [(200, 1536), (500, 1536), (1000, 1536), (2000, 1536),
                                              (200, 3072), (500, 3072), (1000, 3072), (2000, 3072)]
    print(f"torch threads={args.threads}; 17 C values, 2 decades from the first entering neuron; tol=1e-3 KKT")
    print(f"{'n':>5} {'d':>5} {'ours s':>7} {'sk s':>7} {'ratio':>6} {'max|dacc|':>9} {'jaccard':>13} "
          f"{'conv':>5} {'refit s':>7}")
    for n, d in sizes:
        X, y = planted(n, d)
        Cs = default_Cs(X, y, n=17)
        t = time.perf_counter()
        path = fit_logistic_path(X, y, Cs=Cs, penalty="l1", seed=0)
        t_ours = time.perf_counter() - t
        Xs = (X - path.mean) / path.scale
        tr, te = path.train_idx, path.test_idx
        t = time.perf_counter()
        sk_acc, jac = [], []
        for k, C in enumerate(Cs):
            m = LogisticRegression(solver="liblinear", l1_ratio=1.0, C=float(C), intercept_scaling=100).fit(Xs[tr], y[tr])
            sk_acc.append(m.score(Xs[te], y[te]))
            a, b = set(np.flatnonzero(m.coef_[0])), set(np.flatnonzero(path.coefs[k, 0]))
            if a | b:
                jac.append(len(a & b) / len(a | b))
        t_sk = time.perf_counter() - t
        C_new = float(np.sqrt(Cs[10] * Cs[11]))
        t = time.perf_counter()
        rf = refit_at_C(X, y, path, C_new)
        t_refit = time.perf_counter() - t
        dacc = np.abs(np.array(sk_acc) - path.test_accuracy).max()
        print(f"{n:>5} {d:>5} {t_ours:>7.2f} {t_sk:>7.2f} {t_sk / t_ours:>6.1f} {dacc:>9.3f} "
              f"{min(jac):>6.2f}-{max(jac):<6.2f} {int(path.converged.sum()):>2}/17 {t_refit:>7.3f}"
              f"{'' if rf.converged[0] else ' (refit unconverged)'}")
    if not args.quick:
        n, d = 200, 3072
        X, y = planted(n, d)
        Xs = (X - X.mean(0)) / X.std(0)
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m = LogisticRegression(solver="saga", l1_ratio=1.0, C=10, max_iter=1000).fit(Xs[:140], y[:140])
        t_saga = time.perf_counter() - t
        conv_warn = any("converge" in str(x.message) for x in w)
        ours = fit_logistic_path(X, y, Cs=[10.0], seed=0)
        print(f"\nnotebook setting saga C=10, max_iter=1000, n=200, d={d}: {t_saga:.1f} s, "
              f"{'did NOT converge' if conv_warn else 'converged'}, nnz={int((m.coef_ != 0).sum())}; "
              f"ours: {ours.fit_seconds:.2f} s, KKT {ours.kkt_residual[0]:.1e} "
              f"({'converged' if ours.converged[0] else 'NOT converged'}), nnz={int(ours.n_nonzero[0])}")


if __name__ == "__main__":
    main()
