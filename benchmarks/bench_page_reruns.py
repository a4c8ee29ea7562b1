"""Full page reruns with AppTest, one row per control per page, at the default cache entry.

What a user feels after moving one control is the whole rerun, not the solver: this times
``AppTest.run()`` after each widget change (server side: the script, the core calls, the figures,
their JSON, the protobuf messages). Each row splits that time into

* **compute** — time inside ``probing_core.analyses.*`` (and the tree model) calls, outermost only;
* **figures** — time inside ``probing_core.plots.*`` calls (building plotly figures);
* **json** — ``plotly.io.to_json`` (Streamlit's serialization of every figure sent);
* **rest** — everything else: Streamlit's script run, widgets, dataframes (Arrow), AppTest's own
  parsing of the message tree (a few ms per element).

The Layer probes page fits the other C values of a label state and one step of each label control in a
background thread named ``layers-grid`` (not counted in the split; a move to a C it is fitting waits for it). The other pages
start no background work of their own (the Sparse page's C path, embed-only baseline
and control task are fitted once per state, so a C move is a lookup); a thread named
``warm-shelves`` (older trees) would not be counted in the split, only in the totals.

Every move goes to a value not seen before in this process (no warm repeat), except rows marked
"back", which return to an earlier value (what per-state caches buy). The entries are the app's
defaults: Home's default build (hook_embed + every resid_post, 5,000 pydoc tokens, fp32) for
Regression and Layer probes; for Sparse probes the entry its "Build these hooks now" button makes
(``glue.SPARSE_BUILD``), or whatever entry with ``mlp_post`` exists.

    flock /tmp/bench.lock python benchmarks/bench_page_reruns.py            # every page
    python benchmarks/bench_page_reruns.py --pages regression,sparse --moves 3

Uses ``PROBING_CACHE_DIR`` (default ./cache); entries it needs are built there once.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import plotly.io  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

import probing_core.analyses.attention  # noqa: E402,F401
import probing_core.analyses.layer_probes  # noqa: E402,F401
import probing_core.analyses.lens  # noqa: E402,F401
import probing_core.analyses.regression  # noqa: E402,F401
import probing_core.analyses.sparse  # noqa: E402,F401
import probing_core.plots.attention  # noqa: E402,F401
import probing_core.plots.layers  # noqa: E402,F401
import probing_core.plots.lens  # noqa: E402,F401
import probing_core.plots.regression  # noqa: E402,F401
import probing_core.plots.sparse  # noqa: E402,F401
from probing_core.data.datasets import DatasetSpec, load_dataset  # noqa: E402
from probing_core.models import EMBEDDED_NAME, ModelSpec, default_cache_root, load_model  # noqa: E402
from probing_core.store.activations import build_cache  # noqa: E402
from probing_core.store.entries import ActivationStore  # noqa: E402

PYDOC = "Python documentation (offline corpus)"

# ---------------------------------------------------------------------------------------------
# Timers: wrap module attributes (pages call ``module.fn`` at run time), count the outermost call
# ---------------------------------------------------------------------------------------------

_spent = {"compute": 0.0, "figures": 0.0, "json": 0.0}
_depth = {"compute": 0, "figures": 0, "json": 0}


def _timed(kind: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        if _depth[kind] or threading.current_thread().name in ("warm-shelves", "layers-grid"):  # the rerun's own thread only
            return fn(*a, **kw)
        _depth[kind] += 1
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            _spent[kind] += time.perf_counter() - t
            _depth[kind] -= 1

    return wrapper


def _wrap_module(mod: Any, kind: str) -> None:
    for name, obj in list(vars(mod).items()):
        if inspect.isfunction(obj) and obj.__module__ == mod.__name__ and not name.startswith("__"):
            setattr(mod, name, _timed(kind, obj))


def install_timers() -> None:
    import probing_core.analyses as an
    import probing_core.plots as pl

    for m in ("regression", "sparse", "layer_probes", "lens", "attention"):
        _wrap_module(getattr(an, m), "compute")
    for m in ("regression", "sparse", "layers", "lens", "attention"):
        _wrap_module(getattr(pl, m), "figures")
    plotly.io.to_json = _timed("json", plotly.io.to_json)


# ---------------------------------------------------------------------------------------------
# Entries and the app
# ---------------------------------------------------------------------------------------------


def default_entries(tokens: int, sparse: bool = True) -> dict[str, str]:
    """Home's default entry and the Sparse page's build, built once in the app's store."""
    import glue

    model = load_model(ModelSpec("embedded"))
    store = ActivationStore(default_cache_root() / "activations")
    ds = load_dataset(DatasetSpec("pydoc"))
    t = time.perf_counter()
    home, built = build_cache(model, ds, model.hook_names(["embed", "resid_post"]), store=store, max_tokens=tokens)
    print(f"default entry {home.key[:10]}: {'built' if built else 'reused'} ({time.perf_counter() - t:.1f} s)")
    out = {"home": home.key}
    if not sparse:
        return out
    preset = getattr(glue, "SPARSE_BUILD", None)
    if preset is not None:
        t = time.perf_counter()
        sp, built = build_cache(model, ds, preset.hooks(model), store=store, max_tokens=preset.max_tokens,
                                max_len=preset.max_len, dtype=preset.dtype)
        print(f"sparse entry {sp.key[:10]}: {'built' if built else 'reused'} ({time.perf_counter() - t:.1f} s)")
        out["sparse"] = sp.key
    else:
        with_mlp = [e for e in store.entries() if e.meta.get("model_key") == model.key
                    and any(h.endswith("mlp.hook_post") for h in e.hooks)]
        if with_mlp:
            out["sparse"] = with_mlp[0].key
        else:  # before the page could build its own hooks: layers 0-5 (the notebook reads 3), 40,000 tokens
            hooks = [h for h in model.hook_names(["mlp_post"])][:6]
            sp, _ = build_cache(model, ds, hooks, store=store, max_tokens=40_000, dtype="float16")
            out["sparse"] = sp.key
    return out


