"""The app in a real (headless) Chromium, offline: every page renders, the main flow works.

Order matters only for speed: the Home build comes first so later pages have an entry to show.
Screenshots go to test-output/screenshots/ (git-ignored).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probing_core.store.entries import ActivationStore
from tests.e2e.conftest import (
    E2E_SCRIPT_NICE,
    REPO,
    app_pages,
    assert_no_exception,
    goto,
    nav_to,
    screenshot,
    wait_idle,
)

EMBEDDED_LABEL = "SmolLM2-135M-Instruct"
#: Small on purpose: the embedded model runs on 2 shared CPU cores here.
FLOW_TOKENS = 300
SHARED_TOKENS = 257  # a setting no other test uses, so the two-context build starts from nothing
TITLES = dict(app_pages())
#: The success/info message Home shows after Build (keys render as code, without backticks).
DONE = re.compile(r"Built [0-9a-f]{8,}|Already cached as [0-9a-f]{8,}")


def _page_title(file: str) -> str:
    return TITLES[file]


def _require_page(file: str) -> None:
    if not (REPO / file).exists():
        pytest.skip(f"page not present: {file}")


def _build_on_home(page, max_tokens: int) -> str:
    """Set the token cap, keep the default hooks (embed + resid_post), click Build; return the message."""
    box = page.locator(".st-key-home_max_tokens input")
    box.fill(str(max_tokens))
    box.press("Enter")
    wait_idle(page)
    page.locator(".st-key-home_build button").click()
    wait_idle(page)
    alert = page.locator("[data-testid='stAlert']", has_text=DONE)
    alert.first.wait_for()
    return alert.first.inner_text()


def _plotly_data(page, key: str) -> str:
    """The chart's traces as JSON (what plotly drew), read from the plotly graph div."""
    chart = page.locator(f".st-key-{key} .js-plotly-plot")
    if chart.count() == 0:
        chart = page.locator("[data-testid='stPlotlyChart'] .js-plotly-plot")
    chart.first.wait_for()
    return chart.first.evaluate("gd => JSON.stringify((gd.data || []).map(t => [t.name, t.x, t.y]))")


def test_health_endpoint_and_the_images_health_check(server):
    """The Dockerfile's HEALTHCHECK command, run against this server, reports healthy."""
    health = [ln for ln in (REPO / "Dockerfile").read_text().splitlines() if "CMD [\"python\", \"-c\"" in ln]
    assert health, "no exec-form python health check in the Dockerfile"
    argv = json.loads(health[0].split("CMD", 1)[1].strip())
    assert argv[:2] == ["python", "-c"]
    res = subprocess.run([sys.executable, "-c", argv[2]], env={"STREAMLIT_SERVER_PORT": str(server["port"])},
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def _thread_niceness(pid: int) -> dict[int, int]:
    """{thread id: niceness} of a process's threads (/proc: field 19 of each task's stat line)."""
    out = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            out[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[16])
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            pass
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="per-thread niceness is Linux's")
def test_page_scripts_run_below_the_servers_event_loop(server, page):
    """With PROBING_SCRIPT_NICE set (the e2e server sets 5 unless the environment says otherwise), the server's
    main thread (event loop: health checks, every browser's messages) keeps its priority and the threads that run
    page scripts and fits, and the pools they start, run that many levels lower."""
    want = int(os.environ.get("PROBING_SCRIPT_NICE", E2E_SCRIPT_NICE))
    if want == 0:
        pytest.skip("PROBING_SCRIPT_NICE=0 in this environment: nothing to see")
    import threading

    seen: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:  # every thread seen while the page runs (script threads end with their run)
        while not stop.is_set():
            seen.update(_thread_niceness(server["pid"]))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        goto(page, server["url"], "pages/lens.py")  # a script run with a forward pass
        assert_no_exception(page, "Logit lens")
    finally:
        stop.set()
        sampler.join()
    main = seen[server["pid"]]
    assert main == os.getpriority(os.PRIO_PROCESS, os.getpid()), "the server's main thread was reniced"
    assert [t for t, n in seen.items() if n == min(19, main + want)], f"no server thread ran below its event loop: {seen}"
    assert all(n >= main for n in seen.values())


