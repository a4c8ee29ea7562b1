"""Sparse (L1) logistic path: our active-set Newton path vs a scikit-learn liblinear sweep.

Planted data shaped like post-GELU MLP activations (a handful of informative neurons).
For each (n, d): a 17-value C path (C = 1/λ, same objective scaling as scikit-learn), each C
warm-started from the previous one, vs liblinear fitted once per C on the same standardized
training split. Reports time, speed-up, the largest test-accuracy gap, the non-zero-set Jaccard
range, our largest KKT residual (every point must be ≤ tol = 1e-3), the largest relative
objective difference ours − liblinear's on our objective (≤ 0: ours is at least as good), and the
warm-started refit to a new C (a slider move). Optionally (full run) the notebook's saga C=10
fit, which does not converge.

    python benchmarks/bench_sparse.py [--quick] [--threads 1]
    python benchmarks/bench_sparse.py --page [--hook blocks.0.mlp.hook_post] [--classes ' a' ' this' ' that']

``--page``: what a label change on the Sparse page fits (``analyses.sparse.fit_sparse``: the path, its
CV folds, the embed-only baseline with its folds, the embed-only probe at the same C values and the
control path, on the page's worker threads), on real activations: the entry the page's "Build these
hooks now" makes (``glue.SPARSE_BUILD``: SmolLM2, 40,000 pydoc tokens, built in ``PROBING_CACHE_DIR``
if missing), " the" against each class B, one fresh fit per class (wall and CPU seconds, Newton steps
per C, the largest KKT residual, every point converged). The page bench (``bench_page_reruns.py``)
moves to layer 0 before its label changes; so does this by default.

The machine may be shared: figures are wall-clock on whatever load there is; the ratio is
what matters (both sides run in the same process, one after the other). ``--threads`` caps
torch and the BLAS under numpy/scipy alike (liblinear is single-threaded).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def planted(n: int, d: int, k: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X = np.maximum(X, -0.17 * np.abs(X))  # GELU-like skew
    w = np.zeros(d)
    idx = rng.choice(d, k, replace=False)
    w[idx] = rng.choice([-1, 1], k) * rng.uniform(1, 2, k)
    y = (((X - X.mean(0)) / X.std(0)) @ w + rng.logistic(size=n) > 0).astype(int)
    return X, y


def objective(Xs: np.ndarray, y: np.ndarray, C: float, w: np.ndarray, b: float) -> float:
    """C * sum of log-losses + ||w||_1 (the intercept unpenalized), in float64."""
    z = Xs.astype(np.float64) @ np.asarray(w, np.float64) + float(b)
    return C * float(np.sum(np.logaddexp(0.0, z) - y * z)) + float(np.abs(w).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small size, no saga")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and BLAS threads (1 is best on a shared 2-core box)")
    ap.add_argument("--page", action="store_true", help="time a Sparse label change's fits on real activations")
    ap.add_argument("--hook", default="blocks.0.mlp.hook_post", help="--page: the probed hook")
    ap.add_argument("--classes", nargs="+", default=[" an", " a", " this", " that"], help="--page: class B tokens")
    args = ap.parse_args()
    if args.page:
        page_fits(args.hook, args.classes)
        return
    import torch
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from probing_core.solvers.logistic_path import (
        default_Cs,
        fit_logistic_path,
        refit_at_C,
    )

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    sizes = [(300, 1536)] if args.quick else [(200, 1536), (500, 1536), (1000, 1536), (2000, 1536),
                                              (200, 3072), (500, 3072), (1000, 3072), (2000, 3072)]
    print(f"threads={args.threads}; 17 C values, 2 decades from the first entering neuron; ours: tol=1e-3 KKT.\n"
          "liblinear (intercept_scaling=1000, so its intercept penalty is negligible, as ours is unpenalized):\n"
          "  'sk def' = default tol 1e-4 (timed), 'sk conv' = tol 1e-6 (timed; the reference for accuracy,\n"
          "  Jaccard and objective). dacc = max over C of |test acc ours - liblinear| (and in test samples);\n"
          "  dobj = max over C of (ours - liblinear conv) / liblinear conv on our objective (<= 0: ours lower);\n"
          "  refit = slowest warm-started refit at the 16 midpoints between path Cs (all must converge).")
    print(f"{'n':>5} {'d':>5} {'ours s':>7} {'sk def':>7} {'ratio':>6} {'sk conv':>7} {'ratio':>6} "
          f"{'dacc def':>9} {'dacc conv':>11} {'jaccard':>11} {'conv':>5} {'max KKT':>8} {'dobj':>9} {'refit s':>7}")
    for n, d in sizes:
        X, y = planted(n, d)
        Cs = default_Cs(X, y, n=17)
        t = time.perf_counter()
        path = fit_logistic_path(X, y, Cs=Cs, penalty="l1", seed=0)
        t_ours = time.perf_counter() - t
        Xs = (X - path.mean) / path.scale
        tr, te = path.train_idx, path.test_idx

        def sweep(Xs: np.ndarray = Xs, y: np.ndarray = y, tr: np.ndarray = tr, Cs: np.ndarray = Cs,
                  **kw: float) -> tuple[list, float]:
            t = time.perf_counter()
            ms = [LogisticRegression(solver="liblinear", l1_ratio=1.0, C=float(C), intercept_scaling=1000,
                                     max_iter=10_000, **kw).fit(Xs[tr], y[tr]) for C in Cs]
            return ms, time.perf_counter() - t

        m_def, t_def = sweep()
        m_conv, t_conv = sweep(tol=1e-6)
        acc_def = np.array([m.score(Xs[te], y[te]) for m in m_def])
        acc_conv = np.array([m.score(Xs[te], y[te]) for m in m_conv])
        jac, dobj = [], []
        for k, (C, m) in enumerate(zip(Cs, m_conv)):
            a, b = set(np.flatnonzero(m.coef_[0])), set(np.flatnonzero(path.coefs[k, 0]))
            if a | b:
                jac.append(len(a & b) / len(a | b))
            f_ours = objective(Xs[tr], y[tr], C, path.coefs[k, 0], path.intercepts[k, 0])
            f_sk = objective(Xs[tr], y[tr], C, m.coef_[0], m.intercept_[0])
            dobj.append((f_ours - f_sk) / f_sk)
        t_refit, refit_ok = 0.0, True
        for k in range(16):
            t = time.perf_counter()
            rf = refit_at_C(X, y, path, float(np.sqrt(Cs[k] * Cs[k + 1])))
            t_refit = max(t_refit, time.perf_counter() - t)
            refit_ok &= bool(rf.converged[0])
        d_def = np.abs(acc_def - path.test_accuracy).max()
        d_conv = np.abs(acc_conv - path.test_accuracy).max()
        print(f"{n:>5} {d:>5} {t_ours:>7.3f} {t_def:>7.2f} {t_def / t_ours:>6.1f} {t_conv:>7.2f} {t_conv / t_ours:>6.1f} "
              f"{d_def:>5.3f}/{round(d_def * te.size):<3d}{d_conv:>7.3f}/{round(d_conv * te.size):<3d}"
              f"{min(jac):>5.2f}-{max(jac):<5.2f} {int(path.converged.sum()):>2}/17 {path.kkt_residual.max():>8.1e} "
              f"{max(dobj):>+9.1e} {t_refit:>7.3f}{'' if refit_ok else ' (a refit did NOT converge)'}", flush=True)
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
        # The page's "All layers at this C": one cold fit per layer at the middle C of a path,
        # 30 layers shaped like the embedded model's MLP (1,536 neurons), n = 2,000.
        L, n, d = 30, 2000, 1536
        C_mid = None
        t_all, worst, conv_all = 0.0, 0.0, 0
        for layer in range(L):
            X, y = planted(n, d, seed=100 + layer)
            if C_mid is None:
                C_mid = float(default_Cs(X, y, n=17)[8])
            t = time.perf_counter()
            r = fit_logistic_path(X, y, Cs=[C_mid], seed=0)
            dt = time.perf_counter() - t
            t_all, worst, conv_all = t_all + dt, max(worst, dt), conv_all + int(r.converged[0])
        print(f"all layers at one C (C={C_mid:.3g}): {L} layers × n={n} × d={d}: {t_all:.2f} s "
              f"(slowest layer {worst:.2f} s), converged {conv_all}/{L}")


def page_fits(hook: str, classes: list[str]) -> None:
    """One fresh ``fit_sparse`` per class B on the Sparse page's default entry (see the module docstring)."""
    import os

    import glue
    from probing_core.analyses import sparse
    from probing_core.data.datasets import DatasetSpec, load_dataset
    from probing_core.models import ModelSpec, default_cache_root, load_model
    from probing_core.store.activations import build_cache, open_entry
    from probing_core.store.entries import ActivationStore
    from probing_core.threads import workers

    model = load_model(ModelSpec("embedded"))
    store = ActivationStore(default_cache_root() / "activations")
    want = glue.SPARSE_BUILD
    entry, _ = build_cache(model, load_dataset(DatasetSpec("pydoc")), want.hooks(model), store=store,
                           max_tokens=want.max_tokens, max_len=want.max_len, dtype=want.dtype)
    acts = open_entry(store, entry.key)
    print(f"fit_sparse on {hook}, entry {entry.key[:10]} ({acts.n_tokens:,} tokens), {workers()} worker threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'class B':>9} {'contexts':>8} {'wall ms':>8} {'CPU ms':>7} {'Newton steps/C (path)':>22} "
          f"{'max KKT':>8} {'converged':>9}")
    for b in classes:
        q = sparse.SparseQuery(sparse.parse_classes(" the", b))
        ctx = sparse.mine(acts, model.tokenizer, q)
        t, c = time.perf_counter(), time.process_time()
        fit = sparse.fit_sparse(acts, hook, ctx, q)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        paths = [fit.path, fit.embed_same, fit.embed_best]
        kkt = max(float(p.kkt_residual.max()) for p in paths)
        conv = all(bool(p.converged.all()) for p in paths) and bool(fit.controls.converged.all())
        print(f"{b!r:>9} {len(ctx.labels):>8} {wall * 1e3:>8.0f} {cpu * 1e3:>7.0f} "
              f"{int(fit.path.n_iter.max()):>9} max, {fit.path.n_iter.mean():.1f} mean {kkt:>8.1e} "
              f"{'all' if conv else 'NOT all':>9}", flush=True)


if __name__ == "__main__":
    main()