def open_page(page: str, entry: str | None) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=900)
    at.session_state["model_choice"] = EMBEDDED_NAME
    at.session_state["dataset_choice"] = PYDOC
    if entry:
        at.session_state["home_entry_key"] = entry
    at.run()
    if page != "home":
        at.switch_page(f"pages/{page}.py").run()
    _check(at, f"open {page}")
    return at


def _check(at: AppTest, where: str) -> None:
    if at.exception:
        raise SystemExit(f"{where}: {at.exception[0].value}")
    if at.error:
        print(f"  ! {where}: {at.error[0].value[:200]}")


def timed_run(at: AppTest) -> dict[str, float]:
    for k in _spent:
        _spent[k] = 0.0
    t = time.perf_counter()
    at.run()
    total = time.perf_counter() - t
    return {"total": total, **_spent, "rest": total - sum(_spent.values())}


# ---------------------------------------------------------------------------------------------
# Controls: (name, function that sets a new value on the AppTest and returns a description)
# ---------------------------------------------------------------------------------------------


def _widget(at: AppTest, kind: str, key: str):
    return getattr(at, kind)(key=key)


def step(kind: str, key: str, values: list | None = None, *, back: bool = False, pause: float = 0.0):
    """A move of widget ``key``: to the next unseen option (or ``values`` in turn); ``back`` = revisit;
    ``pause``: seconds on the page before the move (not timed: what a user spends reading)."""
    state = {"i": 0, "seen": []}

    def move(at: AppTest):
        time.sleep(pause)
        w = _widget(at, kind, key)
        if back and state["seen"]:
            v = state["seen"][0]
        elif values is not None:
            v = values[state["i"] % len(values)]
        else:
            opts = list(w.options)
            v = opts[(opts.index(w.value) + 1) % len(opts)] if w.value in opts else opts[0]
        if kind == "select_slider" and isinstance(v, int) and v not in w.options:
            v = list(w.options)[v]  # a step given by position
        state["i"] += 1
        state["seen"].append(w.value)
        w.set_value(v)
        return v

    return move


def label_step(pause: float):
    """A Layer probes label move of one control step from where the page is — the token offset one back (or one
    forward at its end), then the top-K one up, in turn — after ``pause`` seconds on the page (not timed). The page
    fits one step of each label control in the background once a table is shown, so these read what it fitted."""
    state = {"i": 0}

    def move(at: AppTest):
        time.sleep(pause)
        if state["i"] % 2 == 0:
            w = _widget(at, "slider", "layers_offset")
            v = w.value - 1 if w.value - 1 >= w.min else w.value + 1
        else:
            w = _widget(at, "slider", "layers_top_k")
            v = w.value + 1 if w.value + 1 <= w.max else w.value - 1
        state["i"] += 1
        w.set_value(v)
        return v

    return move


#: The Sparse page's C control: a slider over the steps of the C path (the URL holds the step).
_C_KIND = "slider"

