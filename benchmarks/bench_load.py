"""Load: N concurrent real-browser sessions against one real server.

Starts ``streamlit run app.py`` (headless, a free port on 127.0.0.1) with its own
``PROBING_CACHE_DIR`` in a temp folder whose ``models/`` links to the converted embedded model of
``.test-cache/models`` (read, never copied or written), builds one small entry of the embedded
model there (the Regression page's default entry), then drives N = 1, 2, 4, 8 Playwright Chromium
contexts at once — each a fresh Streamlit session — through the common path:

    open Regression (default entry, default label) → change the label → move α to the largest value
    → open Logit lens (sidebar link) → run a prompt of its own

and prints, per N, the median and p95 latency of each action, errors (exception elements, error
alerts, timeouts, "Traceback" in the server log), the server's RSS (peak and after the round), and
the /_stcore/health round trip, polled every 0.25 s throughout from a process of its own (goal: under 1 s
at all times), beside a bare http.server polled the same way as a control for the machine itself.

Latency is measured in the page: from just before the action to the moment the script run it caused
has finished (a MutationObserver on ``data-test-script-state``), with no fixed settle time included.
Each round uses labels and prompts of its own, so the fits and forward passes are real, not hits
left over from an earlier round; within a round, sessions share labels (two labels across N
sessions), so shared results are exercised too.

Usage (run alone: it loads the 2-core machine fully):
    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_load.py [--sessions 1 2 4 8] [--tokens 5000]
Needs /usr/bin/chromium and the embedded model converted once (``make test`` or any unit test run).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-gpu"]
ACTION_TIMEOUT_MS = 600_000
#: Label titles the sessions switch to (the page's default is "Token length"); each round takes two.
LABELS = ["Token length without space", "Position", "Capitalised", "Starts with space",
          "Next token starts with space", "Is a number", "Token length without space", "Position"]
ACTIONS = ["open_regression", "change_label", "move_alpha", "open_lens", "run_prompt"]

# In-page watch of the script state: runs seen since the action started, and when the last ended.
WATCH_JS = """() => {
  const app = document.querySelector("[data-testid='stApp']");
  const w = window.__bench = {t0: performance.now(), runs: 0, last: null,
                              running: app.getAttribute('data-test-script-state') === 'running'};
  if (window.__benchObs) window.__benchObs.disconnect();
  // Replay every recorded change (old values, then the current one): a run that starts and ends
  // between two callbacks still counts.
  window.__benchObs = new MutationObserver((records) => {
    const states = records.map(r => r.oldValue).concat([app.getAttribute('data-test-script-state')]);
    for (let i = 1; i < states.length; i++) {
      const was = states[i - 1] === 'running', now = states[i] === 'running';
      if (now && !was) { w.runs += 1; w.running = true; }
      if (was && !now) { if (!w.running) { w.runs += 1; } w.running = false; w.last = performance.now(); }
    }
  });
  window.__benchObs.observe(app, {attributes: true, attributeOldValue: true, attributeFilter: ['data-test-script-state']});
}"""
# Done: at least one run, none running now, 300 ms quiet since (a follow-up rerun would show), no spinner.
# Or no run seen at all within 20 s while the app is idle: then the latency is unknown (reported as such).
DONE_JS = """() => { const w = window.__bench;
  if (!w) return false;
  if (w.runs === 0) return performance.now() - w.t0 > 20000 && !w.running &&
      document.querySelector("[data-testid='stApp']").getAttribute('data-test-script-state') !== 'running';
  return !w.running && performance.now() - w.last > 300 && !document.querySelector("[data-testid='stSpinner']"); }"""
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


#: The poller process: every 0.25 s, GET the server's /_stcore/health, then the control's /health; one line
#: per poll: "start ok seconds control_seconds" (start: time.monotonic(), the same clock in every process).
POLLER = """
import sys, time, urllib.request
health, control, out = sys.argv[1:4]
def get(url):
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            ok = r.read().strip() == b"ok"
    except OSError:
        ok = False
    return ok, time.perf_counter() - t
