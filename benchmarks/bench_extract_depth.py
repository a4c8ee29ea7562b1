"""Extraction depth: the vocabulary extraction (one row per token id, what ``--dataset vocab`` builds)
for ``embed`` alone against every residual hook, now that a pass stops after the deepest hook's block.

1. The same vocabulary batches through ``LoadedModel.run_with_cache`` for ``hook_embed``: stopped
   after the embedding (today) vs the whole model (before: ``return_logits=True`` runs every block).
2. ``extract_to_folder`` of the vocabulary rows for ``embed`` vs ``embed resid_pre resid_mid
   resid_post`` (the regression default) — seconds, tokens/s, and both extrapolated to the whole
   vocabulary. A full vocabulary of every resid hook is ~10 GB on disk for SmolLM2: we time a slice.
3. ``probe embedding``'s core call (``embedding_regression`` on ``W_E``: no forward pass at all).

Usage: flock /tmp/bench.lock python benchmarks/bench_extract_depth.py [--model embedded] [--rows 2048]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from probing_core.analyses.regression import embedding_regression  # noqa: E402
from probing_core.data.datasets import DatasetSpec, load_dataset, tokenize_dataset  # noqa: E402
from probing_core.models import load_model, spec_from_cli  # noqa: E402
from probing_core.store.activations import extract_to_folder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--rows", type=int, default=2048, help="vocabulary rows timed (default 2048)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per pass (the CLI default, 16)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model = load_model(spec_from_cli(args.model))
    vocab = load_dataset(DatasetSpec("vocab"))
    batch = tokenize_dataset(model, vocab, max_len=1, max_tokens=args.rows)
    n, bs = batch.n_tokens, args.batch_size
    print(f"{model.spec.label()}: {model.n_layers} blocks, vocabulary {model.d_vocab:,}; timing {n:,} rows, {bs} per pass, "
          f"torch threads {torch.get_num_threads()}, load average {__import__('os').getloadavg()[0]:.1f}")

    def passes(return_logits: bool) -> float:
        t = time.perf_counter()
        for s in range(0, n, bs):
            model.run_with_cache(torch.from_numpy(batch.tokens[s : s + bs]), ["hook_embed"], return_logits=return_logits)
        return time.perf_counter() - t

    print("\n1. hook_embed passes, alternating")
    passes(False)
    stopped, full = [], []
    for _ in range(args.rounds):
        stopped.append(passes(False))
        full.append(passes(True))
    ms, mf = statistics.median(stopped), statistics.median(full)
    print(f"  stopped after the embedding : median {ms:7.2f} s  (min {min(stopped):.2f}, max {max(stopped):.2f})")
    print(f"  every block (before)        : median {mf:7.2f} s  (min {min(full):.2f}, max {max(full):.2f})")
    print(f"  {mf / ms:.1f}x faster; whole vocabulary: {ms * model.d_vocab / n:.0f} s vs {mf * model.d_vocab / n:.0f} s")

    print("\n2. extract_to_folder of the vocabulary rows")
    sets = {"embed": model.hook_names(["embed"]),
            "embed + resid_pre/mid/post": model.hook_names(["embed", "resid_pre", "resid_mid", "resid_post"])}
    with tempfile.TemporaryDirectory() as d:
        for name, hooks in sets.items():
            times = []
            for r in range(args.rounds if name == "embed" else 1):
                folder = Path(d) / f"{len(hooks)}-{r}"
                folder.mkdir()
                t = time.perf_counter()
                extract_to_folder(model, batch, hooks, folder, batch_size=bs)
                times.append(time.perf_counter() - t)
            m = statistics.median(times)
            gb = model.d_vocab * sum(model.hook_width(h) for h in hooks) * 4 / 1e9
            print(f"  {name:<28s} {len(hooks):3d} hooks: {m:7.2f} s for {n:,} rows ({n / m:8.0f} tokens/s); "
                  f"whole vocabulary ≈ {m * model.d_vocab / n:6.0f} s, {gb:.1f} GB")

    print("\n3. probe embedding (W_E only, no forward pass)")
    t = time.perf_counter()
    res = embedding_regression(model)
    print(f"  embedding_regression, {len(res.tasks)} tasks over {res.d_vocab:,} tokens: {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
