"""The activation store and extraction on a tiny real model: equality with a direct forward pass,
keys, crash safety, concurrency, eviction and bad input."""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from probing_core.store.activations import build_cache, cache_key, export_entry, open_entry
from probing_core.data.datasets import DatasetSpec, make_dataset, tokenize_dataset
from probing_core.errors import HookError, InputError, StoreError
from probing_core.models import ModelSpec, load_model, tiny_native_config
from probing_core.store.entries import ActivationStore

REPO = Path(__file__).resolve().parents[2]


def test_stored_activations_equal_direct_run_with_cache(tiny_model, pydoc_dataset, store):
    hooks = tiny_model.hook_names(["embed", "resid_post", "mlp_post"])
    entry, built = build_cache(tiny_model, pydoc_dataset, hooks, store=store, max_len=32, max_tokens=500)
    assert built and entry.n_tokens == 500
    acts = open_entry(store, entry.key)
    batch = tokenize_dataset(tiny_model, pydoc_dataset, max_len=32, max_tokens=500)
    _, direct = tiny_model.run_with_cache(torch.from_numpy(batch.tokens), hooks)
    valid = np.arange(batch.tokens.shape[1])[None, :] < batch.lengths[:, None]
    for h in hooks:
        expected = direct[h].numpy()[valid]
        got = acts.hook(h)
        assert isinstance(got, np.memmap)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(acts.token_ids, batch.tokens[valid])
    # next_ids is the following token in the same row, -1 at row ends
    row0 = batch.tokens[0, : batch.lengths[0]]
    np.testing.assert_array_equal(acts.next_ids[: len(row0) - 1], row0[1:])
    assert acts.next_ids[len(row0) - 1] == -1
    assert acts.bos_mask().sum() == batch.tokens.shape[0]


def test_vocab_dataset_embed_rows_are_W_E(tiny_model, store):
    from probing_core.data.datasets import load_dataset

    vocab = load_dataset(DatasetSpec("vocab"))
    entry, _ = build_cache(tiny_model, vocab, ["hook_embed"], store=store, max_len=8, max_tokens=None)
    acts = open_entry(store, entry.key)
    assert entry.n_tokens == tiny_model.d_vocab
    np.testing.assert_allclose(acts.hook("hook_embed"), tiny_model.bridge.W_E.detach().numpy(), atol=1e-6)


def test_key_changes_with_every_input(tiny_model, pydoc_dataset):
    other_model = load_model(ModelSpec.native(tiny_native_config(seed=1)))
    small = make_dataset(DatasetSpec("texts", "x"), ["hello world"])
    base = dict(max_len=32, max_tokens=100, dtype="float32")
    k = cache_key(tiny_model, pydoc_dataset, ["hook_embed"], **base)
    variants = [
        cache_key(other_model, pydoc_dataset, ["hook_embed"], **base),
        cache_key(tiny_model, small, ["hook_embed"], **base),
        cache_key(tiny_model, pydoc_dataset, ["blocks.0.hook_resid_post"], **base),
        cache_key(tiny_model, pydoc_dataset, ["hook_embed"], **{**base, "max_len": 16}),
        cache_key(tiny_model, pydoc_dataset, ["hook_embed"], **{**base, "max_tokens": 99}),
        cache_key(tiny_model, pydoc_dataset, ["hook_embed"], **{**base, "dtype": "float16"}),
    ]
    assert len({k, *variants}) == 7
    assert other_model.key != tiny_model.key  # same config, different weights → different identity
    assert cache_key(tiny_model, pydoc_dataset, ["hook_embed"], **base) == k


def test_superset_entry_is_reused(tiny_model, pydoc_dataset, store):
    e1, built1 = build_cache(tiny_model, pydoc_dataset, tiny_model.hook_names(["embed", "resid_post"]), store=store, max_len=32, max_tokens=200)
    e2, built2 = build_cache(tiny_model, pydoc_dataset, ["blocks.1.hook_resid_post"], store=store, max_len=32, max_tokens=200)
    assert built1 and not built2 and e1.key == e2.key


def test_float16_storage_is_close(tiny_model, pydoc_dataset, store):
    e32, _ = build_cache(tiny_model, pydoc_dataset, ["blocks.1.hook_resid_post"], store=store, max_len=32, max_tokens=300)
    e16, _ = build_cache(tiny_model, pydoc_dataset, ["blocks.1.hook_resid_post"], store=store, max_len=32, max_tokens=300, dtype="float16")
    a32 = store.read(e32.key, "blocks.1.hook_resid_post")
    a16 = store.read(e16.key, "blocks.1.hook_resid_post")
    assert a16.dtype == np.float16 and e16.bytes < e32.bytes
    np.testing.assert_allclose(a16.astype(np.float32), a32, atol=2e-2, rtol=1e-2)