with open(out, "a", buffering=1) as f:
    while True:
        t0 = time.monotonic()
        ok, secs = get(health)
        cok, csecs = get(control)
        f.write(f"{t0:.4f} {int(ok)} {secs:.4f} {csecs if cok else float('inf'):.4f}\\n")
        time.sleep(0.25)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(base: str, timeout: float = 5.0) -> tuple[bool, float]:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(f"{base}/_stcore/health", timeout=timeout) as r:
            ok = r.read().strip() == b"ok"
    except OSError:
        ok = False
    return ok, time.perf_counter() - t0


def prepare_cache(tokens: int, reuse: Path | None = None) -> Path:
    """A temp PROBING_CACHE_DIR: models/ links to .test-cache's converted model; one entry built.

    ``reuse``: a folder kept by an earlier run (``--keep``) is used as it is.
    """
    if reuse is not None:
        if not (reuse / "activations").is_dir():
            sys.exit(f"--reuse {reuse}: no activations/ there (keep one with --keep)")
        print(f"cache entry: reusing {reuse}")
        return reuse
    src = REPO / ".test-cache" / "models"
    converted = [p for p in src.glob("smollm2-*") if (p / "config.json").exists()] if src.is_dir() else []
    if not converted:
        sys.exit(f"no converted embedded model under {src}: run the unit tests once (or `make test`) first")
    root = Path(tempfile.mkdtemp(prefix="bench-load-"))
    (root / "models").mkdir()
    for p in converted:
        (root / "models" / p.name).symlink_to(p, target_is_directory=True)
    env = {**os.environ, "PROBING_CACHE_DIR": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "probing_core", "cache", "build", "--model", "embedded",
                          "--dataset", "pydoc", "--hooks", "embed", "resid_post", "--max-tokens", str(tokens),
                          "--json"], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        sys.exit(f"cache build failed: {res.stderr[-2000:]}")
    print(f"cache entry: {tokens:,} tokens of pydoc, embed + resid_post (31 hooks), built in "
          f"{time.perf_counter() - t0:.0f} s in {root}")
    return root


