"""Background cache builds (demo mode's default entry): the thread builds the same entry build_cache
would, its progress is readable meanwhile, a page asking for the entry at the same time reuses it,
and a failure becomes a status with the core's message instead of vanishing with the thread."""
from __future__ import annotations

import time

import numpy as np

from probing_core.data.datasets import DatasetSpec, load_dataset
from probing_core.store.activations import build_cache, open_entry
from probing_core.store.background import build_in_background
from probing_core.store.entries import ActivationStore


def test_background_build_finishes_the_entry_and_reports_progress(tiny_model, tmp_path):
    store = ActivationStore(tmp_path / "store")
    data = load_dataset(DatasetSpec("pydoc"))
    hooks = tiny_model.hook_names(["embed", "resid_post"])
    job = build_in_background(tiny_model, data, hooks, store=store, max_len=64, max_tokens=4000)
    seen = []
    while (s := job.status()).state == "running":
        seen.append(s.fraction)
        time.sleep(0.01)
    final = job.wait(60)
    assert final.state == "done" and final.built and final.error is None and final.fraction == 1.0
    assert seen == sorted(seen) and all(0.0 <= f <= 1.0 for f in seen)
    # a page asking for the same entry now gets this one, not a second extraction
    entry, built = build_cache(tiny_model, data, hooks, store=store, max_len=64, max_tokens=4000)
    assert not built and entry.key == final.entry_key
    acts = open_entry(store, entry.key)
    assert acts.n_tokens == 4000 and np.isfinite(acts.hook("blocks.1.hook_resid_post")).all()


def test_a_page_asking_meanwhile_waits_for_the_same_build(tiny_model, tmp_path):
    store = ActivationStore(tmp_path / "store")
    data = load_dataset(DatasetSpec("pydoc"))
    hooks = tiny_model.hook_names(["embed", "resid_post"])
    job = build_in_background(tiny_model, data, hooks, store=store, max_len=64, max_tokens=6000)
    entry, _ = build_cache(tiny_model, data, hooks, store=store, max_len=64, max_tokens=6000)  # while it runs
    final = job.wait(60)
    assert final.state == "done" and final.entry_key == entry.key
    assert len(store.entries()) == 1  # one extraction between them


def test_a_failed_background_build_keeps_the_message(tiny_model, tmp_path):
    job = build_in_background(tiny_model, load_dataset(DatasetSpec("pydoc")), ["hook_embed"],
                              store=ActivationStore(tmp_path / "store"), max_tokens=0)
    final = job.wait(60)
    assert final.state == "failed" and "max tokens" in final.error and final.entry_key is None
