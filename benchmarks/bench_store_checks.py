"""What the store's checks cost (issue 15): the proof at commit, the cheap checks every listing
makes, the checks on opening an entry, and `cache verify`, against hashing every byte.

    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_store_checks.py [--hooks 8]

Synthetic entry of ``--hooks`` hooks × 20,000 tokens × d = 576 float32 (SmolLM2's width), warm
page cache; best of 5.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import best_of  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

from probing_core.store.integrity import (  # noqa: E402
    checksum_problem,
    inspect_folder,
    open_problem,
    seal_entry,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hooks", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--width", type=int, default=576)
    a = ap.parse_args()
    n, d, n_hooks = a.tokens, a.width, a.hooks
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "0123456789abcdef"
        folder.mkdir()
        arr = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
        hooks = [f"blocks.{i}.hook_resid_post" for i in range(n_hooks)]
        for h in hooks:
            np.save(folder / f"{h}.npy", arr)
        for name in ("token_ids", "seq", "pos", "next_ids"):
            np.save(folder / f"{name}.npy", np.zeros(n, np.int32))
        np.save(folder / "doc_index.npy", np.zeros(n // 128, np.int32))
        ids = list(range(5000))
        (folder / "vocab.json").write_text(json.dumps({"ids": ids, "raw": ["x"] * 5000, "text": ["x"] * 5000, "space_marker": "Ġ"}))
        meta = {"hooks": hooks, "n_tokens": n, "n_seq": n // 128, "widths": {h: d for h in hooks}, "dtype": "float32",
                "rows_written": {h: n for h in hooks}}
        best_of(lambda: [p.read_bytes() for p in folder.glob("*.npy")], 1)  # warm the page cache
        t_seal = best_of(lambda: seal_entry(folder, dict(meta)))
        seal_entry(folder, meta)
        (folder / "meta.json").write_text(json.dumps(meta))
        entry = inspect_folder(folder.name, folder)
        t_ls = best_of(lambda: inspect_folder(folder.name, folder))
        t_open = best_of(lambda: open_problem(entry))  # type: ignore[arg-type]
        t_verify = best_of(lambda: checksum_problem(entry))  # type: ignore[arg-type]
        t_full = best_of(lambda: [hashlib.blake2b(p.read_bytes()).digest() for p in folder.glob("*.npy")], 3)
    mb = n_hooks * n * d * 4 / 1e6
    print(f"[store checks] {n_hooks} hooks × {n:,} tokens × {d} float32 = {mb:.0f} MB, warm page cache")
    print(f"  seal at commit (shapes, sampled hashes)   {t_seal * 1e3:8.1f} ms")
    print(f"  cheap checks, every listing (stat)         {t_ls * 1e3:8.2f} ms")
    print(f"  open checks (headers, vocab.json)          {t_open * 1e3:8.2f} ms")
    print(f"  cache verify (sampled hashes, zero check)  {t_verify * 1e3:8.1f} ms")
    print(f"  blake2b of every byte (for comparison)     {t_full * 1e3:8.1f} ms  ({t_full / t_verify:.0f}x verify)")


if __name__ == "__main__":
    main()