class Server:
    """``streamlit run app.py`` on a free port, plus a thread polling health and sampling RSS.

    The same thread polls a control: a bare ``python -m http.server`` started beside it. On a shared,
    overloaded machine both answer late together (CPU starvation); only the app's own delays show as
    the difference.
    """

    def __init__(self, cache_dir: Path, log_path: Path, options: Sequence[str] = ()) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("PROBING_DEMO", "PROBING_AUTH") and not k.startswith("STREAMLIT_")}
        env.update(PROBING_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 — the server writes it until close()
        cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(self.port),
               "--server.headless", "true", "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
        for opt in options:  # e.g. runner.postScriptGC=false, for an experiment; printed with the results
            name, _, value = opt.partition("=")
            cmd += [f"--{name}", value]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        self.samples: list[tuple[float, bool, float, int, float]] = []  # (time, ok, seconds, rss, control seconds)
        self._control_dir = tempfile.mkdtemp(prefix="bench-load-control-")
        Path(self._control_dir, "health").write_text("ok")
        self.control_port = _free_port()
        self.control = subprocess.Popen([sys.executable, "-m", "http.server", str(self.control_port), "--bind", "127.0.0.1",
                                         "--directory", self._control_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._stop = threading.Event()
        deadline = time.monotonic() + 180
        while not _health(self.base, 3)[0]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                sys.exit(f"server did not come up; see {log_path}")
            time.sleep(0.5)
        # The health and control polls run in a process of their own (as Docker's health check does), so
        # the benchmark's own work (Playwright driving N pages from this process) never delays a poll.
        self._polls = Path(self._control_dir, "polls.txt")
        self.poller = subprocess.Popen([sys.executable, "-c", POLLER, f"{self.base}/_stcore/health",
                                        f"http://127.0.0.1:{self.control_port}/health", str(self._polls)])
        self._rss: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._sample_rss, daemon=True)
        self._thread.start()

    def _sample_rss(self) -> None:
        while not self._stop.is_set():
            try:
                self._rss.append((time.monotonic(), self.ps.memory_info().rss))
            except psutil.Error:
                pass
            self._stop.wait(0.25)

    def window(self, t0: float, t1: float) -> list[tuple[float, bool, float, int, float]]:
        """(time, ok, seconds, rss, control seconds) of each poll that started in [t0, t1] (the poller's file,
        CLOCK_MONOTONIC in both processes); rss: the nearest server RSS sample at or before it."""
        polls = []
        for line in self._polls.read_text().splitlines() if self._polls.exists() else []:
            parts = line.split()
            if len(parts) == 4:
                polls.append((float(parts[0]), parts[1] == "1", float(parts[2]), float(parts[3])))
        out, rss = [], list(self._rss)
        for t, ok, secs, control in polls:
            if t0 <= t <= t1:
                before = [r for tr, r in rss if tr <= t]
                out.append((t, ok, secs, before[-1] if before else 0, control))
        return out

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def tracebacks(self) -> int:
        return self.log_path.read_text(errors="replace").count("Traceback")

    def close(self) -> None:
        self._stop.set()
        self.poller.terminate()
        self.control.terminate()
        shutil.rmtree(self._control_dir, ignore_errors=True)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


class GilProfile:
    """Which thread holds the server's GIL, and doing what (``py-spy record --gil``, 100 Hz, no pauses).

    py-spy samples only the thread holding the GIL; samples over (rate × seconds) is the share of the
    time the GIL was held. The main thread runs the server's event loop (uvicorn/asyncio in Streamlit
    1.67), which answers /_stcore/health and every browser's messages: while another thread holds
    the GIL it cannot run.
    """

    RATE = 100

    def __init__(self, pid: int, out: Path) -> None:
        exe = shutil.which("py-spy") or "/tmp/pyspy/bin/py-spy"
        if not Path(exe).exists():
            sys.exit("--profile needs py-spy (pip install --target /tmp/pyspy py-spy; not a requirement)")
        self.pid, self.out = pid, out
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--gil", "--threads", "--nonblocking",
                                      "--rate", str(self.RATE), "--format", "raw", "-o", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> str:
        """A few lines: the GIL's busy share, the main thread's share, the top holders."""
        seconds = time.monotonic() - self.t0
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        try:
            lines = self.out.read_text().splitlines()
        except OSError:
            return "    (py-spy wrote no profile)"
        held: dict[str, int] = {}
        main = total = 0
        for line in lines:
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            n = int(count)
            total += n
            if frames[0].startswith(f"thread ({self.pid})"):
                main += n
            k = _where(frames[1:])
            held[k] = held.get(k, 0) + n
        expected = self.RATE * seconds
        out = [(f"    GIL held in {total:,} of ~{expected:,.0f} samples ({100 * total / expected:.0f} % of the round); "
               f"by the main thread (event loop) {100 * main / max(total, 1):.0f} % of those")]
        for k, n in sorted(held.items(), key=lambda kv: -kv[1])[:12]:
            out.append(f"      {100 * n / max(total, 1):5.1f} %  {k[:160]}")
        return "\n".join(out)


def _where(frames: list[str]) -> str:
    """The innermost project frame and the innermost frame: what the thread was doing."""
    proj = [f for f in frames if any(k in f for k in ("(glue.py", "(app.py", "probing_core"))
            or re.match(r"<module> \((regression|lens|home|sparse|layers|attention|interventions|tree)\.py", f)]
    leaf = re.sub(r":\d+\)$", ")", frames[-1]) if frames else "?"
    where = re.sub(r":\d+\)$", ")", proj[-1]) if proj else ""
    return f"{where} → {leaf}" if where and where != leaf else leaf


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    return sum(_cpu_by_pid(procs).values())


def _cpu_by_pid(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            c = p.cpu_times()
            out[p.pid] = c.user + c.system
        except psutil.Error:
            pass
    return out


def _chromium_procs() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith(("chromium", "chrome"))]


#: Input events the browser dropped under load (the widget did not change: the action was sent again), and
#: actions whose widget changed with no script run seen by the in-page watch (the app did the work; latency unknown).
RESENT: list[str] = []
UNSEEN: list[str] = []


async def _timed(page, act, took_effect=None, name: str = "") -> float:
    """Seconds from just before ``act()`` until the script run it caused has finished (in-page clock).

    ``took_effect()``: whether the widget now shows the action's value. When no script run was seen and the
    widget did not change, the input was lost before it reached the app (focus taken by a rerun that redrew
    the widget, under load): the action is sent again, timed from the new attempt, and counted in RESENT.
    """
    for attempt in range(3):
        await page.evaluate(WATCH_JS)
        await act()
        await page.wait_for_function(DONE_JS, timeout=ACTION_TIMEOUT_MS, polling=50)
        t = await page.evaluate("() => window.__bench.runs ? (window.__bench.last - window.__bench.t0) / 1000 : NaN")
        if not math.isnan(t) or took_effect is None:
            return t
        if await took_effect():
            UNSEEN.append(name)
            return None
        RESENT.append(name)
    return float("nan")


async def _page_errors(page) -> list[str]:
    out = []
    for sel in ("[data-testid='stException']", "[data-testid='stAlertContentError']"):
        loc = page.locator(sel)
        for i in range(await loc.count()):
            out.append((await loc.nth(i).inner_text())[:200])
    return out


async def session(browser, base: str, label: str, prompt: str) -> tuple[dict[str, float], list[str]]:
    """One fresh browser session through the common path; returns latencies and errors."""
    ctx = await browser.new_context(viewport={"width": 1400, "height": 1000}, service_workers="block")
    ctx.set_default_timeout(ACTION_TIMEOUT_MS)
    page = await ctx.new_page()
    times: dict[str, float] = {}
    errors: list[str] = []
    try:
        # Open Regression on the default entry: until the R² chart is drawn (a page load, so the
        # in-page watch cannot span it: timed from the navigation, first chart and idle state).
        t0 = time.perf_counter()
        await page.goto(f"{base}/regression")
        await page.locator(".st-key-reg_curve .js-plotly-plot").first.wait_for()
        await page.wait_for_selector(IDLE)
        await page.wait_for_selector("[data-testid='stSpinner']", state="detached")
        times["open_regression"] = time.perf_counter() - t0
        errors += await _page_errors(page)

        async def pick_label():
            await page.locator(".st-key-reg_label [role='combobox']").click()  # a react-aria combo box in 1.67
            await page.get_by_role("option", name=label, exact=True).click()
        async def label_shown() -> bool:
            return label in await page.locator(".st-key-reg_label").evaluate(  # a combo box: the choice is its input's value
                "el => (el.querySelector('input') || {}).value + ' ' + el.innerText")
        times["change_label"] = await _timed(page, pick_label, label_shown, "change_label")
        errors += await _page_errors(page)

        async def move_alpha():
            slider = page.locator(".st-key-reg_alpha input[type='range'], .st-key-reg_alpha [role='slider']").first
            await slider.focus()
            await slider.press("End")
        async def alpha_at_end() -> bool:
            slider = page.locator(".st-key-reg_alpha input[type='range'], .st-key-reg_alpha [role='slider']").first
            return await slider.evaluate("el => (el.getAttribute('aria-valuenow') ?? el.value) == "
                                         "(el.getAttribute('aria-valuemax') ?? el.max)", timeout=30_000)
        times["move_alpha"] = await _timed(page, move_alpha, alpha_at_end, "move_alpha")
        errors += await _page_errors(page)

        # A page switch: timed like the first page (the in-page watch missed the switch's script run at
        # times): from the click until the lens page's prompt box is there and the app is idle.
        t0 = time.perf_counter()
        await page.locator("[data-testid='stSidebarNav'] a", has_text="Logit lens").first.click()
        await page.locator(".st-key-lens_prompt textarea").wait_for()
        await page.wait_for_selector(IDLE)
        await page.wait_for_selector("[data-testid='stSpinner']", state="detached")
        times["open_lens"] = time.perf_counter() - t0
        errors += await _page_errors(page)

        async def run_prompt():
            box = page.locator(".st-key-lens_prompt textarea")
            await box.fill(prompt)
            await box.press("Control+Enter")
        times["run_prompt"] = await _timed(page, run_prompt)
        errors += await _page_errors(page)
    except Exception as e:  # noqa: BLE001 — a timeout or a missing element is a result to report, not a crash
        try:  # where it stood: the in-page watch and the app's script state
            state = await page.evaluate("() => JSON.stringify(window.__bench || null) + ' state=' + "
                                        "document.querySelector(\"[data-testid='stApp']\").getAttribute('data-test-script-state')")
        except Exception as e2:  # noqa: BLE001
            state = f"(page unreadable: {type(e2).__name__})"
        errors.append(f"{type(e).__name__} after {list(times)}: {str(e).splitlines()[0][:200]} {state}")
    finally:
        await ctx.close()
    for a in [a for a, s in times.items() if s is None]:  # done (the widget changed), no run seen: no latency
        del times[a]
    missed = [a for a, s in times.items() if math.isnan(s)]  # NaN: no script run and no change, three times
    for a in missed:
        del times[a]
        errors.append(f"{a}: no script run seen and the widget unchanged after 3 tries")
    return times, errors


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def run_round(browser, server: Server, n: int, round_no: int, profile_dir: Path | None = None) -> dict:
    labels = [LABELS[(2 * round_no + i % 2) % len(LABELS)] for i in range(n)]
    prompts = [f"Round {round_no}, visitor {i}: the capital of France is" for i in range(n)]
    tb0 = server.tracebacks()
    RESENT.clear()
    UNSEEN.clear()
    cpu0 = (_cpu_seconds([server.ps]), _cpu_by_pid(_chromium_procs()), psutil.cpu_times())
    prof = GilProfile(server.proc.pid, profile_dir / f"gil-n{n}.txt") if profile_dir else None
    t0 = time.monotonic()
    results = await asyncio.gather(*(session(browser, server.base, labels[i], prompts[i]) for i in range(n)))
    t1 = time.monotonic()
    gil = prof.stop() if prof else None
    # Chromium processes alive at the end, less what they had used at the start (renderers come and go).
    chromium = sum(t - cpu0[1].get(pid, 0.0) for pid, t in _cpu_by_pid(_chromium_procs()).items())
    machine = psutil.cpu_times()
    win = server.window(t0, t1)
    return {
        "gil": gil,
        "cpu": {"server": _cpu_seconds([server.ps]) - cpu0[0], "chromium": chromium,
                "machine": (machine.user + machine.system + machine.nice) - (cpu0[2].user + cpu0[2].system + cpu0[2].nice),
                "capacity": (t1 - t0) * (os.cpu_count() or 1)},
        "n": n, "wall": t1 - t0,
        "times": {a: [r[0][a] for r in results if a in r[0]] for a in ACTIONS},
        "errors": [e for r in results for e in r[1]],
        "resent": list(RESENT), "unseen": list(UNSEEN),
        "tracebacks": server.tracebacks() - tb0,
        "health_max": max((s[2] for s in win), default=float("nan")),
        "health_slow": sum(1 for s in win if not s[1] or s[2] > 1.0), "health_n": len(win),
        "health_p50": statistics.median([s[2] for s in win]) if win else float("nan"),
        "control_max": max((s[4] for s in win), default=float("nan")),
        "control_slow": sum(1 for s in win if s[4] > 1.0),
        "load": os.getloadavg()[0],
        "rss_peak": max((s[3] for s in win), default=0), "rss_end": server.rss(),
    }


def report(r: dict) -> None:
    print(f"\nN = {r['n']} sessions at once: round wall time {r['wall']:.1f} s")
    print(f"  {'action':<16} {'done':>5} {'median s':>9} {'p95 s':>7} {'max s':>7}")
    for a in ACTIONS:
        xs = r["times"][a]
        if xs:
            print(f"  {a:<16} {len(xs):>5} {statistics.median(xs):>9.2f} {_pct(xs, 0.95):>7.2f} {max(xs):>7.2f}")
        else:
            print(f"  {a:<16} {0:>5}        --")
    print(f"  errors: {len(r['errors'])} in pages/timeouts, {r['tracebacks']} tracebacks in the server log"
          + "".join(f"\n    - {e}" for e in r["errors"][:8]))
    if r["resent"] or r["unseen"]:
        print(f"  browser input lost under load and sent again: {len(r['resent'])} ({', '.join(r['resent']) or '-'}); "
              f"done with no run seen (no latency): {len(r['unseen'])} ({', '.join(r['unseen']) or '-'})")
    print(f"  server RSS: peak {r['rss_peak'] / 2**20:,.0f} MiB, after the round {r['rss_end'] / 2**20:,.0f} MiB")
    print(f"  /_stcore/health: {r['health_n']} polls, median {r['health_p50'] * 1000:.0f} ms, slowest "
          f"{r['health_max'] * 1000:.0f} ms, {r['health_slow']} failed or over 1 s; control http.server: slowest "
          f"{r['control_max'] * 1000:.0f} ms, {r['control_slow']} over 1 s; machine load average {r['load']:.1f}")
    c = r["cpu"]
    print(f"  CPU seconds in the round: server {c['server']:.0f}, Chromium {c['chromium']:.0f} (renderers that ended "
          f"before the round's end are not counted), whole machine {c['machine']:.0f} of {c['capacity']:.0f} available")
    if r["gil"]:
        print("  who held the server's GIL (py-spy):\n" + r["gil"])


async def main_async(args) -> int:
    from playwright.async_api import async_playwright

    cache_dir = prepare_cache(args.tokens, args.reuse)
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    server = Server(cache_dir, out / "bench_load-server.log", args.server_option)
    if args.server_option:
        print("server options: " + " ".join(args.server_option))
    print(f"server {server.base}, pid {server.proc.pid}, RSS at start {server.rss() / 2**20:,.0f} MiB")
    bad = 0
    try:
        async with async_playwright() as pw:
            exe = CHROMIUM
            if args.nice_browsers:  # a wrapper, so every renderer it forks inherits the niceness
                exe = str(cache_dir / "chromium-niced")
                Path(exe).write_text(f'#!/bin/sh\nexec nice -n {args.nice_browsers} {CHROMIUM} "$@"\n')
                os.chmod(exe, 0o755)
                print(f"Chromium runs at niceness {args.nice_browsers} (the browsers model remote clients; the server is not niced)")
            browser = await pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
            # Idle baseline: the server with no visitor, against the control.
            t0 = time.monotonic()
            await asyncio.sleep(15)
            idle = server.window(t0, time.monotonic())
            print(f"idle 15 s: health slowest {max(s[2] for s in idle) * 1000:.0f} ms, control slowest "
                  f"{max(s[4] for s in idle) * 1000:.0f} ms, load average {os.getloadavg()[0]:.1f}")
            # Warm-up, not counted: the first visitor loads the model and makes the first (cold) fit.
            t0 = time.monotonic()
            times, errors = await session(browser, server.base, LABELS[-1], "Warm-up: the capital of France is")
            print(f"warm-up session (model load + first fit, one visitor): {time.monotonic() - t0:.1f} s, "
                  f"open_regression {times.get('open_regression', float('nan')):.1f} s, errors {errors or 0}; "
                  f"RSS {server.rss() / 2**20:,.0f} MiB")
            for k, n in enumerate(args.sessions):
                r = await run_round(browser, server, n, k, out if args.profile else None)
                report(r)
                bad += len(r["errors"]) + r["tracebacks"] + r["health_slow"]
            await browser.close()
    finally:
        server.close()
        if not args.keep and args.reuse is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"\nserver log: {server.log_path}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent sessions per round")
    ap.add_argument("--tokens", type=int, default=5000, help="tokens in the benchmark's cache entry (Home's default)")
    ap.add_argument("--keep", action="store_true", help="keep the temp cache folder")
    ap.add_argument("--reuse", type=Path, metavar="DIR", help="use a cache folder kept by an earlier --keep run")
    ap.add_argument("--server-option", action="append", default=[], metavar="NAME=VALUE",
                    help="a Streamlit option for the server (repeatable), e.g. runner.postScriptGC=false")
    ap.add_argument("--profile", action="store_true",
                    help="sample the GIL holder with py-spy (on PATH or /tmp/pyspy/bin): who held it, doing what, per round")
    ap.add_argument("--nice-browsers", type=int, default=0, metavar="N",
                    help="run Chromium at this niceness (models remote clients; the server is never niced)")
    ap.add_argument("--action-timeout", type=float, default=600, help="seconds one action may take before it counts as an error")
    args = ap.parse_args()
    global ACTION_TIMEOUT_MS
    ACTION_TIMEOUT_MS = int(args.action_timeout * 1000)
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` stops it like Ctrl-C: the server is stopped too
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
