"""Ray engine vs the one-process build, and the streamed ridge fit's memory (one run, ratios printed).

Run under the shared lock (the machine is shared):

    flock /tmp/bench.lock .venv/bin/python -u benchmarks/bench_ray.py [--model embedded|tiny] [--tokens 3000]

1. Extraction tokens/s of the embedded model (hooks: resid_post of every layer) over pydoc:
   the local build, then a Ray build with 1 and with 2 local CPU workers (same key, separate
   stores). Ray figures are given end to end (actor start = torch import + model load included)
   and in steady state (ranges after the first one finished, i.e. what a long job sees).
2. Memory of a ridge path fit (5-fold CV, 20 α) on a synthetic sharded hook of N × 576 fp32:
   streamed shard by shard vs the in-memory fit on the concatenated array. Peak memory is the
   peak of NumPy allocations (tracemalloc; memmap pages are page cache, not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROBING_CACHE_DIR", str(REPO / ".test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_extraction(model_id: str, tokens: int, max_len: int, batch_size: int) -> None:
    import torch

    from probing_core.data.datasets import DatasetSpec, load_dataset
    from probing_core.models import ModelSpec, load_model, tiny_native_config
    from probing_core.store import ray_engine
    from probing_core.store.activations import BuildParams, build_cache
    from probing_core.store.entries import ActivationStore
    from probing_core.store.shards import compare_entries

    spec = ModelSpec("embedded") if model_id == "embedded" else ModelSpec.native(tiny_native_config())
    model = load_model(spec)
    ds = load_dataset(DatasetSpec("pydoc"))
    hooks = model.hook_names(["resid_post"])
    cores = os.cpu_count() or 1
    print(f"model {model.spec.label()}, {len(hooks)} hooks × d={model.d_model}, {tokens} tokens, max_len {max_len}, "
          f"batch {batch_size}, {cores} cores, torch threads {torch.get_num_threads()}")
    kw = {"max_len": max_len, "max_tokens": tokens, "batch_size": batch_size}
    with tempfile.TemporaryDirectory() as d:
        local_tps = []

        def local(tag: str) -> tuple[ActivationStore, str, int]:
            store = ActivationStore(Path(d) / f"local-{tag}")
            entry, _ = build_cache(model, ds, hooks, store=store, **kw)
            local_tps.append(entry.n_tokens / float(entry.meta["seconds"]))
            print(f"local build ({tag}): {entry.n_tokens} tokens, extraction {entry.meta['seconds']:.1f} s → "
                  f"{local_tps[-1]:,.1f} tokens/s")
            return store, entry.key, entry.n_tokens

        ref_store, ref_key, n = local("before")
        t0 = time.perf_counter()
        ray_engine.connect(num_cpus=cores)
        print(f"ray.init (local cluster, {cores} CPUs): {time.perf_counter() - t0:.1f} s (once per process)")
        ray_tps = {}
        for workers in (1, 2):
            store = ActivationStore(Path(d) / f"ray{workers}")
            t0 = time.perf_counter()
            res = ray_engine.build_cache_ray(model, ds, hooks, store=store, options=ray_engine.RayOptions(workers=workers),
                                             params=BuildParams(**kw), rows_per_shard=batch_size)
            wall = time.perf_counter() - t0
            same = not compare_entries(store, res.entry.key, ref_store, ref_key)
            manifest = json.loads((res.entry.path / "shards.json").read_text())
            busy = sum(float(s["seconds"]) for s in manifest["shards"]) / min(workers, res.ranges_total)
            ray_tps[workers] = (n / wall, n / busy)
            print(f"ray, {workers} worker(s): {res.ranges_total} ranges; wall {wall:.1f} s (actor start + extraction) → "
                  f"{n / wall:,.1f} tokens/s end to end; extraction in the actors {busy:.1f} s per worker → "
                  f"{n / busy:,.1f} tokens/s; same bytes as local: {same}")
        ray_engine.import_ray().shutdown()
        local("after")
        ref = float(np.mean(local_tps))
        print(f"vs the local build (mean of before/after, {ref:,.1f} tokens/s; the two differ by "
              f"{abs(local_tps[0] - local_tps[1]) / ref:.0%} on this shared machine):")
        for workers, (e2e, ext) in ray_tps.items():
            print(f"  {workers} worker(s): end to end {e2e / ref:.2f}×, extraction {ext / ref:.2f}×")


def bench_ridge_memory(n_rows: int, d: int, n_shards: int) -> None:
    from probing_core.solvers.ridge import fit_ridge_path
    from probing_core.store.shards import ShardedArray

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        parts, w = [], rng.standard_normal(d)
        y = np.empty(n_rows)
        per = -(-n_rows // n_shards)
        for i, a in enumerate(range(0, n_rows, per)):
            m = min(per, n_rows - a)
            X = (rng.standard_normal((m, d)) * rng.uniform(0.1, 5, d)).astype(np.float32)
            y[a : a + m] = X @ w + rng.standard_normal(m)
            np.save(Path(tmp) / f"{i}.npy", X)
            del X
            parts.append(np.load(Path(tmp) / f"{i}.npy", mmap_mode="r"))
        sharded = ShardedArray(parts)
        gb = sharded.nbytes / 1e9
        print(f"ridge path, {n_rows:,} × {d} fp32 = {gb:.2f} GB in {n_shards} shards of {per:,} rows "
              f"({per * d * 4 / 1e6:.0f} MB), 5-fold CV + test split, 20 α")
        out = {}
        for name in ("streamed", "in-memory"):
            tracemalloc.start()
            t0 = time.perf_counter()
            X = sharded if name == "streamed" else np.asarray(sharded)
            r = fit_ridge_path({"h": X}, y, cv=5, baseline=False)
            secs = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            del X
            out[name] = (r, peak, secs)
            print(f"  {name:9}: {secs:.1f} s, peak NumPy memory {peak / 1e6:,.0f} MB ({peak / sharded.nbytes:.2f}× the hook), "
                  f"best R² (CV) {float(np.nanmax(r.r2_cv_mean)):.6f}")
        (rs, ps, ts), (rm, pm, tm) = out["streamed"], out["in-memory"]
        print(f"  streamed / in-memory: memory {ps / pm:.2f}×, time {ts / tm:.2f}×; max |ΔR²| "
              f"{float(np.nanmax(np.abs(rs.r2_cv - rm.r2_cv))):.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", choices=["embedded", "tiny"])
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ridge-rows", type=int, default=200_000)
    ap.add_argument("--skip-extraction", action="store_true")
    ap.add_argument("--skip-ridge", action="store_true")
    args = ap.parse_args()
    if not args.skip_ridge:
        bench_ridge_memory(args.ridge_rows, 576, 8)
    if not args.skip_extraction:
        bench_extraction(args.model, args.tokens, args.max_len, args.batch_size)


if __name__ == "__main__":
    main()