def test_concurrent_threads_extract_once(tiny_model, pydoc_dataset, store):
    results = []

    def go():
        results.append(build_cache(tiny_model, pydoc_dataset, ["hook_embed"], store=store, max_len=32, max_tokens=2000))

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(b for _, b in results) == [False, False, False, True]
    assert len({e.key for e, _ in results}) == 1
    assert len(store.entries()) == 1


def _cli(cache_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "probing_core", "cache", "build", "--model", "tiny", "--cache-dir", str(cache_dir), *extra]


def test_two_processes_build_same_key_once(tmp_path):
    args = _cli(tmp_path, "--max-tokens", "20000", "--hooks", "resid_post", "--json")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o["built"] for o in outs) == [False, True]
    assert outs[0]["key"] == outs[1]["key"]
    assert len(ActivationStore(tmp_path / "activations").entries()) == 1


def test_killed_extraction_leaves_no_entry_and_next_run_completes(tmp_path):
    args = _cli(tmp_path, "--max-tokens", "60000", "--hooks", "embed", "resid_pre", "resid_mid", "resid_post", "mlp_post", "--json")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    entries_dir = tmp_path / "activations" / "entries"
    deadline = time.time() + 120
    while time.time() < deadline and not list(entries_dir.glob(".tmp-*/blocks.0.hook_resid_pre.npy")):
        time.sleep(0.05)
    assert list(entries_dir.glob(".tmp-*")), "extraction never started"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ActivationStore(tmp_path / "activations")  # reopening cleans the dead process's temp folder
    assert store.entries() == []
    assert not list(entries_dir.glob(".tmp-*"))
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["built"] and out["n_tokens"] == 60000
    assert [e.key for e in store.entries()] == [out["key"]]


def test_eviction_of_least_recently_used(tiny_model, pydoc_dataset, tmp_path):
    store = ActivationStore(tmp_path / "s", size_limit=10**12)
    e1, _ = build_cache(tiny_model, pydoc_dataset, ["hook_embed"], store=store, max_len=32, max_tokens=1000)
    e2, _ = build_cache(tiny_model, pydoc_dataset, ["hook_embed"], store=store, max_len=32, max_tokens=1001)
    store.get(e1.key)  # e1 is now the most recently used
    store.size_limit = e1.bytes + e2.bytes - 1
    e3, _ = build_cache(tiny_model, pydoc_dataset, ["hook_embed"], store=store, max_len=32, max_tokens=1002)
    keys = {e.key for e in store.entries()}
    assert e3.key in keys and e2.key not in keys


def test_delete_and_export(tiny_entry, tmp_path):
    store, entry = tiny_entry
    paths = export_entry(store, entry.key, "blocks.0.hook_resid_post", tmp_path / "out.npy")
    arr = np.load(paths[0], allow_pickle=False)
    np.testing.assert_array_equal(arr, store.read(entry.key, "blocks.0.hook_resid_post"))
    lines = paths[1].read_text().splitlines()
    assert lines[0].startswith("row\tseq\tpos\ttoken_id") and len(lines) == entry.n_tokens + 1


def test_bad_inputs(tiny_model, pydoc_dataset, store, tmp_path):
    with pytest.raises(HookError, match="do not exist"):
        build_cache(tiny_model, pydoc_dataset, ["blocks.7.hook_resid_post"], store=store)
    with pytest.raises(HookError):
        build_cache(tiny_model, pydoc_dataset, ["not_a_hook"], store=store)
    with pytest.raises(InputError, match="positive"):
        build_cache(tiny_model, pydoc_dataset, ["hook_embed"], store=store, max_tokens=0)
    with pytest.raises(StoreError, match="no hook"):
        e, _ = build_cache(tiny_model, pydoc_dataset, ["hook_embed"], store=store, max_len=32, max_tokens=50)
        store.read(e.key, "blocks.0.hook_resid_post")
    with pytest.raises(StoreError, match="not a store key"):
        store.get("../../etc")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="not writable"):
        ActivationStore(blocker / "store")


def test_disk_full_gives_store_error_and_no_entry(tiny_model, pydoc_dataset, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here to fill the disk")
    try:
        store = ActivationStore(mnt)
        with pytest.raises(StoreError, match="full") as failed:
            build_cache(tiny_model, pydoc_dataset, tiny_model.hook_names(["resid_post", "mlp_post"]), store=store, max_len=64, max_tokens=5000)
        assert store.entries() == [] and not list((mnt / "entries").glob(".tmp-*"))
        store.close()
        del failed  # its traceback holds the build's memory maps, which keep the mount busy
        gc.collect()
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
