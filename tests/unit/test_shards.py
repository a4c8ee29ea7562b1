"""Sharded store entries (no Ray): the view over shards, the in-process sharded build, resume,
verification, and the streamed ridge fit over shards against the in-memory fit."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from probing_core.cli import main
from probing_core.errors import ProbeError, StoreError
from probing_core.solvers.ridge import (
    decompose_ridge,
    decompose_ridge_streamed,
    fit_ridge_path,
    make_split,
)
from probing_core.store import shards
from probing_core.store.activations import BuildParams, build_cache, open_entry
from probing_core.store.entries import ActivationStore

REPO = Path(__file__).resolve().parents[2]
HOOKS = ("embed", "resid_post", "mlp_post")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def local_entry(tiny_model, pydoc_dataset, tmp_path_factory):
    """The one-process build (one file per hook) of 3,000 tokens: the reference."""
    store = ActivationStore(tmp_path_factory.mktemp("local"))
    entry, _ = build_cache(tiny_model, pydoc_dataset, tiny_model.hook_names(HOOKS), store=store, max_len=64,
                           max_tokens=3000, batch_size=4)
    return store, entry


def _same_entry(store_a, key_a, store_b, key_b) -> None:
    assert shards.compare_entries(store_a, key_a, store_b, key_b) == []  # bitwise: token table and every hook


class _StopAfter:
    """An engine that computes ``n`` ranges in this process, then fails like a killed job."""

    def __init__(self, model, n: int) -> None:
        self.inner, self.n = shards.local_runner(model), n

    def __call__(self, job):
        for i, done in enumerate(self.inner(job)):
            yield done
            if i + 1 == self.n:
                raise RuntimeError("job killed")


# ---- the view over shards ---------------------------------------------------------------------
def test_sharded_array_indexes_like_the_concatenated_array(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 5)).astype(np.float32) for n in (7, 1, 12, 4)]
    paths = []
    for i, p in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", p)
        paths.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    X = shards.ShardedArray(paths)
    full = np.concatenate(parts)
    assert X.shape == full.shape and len(X) == 24 and X.dtype == np.float32
    assert np.array_equal(np.asarray(X), full)
    for key in (0, 6, 7, 8, -1, slice(2, 5), slice(5, 20), slice(None, None, 3), slice(8, 20),
                np.array([23, 0, 7, 7, 8, -2]), full[:, 0] > 0, (slice(3, 15), 2), (np.array([1, 9]), slice(1, 3))):
        assert np.array_equal(X[key], full[key]), key
    idx = np.array([[3, 20], [8, 0]])
    assert np.array_equal(np.take(X, idx, axis=0), full[idx])
    # A slice inside one shard is a view of its memmap (no copy), and chunks are the shards themselves.
    assert np.shares_memory(X[8:15], paths[2])
    assert [(s, c.shape[0]) for s, c in X.iter_chunks()] == [(0, 7), (7, 1), (8, 12), (20, 4)]
    assert all(c is p for (_, c), p in zip(X.iter_chunks(), paths))
    with pytest.raises(IndexError):
        X[24]
    with pytest.raises(IndexError):
        X[np.array([0, 30])]


# ---- the in-process sharded build ----------------------------------------------------------------
def test_local_sharded_build_equals_the_one_file_build(tiny_model, pydoc_dataset, local_entry, tmp_path):
    store0, e0 = local_entry
    store = ActivationStore(tmp_path / "s")
    hooks = tiny_model.hook_names(HOOKS)
    res = shards.build_sharded(tiny_model, pydoc_dataset, hooks, store=store, run=shards.local_runner(tiny_model),
                               engine="local-shards", params=BuildParams(64, 3000, batch_size=4), rows_per_shard=10)
    n_seq = int(res.entry.meta["n_seq"])
    assert res.built and res.entry.key == e0.key  # same key whichever engine filled it
    assert res.ranges_total == res.ranges_computed == -(-n_seq // 12)  # 10 rows → 3 whole batches of 4
    assert res.forward_passes == -(-n_seq // 4)  # the local build's own batches, once each
    assert res.entry.meta["layout"] == "sharded" and res.entry.meta["engine"] == "local-shards"
    _same_entry(store0, e0.key, store, res.entry.key)
    assert isinstance(open_entry(store, e0.key).hook(hooks[0]), shards.ShardedArray)
    assert not list(store.entries_dir.glob(".partial-*"))
    # A second build of the key finds the entry; `cache ls` says how each was built.
    again = shards.build_sharded(tiny_model, pydoc_dataset, hooks, store=store, run=shards.local_runner(tiny_model),
                                 engine="local-shards", params=BuildParams(64, 3000, batch_size=4))
    assert not again.built and again.forward_passes == 0
    store.verify(e0.key)
    assert store.verify(e0.key).meta["n_shards"] == res.ranges_total


def test_cache_ls_says_how_an_entry_was_built(tiny_model, pydoc_dataset, local_entry, tmp_path, capsys):
    _, e0 = local_entry
    root = tmp_path / "cache"
    store = ActivationStore(root / "activations")
    shutil.copytree(e0.path, store.path_of(e0.key))
    shards.build_sharded(tiny_model, pydoc_dataset, tiny_model.hook_names(["embed"]), store=store,
                         run=shards.local_runner(tiny_model), engine="local-shards", params=BuildParams(32, 500))
    capsys.readouterr()
    assert main(["cache", "ls", "--json", "--cache-dir", str(root)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["engine"] for r in rows) == ["local", "local-shards"]
    assert main(["cache", "ls", "--cache-dir", str(root)]) == 0
    assert "local-shards" in capsys.readouterr().out


def test_resume_computes_only_missing_ranges(tiny_model, pydoc_dataset, local_entry, tmp_path):
    store0, e0 = local_entry
    store = ActivationStore(tmp_path / "s")
    hooks = tiny_model.hook_names(HOOKS)
    kw = {"store": store, "engine": "local-shards", "params": BuildParams(64, 3000, batch_size=4), "rows_per_shard": 8}
    with pytest.raises(StoreError, match=r"3 of \d+ shards are finished and kept.*run the same build again"):
        shards.build_sharded(tiny_model, pydoc_dataset, hooks, run=_StopAfter(tiny_model, 3), **kw)
    assert store.get(e0.key) is None and store.entries() == []  # nothing half-written is visible
    part = shards.partial_dir(store, e0.key)
    finished = sorted(d.name for d in (part / "shards").iterdir() if not d.name.startswith("."))
    assert len(finished) == 3
    # A crashed writer's temp shard and a damaged finished shard are not trusted: both are redone.
    (part / "shards" / ".tmp-0000000099-0000000107-dead").mkdir()
    victim = part / "shards" / finished[1] / f"{hooks[0]}.npy"
    arr = np.load(victim)
    arr[0, 0] += 1.0
    np.save(victim, arr)
    res = shards.build_sharded(tiny_model, pydoc_dataset, hooks, run=shards.local_runner(tiny_model), **kw)
    assert res.built and res.ranges_reused == 2 and res.ranges_computed == res.ranges_total - 2
    kept = {finished[0], finished[2]}
    missing = [r for r in shards.plan_ranges(int(res.entry.meta["n_seq"]), 8) if shards.shard_name(r) not in kept]
    assert res.forward_passes == sum(-(-(b - a) // 4) for a, b in missing)  # counted by the extraction itself
    _same_entry(store0, e0.key, store, res.entry.key)
    assert not part.exists()


def test_cache_rm_removes_an_unfinished_builds_shards_unless_their_builder_is_alive(tiny_model, pydoc_dataset,
                                                                                     tmp_path, capsys):
    root = tmp_path / "cache"
    store = ActivationStore(root / "activations")
    hooks = tiny_model.hook_names(["embed"])
    params = BuildParams(32, 600)
    key = params.key(tiny_model, pydoc_dataset, hooks)
    part = shards.partial_dir(store, key)
    refused: list[str] = []

    def progress(frac: float, msg: str) -> None:  # runs inside the live build, which holds the key's lock
        if "shards, rows" in msg and not refused:
            with pytest.raises(StoreError, match=r"a build of \w+ is running now.*stop that build") as e:
                store.delete(key)
            assert (part / "shards").is_dir()  # the live build's shards are untouched
            refused.append(str(e.value))

    with pytest.raises(StoreError, match=r"2 of \d+ shards are finished and kept"):
        shards.build_sharded(tiny_model, pydoc_dataset, hooks, store=store, run=_StopAfter(tiny_model, 2),
                             engine="local-shards", params=params, rows_per_shard=4, progress=progress)
    assert refused and len([d for d in (part / "shards").iterdir() if not d.name.startswith(".")]) == 2
    # The builder is gone: `cache rm KEY` removes the unfinished build's folder (no entry was committed).
    capsys.readouterr()
    assert main(["cache", "rm", key, "--cache-dir", str(root)]) == 0
    assert f"deleted {key}" in capsys.readouterr().out
    assert not part.exists() and not list(store.entries_dir.iterdir())
    assert main(["cache", "rm", key, "--cache-dir", str(root)]) == 1  # nothing left to delete
    # A committed entry and a leftover partial folder of the same key go together (Home's Delete).
    entry = shards.build_sharded(tiny_model, pydoc_dataset, hooks, store=store, run=shards.local_runner(tiny_model),
                                 engine="local-shards", params=params, rows_per_shard=4).entry
    (part / "shards").mkdir(parents=True)
    assert store.delete(entry.key) and not part.exists() and store.get(key) is None


def test_verify_finds_a_damaged_shard_of_a_committed_entry(tiny_model, pydoc_dataset, tmp_path):
    store = ActivationStore(tmp_path / "s")
    res = shards.build_sharded(tiny_model, pydoc_dataset, tiny_model.hook_names(["embed"]), store=store,
                               run=shards.local_runner(tiny_model), engine="local-shards", params=BuildParams(32, 600),
                               rows_per_shard=8)
    assert res.ranges_total > 1
    path = next((res.entry.path / "shards").iterdir()) / "hook_embed.npy"
    arr = np.load(path)
    arr[:] = 0.0
    np.save(path, arr)
    found = store.verify(res.entry.key)
    assert "sampled checksum" in found.reason


def test_shards_and_the_cli_do_not_import_ray():
    code = ("import sys, probing_core.cli, probing_core.store.shards, probing_core.store.ray_engine, "
            "probing_core.solvers.ridge; from probing_core.cli import build_parser; build_parser(); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---- streamed ridge over shards -------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_entry(tiny_model, pydoc_dataset, tmp_path_factory):
    store = ActivationStore(tmp_path_factory.mktemp("sharded"))
    res = shards.build_sharded(tiny_model, pydoc_dataset, tiny_model.hook_names(HOOKS), store=store,
                               run=shards.local_runner(tiny_model), engine="local-shards",
                               params=BuildParams(64, 3000, batch_size=4), rows_per_shard=4)
    return store, res.entry


def test_streamed_ridge_equals_the_in_memory_fit(sharded_entry):
    store, entry = sharded_entry
    acts = open_entry(store, entry.key)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]
    X_sh = {h: acts.hook(h) for h in hooks}
    assert all(isinstance(x, shards.ShardedArray) and len(x.parts) > 10 for x in X_sh.values())
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(acts.n_tokens, 2000, replace=False))[::-1].copy()  # any order
    w = rng.standard_normal(X_sh[hooks[1]].shape[1])
    y = np.asarray(X_sh[hooks[1]][rows], np.float64) @ w + 0.3 * rng.standard_normal(rows.size)
    mem = fit_ridge_path({h: np.asarray(x[rows]) for h, x in X_sh.items()}, y, cv=4)
    streamed = fit_ridge_path(X_sh, y, rows=rows, cv=4)  # a ShardedArray streams by default
    assert all(d.form == "primal" for d in streamed.decompositions.values())
    for name in ("r2_train", "r2_test", "r2_cv", "r2_train_ols", "baseline_r2"):
        np.testing.assert_allclose(getattr(streamed, name), getattr(mem, name), atol=2e-6, err_msg=name)
    assert np.array_equal(streamed.best_alpha, mem.best_alpha)
    for h in hooks:
        # fp32 Gram round-off: one product per block in memory, per shard (summed in fp64) streamed.
        scale = float(np.abs(mem.coef(h, 1.0)).max())
        np.testing.assert_allclose(streamed.coef(h, 1.0), mem.coef(h, 1.0), rtol=0, atol=2e-5 * scale)
        assert streamed.intercept(h, 1.0) == pytest.approx(mem.intercept(h, 1.0), rel=1e-4, abs=1e-6)
    # …and both are scikit-learn's Ridge on the training rows.
    split = make_split(rows.size, test_fraction=0.2, cv=4, seed=0)
    train = split.block != 0
    Xt = np.asarray(X_sh[hooks[1]][rows][train], np.float64)
    sk = Ridge(alpha=1.0).fit(Xt, y[train])
    np.testing.assert_allclose(streamed.coef(hooks[1], 1.0), sk.coef_, rtol=1e-3, atol=1e-5)


def test_streamed_decomposition_of_a_plain_array_in_chunks():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((3000, 24)).astype(np.float32) * rng.uniform(0.1, 20, 24).astype(np.float32) + 5
    split = make_split(3000, test_fraction=0.2, cv=5, seed=3)
    a = decompose_ridge(X, split)
    b = decompose_ridge_streamed(X, split, chunk_rows=257)
    np.testing.assert_allclose(b.x_mean, a.x_mean, rtol=1e-6)
    np.testing.assert_allclose(b.block_sum, a.block_sum, rtol=1e-4, atol=1e-2)
    for ma, mb in zip(a.models, b.models):
        np.testing.assert_allclose(mb.eigvals, ma.eigvals, rtol=1e-5)
    y = X @ rng.standard_normal(24) + rng.standard_normal(3000)
    r_mem = fit_ridge_path({"h": X}, y, cv=5, seed=3)
    r_str = fit_ridge_path({"h": X}, y, cv=5, seed=3, stream=True)
    np.testing.assert_allclose(r_str.r2_cv, r_mem.r2_cv, atol=1e-6)
    # Fewer rows than features: the selected rows are small and go to the dual form in memory.
    small = make_split(20, test_fraction=0.0, cv=0)
    assert decompose_ridge_streamed(X[:20], small).form == "dual"


def test_in_memory_probe_refuses_what_does_not_fit():
    with pytest.raises(ProbeError, match=r"needs the selected activations in memory: .* GB.*streams"):
        shards.check_fits_in_memory(10**15, "the per-layer multiclass probe")
    shards.check_fits_in_memory(1000, "the per-layer multiclass probe")


def test_regression_analysis_reads_a_sharded_entry_like_a_one_file_entry(sharded_entry, local_entry):
    """The page's own analysis on the sharded entry (streamed) and on the one-file entry (in memory)."""
    from probing_core.analyses.regression import run_regression
    from probing_core.data.labels import LabelSpec

    hooks = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    runs = [run_regression(open_entry(s, e.key), hooks, LabelSpec.make("position"), "all", cv=3, split_by="tokens")
            for s, e in (sharded_entry, local_entry)]
    sharded, one_file = (r.result for r in runs)
    assert isinstance(open_entry(*[sharded_entry[0], sharded_entry[1].key]).hook(hooks[0]), shards.ShardedArray)  # streamed
    assert all(d.form == "primal" for d in sharded.decompositions.values())
    np.testing.assert_allclose(sharded.r2_cv_mean, one_file.r2_cv_mean, atol=2e-6)
    np.testing.assert_allclose(sharded.r2_test, one_file.r2_test, atol=2e-6)
    assert np.array_equal(sharded.best_alpha, one_file.best_alpha)
