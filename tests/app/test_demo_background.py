"""Demo mode builds the default entry in the background as soon as the app has its model: Home
shows its progress (then that it is ready), and a probe page opens on that entry without a build."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import glue

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def demo_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PROBING_DEMO", "1")
    monkeypatch.setenv("PROBING_CACHE_DIR", str(tmp_path))  # an empty store of this test's own


def test_demo_home_shows_the_background_build_and_pages_use_its_entry(demo_env):
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=240)
    at.session_state["model_choice"] = "tiny native model"
    at.session_state["dataset_choice"] = "Python documentation (offline corpus)"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    model = glue._load_model_cached(at.session_state["_model_spec"], str(glue.default_cache_root()))
    job = glue._demo_build(model.key, model)
    first = job.status()
    shown = [p.proto.text for p in at.get("progress")] + [s.value for s in at.success]
    assert any("example" in t for t in shown), shown  # a bar (still running) or "ready" (already done)
    final = job.wait(120)
    assert final.state == "done", final.error
    entry = glue.get_store().require(final.entry_key)
    assert set(entry.hooks) == set(glue.DEFAULT_BUILD.hooks(model)) and entry.n_tokens == glue.DEFAULT_BUILD.max_tokens
    at.run()
    assert any("ready" in s.value for s in at.success)
    assert first.state in ("running", "done")
    at.button(key="home_build").click().run()  # Home's defaults ask for exactly that entry: nothing to recompute
    assert at.session_state["home_entry_key"] == final.entry_key and "Already cached" in at.info[-1].value
    at.switch_page("pages/regression.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="reg_entry").value == final.entry_key


def test_the_build_started_with_the_server_is_homes_default_entry():
    from probing_core.store.background import DEMO_BUILD

    want = glue.DEFAULT_BUILD
    assert (want.families, want.layers, want.max_tokens, want.max_len, want.dtype) == (
        DEMO_BUILD.families, None, DEMO_BUILD.max_tokens, DEMO_BUILD.max_len, DEMO_BUILD.dtype)


def test_a_visit_during_the_server_build_shows_its_progress_and_builds_nothing(demo_env, tmp_path):
    """The launcher's build process is running (its lock held, its progress file written): Home shows that
    progress and the page starts no build of its own — no thread, no store entry, no temp folder."""
    import fcntl
    import os
    import threading
    import time

    from probing_core.store.background import (
        LOCK_FILE,
        PROGRESS_FILE,
        progress_folder,
        write_progress,
    )

    folder = progress_folder(tmp_path)
    folder.mkdir(parents=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        write_progress(folder / PROGRESS_FILE, {
            "state": "running", "fraction": 0.4, "message": "block 1 of 2 · batch 3 of 9", "model_id": "tiny",
            "model_key": None, "entry_key": None, "built": False, "error": None, "started": time.time(), "ended": None})
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=240)
        at.session_state["model_choice"] = "tiny native model"
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        shown = [p.proto.text for p in at.get("progress")]
        assert any("block 1 of 2 · batch 3 of 9" in t for t in shown), shown
        assert not [t for t in threading.enumerate() if t.name.startswith("cache-build-")]
        store = glue.get_store()
        assert store.entries() == [] and not list(store.entries_dir.glob(".tmp-*"))
        at.switch_page("pages/regression.py").run()  # a probe page waits for the same build
        assert not at.exception and any("block 1 of 2" in p.proto.text for p in at.get("progress"))
    finally:
        os.close(fd)
