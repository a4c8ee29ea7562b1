"""The Ray engine on a local Ray cluster (CPU, no network): same arrays as the one-process build,
resume after a killed job, one extraction for two engines at once, clear errors.

One ``ray.init`` for the whole session (it costs 7–8 s on a 2-core machine, much more under load);
each build starts its own actor pool (each actor imports torch and loads the tiny model: tens of
seconds here), so the tests share builds where they can.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from probing_core.errors import InputError, StoreError
from probing_core.store import shards
from probing_core.store.activations import build_cache, cache_key, open_entry
from probing_core.store.entries import ActivationStore

ray = pytest.importorskip("ray")
from probing_core.store import ray_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HOOKS = ("embed", "resid_mid", "resid_post")
TABLE = ("token_ids", "seq", "pos", "next_ids", "doc_index")
BUILD = dict(max_len=64, max_tokens=2500, batch_size=4)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs, no dashboard) for every Ray test of the session."""
    r = ray_engine.connect(num_cpus=2)
    yield r
    r.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model, pydoc_dataset, tmp_path_factory):
    """The one-process build of the same key (one torch thread, like each Ray actor here)."""
    store = ActivationStore(tmp_path_factory.mktemp("ref"))
    entry, _ = build_cache(tiny_model, pydoc_dataset, tiny_model.hook_names(HOOKS), store=store, **BUILD)
    return store, entry


def _assert_same(store_a, key_a, store_b, key_b) -> None:
    a, b = open_entry(store_a, key_a), open_entry(store_b, key_b)
    assert a.hooks == b.hooks and a.n_tokens == b.n_tokens
    for t in TABLE:
        assert np.array_equal(getattr(a, t), getattr(b, t)), t
    for h in a.hooks:
        # Bitwise: every range runs the one-process build's own batches (ranges are whole batches).
        assert np.array_equal(np.asarray(a.hook(h)), np.asarray(b.hook(h))), h


