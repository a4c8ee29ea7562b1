"""Foundation benchmarks (printed figures and ratios measured in one run; not timed tests).

1. Extraction throughput (tokens/s) writing activations to the store vs a bare forward pass of
   the same model and batches — goal ≥ 0.9.
2. Reading one hook from the store (memmap → contiguous array) vs a plain ``np.load`` of the same
   array vs a memory copy of the same size (this machine's bandwidth).
3. Cold (GGUF → dequantized folder) and warm (folder) start of the embedded model, each in a
   fresh process so imports count as a user would see them.

Usage: python benchmarks/bench_store.py [--quick] [--model embedded|tiny]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _timing import best_of  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

from probing_core.data.datasets import DatasetSpec, load_dataset, tokenize_dataset  # noqa: E402
from probing_core.models import load_model, spec_from_cli  # noqa: E402
from probing_core.store.activations import extract_to_folder  # noqa: E402
from probing_core.store.entries import ActivationStore  # noqa: E402


def bench_extraction(model_name: str, n_tokens: int, batch_size: int) -> None:
    model = load_model(spec_from_cli(model_name))
    ds = load_dataset(DatasetSpec("pydoc"))
    batch = tokenize_dataset(model, ds, max_len=128, max_tokens=n_tokens)
    hooks = model.hook_names(["embed", "resid_post"])

    def bare() -> None:
        for s in range(0, batch.tokens.shape[0], batch_size):
            model.logits(torch.from_numpy(batch.tokens[s : s + batch_size]))

    with tempfile.TemporaryDirectory() as d:
        def cached() -> None:
            folder = Path(tempfile.mkdtemp(dir=d))
            extract_to_folder(model, batch, hooks, folder, batch_size=batch_size)

        bare()  # warm-up (allocator, kernels)
        t_bare = best_of(bare, 2)
        t_cached = best_of(cached, 2)
    n = batch.n_tokens
    print(f"[extract] {model.spec.label()}, {n:,} tokens, batch {batch_size}×128, {len(hooks)} hooks (embed + resid_post)")
    print(f"  bare forward         {n / t_bare:10.1f} tokens/s  ({t_bare:.2f} s)")
    print(f"  extract to store     {n / t_cached:10.1f} tokens/s  ({t_cached:.2f} s)")
    print(f"  ratio cached/bare    {t_bare / t_cached:10.3f}   (goal ≥ 0.9)")


def bench_read(n_tokens: int, width: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = ActivationStore(Path(d) / "s")
        arr = np.random.default_rng(0).standard_normal((n_tokens, width), dtype=np.float32)

        def build(folder: Path) -> dict:
            np.save(folder / "hook_a.npy", arr)
            np.save(folder / "hook_b.npy", arr)
            for name in ("token_ids", "seq", "pos", "next_ids", "doc_index"):
                np.save(folder / f"{name}.npy", np.zeros(n_tokens, np.int32))
            (folder / "vocab.json").write_text('{"ids": [0], "raw": [""], "text": [""], "space_marker": ""}')
            return {"hooks": ["hook_a", "hook_b"], "n_tokens": n_tokens, "n_seq": n_tokens, "dtype": "float32",
                    "widths": {"hook_a": width, "hook_b": width}, "rows_written": {"hook_a": n_tokens, "hook_b": n_tokens}}

        entry, _ = store.get_or_build("0123456789abcdef", build)
        plain = entry.path / "hook_a.npy"
        out = np.empty_like(arr)
        src = arr.copy()

        def from_store() -> None:
            np.copyto(out, store.read(entry.key, "hook_a"))

        def from_np_load() -> None:
            np.load(plain)

        def memcopy() -> None:
            np.copyto(out, src)

        from_store(), from_np_load(), memcopy()  # warm the page cache
        t_store, t_load, t_copy = (best_of(f, 5) for f in (from_store, from_np_load, memcopy))
    mb = arr.nbytes / 1e6
    print(f"[read] one hook, {n_tokens:,} × {width} float32 = {mb:.0f} MB (warm page cache)")
    print(f"  store.read → array   {t_store * 1e3:8.1f} ms  ({mb / 1e3 / t_store:.1f} GB/s)")
    print(f"  np.load              {t_load * 1e3:8.1f} ms  ({mb / 1e3 / t_load:.1f} GB/s)")
    print(f"  memory copy          {t_copy * 1e3:8.1f} ms  ({mb / 1e3 / t_copy:.1f} GB/s)")
    print(f"  ratio store/np.load  {t_store / t_load:8.2f}   ratio store/memcopy {t_store / t_copy:.2f}")


def bench_start() -> None:
    code = (
        "import time,sys; t=time.perf_counter(); sys.path.insert(0, %r);"
        "from probing_core.models import load_model, ModelSpec; m=load_model(ModelSpec('embedded'));"
        "print(f'{time.perf_counter()-t:.2f} {m.load_seconds:.2f}')" % str(REPO)
    )
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "PROBING_CACHE_DIR": d, "HF_HUB_OFFLINE": "1"}
        cold = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
        warm = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    print("[start] embedded SmolLM2-135M, fresh process each (wall incl. imports / load_model only)")
    print(f"  cold (convert GGUF)  {float(cold[0]):6.1f} s / {float(cold[1]):6.1f} s")
    print(f"  warm (saved folder)  {float(warm[0]):6.1f} s / {float(warm[1]):6.1f} s")
    print(f"  ratio cold/warm      {float(cold[1]) / float(warm[1]):6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny model and small arrays (smoke run)")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}")
    if args.quick:
        bench_extraction(args.model or "tiny", 4_000, 16)
        bench_read(20_000, 64)
        return
    bench_extraction(args.model or "embedded", 2_048, 8)
    bench_read(20_000, 768 * 13 // 13)
    bench_read(100_000, 576)
    bench_start()


if __name__ == "__main__":
    main()