def test_home_build_then_regression_curve_and_alpha_slider(server, page):
    base = server["url"]
    goto(page, base, "pages/home.py")
    assert_no_exception(page, "Home")
    assert EMBEDDED_LABEL in page.locator("[data-testid='stMain']").inner_text(), "the embedded model is the default"
    msg = _build_on_home(page, FLOW_TOKENS)
    assert f"{FLOW_TOKENS:,} tokens" in msg, msg
    screenshot(page, "home-built")

    _require_page("pages/regression.py")
    nav_to(page, _page_title("pages/regression.py"))
    assert_no_exception(page, "Regression")
    before = _plotly_data(page, "reg_curve")
    assert before.count("[") > 3, "the R² curve has traces"
    screenshot(page, "regression-best-alpha")

    slider = page.locator(".st-key-reg_alpha input[type='range']")
    slider.focus()
    t0 = time.perf_counter()
    slider.press("End")  # the largest α: a heavily regularized probe, a visibly lower curve
    wait_idle(page, settle_ms=100)
    # One real-browser figure for benchmarks/bench_page_reruns.py (a figure, not an assertion): key press →
    # script finished, including the 100 ms settle wait and the browser's polling.
    (REPO / "test-output").mkdir(exist_ok=True)
    with open(REPO / "test-output" / "browser-timings.txt", "a") as f:
        f.write(f"regression α slider move → rerun done in the browser: {(time.perf_counter() - t0) * 1e3:.0f} ms\n")
    assert_no_exception(page, "Regression after moving α")
    after = _plotly_data(page, "reg_curve")
    assert after != before, "moving the α slider did not change the R² curve"
    screenshot(page, "regression-largest-alpha")

    # The downloads are made when clicked (not on every rerun): the file arrives, at the α shown.
    with page.expect_download(timeout=60_000) as got:
        page.locator(".st-key-reg_dl_zip button").click()
    import io
    import zipfile

    import numpy as np

    with zipfile.ZipFile(io.BytesIO(Path(got.value.path()).read_bytes())) as z:
        names = [n for n in z.namelist() if n.endswith(".npy")]
        assert "hook_embed.npy" in names and len(names) > 1, z.namelist()
        w = np.load(io.BytesIO(z.read(names[0])), allow_pickle=False)
        assert "best per hook" not in z.read("README.txt").decode()  # the α moved to above, not the default
    assert w.ndim >= 1 and w.size > 0 and np.isfinite(w).all()
    with page.expect_download(timeout=60_000) as got:
        page.locator(".st-key-reg_dl_csv button").click()
    csv = Path(got.value.path()).read_text()
    assert csv.splitlines()[0].count(",") >= 2 and len(csv.splitlines()) > 2, csv[:200]


def test_attention_page_draws_circuitsvis_in_its_iframe(server, page):
    _require_page("pages/attention.py")
    goto(page, server["url"], "pages/attention.py")
    assert_no_exception(page, "Attention")
    frame_el = page.locator("[data-testid='stMain'] iframe").first
    frame_el.wait_for()
    frame = frame_el.element_handle().content_frame()
    assert frame is not None
    # The inlined CircuitsVis bundle renders a React tree (canvas/svg charts, head selectors) into the page.
    frame.wait_for_function(
        "() => document.body && document.body.querySelectorAll('*').length > 20 && "
        "(document.querySelector('canvas, svg') !== null || document.body.innerText.length > 50)",
        timeout=120_000,
    )
    assert frame.locator("script[src^='http']").count() == 0, "CircuitsVis must not load JavaScript from a CDN"
    screenshot(page, "attention")


