"""Background cache builds (demo mode's default entry): the thread builds the same entry build_cache
would, its progress is readable meanwhile, a page asking for the entry at the same time reuses it,
and a failure becomes a status with the core's message instead of vanishing with the thread. The
build that starts with the server runs in its own process and reports through a progress file and
a lock: tested here with the tiny model (a real server start is in tests/e2e/test_demo_start.py)."""
from __future__ import annotations

import fcntl
import json
import os
import time

import numpy as np
import pytest

from probing_core.data.datasets import DatasetSpec, load_dataset
from probing_core.models import spec_from_cli
from probing_core.store.activations import build_cache, open_entry
from probing_core.store.background import (
    DEMO_BUILD,
    LOCK_FILE,
    PROGRESS_FILE,
    ServerBuild,
    build_in_background,
    progress_folder,
    read_progress,
    run_demo_build,
    server_build,
    write_progress,
)
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


# ---- the demo build that starts with the server (its own process, progress in a file) -------------

def _hold(lock_path):
    """Hold the build's lock as a live builder process would (a separate open file: flock sees a second holder)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _record(**kw):
    rec = {"state": "running", "fraction": 0.25, "message": "tokenizing…", "model_id": "tiny", "model_key": None,
           "entry_key": None, "built": False, "error": None, "started": 1.0e9, "ended": None, "pid": 1}
    rec.update(kw)
    return rec


def test_demo_build_writes_progress_and_the_entry_home_asks_for(tmp_path, tiny_model):
    assert run_demo_build(tmp_path, "tiny") == 0
    rec = read_progress(progress_folder(tmp_path) / PROGRESS_FILE)
    assert rec is not None and rec["state"] == "done" and rec["built"] and rec["model_key"] == tiny_model.key
    entry = ActivationStore(tmp_path / "activations").require(rec["entry_key"])
    assert entry.hooks == tiny_model.hook_names(list(DEMO_BUILD.families)) and entry.n_tokens == DEMO_BUILD.max_tokens
    job = server_build(tmp_path, spec_from_cli("tiny"), tiny_model.key)
    assert job is not None and job.status().state == "done" and job.status().entry_key == entry.key
    assert server_build(tmp_path, spec_from_cli("embedded")) is None  # another model's page builds its own
    # the same entry Home's "Build cache" makes with its defaults: asking again builds nothing
    again, built = build_cache(tiny_model, load_dataset(DatasetSpec(DEMO_BUILD.dataset)), entry.hooks,
                               store=ActivationStore(tmp_path / "activations"), max_len=DEMO_BUILD.max_len,
                               max_tokens=DEMO_BUILD.max_tokens, dtype=DEMO_BUILD.dtype)
    assert not built and again.key == entry.key
    assert run_demo_build(tmp_path, "tiny") == 0  # a second start finds it cached
    assert read_progress(progress_folder(tmp_path) / PROGRESS_FILE)["built"] is False


def test_a_second_builder_leaves_the_running_one_alone(tmp_path):
    folder = progress_folder(tmp_path)
    fd = _hold(folder / LOCK_FILE)
    try:
        assert run_demo_build(tmp_path, "tiny") == 0
        assert not (folder / PROGRESS_FILE).exists() and not (tmp_path / "activations").exists()
    finally:
        os.close(fd)


def test_a_running_build_is_live_only_while_its_process_holds_the_lock(tmp_path, tiny_model):
    folder = progress_folder(tmp_path)
    folder.mkdir(parents=True)
    write_progress(folder / PROGRESS_FILE, _record())
    fd = _hold(folder / LOCK_FILE)
    try:
        job = server_build(tmp_path, tiny_model.spec, tiny_model.key)
        assert job is not None and job.status().state == "running" and job.status().fraction == 0.25
    finally:
        os.close(fd)  # the builder died (kill -9 releases the lock the same way)
    dead = ServerBuild(folder).status()
    assert dead.state == "failed" and "stopped" in dead.error
    assert server_build(tmp_path, tiny_model.spec, tiny_model.key) is None  # the page then builds it itself
    write_progress(folder / PROGRESS_FILE, _record(model_key="0" * 16))
    fd = _hold(folder / LOCK_FILE)
    try:
        assert server_build(tmp_path, tiny_model.spec, tiny_model.key) is None  # a build for other weights
    finally:
        os.close(fd)


@pytest.mark.parametrize("damage", [
    "", "{", "[]", "null", json.dumps(_record(state="paused")), json.dumps(_record(fraction=1.5)),
    json.dumps(_record(fraction=True)), json.dumps(_record(fraction="0.5")), json.dumps(_record(started=None)),
    '{"state": "running", "fraction": 0.1, "model_id": "tiny", "started": NaN}', json.dumps(_record(message=7)),
    json.dumps(_record(model_id=None)), json.dumps(_record(state="done")), json.dumps(_record(built="yes")),
    json.dumps(_record(model_id="no/such-model-here")),
])
def test_a_damaged_or_foreign_progress_file_counts_as_no_build(tmp_path, tiny_model, damage):
    folder = progress_folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / PROGRESS_FILE).write_text(damage)
    fd = _hold(folder / LOCK_FILE)
    try:
        assert server_build(tmp_path, tiny_model.spec, tiny_model.key) is None
    finally:
        os.close(fd)


def test_a_read_only_cache_stops_the_demo_build_with_one_line(tmp_path, capsys):
    (tmp_path / "background").write_text("a file where the folder should be")  # mkdir fails like a read-only volume
    assert run_demo_build(tmp_path, "tiny") == 1
    err = capsys.readouterr().err
    assert "PROBING_CACHE_DIR" in err and "Traceback" not in err


def _launch(tmp_path, demo: str, command: list[str]):
    import subprocess
    import sys

    env = {**os.environ, "PROBING_DEMO": demo, "PROBING_DEMO_MODEL": "tiny", "PROBING_CACHE_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "probing_core.store.background", "serve", "--", *command],
                          env=env, capture_output=True, text=True, timeout=120, check=True)


def test_the_launcher_runs_the_command_and_starts_no_build_outside_demo_mode(tmp_path):
    out = _launch(tmp_path, "0", ["echo", "server here"])
    assert out.stdout.strip() == "server here" and not (tmp_path / "background").exists()


def test_the_launcher_starts_the_demo_build_then_becomes_the_command(tmp_path):
    out = _launch(tmp_path, "1", ["echo", "server here"])  # the command ends at once; its build goes on
    assert out.stdout.strip() == "server here"
    path = progress_folder(tmp_path) / PROGRESS_FILE
    deadline = time.monotonic() + 120
    while (rec := read_progress(path)) is None or rec["state"] == "running":
        assert time.monotonic() < deadline, rec
        time.sleep(0.2)
    assert rec["state"] == "done" and rec["model_id"] == "tiny"
    assert [e.key for e in ActivationStore(tmp_path / "activations").entries()] == [rec["entry_key"]]
