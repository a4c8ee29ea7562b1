"""The Ray engine on a local Ray cluster (CPU, no network): same arrays as the one-process build,
resume after a killed job, one extraction for two engines at once, clear errors.

One ``ray.init`` for the module (it costs 7–8 s on a 2-core machine, much more under load), shut
down after it so that later tests of a CI session find no Ray cluster running; each build starts its
own actor pool (each actor imports torch and loads the tiny model: tens of seconds here), so the
tests share builds where they can. Every failed or interrupted build must hand its CPUs back: the
next build of the module runs on the same 2-CPU cluster.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from probing_core.errors import InputError, StoreError
from probing_core.store import shards
from probing_core.store.activations import BuildParams, build_cache
from probing_core.store.entries import ActivationStore

ray = pytest.importorskip("ray")
from probing_core.store import ray_engine

REPO = Path(__file__).resolve().parents[2]
HOOKS = ("embed", "resid_mid", "resid_post")
BUILD = BuildParams(64, 2500, batch_size=4)
CPUS = 2.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster (2 CPUs, no dashboard) for the Ray tests of this module, shut down after them."""
    r = ray_engine.connect(num_cpus=int(CPUS))
    yield r
    r.shutdown()


def _cpus_come_back(ray_mod, within_s: float = 30.0) -> float:
    """Seconds until every CPU of the cluster is free again (a failed build's actors are gone)."""
    t0 = time.monotonic()
    while ray_mod.available_resources().get("CPU", 0.0) < CPUS:
        assert time.monotonic() - t0 < within_s, f"the build's actors still hold CPUs: {ray_mod.available_resources()}"
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def reference(tiny_model, pydoc_dataset, tmp_path_factory):
    """The one-process build of the same key (one torch thread, like each Ray actor here)."""
    store = ActivationStore(tmp_path_factory.mktemp("ref"))
    entry, _ = build_cache(tiny_model, pydoc_dataset, tiny_model.hook_names(HOOKS), store=store,
                           max_len=BUILD.max_len, max_tokens=BUILD.max_tokens, batch_size=BUILD.batch_size)
    return store, entry


def _assert_same(store_a, key_a, store_b, key_b) -> None:
    # Bitwise: every range runs the one-process build's own batches (ranges are whole batches).
    assert shards.compare_entries(store_a, key_a, store_b, key_b) == []


def _finished(store: ActivationStore, key: str) -> list[str]:
    d = shards.partial_dir(store, key) / "shards"
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def test_ray_build_gives_the_local_build_arrays(ray_cluster, tiny_model, pydoc_dataset, reference, tmp_path):
    ref_store, ref = reference
    store = ActivationStore(tmp_path / "s")
    seen: list[tuple[float, str]] = []
    res = ray_engine.build_cache_ray(tiny_model, pydoc_dataset, tiny_model.hook_names(HOOKS), store=store,
                                     options=ray_engine.RayOptions(workers=2), params=BUILD, rows_per_shard=8,
                                     progress=lambda f, m: seen.append((f, m)))
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
    _cpus_come_back(ray_cluster)


class _Rerun(BaseException):
    """What Streamlit raises inside a callback when the user reruns the page (not an Exception)."""


def test_killed_job_keeps_its_shards_and_the_rerun_computes_only_the_rest(
    ray_cluster, tiny_model, pydoc_dataset, reference, tmp_path
):
    ref_store, ref = reference
    store = ActivationStore(tmp_path / "s")
    hooks = tiny_model.hook_names(HOOKS)
    n_total = len(shards.plan_ranges(int(ref.meta["n_seq"]), 4))

    def build(write: str = "worker", fault: dict | None = None, progress=None):
        return ray_engine.build_cache_ray(tiny_model, pydoc_dataset, hooks, store=store, params=BUILD, rows_per_shard=4,
                                          options=ray_engine.RayOptions(workers=2, write=write, fault=fault or {}),
                                          progress=progress)

    # 0. Interrupted from the driver's side after the first shard (a Streamlit rerun, Ctrl-C): the
    #    actor pool is killed at once, not left running, and the finished shard is kept.
    def interrupt(frac: float, msg: str) -> None:
        if "shards, rows" in msg:
            raise _Rerun()

    with pytest.raises(_Rerun):
        build(progress=interrupt)
    _cpus_come_back(ray_cluster)
    assert store.get(ref.key) is None and len(_finished(store, ref.key)) >= 1
    # 1. Every worker stops after one range (like a job killed half-way).
    with pytest.raises(StoreError, match=r"stopped after 1 ranges.*shards are finished and kept.*run the same build again"):
        build(fault={"fail_after_ranges": 1})
    _cpus_come_back(ray_cluster)  # the failed pool's CPUs are free again for the next build
    assert store.get(ref.key) is None and store.entries() == []  # nothing half-written is visible
    first = _finished(store, ref.key)
    assert 2 <= len(first) < n_total
    # 2. A worker dies in the middle of a range: a clear message, the finished shards still there,
    #    and its half-written range never counts as a shard.
    with pytest.raises(StoreError, match=r"died 1 forward passes into a range.*kept"):
        build(fault={"die_mid_range_after_passes": 1})
    _cpus_come_back(ray_cluster)
    assert store.get(ref.key) is None
    assert set(first) <= set(_finished(store, ref.key))
    kept = _finished(store, ref.key)
    # 3. The rerun (arrays returned to the driver this time) computes only the missing ranges.
    res = build(write="driver")
    assert res.built and res.ranges_total == n_total
    # (≥: a range already in flight when a job fails may still be finished by its actor)
    assert res.ranges_reused >= len(kept) and res.ranges_computed == n_total - res.ranges_reused
    assert res.forward_passes == res.ranges_computed  # one batch of 4 rows per range
    _assert_same(ref_store, ref.key, store, res.entry.key)
    assert not shards.partial_dir(store, ref.key).exists()