def _finished(store: ActivationStore, key: str) -> list[str]:
    d = shards.partial_dir(store, key) / "shards"
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def test_ray_build_gives_the_local_build_arrays(ray_cluster, tiny_model, pydoc_dataset, reference, tmp_path):
    ref_store, ref = reference
    store = ActivationStore(tmp_path / "s")
    seen: list[tuple[float, str]] = []
    res = ray_engine.build_cache_ray(tiny_model, pydoc_dataset, tiny_model.hook_names(HOOKS), store=store, workers=2,
                                     rows_per_shard=8, progress=lambda f, m: seen.append((f, m)), **BUILD)
    n_seq = int(res.entry.meta["n_seq"])
    assert res.built and res.entry.key == ref.key  # the same key whichever engine filled it
    assert res.ranges_total == res.ranges_computed == -(-n_seq // 8)
    assert res.forward_passes == -(-n_seq // 4)  # each batch once, counted inside the actors
    assert sum(res.workers.values()) == res.ranges_total
    meta = res.entry.meta
    assert meta["engine"] == "ray" and meta["layout"] == "sharded" and meta["engine_info"]["workers"] == 2
    _assert_same(ref_store, ref.key, store, res.entry.key)
    # Progress came per finished range, ending at 1.
    fracs = [f for f, m in seen if m.startswith("ray:")]
    assert fracs[-1] == 1.0 and len(fracs) == res.ranges_total + 1 and fracs == sorted(fracs)
    assert store.verify(ref.key).meta["engine"] == "ray"


@pytest.mark.skip(reason=(
    "hangs on a 2-core machine when run after the other Ray tests in one session (seen 2026-12-01): the "
    "failed jobs' actors keep 1.5 of the 2 CPUs reserved, so the rerun's actors stay pending and the build "
    "waits forever. Resume itself is covered without Ray by test_shards.py::test_resume_computes_only_"
    "missing_ranges; this test passed when run on its own. Issue 18 stays open for it."))
def test_killed_job_keeps_its_shards_and_the_rerun_computes_only_the_rest(
    ray_cluster, tiny_model, pydoc_dataset, reference, tmp_path
):
    ref_store, ref = reference
    store = ActivationStore(tmp_path / "s")
    hooks = tiny_model.hook_names(HOOKS)
    kw = dict(store=store, workers=2, rows_per_shard=4, **BUILD)
    # 1. Every worker stops after one range (like a job killed half-way).
    with pytest.raises(StoreError, match=r"stopped after 1 ranges.*shards are finished and kept.*run the same build again"):
        ray_engine.build_cache_ray(tiny_model, pydoc_dataset, hooks, fault={"fail_after_ranges": 1}, **kw)
    assert store.get(ref.key) is None and store.entries() == []  # nothing half-written is visible
    first = _finished(store, ref.key)
    n_total = len(shards.plan_ranges(int(ref.meta["n_seq"]), 4))
    assert 1 <= len(first) <= 2 < n_total
    # 2. A worker dies in the middle of a range: a clear message, the finished shards still there,
    #    and its half-written range never counts as a shard.
    with pytest.raises(StoreError, match=r"died 1 forward passes into a range.*kept"):
        ray_engine.build_cache_ray(tiny_model, pydoc_dataset, hooks, fault={"die_mid_range_after_passes": 1}, **kw)
    assert store.get(ref.key) is None
    assert set(first) <= set(_finished(store, ref.key))
    kept = _finished(store, ref.key)
    # 3. The rerun (arrays returned to the driver this time) computes only the missing ranges.
    res = ray_engine.build_cache_ray(tiny_model, pydoc_dataset, hooks, write="driver", **kw)
    assert res.built and res.ranges_total == n_total
    # (≥: a range already in flight when a job fails may still be finished by its actor)
    assert res.ranges_reused >= len(kept) and res.ranges_computed == n_total - res.ranges_reused
    assert res.forward_passes == res.ranges_computed  # one batch of 4 rows per range
    _assert_same(ref_store, ref.key, store, res.entry.key)
    assert not shards.partial_dir(store, ref.key).exists()


def test_local_and_ray_builds_of_one_key_extract_once(ray_cluster, tiny_model, pydoc_dataset, tmp_path):
    store = ActivationStore(tmp_path / "s")
    hooks = tiny_model.hook_names(["embed", "resid_post"])
    kw = dict(max_len=32, max_tokens=800, batch_size=4)
    key = cache_key(tiny_model, pydoc_dataset, hooks, max_len=32, max_tokens=800, dtype="float32")
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.setdefault(
        "ray", ray_engine.build_cache_ray(tiny_model, pydoc_dataset, hooks, store=store, workers=1, **kw)))
    t.start()
    deadline = time.monotonic() + 60
    while not store.is_locked(key) and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    entry, built_local = build_cache(tiny_model, pydoc_dataset, hooks, store=store, **kw)  # waits on the key's lock
    t.join(timeout=600)
    ray_res = out["ray"]
    assert ray_res.built and not built_local  # the Ray build held the lock; the local one found its entry
    assert ray_res.forward_passes == -(-int(ray_res.entry.meta["n_seq"]) // 4)
    assert entry.key == ray_res.entry.key == key and entry.meta["engine"] == "ray"
    assert [e.key for e in store.entries()] == [key]


def test_unreachable_address_is_a_clear_error(ray_cluster, tiny_model, pydoc_dataset, tmp_path):
    store = ActivationStore(tmp_path / "s")
    t0 = time.monotonic()
    with pytest.raises(InputError, match=r"no Ray cluster answers at 127\.0\.0\.1:1 .*leave --address out"):
        ray_engine.build_cache_ray(tiny_model, pydoc_dataset, tiny_model.hook_names(["embed"]), store=store,
                                   address="127.0.0.1:1", **BUILD)
    assert time.monotonic() - t0 < 30
    assert store.entries() == [] and not list(store.entries_dir.glob(".partial-*"))
    with pytest.raises(InputError, match="not host:port"):
        ray_engine.connect("nowhere")


BLOCK_RAY = '''
import sys
class _NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NoRay())
'''


def test_without_ray_installed_the_cli_says_how_to_get_it(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_RAY)
    cache = tmp_path / "cache"
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "probing_core", "cache", "build", "--model", "tiny", "--max-tokens", "300",
           "--hooks", "embed", "--engine", "ray", "--cache-dir", str(cache)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "needs the `ray` package" in out.stderr and "pip install ray==2.60.0" in out.stderr
    assert "Traceback" not in out.stderr
    entries = cache / "activations" / "entries"
    assert not entries.exists() or not any(entries.iterdir())  # nothing built, nothing half-written
    # The local engine still works in the same environment.
    out = subprocess.run(cmd[:-4] + ["--cache-dir", str(cache)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    # With the entry there, a Ray build has nothing to compute and needs no cluster (nor ray).
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "already cached" in out.stdout, out.stderr
