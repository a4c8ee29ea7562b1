"""All-hooks multiclass probe: one torch L-BFGS over every hook vs a scikit-learn lbfgs loop.

16 classes, planted class means whose strength grows with depth, plus an outlier dimension.
Cases: n=10,000, d=128, 7 hooks; n=10,000, d=576, 31 hooks (SmolLM2's resid width/count).
Both sides use the same standardized split, C=1, tolerance 1e-4 (scikit-learn's default).

    python benchmarks/bench_layers.py [--quick] [--threads 1]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small case only")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch
    from sklearn.linear_model import LogisticRegression

    from probing_core.logistic import fit_multiclass_all_hooks

    torch.set_num_threads(args.threads)
    # torch.optim imports torch._dynamo on first use (~4 s, once per process): keep it out of the timing.
    warm_h, warm_y = planted(200, 8, 2, K=3)
    fit_multiclass_all_hooks(warm_h, warm_y)
    cases = [(3000, 64, 4)] if args.quick else [(10000, 128, 7), (10000, 576, 31)]
    print(f"torch threads={args.threads}; 16 classes, C=1, test 30 %")
    for n, d, H in cases:
        hooks, y = planted(n, d, H)
        r = fit_multiclass_all_hooks(hooks, y, C=1.0)
        t_ours = r.fit_seconds
        t = time.perf_counter()
        warm = fit_multiclass_all_hooks(hooks, y, C=1.3, warm_start=r)
        t_warm = time.perf_counter() - t
        tr, te = r.train_idx, r.test_idx
        t = time.perf_counter()
        sk = []
        for X in hooks.values():
            mu, sd = X[tr].mean(0), X[tr].std(0)
            m = LogisticRegression(C=1.0, max_iter=1000).fit((X[tr] - mu) / sd, y[tr])
            sk.append(m.score((X[te] - mu) / sd, y[te]))
        t_sk = time.perf_counter() - t
        gap = np.abs(np.array(sk) - r.test_accuracy).max()
        print(f"n={n} d={d} hooks={H}: ours {t_ours:.2f} s ({r.n_iter} L-BFGS its, converged "
              f"{int(r.converged.sum())}/{H}), sklearn loop {t_sk:.2f} s, ratio {t_sk / t_ours:.1f}x, "
              f"max |test acc gap| {100 * gap:.2f} points; warm refit at C=1.3 {t_warm:.2f} s "
              f"(converged {int(warm.converged.sum())}/{H})")
        print("   test acc per hook (ours):", np.round(r.test_accuracy, 3).tolist())


if __name__ == "__main__":
    main()