def test_a_cluster_without_room_for_the_workers_is_a_clear_error_not_a_hang(ray_cluster, tiny_model, pydoc_dataset,
                                                                           tmp_path):
    @ray.remote(num_cpus=1.5)
    class Hog:  # another job holding most of the cluster
        def ping(self) -> int:
            return 1

    hog = Hog.remote()
    try:
        ray.get(hog.ping.remote(), timeout=120)
        store = ActivationStore(tmp_path / "s")
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=r"Ray could not start 2 workers: only 0\.5 CPUs free \(each worker needs "
                                             r"0\.75 CPU; the cluster has 2\), after waiting 2 s.*fewer workers"):
            ray_engine.build_cache_ray(tiny_model, pydoc_dataset, tiny_model.hook_names(["embed"]), store=store,
                                       params=BUILD, rows_per_shard=4,  # ranges for both workers
                                       options=ray_engine.RayOptions(workers=2, place_timeout_s=2))
        assert time.monotonic() - t0 < 60
        assert store.entries() == []
    finally:
        ray.kill(hog)
    _cpus_come_back(ray_cluster)


def test_local_and_ray_builds_of_one_key_extract_once(ray_cluster, tiny_model, pydoc_dataset, tmp_path):
    store = ActivationStore(tmp_path / "s")
    hooks = tiny_model.hook_names(["embed", "resid_post"])
    params = BuildParams(32, 800, batch_size=4)
    key = params.key(tiny_model, pydoc_dataset, hooks)
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.setdefault("ray", ray_engine.build_cache_ray(
        tiny_model, pydoc_dataset, hooks, store=store, params=params, options=ray_engine.RayOptions(workers=1))))
    t.start()
    deadline = time.monotonic() + 60
    while not store.is_locked(key) and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    entry, built_local = build_cache(tiny_model, pydoc_dataset, hooks, store=store, max_len=32, max_tokens=800,
                                     batch_size=4)  # waits on the key's lock
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
                                   address="127.0.0.1:1", params=BUILD)
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
    out = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "needs the `ray` package" in out.stderr and "pip install ray==2.60.0" in out.stderr
    assert "Traceback" not in out.stderr
    entries = cache / "activations" / "entries"
    assert not entries.exists() or not any(entries.iterdir())  # nothing built, nothing half-written
    # The local engine still works in the same environment.
    out = subprocess.run(cmd[:-4] + ["--cache-dir", str(cache)], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    # With the entry there, a Ray build has nothing to compute and needs no cluster (nor ray).
    out = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "already cached" in out.stdout, out.stderr


def test_options_and_address_from_the_environment(monkeypatch):
    for var in ("PROBING_RAY_ADDRESS", "RAY_ADDRESS", "PROBING_RAY_WORKERS", "PROBING_RAY_GPUS_PER_WORKER",
                "PROBING_RAY_WRITE"):
        monkeypatch.delenv(var, raising=False)
    assert ray_engine.ray_address_from_env() is None and ray_engine.RayOptions.from_env() == ray_engine.RayOptions()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_engine.ray_address_from_env() == "10.0.0.5:6379"
    monkeypatch.setenv("PROBING_RAY_ADDRESS", " ray://ray-head:10001 ")  # the app's own variable wins
    assert ray_engine.ray_address_from_env() == "ray://ray-head:10001"
    monkeypatch.setenv("PROBING_RAY_WORKERS", "3")
    monkeypatch.setenv("PROBING_RAY_GPUS_PER_WORKER", "1")
    monkeypatch.setenv("PROBING_RAY_WRITE", "driver")
    assert ray_engine.RayOptions.from_env() == ray_engine.RayOptions(workers=3, gpus_per_worker=1.0, write="driver")
    monkeypatch.setenv("PROBING_RAY_WORKERS", "two")
    with pytest.raises(InputError, match=r"PROBING_RAY_WORKERS='two' is not a whole number"):
        ray_engine.RayOptions.from_env()
    for bad in ({"write": "disk"}, {"workers": 0}, {"gpus_per_worker": -1}, {"place_timeout_s": float("nan")}):
        with pytest.raises(InputError):
            ray_engine.RayOptions(**bad)
