"""What the Regression page costs on the embedded model at its default size (printed figures).

The Home page's default entry — SmolLM2-135M, the embedded pydoc corpus, 20,000 tokens, hook_embed
and every resid_post (31 hooks × 576 floats per token) — probed the way the page does it
(``run_regression``: labels, store reads of the selected rows, ridge path with 20 α, 5-fold CV and
a test split). Figures: the first fit (eigendecompositions), a label change on the same rows (the
cached decompositions are reused), the labels-and-rows part of a label change, and one plain read
of every stored hook (what any exact refit must at least do).

    python benchmarks/bench_regression_page.py            # builds the entry once in ./cache
    python benchmarks/bench_regression_page.py --tokens 4000

The entry is built in the app's own store (``PROBING_CACHE_DIR``, default ./cache), so a later
``make run`` finds it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from probing_core.store.activations import build_cache, open_entry  # noqa: E402
from probing_core.data.datasets import DatasetSpec, load_dataset  # noqa: E402
from probing_core.data.labels import LabelSpec  # noqa: E402
from probing_core.models import default_cache_root, load_model, spec_from_cli  # noqa: E402
from probing_core.analyses.regression import regression_data, run_regression  # noqa: E402
from probing_core.store.entries import ActivationStore  # noqa: E402


def _t(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--model", default="embedded")
    a = ap.parse_args()
    print(f"bench_regression_page: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at start")
    t_load, model = _t(lambda: load_model(spec_from_cli(a.model)))
    print(f"model load: {t_load:.1f} s")
    store = ActivationStore(default_cache_root() / "activations")
    hooks = model.hook_names(["embed", "resid_post"])
    ds = load_dataset(DatasetSpec("pydoc"))
    t_build, (entry, built) = _t(lambda: build_cache(model, ds, hooks, store=store, max_tokens=a.tokens))
    print(f"cache entry: {'built' if built else 'reused'} in {t_build:.1f} s ({entry.key})")
    acts = open_entry(store, entry.key)

    labels = [LabelSpec.make("length"), LabelSpec.make("capitalised"), LabelSpec.make("starts_with_space"),
              LabelSpec.make("position")]
    t_cold, run = _t(lambda: run_regression(acts, hooks, labels[0], "all"))
    r = run.result
    n, d = run.info.n_selected, r.decompositions[hooks[0]].n_features
    print(f"\n{len(hooks)} hooks × {n:,} tokens × d={d}; label '{labels[0].name}': best test R² "
          f"{r.r2_test[range(len(hooks)), r.best_index].max():.3f}")
    print(f"first fit (labels + reads + eigendecompositions): {t_cold:6.2f} s")
    for lab in labels[1:]:
        t_label, run2 = _t(lambda: run_regression(acts, hooks, lab, "all", decompositions=run.decompositions))
        t_data, _ = _t(lambda: regression_data(acts, hooks, lab, "all"))
        t_read, _ = _t(lambda: [float(acts.hook(h).sum(dtype="float32")) for h in hooks])
        print(f"label change → '{lab.name}': {t_label * 1e3:7.0f} ms   (labels + row selection {t_data * 1e3:.0f} ms; "
              f"one plain read of the {len(hooks)} stored hooks, 1 thread: {t_read * 1e3:.0f} ms; max test R² "
              f"{run2.result.r2_test[range(len(hooks)), run2.result.best_index].max():.3f})")
    print("(the α slider moves along the stored path: no refit)")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