PLANS: dict[str, list[tuple[str, Callable]]] = {
    "regression": [
        ("α slider (one grid step)", step("select_slider", "reg_alpha")),
        ("α slider back to a seen value", step("select_slider", "reg_alpha", ["best per hook", "0.001"])),
        ("hook for R² vs α", step("selectbox", "reg_hook")),
        ("label change", step("selectbox", "reg_label", ["capitalised", "starts_with_space", "position", "length_no_space"])),
    ],
    "sparse": [
        ("C slider (one step, right after the last)", step(_C_KIND, "sparse_C", [9, 10, 11, 12])),
        ("C slider back to a seen value", step(_C_KIND, "sparse_C", [8])),
        ("C slider (new step, after 10 s on the page)", step(_C_KIND, "sparse_C", [5, 3, 14, 1], pause=10.0)),
        ("hook change", step("selectbox", "sparse_hook")),
        ("class B tokens (label change)", step("text_input", "sparse_b", [" a", " this", " that"])),
    ],
    "layers": [
        ("top-K slider", step("slider", "layers_top_k", [15, 10, 25, 30])),
        ("top-K back to a seen value", step("slider", "layers_top_k", [20])),
        ("C slider", step("select_slider", "layers_C", [0.1, 10.0, 0.01])),
        ("label change (token offset)", step("slider", "layers_offset", [-2, 1, -3, -4])),
        # the page fits the other C values of a label state in the background after its first view
        ("C slider (new value, after 40 s on the page)", step("select_slider", "layers_C", [1.0, 100.0, 0.001],
                                                               pause=40.0)),
        # ... and one step of the offset or top-K (nearby label states, fitted at the C in view after the C values
        # next to it): after 60 s they are there
        ("label, one step (after 60 s on the page)", label_step(60.0)),
    ],
    "attention": [
        ("layer", step("number_input", "attn_layer", [1, 2, 3, 4])),
        ("head", step("selectbox", "attn_head", [1, 2, 3, 4])),
    ],
    "lens": [
        ("top-k slider", step("slider", "lens_k", [6, 7, 8, 9])),
        ("prompt change", step("text_area", "lens_prompt", ["The capital of Italy is", "The capital of Spain is",
                                                             "The capital of Japan is"])),
    ],
}


def bench_page(page: str, entry: str | None, moves: int) -> list[tuple[str, dict[str, float]]]:
    t = time.perf_counter()
    at = open_page(page, entry)
    print(f"\n{page}: first visit {time.perf_counter() - t:.1f} s (model load, first fits)")
    rows = []
    for name, move in PLANS[page]:
        timings = []
        for _ in range(moves):
            v = move(at)
            timings.append(timed_run(at))
            _check(at, f"{page}: {name} → {v!r}")
        med = {k: statistics.median(t[k] for t in timings) for k in timings[0]}
        rows.append((name, med))
        print(f"  {name:34s} {_fmt(med)}")
    return rows


def _fmt(t: dict[str, float]) -> str:
    return (f"total {t['total'] * 1e3:7.0f} ms | compute {t['compute'] * 1e3:6.0f} | figures {t['figures'] * 1e3:5.0f} | "
            f"json {t['json'] * 1e3:5.0f} | rest {t['rest'] * 1e3:5.0f}")


def browser_sparse_moves(moves: int) -> list[float]:
    """One real-browser figure: a Sparse C step (arrow key on the slider) → the rerun done, in headless Chromium
    against a ``streamlit run`` server on this store (the fragment under the slider reruns alone there).
    Times include the 100 ms settle wait and the browser's polling; the first visit (model load, fit) is not timed."""
    import subprocess
    import urllib.request

    from playwright.sync_api import sync_playwright

    port = 8700 + os.getpid() % 200
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PROBING_DEMO", None)
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.headless", "true", "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base, out = f"http://localhost:{port}", []
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
                "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)

            def idle(settle: int) -> None:
                page.wait_for_timeout(settle)
                page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']")

            page.goto(f"{base}/sparse")
            idle(2000)
            page.wait_for_selector(".st-key-sparse_C input[type='range']")
            for _ in range(moves):
                slider = page.locator(".st-key-sparse_C input[type='range']")
                slider.focus()
                t = time.perf_counter()
                slider.press("ArrowLeft")
                idle(100)
                out.append(time.perf_counter() - t)
                if page.locator("[data-testid='stException']").count():
                    raise SystemExit("browser: the Sparse page shows an exception after a C step")
            b.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", default=",".join(PLANS), help=f"comma-separated subset of {', '.join(PLANS)}")
    ap.add_argument("--moves", type=int, default=3, help="moves per control (median reported)")
    ap.add_argument("--tokens", type=int, default=5_000, help="tokens of the default entry (Home's default)")
    ap.add_argument("--browser", action="store_true", help="also time Sparse C steps in headless Chromium")
    a = ap.parse_args()
    print(f"bench_page_reruns: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at start; "
          f"store {default_cache_root()}")
    entries = default_entries(a.tokens, sparse="sparse" in a.pages.split(","))
    import glue

    glue.LAYERS_GRID_IN_APPTEST = True  # the Layer probes page's background C grid, as in a real server
    install_timers()
    table = []
    for page in a.pages.split(","):
        entry = entries.get("sparse" if page == "sparse" else "home")
        for name, t in bench_page(page, entry, a.moves):
            table.append((page, name, t))
    print("\n| page | control | total ms | compute | figures | json | rest |\n|---|---|---:|---:|---:|---:|---:|")
    for page, name, t in table:
        print(f"| {page} | {name} | {t['total'] * 1e3:.0f} | {t['compute'] * 1e3:.0f} | {t['figures'] * 1e3:.0f} | "
              f"{t['json'] * 1e3:.0f} | {t['rest'] * 1e3:.0f} |")
    if a.browser:
        ts = browser_sparse_moves(max(3, a.moves))
        print(f"browser: Sparse C step → rerun done: median {statistics.median(ts) * 1e3:.0f} ms "
              f"({', '.join(f'{t * 1e3:.0f}' for t in ts)} ms; includes a 100 ms settle wait)")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
