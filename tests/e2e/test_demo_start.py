"""A real demo-mode server start: the example cache entry is built from the moment the server starts,
before anyone visits, and the first visitor finds it on Home — one extraction in all.

The server is started the way `make demo` and the Docker image start it (the launcher, then Streamlit),
with the tiny model as the demo's model (PROBING_DEMO_MODEL=tiny) and an empty cache of its own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from probing_core.store.activations import open_entry
from probing_core.store.background import DEMO_BUILD, PROGRESS_FILE, read_progress
from probing_core.store.entries import ActivationStore
from tests.e2e.conftest import (
    OUT,
    REPO,
    _free_port,
    _health,
    assert_no_exception,
    wait_idle,
)

DEADLINE_S = 240  # the launcher, Streamlit and the build's imports on a busy 2-core machine


def _start(cache: Path, port: int, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(PROBING_DEMO="1", PROBING_DEMO_MODEL="tiny", PROBING_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "probing_core.store.background", "serve", "--",
           sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    # Its own process group: the build process is the server's child, and teardown stops both.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_demo_server_builds_the_example_at_start_and_home_shows_it(new_context, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    shared_models = REPO / ".test-cache" / "models"  # if the page ever loaded the embedded model: converted once, shared
    shared_models.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(shared_models.resolve(), target_is_directory=True)
    port = _free_port()
    OUT.mkdir(exist_ok=True)
    log_path = OUT / "e2e-demo-server.log"
    with open(log_path, "w") as log:
        proc = _start(cache, port, log)
        base = f"http://localhost:{port}"
        progress = cache / "background" / PROGRESS_FILE
        try:
            t0 = time.monotonic()
            while True:  # nobody visits: the build must start and finish on its own
                assert proc.poll() is None, f"the server exited ({proc.returncode}); see {log_path}"
                rec = read_progress(progress)
                if rec is not None and rec["state"] != "running":
                    break
                assert time.monotonic() - t0 < DEADLINE_S, f"no finished demo build after {DEADLINE_S} s: {rec}; see {log_path}"
                time.sleep(0.2)
            assert rec["state"] == "done" and rec["built"], rec
            assert _health(base) == "ok"
            store = ActivationStore(cache / "activations")
            assert [e.key for e in store.entries()] == [rec["entry_key"]]
            acts = open_entry(store, rec["entry_key"])
            assert acts.n_tokens == DEMO_BUILD.max_tokens and "hook_embed" in acts.hooks

            page = new_context().new_page()
            page.goto(f"{base}/?model_choice=tiny+native+model")
            wait_idle(page)
            assert_no_exception(page, "demo Home")
            text = page.locator("[data-testid='stMain']").inner_text()
            assert "The example is ready" in text, text[:2000]
            assert [e.key for e in store.entries()] == [rec["entry_key"]]  # the visit built nothing more
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the server and, if it still runs, the build
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