@pytest.mark.parametrize("page_file", [p for p, _ in app_pages()])
def test_every_page_renders_without_an_exception(server, page, page_file):
    # One session: Home's small entry becomes every page's preferred cache entry (a fresh session
    # would default to whatever entry is newest in the shared test cache, possibly a large one).
    goto(page, server["url"], "pages/home.py")
    _build_on_home(page, FLOW_TOKENS)
    if page_file != "pages/home.py":
        nav_to(page, _page_title(page_file))
    assert_no_exception(page, page_file)
    assert page.locator("[data-testid='stMain'] h1").count() >= 1
    screenshot(page, f"page-{Path(page_file).stem}-1400")
    # The same page in an 800 px window (a reload: the page starts narrow, as on a small laptop or a tablet).
    page.set_viewport_size({"width": 800, "height": 1000})
    page.reload()
    wait_idle(page, settle_ms=2000)
    assert_no_exception(page, f"{page_file} at 800 px")
    sidebar = page.locator("[data-testid='stSidebar']")
    page.wait_for_function("() => document.querySelector(\"[data-testid='stSidebar']\")?.dataset.collapsed === 'true'",
                           timeout=15_000)
    assert sidebar.get_attribute("data-collapsed") == "true", "under 1,000 px the sidebar starts closed"
    assert_fits(page, f"{page_file} at 800 px")
    screenshot(page, f"page-{Path(page_file).stem}-800")


def assert_fits(page, where: str) -> None:
    """Metric values and download labels are shown whole (not cut with an ellipsis) and nothing is wider than the window."""
    cut = page.evaluate("""() => {
        const out = [];
        for (const el of document.querySelectorAll("[data-testid='stMetricValue'], [data-testid='stMetricLabel'], "
                                                   + "[data-testid='stDownloadButton'] button")) {
            for (const e of [el, ...el.querySelectorAll('*')]) {
                if (e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflow !== 'visible') {
                    out.push(el.innerText.slice(0, 60)); break;
                }
            }
        }
        return out;
    }""")
    assert not cut, f"{where}: text cut off in {cut}"
    wide = page.evaluate("() => document.querySelector(\"[data-testid='stMain']\").scrollWidth - window.innerWidth")
    assert wide <= 16, f"{where}: the page is {wide} px wider than the window (horizontal scrolling)"


def test_two_sessions_building_the_same_entry_extract_once(server, new_context):
    """Two browsers click Build on the same settings at once: one extraction, both see the entry."""
    store = ActivationStore(server["cache_dir"] / "activations")

    def matching():
        return [e for e in store.entries()
                if e.meta.get("max_tokens") == SHARED_TOKENS and e.meta.get("model_label", "").startswith(EMBEDDED_LABEL)]

    for e in matching():
        store.delete(e.key)

    pages = [new_context().new_page() for _ in range(2)]
    for p in pages:
        goto(p, server["url"], "pages/home.py")
        box = p.locator(".st-key-home_max_tokens input")
        box.fill(str(SHARED_TOKENS))
        box.press("Enter")
        wait_idle(p)
    for p in pages:  # click both before waiting for either
        p.locator(".st-key-home_build button").click()
    msgs = []
    for p in pages:
        wait_idle(p)
        alert = p.locator("[data-testid='stAlert']", has_text=DONE)
        alert.first.wait_for()
        msgs.append(alert.first.inner_text())
        assert_no_exception(p, "Home (concurrent build)")
    for i, p in enumerate(pages):
        screenshot(p, f"home-concurrent-{i}")

    entries = matching()
    assert len(entries) == 1, f"expected one entry for the shared settings, found {[e.key for e in entries]}"
    key = entries[0].key
    assert all(key in m for m in msgs), msgs
    assert sum(m.strip().startswith("Built ") for m in msgs) == 1, msgs


def test_no_request_left_the_machine(outside_requests):
    """Runs last: nothing any page did needed a host other than the app's own server."""
    assert outside_requests == [], f"requests to outside hosts (blocked): {sorted(set(outside_requests))[:10]}"
