"""Real-browser fixtures: one `streamlit run app.py` per test session, Debian's Chromium via Playwright.

- The server uses the unit tests' PROBING_CACHE_DIR (<repo>/.test-cache), so the embedded model's
  one-time conversion and earlier cache entries are reused.
- Every request to a host other than the local server is aborted and recorded: the app must work
  offline (no CDN, no telemetry).
- Without /usr/bin/chromium the tests skip with the reason — except in CI (CI=true), where they fail.
  Never `playwright install` (it downloads a browser); `apt-get install -y chromium`.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
OUT = REPO / "test-output"
SHOTS = OUT / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
]
#: Generous: the first session loads the embedded model on a busy 2-core machine.
SCRIPT_TIMEOUT_MS = 240_000
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.e2e)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def app_pages() -> list[tuple[str, str]]:
    """(file, title) of every page app.py lists whose file exists (others are being written)."""
    listed = re.findall(r'\("(pages/[\w/]+\.py)",\s*"([^"]+)"', (REPO / "app.py").read_text())
    assert listed, "app.py lists no pages"
    return [(p, t) for p, t in listed if (REPO / p).exists()]


def url_path(page_file: str) -> str:
    """Streamlit's URL path for a page: the file's stem; the first page is the root."""
    return "" if page_file == app_pages()[0][0] else Path(page_file).stem


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not CHROMIUM.exists():
        msg = f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium); the real-browser tests need it"
        if _in_ci():
            pytest.fail(msg + " — and CI=true, so this is a failure, not a skip.")
        pytest.skip(msg)
    return str(CHROMIUM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(base: str) -> str:
    try:
        with urllib.request.urlopen(f"{base}/_stcore/health", timeout=3) as r:
            return r.read().decode().strip()
    except OSError:
        return ""


#: PROBING_SCRIPT_NICE of the e2e server (off by default in the app; see probing_core.threads.script_niceness).
E2E_SCRIPT_NICE = 5


@pytest.fixture(scope="session")
def server(chromium_path) -> dict:
    """Start the app; yield {"url", "port", "cache_dir", "log", "pid"}; stop it at the end."""
    port = _free_port()
    cache_dir = Path(os.environ.get("PROBING_CACHE_DIR", REPO / ".test-cache")).resolve()
    env = {k: v for k, v in os.environ.items() if k != "PROBING_DEMO" and not k.startswith("STREAMLIT_")}
    env.update(PROBING_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("PROBING_SCRIPT_NICE", str(E2E_SCRIPT_NICE))  # opt-in setting, on here so a test can see it work
    OUT.mkdir(exist_ok=True)
    log_path = OUT / "e2e-server.log"
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 120
        while _health(base) != "ok":
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}; see {log_path}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"/_stcore/health did not answer 'ok' within 120 s; see {log_path}")
            time.sleep(0.5)
        yield {"url": base, "port": port, "cache_dir": cache_dir, "log": log_path, "pid": proc.pid}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def outside_requests() -> list[str]:
    """Every request to a non-local host that any page attempted (all were aborted)."""
    return []


def _new_context(browser, outside: list[str]):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, service_workers="block")
    ctx.set_default_timeout(SCRIPT_TIMEOUT_MS)

    def guard(route):
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about") or (parts.hostname or "") in LOCAL_HOSTS:
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    ctx.route("**/*", guard)
    return ctx


@pytest.fixture()
def new_context(browser, outside_requests):
    """Factory of offline browser contexts (closed at the end of the test)."""
    made = []

    def make():
        ctx = _new_context(browser, outside_requests)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.close()


@pytest.fixture()
def page(new_context):
    return new_context().new_page()


def wait_idle(page, settle_ms: int = 400) -> None:
    """Wait until the app's script has finished (after a navigation or an interaction)."""
    page.wait_for_timeout(settle_ms)  # let a rerun triggered just now start
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=SCRIPT_TIMEOUT_MS)
    page.wait_for_selector("[data-testid='stMain'] h1", timeout=SCRIPT_TIMEOUT_MS)
    # A model load shows a spinner while the script runs; make sure none is left.
    page.wait_for_selector("[data-testid='stSpinner']", state="detached", timeout=SCRIPT_TIMEOUT_MS)


def goto(page, base: str, page_file: str) -> None:
    page.goto(f"{base}/{url_path(page_file)}")
    wait_idle(page, settle_ms=200)


def nav_to(page, title: str) -> None:
    """Follow the sidebar link to a page (keeps the session, unlike page.goto)."""
    page.locator("[data-testid='stSidebarNav'] a", has_text=title).first.click()
    wait_idle(page)


def assert_no_exception(page, where: str) -> None:
    exc = page.locator("[data-testid='stException']")
    assert exc.count() == 0, f"{where}: exception shown: {exc.first.inner_text()[:500]}"


def screenshot(page, name: str) -> Path:
    """The whole page (Streamlit scrolls inside its main block, so the window is made as tall as it for the shot)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    # Streamlit draws grey placeholders until an element's content has arrived; shoot what the user finally sees.
    page.wait_for_function("() => !document.querySelector(\"[data-testid='stSkeleton']\")", timeout=SCRIPT_TIMEOUT_MS)
    size = page.viewport_size
    tall = page.evaluate("() => document.querySelector(\"[data-testid='stMain']\")?.scrollHeight || 0")
    if size and tall > size["height"]:
        page.set_viewport_size({"width": size["width"], "height": min(int(tall) + 40, 12_000)})
        page.wait_for_timeout(1500)  # plotly redraws for the new size
    page.screenshot(path=str(path), full_page=True)
    if size:
        page.set_viewport_size(size)
    return path
