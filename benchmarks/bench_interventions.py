"""Interventions: the cost of a steering slider move, of the batched random band, and of amnesic probing.

    flock /tmp/bench.lock python benchmarks/bench_interventions.py [--model embedded] [--repeat 7]

Prints medians and ratios measured in one run (no assertions). Goals (issue 17): a steering move
≤ 1.2× a bare forward of the same prompt; the K = 20 band as one batched forward ≤ 3× one forward
at ≤ 32 tokens; amnesic probing per iteration reported against one ridge fit + one pass over the
stored activations.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from probing_core.analyses import amnesic, directions, interventions as iv
from probing_core.analyses.regression import regression_data
from probing_core.data.datasets import DatasetSpec, load_dataset
from probing_core.data.labels import LabelSpec
from probing_core.models import load_model, spec_from_cli
from probing_core.store.activations import build_cache, open_entry
from probing_core.store.entries import ActivationStore

PROMPT = "The city of Paris is in France. This statement is:"


def _medians(fns: dict, repeat: int) -> dict:
    """Median wall time of each function, run in alternation (the shared box's load drifts; alternating
    keeps a ratio honest)."""
    for fn in fns.values():
        fn()  # warm-up
    ts: dict = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=4000, help="tokens in the entry used for amnesic probing")
    args = ap.parse_args()
    model = load_model(spec_from_cli(args.model))
    L = model.n_layers
    hook, later = f"blocks.{L // 3}.hook_resid_post", f"blocks.{(2 * L) // 3}.hook_resid_post"
    root = Path(os.environ.get("PROBING_CACHE_DIR", tempfile.mkdtemp())) / "activations"
    store = ActivationStore(root)
    entry, _ = build_cache(model, load_dataset(DatasetSpec("pydoc")), [hook, later], store=store, max_len=64,
                           max_tokens=args.tokens)
    acts = open_entry(store, entry.key)
    X, y, info = regression_data(acts, [hook], LabelSpec.make("starts_with_space"), "all")
    d = directions.mass_mean_direction(X[hook], y, model_key=model.key, hook=hook)
    ids = model.encode(PROMPT)
    toks = torch.tensor([ids])
    print(f"{args.model}: {L} layers; prompt {len(ids)} tokens; entry {acts.n_tokens:,} tokens; torch threads {torch.get_num_threads()}")

    step = iv.Intervention("steer", "all", 4.0)
    K = 20
    mask = iv.position_mask(model, ids, "all")
    batch = iv._rows_batch(model, d, step, mask, controls=K, seed=0)
    m = _medians({
        "bare": lambda: model.logits(toks),
        "steer": lambda: iv.run_intervened(model, toks, d, step),
        "band": lambda: iv._forward(model, toks.expand(K + 1, -1), hook, batch),
    }, args.repeat)
    bare, steer, band = m["bare"], m["steer"], m["band"]
    print(f"bare forward                                  {bare * 1e3:8.1f} ms")
    print(f"steering move (run_intervened, c = 4)         {steer * 1e3:8.1f} ms   ratio {steer / bare:.2f}x (goal <= 1.2x)")
    print(f"probe + K = {K} band, one batched forward       {band * 1e3:8.1f} ms   ratio {band / bare:.2f}x (goal <= 3x)")
    full = _medians({"full": lambda: iv.intervene_prompt(model, PROMPT, d, step, answers=(" True", " False"), k_controls=K)}, 3)["full"]
    print(f"intervene_prompt (bare + probe + band)        {full * 1e3:8.1f} ms   ratio {full / bare:.2f}x")

    t = time.perf_counter()
    directions.ridge_direction(X[hook], y, model_key=model.key, hook=hook)
    np.asarray(acts.hook(hook)).sum()
    fit_pass = time.perf_counter() - t
    res = amnesic.amnesic_probing(model, acts, hook, info.rows, y, k_max=3, later_hook=later, n_loss_rows=2)
    print(f"one ridge fit + one pass over the stored hook {fit_pass * 1e3:8.1f} ms")
    print(f"amnesic probing, per iteration                {res.seconds_per_iteration * 1e3:8.1f} ms   "
          f"ratio {res.seconds_per_iteration / fit_pass:.1f}x (probe + random: 2 fits, 2 loss passes, 2 downstream passes)")
    print(f"    accuracy at {hook} vs k: {np.round(res.probe_acc, 3).tolist()} (random {np.round(res.control_acc, 3).tolist()}, "
          f"chance {res.chance:.3f})")
    print(f"    loss vs k: {np.round(res.loss, 4).tolist()} (random {np.round(res.control_loss, 4).tolist()})")


if __name__ == "__main__":
    main()
