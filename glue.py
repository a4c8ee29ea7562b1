"""Streamlit glue: cached resources, the shared sidebar and small UI helpers.

The only module outside ``pages/`` that imports streamlit. Pages call it to get the selected
model, dataset and cache entry, and to show :class:`ProbingError` messages instead of tracebacks.

Caching rules (see ../shared/STYLE.md): ``st.cache_resource`` holds loaded models and the store
(shared by every session, never mutated; forward passes hold the model's lock); big arrays live
in the store; ``st.session_state`` holds UI choices only, keys prefixed by page.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Sequence, TypeVar

import streamlit as st

from probing_core.store.activations import CachedActivations, open_entry
from probing_core.data.datasets import MAX_UPLOAD_BYTES, Dataset, DatasetSpec, load_dataset
from probing_core.data.labels import LABELS, LabelSpec
from probing_core.errors import ProbingError
from probing_core.models import (
    EMBEDDED_NAME,
    LoadedModel,
    ModelSpec,
    default_cache_root,
    load_model,
    model_catalog,
)
from probing_core.store.entries import ActivationStore, StoreEntry, size_limit_from_env
from probing_core.threads import ComputeQueue, compute_slots, lower_thread_priority, script_niceness

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def demo_mode() -> bool:
    """Demo mode (PROBING_DEMO=1): capped inputs, embedded model preselected, explanations shown."""
    return os.environ.get("PROBING_DEMO", "0").lower() in ("1", "true", "yes", "on")


#: Token cap for cache builds: small in demo mode so nothing a visitor clicks takes long.
def max_tokens_cap() -> int:
    return 5_000 if demo_mode() else 200_000


def ensure_shell() -> None:
    """Rerun through app.py if a page was started without it.

    On a fresh server, the first visit straight to a page URL (e.g. ``/attention``) runs the page
    file by Streamlit's legacy ``pages/`` folder rule, skipping app.py's sidebar and navigation.
    Streamlit keeps using that rule until app.py's ``st.navigation`` has run once, so we switch
    the rule off (the flag app.py's ``st.navigation`` would clear) and rerun through app.py, which
    then routes to the same URL. Covered by the browser test that opens a page URL first.
    """
    if "_shell" not in st.session_state:
        from streamlit.runtime.pages_manager import PagesManager

        PagesManager.uses_pages_directory = False
        st.rerun()


def research() -> bool:
    """True outside demo mode: show the research controls (folds, seeds, tolerances, residuals, dtype, keys)."""
    return not demo_mode()


def explain(text: str, *, demo: str | None = None, steps: Sequence[str] = ()) -> None:
    """A "what this shows, how to read it" box.

    Demo mode shows ``demo`` (plain words; its first sentence should make sense to a twelve-year-old)
    in a 💡 box, followed by the guided path ``steps`` ("1. pick … → 2. watch … → 3. …"). The research
    view folds ``text`` (precise terms) into an expander.
    """
    ensure_shell()
    if demo_mode():
        body = demo or text
        if steps:
            body += "\n\n**Try it:** " + " → ".join(f"**{i}.** {s}" for i, s in enumerate(steps, 1))
        st.info(body, icon="💡")
    else:
        with st.expander("What am I looking at?", expanded=False):
            st.markdown(text)


def layer_words(hook: str) -> str:
    """A hook named for people: ``blocks.5.hook_resid_post`` → "layer 5 · resid post", ``hook_embed`` → "embedding"."""
    try:
        from probing_core.plots._common import hook_label
    except ImportError:  # the charts' shared helpers are newer than this module; same wording
        parts = hook.split(".")
        if parts[0] == "blocks" and len(parts) >= 3:
            return f"layer {parts[1]} · " + ".".join(parts[2:]).replace("hook_", "").replace("_", " ")
        return "embedding" if hook == "hook_embed" else hook
    return hook_label(hook)


_STYLE = """<style>
/* Narrow windows (800 px and up): metrics and button labels wrap instead of being cut ("bloc…"). */
[data-testid="stMetricValue"], [data-testid="stMetricValue"] *, [data-testid="stMetricLabel"], [data-testid="stMetricLabel"] * {
  white-space: normal !important; overflow: visible !important; text-overflow: clip !important; overflow-wrap: anywhere;
}
[data-testid="stMetricValue"] { font-size: clamp(1.3rem, 2.4vw, 2.25rem) !important; line-height: 1.25 !important; }
[data-testid="stDownloadButton"] button, [data-testid="stDownloadButton"] button *,
[data-testid="stBaseButton-secondary"] *, [data-testid="stBaseButton-primary"] * { white-space: normal !important; }
[data-testid="stDownloadButton"] button { height: auto; min-height: 2.5rem; }
</style>"""

#: Streamlit's "auto" sidebar collapses only under 768 px; close it once per tab under 1,000 px as well,
#: so the page gets the width (the user can open it again; it is not closed twice).
_NARROW_SIDEBAR_JS = """<script>
(() => {
  if (window.innerWidth >= 1000 || sessionStorage.getItem("probing-sidebar-auto")) return;
  let tries = 0;
  const close = () => {
    const bar = document.querySelector('[data-testid="stSidebar"][data-collapsed="false"]');
    const btn = document.querySelector('[data-testid="stSidebarCollapseButton"] button');
    if (bar && btn) { btn.click(); sessionStorage.setItem("probing-sidebar-auto", "1"); }
    else if (++tries < 50) setTimeout(close, 100);
  };
  close();
})();
</script>"""


def page_style() -> None:
    """CSS for narrow windows and the sidebar rule above (called by app.py on every run; drawn in the
    sidebar so that nothing comes before a page's title)."""
    st.sidebar.html(_STYLE)
    st.sidebar.html(_NARROW_SIDEBAR_JS, unsafe_allow_javascript=True)


# ---------------------------------------------------------------------------------------------
# Who may use the server: optional sign-in (Streamlit's own OIDC login), the open-access note
# ---------------------------------------------------------------------------------------------


def auth_enabled() -> bool:
    """Sign-in required (``PROBING_AUTH=1``): no page runs until the visitor has signed in with ``st.login``."""
    return os.environ.get("PROBING_AUTH", "0").strip().lower() in ("1", "true", "yes", "on")


def sign_in_gate() -> None:
    """With sign-in on, stop the app here until the visitor has signed in (app.py calls it before any page).

    The provider is the ``[auth]`` table of ``.streamlit/secrets.toml`` (``PROBING_AUTH_PROVIDER=NAME`` picks an
    ``[auth.NAME]`` table instead). Missing or incomplete settings give a message, never a traceback.
    """
    if not auth_enabled():
        return
    from streamlit.auth_util import is_authlib_installed, validate_auth_credentials
    from streamlit.errors import StreamlitAuthError

    provider = os.environ.get("PROBING_AUTH_PROVIDER", "").strip() or "default"
    problem = "" if is_authlib_installed() else "Authlib is not installed (pip install -r requirements.txt)."
    if not problem:
        try:
            validate_auth_credentials(provider)
        except StreamlitAuthError as e:
            problem = " ".join(str(e).split())
    if problem:
        st.title("🔒 Sign-in is switched on but not set up")
        st.error(f"This server was started with PROBING_AUTH=1, so every visitor must sign in, but sign-in is not "
                 f"configured: {problem} Put the [auth] settings into .streamlit/secrets.toml (docs/deploy.md, "
                 f"\"Sign-in\") and restart the server, or start it without PROBING_AUTH.", icon="🔒")
        st.stop()
    if not st.user.is_logged_in:
        st.title("🔒 Probing dashboard")
        st.write("This server asks every visitor to sign in first.")
        st.button("Sign in", type="primary", on_click=st.login, args=(provider,), key="auth_login")
        st.stop()
    user = st.user.to_dict()
    with st.sidebar:
        st.caption(f"Signed in as {user.get('email') or user.get('name') or 'you'}")
        st.button("Sign out", on_click=st.logout, key="auth_logout")


def open_access_note() -> None:
    """On Home: with sign-in off, say plainly that anyone who can reach the port can use the app."""
    if not auth_enabled():
        st.caption("🔓 No sign-in: anyone who can reach this server's port can use this app (build caches, run the "
                   "model). To restrict it, switch on sign-in (PROBING_AUTH=1; see docs/deploy.md).")


def local_folder_help() -> str:
    """Help text of the local-folder box, naming the folders this server may read models from."""
    from probing_core.models import allowed_model_roots

    roots = allowed_model_roots()
    where = "" if roots is None else " On this server: only folders under " + ", ".join(map(str, roots)) + "."
    return "a Hugging Face model folder (config.json + weights)." + where


# ---------------------------------------------------------------------------------------------
# Cached resources (shared by all sessions: read-only)
# ---------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False, max_entries=3)
def _load_model_cached(spec: ModelSpec, cache_root: str) -> LoadedModel:
    model = load_model(spec, cache_root=Path(cache_root))
    if _in_server():  # the event loop must not stall in full collections over the model's objects
        freeze_long_lived()
    return model


def get_model(spec: ModelSpec) -> LoadedModel:
    """The loaded model for ``spec``; loads once per process (spinner while loading)."""
    with st.spinner(f"Loading {spec.label()} (first time: up to a minute)…"):
        return _load_model_cached(spec, str(default_cache_root()))


@st.cache_resource(show_spinner=False)
def _store_cached(root: str, limit: int) -> ActivationStore:
    return ActivationStore(Path(root), size_limit=limit)


def get_store() -> ActivationStore:
    """The activation store under ``$PROBING_CACHE_DIR/activations``."""
    with user_errors():  # a bad PROBING_CACHE_LIMIT_GB or an unwritable folder: a message, not a traceback
        return _store_cached(str(default_cache_root() / "activations"), size_limit_from_env())


@st.cache_resource(show_spinner=False, max_entries=8)
def _dataset_cached(spec: DatasetSpec, upload_digest: str, _upload: bytes | None) -> Dataset:
    return load_dataset(spec, upload=_upload)


def get_dataset(spec: DatasetSpec, upload: bytes | None = None) -> Dataset:
    digest = hashlib.blake2b(upload, digest_size=8).hexdigest() if upload else ""
    return _dataset_cached(spec, digest, upload)


@st.cache_resource(show_spinner=False, max_entries=4)
def _entry_cached(root: str, key: str) -> CachedActivations:
    return open_entry(get_store(), key)


def get_entry(key: str) -> CachedActivations:
    """Read access to a store entry (token table loaded once per process)."""
    return _entry_cached(str(get_store().root), key)


# ---------------------------------------------------------------------------------------------
# Errors and progress
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Show a :class:`ProbingError` as ``st.error`` and stop the page (never a traceback)."""
    try:
        yield
    except ProbingError as e:
        st.error(str(e), icon="⚠️")
        st.stop()


def progress_bar(label: str) -> tuple[Callable[[float, str], None], Callable[[], None]]:
    """A Streamlit progress bar as a core progress callback, and a function that removes it."""
    bar = st.progress(0.0, text=label)

    def update(frac: float, msg: str) -> None:
        bar.progress(max(0.0, min(1.0, float(frac))), text=f"{label} — {msg}")

    return update, bar.empty


# ---------------------------------------------------------------------------------------------
# Shared results: fits every session reuses (one place, bounded, with their lock)
# ---------------------------------------------------------------------------------------------

T = TypeVar("T")


@st.cache_resource(show_spinner=False)
def _shelves() -> tuple[threading.Lock, dict[str, OrderedDict]]:
    """Named, insertion-ordered result shelves shared by every session, and the lock guarding them."""
    return threading.Lock(), {}


def _shelve(shelves: dict[str, OrderedDict], shelf: str, key: Hashable, value: Any, keep: int) -> Any:
    """Put ``value`` on ``shelf`` under ``key``, dropping the oldest past ``keep`` (caller holds the lock)."""
    items = shelves.setdefault(shelf, OrderedDict())
    items[key] = value
    while len(items) > keep:
        items.popitem(last=False)
    return value


def shared_slot(shelf: str, key: Hashable, *, keep: int) -> list:
    """A mutable list shared by every session under ``key`` (e.g. label-independent decompositions).

    At most ``keep`` keys are held per shelf; the oldest is dropped first.
    """
    lock, shelves = _shelves()
    with lock:
        slot = shelves.setdefault(shelf, OrderedDict()).get(key)
        return _shelve(shelves, shelf, key, [], keep) if slot is None else slot


@st.cache_resource(show_spinner=False)
def _in_flight() -> dict[tuple, threading.Event]:
    """``(shelf, key) -> Event`` of the fits running now (guarded by the shelves' lock)."""
    return {}


def freeze_long_lived() -> None:
    """Exempt every object alive now (modules, loaded models) from later garbage collections.

    Streamlit runs a full collection after every script run (``runner.postScriptGC``), holding the GIL,
    so the server's event loop — health checks and every browser's messages — stops meanwhile. With
    torch, transformers and SmolLM2 loaded a full collection walked ~560k objects in 0.8–2.3 s (load
    average 16); after ``gc.freeze()`` it walks only what was made since. Frozen objects are still
    freed when their last reference goes; only reference cycles among them are never collected, so
    garbage is collected first. Called after each model load in a running server (:func:`_in_server`).
    """
    gc.collect()
    gc.freeze()


def serve_event_loop_first() -> None:
    """Keep the server's event loop (health checks, every browser's messages) answering while pages compute.

    In a real server (tests never change their process): (1) CPython's GIL switch interval drops from 5 ms to
    ``SWITCH_INTERVAL`` (1 ms): a thread that wants the GIL asks the holder to drop it after that long, and
    with several sessions' scripts wanting it too, the loop waited up to that many intervals per request;
    (2) with ``PROBING_SCRIPT_NICE`` set (default 0: off), this page's script thread and the fit workers and
    pools it starts run that many nice levels below the event loop's thread.
    """
    if _in_server():
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
    lower_script_priority()


def lower_script_priority() -> None:
    """This thread (a page script's or a background fit's) ``PROBING_SCRIPT_NICE`` levels below the event loop;
    only in a real server."""
    if _in_server():
        lower_thread_priority(script_niceness())


#: Seconds between GIL drop requests in the server (CPython's default: 0.005).
SWITCH_INTERVAL = 0.001


def _in_server() -> bool:
    """Inside ``streamlit run`` (AppTest installs a stand-in Runtime: tests never freeze their process)."""
    from streamlit.runtime import Runtime

    return Runtime.exists() and type(Runtime.instance()) is Runtime


@st.cache_resource(show_spinner=False)
def _compute_queue() -> ComputeQueue:
    """Fits run at once in this server (``PROBING_COMPUTE_SLOTS``, default half the cores); the rest queue."""
    return ComputeQueue(compute_slots())


def _queue_note(ahead: int) -> str:
    return (f"waiting for {ahead} other computation{'s' if ahead != 1 else ''} to finish (this server runs "
            f"{_compute_queue().slots} at a time)")


def shared_result(shelf: str, key: Hashable, compute: Callable[[Callable[[float, str], None]], T], *,
                  keep: int, label: str) -> T:
    """The result stored under ``key``, or ``compute(progress)`` with a live progress bar, then stored.

    Not ``st.cache_data``: a fit's progress bar must draw while it runs, and results hold arrays that
    should not be pickled and copied per session. At most ``keep`` results per shelf (oldest dropped).
    One fit per key at a time: a session that asks for a key another session is computing waits for
    that result instead of computing it again (the load benchmark saw duplicated fits double memory
    and label-change time at 4-8 sessions). If that fit fails, the waiting session computes it itself.
    Fits of different keys take turns in :func:`_compute_queue`; the progress bar says how many are ahead.
    """
    lock, shelves = _shelves()
    flights = _in_flight()
    while True:
        with lock:
            res = shelves.setdefault(shelf, OrderedDict()).get(key)
            if res is not None:
                return res
            event = flights.get((shelf, key))
            if event is None:
                event = flights[(shelf, key)] = threading.Event()
                break
        with st.spinner(f"{label} — another session is computing this; waiting for its result…"):
            event.wait()
    try:
        update, done = progress_bar(label)
        try:
            with _compute_queue().turn(lambda ahead: update(0.0, _queue_note(ahead))):
                res = compute(update)
        finally:
            done()
        with lock:
            _shelve(shelves, shelf, key, res, keep)
        return res
    finally:
        with lock:
            flights.pop((shelf, key), None)
        event.set()


#: Figures kept per process (a sparse path's 17 steps × 4 figures fit, with room for other pages).
FIGURES_KEEP = 160


def cached_figure(name: str, key: Hashable, build: Callable[[], Any], *, keep: int = FIGURES_KEEP) -> Any:
    """A plotly figure built once per state and shared by every session (a rerun that changes nothing in a
    chart skips building it). ``key`` must hold everything the figure depends on. Streamlit serializes a
    figure through ``to_dict()`` (a copy), so a shared figure is never mutated."""
    lock, shelves = _shelves()
    with lock:
        fig = shelves.setdefault("figures", OrderedDict()).get((name, key))
    if fig is None:
        fig = build()
        with lock:
            _shelve(shelves, "figures", (name, key), fig, keep)
    return fig


# ---------------------------------------------------------------------------------------------
# Sparse probes and Layer probes (issue 16): their shared results, one fit per state for every session
# ---------------------------------------------------------------------------------------------


def sparse_fit(model: LoadedModel, acts: CachedActivations, hook: str, q: Any) -> Any:
    """The Sparse page's :class:`~probing_core.analyses.sparse.SparseFit` for ``hook`` and query ``q``.

    Three shelves: the contexts and the embed-only baseline depend on the entry and the query, not on
    the hook (a hook change refits only that hook's path); the fit holds the whole C path, the embed-only
    probe on the same C values and the control task along the path, so a C move is a lookup. A new
    query's embed-only baseline is fitted by ``fit_sparse`` beside the path (in parallel), then kept.
    """
    from probing_core.analyses import sparse

    ctx = shared_result("sparse_contexts", (acts.key, q.contexts_key()), lambda _: sparse.mine(acts, model.tokenizer, q),
                        keep=16, label="Mining contexts")
    lock, shelves = _shelves()
    with lock:
        embed = shelves.setdefault("sparse_embed", OrderedDict()).get((acts.key, q))
    fit = shared_result("sparse_fit", (acts.key, hook, q), lambda p: sparse.fit_sparse(
        acts, hook, ctx, q, embed_best=embed, progress=p), keep=16, label="Fitting the whole C path at once")
    if embed is None and fit.embed_best is not None:
        with lock:
            _shelve(shelves, "sparse_embed", (acts.key, q), fit.embed_best, 16)
    return fit


#: The Layer probes page's C values (its select_slider). Every C of a label state is one cold fit, so a table is
#: the same whichever order the controls were moved in; the first view fits the C in view, then the page's other
#: C values are fitted in a background thread (:class:`_LayerGrid`), so a later C move is a lookup.
LAYERS_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
#: The background C grid runs in a real server; under AppTest only when this is True (the page tests that check
#: it and bench_page_reruns set it), so other tests that open the page leave no thread behind.
LAYERS_GRID_IN_APPTEST = False


def layer_probes(key: str, hooks: tuple[str, ...], label: Any, pos: Any, C: float, *, test_fraction: float = 0.3,
                 seed: int = 0, control_samples: Any = "task", grid: Sequence[float] = LAYERS_C_GRID,
                 nearby: Sequence[Any] = ()) -> Any:
    """The Layer probes table for this state (``layer_probes.probe_layers``), shared by every session; a fresh fit
    shows a progress bar per hook. Always fitted cold (never warm-started from the state before), so a table does
    not depend on the order in which the controls were moved. ``control_samples="task"``: the control task on as
    many rows as the real task (its fit then costs what the real one costs; None: up to 6,000 rows).

    Once this state's table is there, the background (:class:`_LayerGrid`) fits, each cold like this one: the two
    C values of ``grid`` next to ``C``, then the labels of ``nearby`` (what one step of the page's label controls
    reaches) at this C, then the rest of the C grid. A move to a state the background is fitting shows that fit's
    progress and waits for it, and any fit a session asks for preempts the background within one hook."""
    import math

    from probing_core.analyses import layer_probes as lp

    acts = get_entry(key)
    arrays = _layers_arrays(acts, hooks)  # opened here, on the script's thread, for the background's fits too

    def state_of(lab: Any) -> tuple:
        return (key, hooks, lab, pos, test_fraction, seed, control_samples)

    def fit_of(lab: Any) -> Callable[[float, Callable[[float, str], None]], Any]:
        def fit(c: float, progress: Callable[[float, str], None]) -> Any:
            return lp.probe_layers(acts, list(hooks), lab, pos, C=c, test_fraction=test_fraction, seed=seed,
                                   progress=progress, control_samples=control_samples, arrays=arrays)
        return fit

    state, fit = state_of(label), fit_of(label)
    bg = _layers_grid()
    bg.wait_shown(_layers_key(state, C))
    res = shared_result("layer_probes", _layers_key(state, C), lambda p: fit(C, p), keep=_LAYERS_KEEP,
                        label="Fitting one probe per hook")
    if C in grid and (LAYERS_GRID_IN_APPTEST or _in_server()):
        order = sorted(grid, key=lambda c: (abs(math.log10(c / C)), c))[1:]  # the C in view is done
        jobs = [(state, fit, c) for c in order[:2]]
        jobs += [(state_of(lab), fit_of(lab), C) for lab in nearby if lab != label]
        jobs += [(state, fit, c) for c in order[2:]]
        bg.want(state, jobs)
    return res


_LAYERS_KEEP = 64  # the whole C grid of 8 label states, and what the background fits around the last ones


def _layers_arrays(acts: CachedActivations, hooks: tuple[str, ...]) -> dict[str, Any]:
    """``{hook: memmap}`` of the entry's hooks, opened once (entries never change under a key) on the calling
    thread. The background grid thread must not open them itself: numpy parses a ``.npy`` header with ``ast``,
    and CPython 3.11's AST constructor is not safe beside the script compile of another thread (it raised
    "SystemError: AST constructor recursion depth mismatch" in a page rerun)."""
    lock, shelves = _shelves()
    key = (acts.key, hooks)
    with lock:
        arrays = shelves.setdefault("layers_arrays", OrderedDict()).get(key)
    if arrays is None:
        arrays = {h: acts.hook(h) for h in hooks if h in acts.hooks}
        with lock:
            _shelve(shelves, "layers_arrays", key, arrays, 4)
    return arrays


def _layers_key(state: tuple, C: float) -> str:
    key, hooks, label, pos, test_fraction, seed, control_samples = state
    return repr((key, hooks, label, pos, float(C), test_fraction, seed, control_samples))


class _Yield(Exception):
    """The background grid fit gives the cores back (a session's fit is waiting, or the user moved on)."""


class _LayerGrid:
    """One background thread per process fitting what is around the latest Layer probes state asked for: the other
    C values of that state and its nearby label states (``jobs``, in order; see :func:`layer_probes`).

    It fits one ``(state, C)`` at a time, cold, through the same shelf and in-flight events as :func:`shared_result`
    (a session asking for it waits for it instead of fitting it again), and only while no other fit runs or waits:
    it takes a turn in the compute queue when the queue is empty, and gives it back at the next hook when anyone
    queues (that fit is then done again later, or by the session that asks for it). It ends when the jobs of the
    latest state are done; :meth:`join` waits for that (tests). It starts ``delay`` seconds after a new state
    is asked for, so that the page that asked draws its table and charts first (measured: fitting at once added
    ~350 ms to that rerun)."""

    delay = 1.0

    def __init__(self, lock: threading.Lock, shelves: dict, flights: dict, queue: ComputeQueue) -> None:
        self.lock, self.shelves, self.flights, self.queue = lock, shelves, flights, queue
        self.cond = threading.Condition()
        self.target: tuple | None = None  # (state asked for, [(state, fit, C), ...] to fit around it)
        self.thread: threading.Thread | None = None
        self.progress: dict[str, tuple[float, str]] = {}  # key -> progress of the fit running here
        self.failed: set[str] = set()  # keys whose fit raised a ProbingError here
        self.not_before = 0.0  # time.monotonic() before which no new state's fit starts
        self.stopping = False  # the process is exiting: no new fits, the running one yields

    def want(self, state: tuple, jobs: Sequence[tuple[tuple, Callable, float]]) -> None:
        """Fit ``jobs`` — ``(state, fit, C)``, ``fit(C, progress)`` — around ``state`` (the one asked for)."""
        import time

        with self.cond:
            if self.stopping:
                return
            if self.target is None or self.target[0] != state:
                self.not_before = time.monotonic() + self.delay
            self.target = (state, list(jobs))
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="layers-grid", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the background has nothing left to fit; True when it has stopped."""
        with self.cond:
            t = self.thread
        if t is not None:
            t.join(timeout)
        return t is None or not t.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """At exit: the running fit yields at its next hook and the thread ends (a daemon thread still inside torch
        when the interpreter finalizes can abort the process)."""
        with self.cond:
            self.stopping = True
        self.join(timeout)

    def wait_shown(self, key: str) -> None:
        """If the background is fitting ``key``, show its progress until it is done (then it is on the shelf,
        or, if the background gave its turn away, the caller fits it)."""
        with self.lock:
            event = self.flights.get(("layer_probes", key))
        if event is None or key not in self.progress:
            return
        update, done = progress_bar("Fitting one probe per hook (started in the background)")
        try:
            while not event.wait(0.2):
                update(*self.progress.get(key, (1.0, "finishing")))
        finally:
            done()

    def _next(self, jobs: Sequence[tuple[tuple, Callable, float]]) -> tuple[Callable, float, str, threading.Event] | None:
        """The first job not fitted and not being fitted, claimed: ``(fit, C, key, its in-flight event)``;
        None: done."""
        with self.lock:
            shelf = self.shelves.setdefault("layer_probes", OrderedDict())
            for state, fit, c in jobs:
                key = _layers_key(state, c)
                if key not in shelf and ("layer_probes", key) not in self.flights and key not in self.failed:
                    event = self.flights[("layer_probes", key)] = threading.Event()
                    return fit, c, key, event
        return None

    def _stale(self, state: tuple) -> bool:
        with self.cond:
            return self.stopping or self.target is None or self.target[0] != state

    def _run(self) -> None:
        try:
            self._loop()
        finally:  # done, or an unexpected error: the next want() starts a new thread
            with self.cond:
                if self.thread is threading.current_thread():
                    self.target, self.thread = None, None

    def _loop(self) -> None:
        import time

        lower_script_priority()
        while True:
            with self.cond:
                if self.stopping:
                    return
                state, jobs = self.target
            while (self.queue.counts() != (0, 0) or time.monotonic() < self.not_before) and not self._stale(state):
                time.sleep(0.1)  # sessions' fits and page draws first
            job = None if self._stale(state) else self._next(jobs)
            if job is None:
                with self.cond:
                    if self.target is not None and self.target[0] == state:  # nothing newer: done
                        self.target, self.thread = None, None
                        return
                continue
            fit, c, key, event = job

            def tick(frac: float, msg: str, key: str = key, state: tuple = state) -> None:
                self.progress[key] = (frac, msg)
                if self.queue.counts()[1] or self._stale(state):
                    raise _Yield()

            self.progress[key] = (0.0, "starting")
            res = None
            try:
                with self.queue.turn():
                    res = fit(c, tick)
            except _Yield:  # fitted again later, or by the session that asks for it
                res = None
            except ProbingError:  # not tried again here; a session that asks for this C meets the error itself
                self.failed.add(key)
            finally:
                with self.lock:
                    if res is not None:
                        _shelve(self.shelves, "layer_probes", key, res, _LAYERS_KEEP)
                    self.flights.pop(("layer_probes", key), None)
                self.progress.pop(key, None)
                event.set()


@st.cache_resource(show_spinner=False)
def _layers_grid() -> _LayerGrid:
    import atexit

    lock, shelves = _shelves()
    grid = _LayerGrid(lock, shelves, _in_flight(), _compute_queue())
    atexit.register(grid.stop)
    return grid


def layers_grid_join(timeout: float | None = None) -> bool:
    """Wait for the Layer probes page's background C-grid fits to finish (tests: leave no thread behind)."""
    return _layers_grid().join(timeout)


def tree_edge_probes(model: LoadedModel, n_trees: int, seed: int, C: float) -> tuple[Any, str]:
    """The tree edge preset: its prompts cached through the store (progress bar), then the edge probes at every
    layer (shared by every session). Returns ``(LayerAccuracyResult, entry key)``."""
    from probing_core.analyses import layer_probes as lp

    update, done = progress_bar("Caching tree prompts")
    try:
        entry = lp.build_tree_cache(model, lp.tree_edge_samples(n_trees, seed), get_store(), seed=seed, progress=update)
    finally:
        done()
    return shared_result("layers_tree", (entry.key, n_trees, seed, C), lambda p: lp.probe_tree_edges(
        get_entry(entry.key), lp.tree_edge_samples(n_trees, seed), C=C, seed=seed, progress=p), keep=4,
        label="Probing the edges at every layer"), entry.key


# ---------------------------------------------------------------------------------------------
# The shared sidebar: model and dataset picked once, used by every page
# ---------------------------------------------------------------------------------------------

_CUSTOM_HF = "Hugging Face model by name…"
_CUSTOM_LOCAL = "Local model folder…"


def _model_options() -> dict[str, ModelSpec | None]:
    opts: dict[str, ModelSpec | None] = {}
    for e in model_catalog():
        if e.spec.kind == "hf":
            continue
        opts[EMBEDDED_NAME if e.id == "embedded" else e.spec.label()] = e.spec
    if not demo_mode():
        opts[_CUSTOM_HF] = None
        opts[_CUSTOM_LOCAL] = None
    return opts


_DATASETS = {
    "Python documentation (offline corpus)": DatasetSpec("pydoc"),
    "Model vocabulary (every token once)": DatasetSpec("vocab"),
    "True/false statements: cities (Geometry of Truth, CC BY 4.0)": DatasetSpec("statements", "cities", text_column="statement"),
    "Upload a file (.txt, .csv, .jsonl)": None,
    "Hugging Face dataset by name (online)": None,
}


def sidebar() -> None:
    """Render the model and dataset pickers (called by app.py on every page)."""
    st.session_state["_shell"] = True
    with st.sidebar:
        st.subheader("Model")
        opts = _model_options()
        q = "query-params"  # a shared link opens with the same model
        choice = st.selectbox("Model", list(opts), key="model_choice", bind=q, label_visibility="collapsed")
        spec = opts.get(choice)
        if choice == _CUSTOM_HF:
            name = st.text_input("Model name", value="gpt2", key="model_hf_name", bind=q, help="e.g. gpt2, EleutherAI/pythia-70m — needs the internet")
            spec = ModelSpec("hf", name.strip())
        elif choice == _CUSTOM_LOCAL:
            folder = st.text_input("Folder", key="model_local_dir", bind=q, help=local_folder_help())
            spec = ModelSpec("local", folder.strip()) if folder.strip() else None
        device, dtype = "auto", "float32"
        if research():
            with st.expander("Device and dtype"):
                device = st.selectbox("Device", ["auto", "cpu", "cuda", "mps"], key="model_device", bind=q)
                dtype = st.selectbox("Weights dtype", ["float32", "bfloat16", "float16"], key="model_dtype", bind=q)
        if spec is not None:
            spec = ModelSpec(spec.kind, spec.name, device=device, dtype=dtype)
        st.session_state["_model_spec"] = spec

        st.subheader("Dataset")
        dchoice = st.selectbox("Dataset", list(_DATASETS), key="dataset_choice", bind="query-params", label_visibility="collapsed")
        dspec = _DATASETS[dchoice]
        upload: bytes | None = None
        if dchoice.startswith("Upload"):
            f = st.file_uploader("File", type=["txt", "csv", "jsonl"], key="dataset_upload", max_upload_size=MAX_UPLOAD_BYTES // (1024 * 1024))
            column = st.text_input("Text column (CSV/JSONL)", value="text", key="dataset_text_column")
            if f is not None:
                upload = f.getvalue()
                dspec = DatasetSpec("upload", f.name, text_column=column.strip() or "text")
        elif dchoice.startswith("Hugging Face"):
            name = st.text_input("Dataset", value="wikitext:wikitext-2-raw-v1", key="dataset_hf_name", help="NAME[:CONFIG]; needs the internet")
            dspec = DatasetSpec("hf", name.strip(), max_docs=2000)
        st.session_state["_dataset_spec"] = dspec
        st.session_state["_dataset_upload"] = upload
        if demo_mode():
            st.caption("Demo mode: inputs are capped so every step is quick.")


def selected_model() -> LoadedModel:
    """The model picked in the sidebar, loaded (stops the page with a message on failure)."""
    ensure_shell()
    spec = st.session_state.get("_model_spec")
    if spec is None:
        st.warning("Pick a model in the sidebar (for a local folder, type its path).")
        st.stop()
    with user_errors():
        model = get_model(spec)
    demo_build(model)  # demo mode: the default entry starts building in the background as soon as the model is here
    return model


@st.cache_resource(show_spinner=False, max_entries=2)
def _demo_build(model_key: str, _model: LoadedModel) -> Any:
    from probing_core.store.background import build_in_background

    want = DEFAULT_BUILD  # the same entry Home's "Build cache" makes with its defaults: that click then finds it
    return build_in_background(_model, get_dataset(DatasetSpec("pydoc")), want.hooks(_model), store=get_store(),
                               max_len=min(want.max_len, _model.n_ctx), max_tokens=min(want.max_tokens, max_tokens_cap()),
                               dtype=want.dtype)


def demo_build(model: LoadedModel) -> Any:
    """Demo mode: the build of the default entry for ``model`` — the one the launcher started with the server
    (read from its progress file) while it runs or once it is done, else one started here (once per process);
    None outside demo mode."""
    if not demo_mode():
        return None
    from probing_core.store.background import server_build

    job = server_build(default_cache_root(), model.spec, model.key)
    return job if job is not None else _demo_build(model.key, model)


def show_demo_build(model: LoadedModel) -> bool:
    """The demo's background build as a progress bar refreshed every second; the page reruns when it ends.

    Returns:
        True while it is still running.
    """
    job = demo_build(model)
    if job is None:
        return False
    running = job.status().state == "running"

    @st.fragment(run_every=1.0 if running else None)
    def _show() -> None:
        s = job.status()
        if s.state == "running":
            st.progress(s.fraction, text=f"Getting the example ready: the model is reading the example text — {s.message}")
        elif running:
            st.rerun()  # it just ended: the whole page again, now with the entry
        elif s.state == "done":
            st.success(f"The example is ready ({s.message}). Open **Regression probes** in the sidebar to start.")
        else:
            st.error(f"Preparing the example failed: {s.error}")

    _show()
    return running


def selected_dataset() -> Dataset:
    """The dataset picked in the sidebar (stops the page with a message on failure)."""
    ensure_shell()
    spec = st.session_state.get("_dataset_spec")
    if spec is None:
        st.warning("Upload a file in the sidebar, or pick the Python documentation corpus.")
        st.stop()
    with user_errors():
        return get_dataset(spec, st.session_state.get("_dataset_upload"))


def entries_for(model: LoadedModel, hooks_like: str | None = None) -> list[StoreEntry]:
    """Store entries built with ``model`` (most recent first), optionally holding a hook containing ``hooks_like``."""
    out = []
    for e in get_store().entries():
        if e.meta.get("model_key") != model.key:
            continue
        if hooks_like and not any(hooks_like in h for h in e.hooks):
            continue
        out.append(e)
    return out


@dataclass(frozen=True)
class HookBuild:
    """The hooks a page needs, which it offers to build in place ("Build these hooks now") when missing.

    Attributes:
        families: hook families (see :meth:`LoadedModel.hook_names`).
        layers: keep only the first ``layers`` blocks (None = every block).
        max_tokens, max_len, dtype: the cache entry's settings (as on Home).
        what: what these hooks are, in words ("MLP neurons of layers 0–5").
    """

    families: tuple[str, ...]
    layers: int | None = None
    max_tokens: int = 5_000
    max_len: int = 128
    dtype: str = "float32"
    what: str = ""

    def hooks(self, model: LoadedModel) -> list[str]:
        names = model.hook_names(list(self.families))
        if self.layers is None:
            return names
        return [h for h in names if not h.startswith("blocks.") or int(h.split(".")[1]) < self.layers]

    def megabytes(self, model: LoadedModel) -> float:
        width = sum(model.hook_width(h) for h in self.hooks(model))
        return self.max_tokens * width * (2 if self.dtype == "float16" else 4) / 1e6


#: Home's default build: the token embedding and the residual stream after every block.
DEFAULT_BUILD = HookBuild(("embed", "resid_post"), max_tokens=5_000, what="the embedding and the residual stream after every block")
#: Sparse probes: MLP neurons of the first six blocks (the reference notebook reads block 3) on enough text that
#: " an" (rarer than " the") gives ~170 contexts: ~200 test rows with the page's 30 % test split. The embedding
#: too: the page's embed-only baseline is the same probe on hook_embed at the same rows (issue 20).
SPARSE_BUILD = HookBuild(("embed", "mlp_post"), layers=6, max_tokens=40_000, dtype="float16",
                         what="the embedding and the MLP neurons of layers 0–5")


def build_hooks_now(model: LoadedModel, want: HookBuild) -> StoreEntry:
    """Build ``want`` for ``model`` with a progress bar (the same core ``build_cache`` as Home) and make it the default entry.

    Texts: the sidebar's dataset when it has documents, else the offline Python documentation corpus.
    """
    from probing_core.store.activations import build_cache

    spec = st.session_state.get("_dataset_spec")
    dataset = None
    if spec is not None and spec.kind != "vocab":
        with user_errors():
            dataset = get_dataset(spec, st.session_state.get("_dataset_upload"))
    if dataset is None or not dataset.documents:
        dataset = get_dataset(DatasetSpec("pydoc"))
    update, done = progress_bar(f"Building {want.what or 'the hooks'}")
    try:
        with user_errors():
            entry, _ = build_cache(model, dataset, want.hooks(model), store=get_store(), max_len=want.max_len,
                                   max_tokens=want.max_tokens, dtype=want.dtype, progress=update)
    finally:
        done()
    st.session_state["home_entry_key"] = entry.key  # the entry last built is every page's default
    st.session_state["_entry_built"] = entry.key  # and the one this page's picker shows after the rerun
    return entry


def entry_picker(model: LoadedModel, *, page: str, hooks_like: str | None = None, help_build: str = "",
                 build_hooks: HookBuild | None = None) -> CachedActivations:
    """Select box over this model's cache entries (bound to the URL).

    With none that holds ``hooks_like``: when ``build_hooks`` is given, a "Build these hooks now" button
    builds exactly those (progress bar, then the page reruns on the new entry); otherwise a pointer to Home.
    The default is the entry last built or chosen on Home.
    """
    entries = entries_for(model, hooks_like)
    if not entries and show_demo_build(model):
        st.stop()  # demo mode: the example entry is still being built; this page reruns when it is ready
    if not entries:
        need = f" with `{hooks_like}` hooks" if hooks_like else ""
        if build_hooks is None:
            st.warning(f"No cached activations{need} for this model yet. Build them on the **Home** page first. {help_build}")
            st.page_link("pages/home.py", label="Go to Home", icon="🏠")
            st.stop()
        n = len(build_hooks.hooks(model))
        st.info(f"This page needs {build_hooks.what or 'hooks'} of this model, and none are cached yet. One click "
                f"builds exactly those: {n} hook{'s' * (n != 1)} × {build_hooks.max_tokens:,} tokens "
                f"(about {build_hooks.megabytes(model):,.0f} MB on disk).", icon="🧰")
        if st.button("Build these hooks now", type="primary", key=f"{page}_build_hooks"):
            build_hooks_now(model, build_hooks)
            st.rerun()
        st.page_link("pages/home.py", label="…or choose hooks and sizes yourself on Home", icon="🏠")
        st.stop()
    keys = [e.key for e in entries]
    wkey = f"{page}_entry"
    built = st.session_state.pop("_entry_built", None)
    if built in keys:
        st.session_state[wkey] = built
    preferred = st.session_state.get("home_entry_key")
    # The default only counts before the widget has a value (a default beside a session value makes Streamlit warn).
    index = 0 if wkey in st.session_state else keys.index(preferred) if preferred in keys else 0

    def label(e: StoreEntry) -> str:
        text = f"{e.meta.get('dataset_label')} · {e.n_tokens:,} tokens · {len(e.hooks)} hooks"
        return text + (f" · {e.key[:8]}" if research() else "")

    labels = {e.key: label(e) for e in entries}
    key = st.selectbox("Cached activations", keys, index=index, format_func=labels.get, key=wkey, bind="query-params")
    with user_errors():
        return get_entry(key)


def manifest_base(model: LoadedModel, acts: CachedActivations | None = None) -> dict[str, Any]:
    """Common fields of every JSON run manifest (model, dataset fingerprint, versions)."""
    import probing_core
    import sklearn
    import torch

    out: dict[str, Any] = {
        "model": model.describe(),
        "versions": {"probing_core": probing_core.__version__, "torch": torch.__version__, "streamlit": st.__version__, "scikit-learn": sklearn.__version__},
    }
    if acts is not None:
        out["cache_entry"] = {k: acts.meta.get(k) for k in ("key", "dataset_label", "dataset_fingerprint", "n_tokens", "max_len", "max_tokens", "dtype")}
    return out


def token_label_picker(acts: CachedActivations, *, page: str) -> tuple[LabelSpec, str, str]:
    """Widgets for a token label, its options and the tokens to probe (all bound to the URL).

    Returns:
        ``(label, position rule, label name)``; the rule is ``all``, ``last`` or ``match:TOKENS``.
    """
    q = "query-params"
    names = [n for n in LABELS if n != "column" or acts.columns()]
    c1, c2, c3 = st.columns([2, 2, 3])
    name = c1.selectbox("Label", names, index=names.index("length"), format_func=lambda n: LABELS[n].title,
                        key=f"{page}_label", bind=q, help="; ".join(f"{i.title}: {i.description}" for i in LABELS.values()))
    kind = c2.radio("Tokens", ["all", "last", "match"], horizontal=True, key=f"{page}_positions", bind=q,
                    format_func={"all": "every token", "last": "last of each row", "match": "matching…"}.get)
    rule = kind
    if kind == "match":
        rule = "match:" + c3.text_input("Tokens to probe (comma-separated; mind leading spaces)", " the, a",
                                        key=f"{page}_match", bind=q)
    params: dict[str, Any] = {}
    for p, default in LABELS[name].params.items():
        k = f"{page}_{name}_{p}"
        if p == "drop_missing" or isinstance(default, bool):
            params[p] = c3.checkbox(p.replace("_", " "), bool(default), key=k, bind=q)
        elif isinstance(default, str):
            params[p] = c3.text_input(p.replace("_", " "), default, key=k, bind=q) or None
        else:
            params[p] = c3.number_input(p.replace("_", " ") + " (empty = none)", min_value=0, value=default, step=1,
                                        key=k, bind=q)
    if name == "column":
        params["column"] = c3.selectbox("column", list(acts.columns()), key=f"{page}_column", bind=q)
    label = LabelSpec.make(name, **{p: (int(v) if isinstance(v, float) else v) for p, v in params.items()})
    return label, rule, name


# ---------------------------------------------------------------------------------------------
# Shared page blocks (issue 19, thin pages): a metric row, a verdict, a per-hook table, downloads
# and the run manifest — the blocks several pages repeat, in one place
# ---------------------------------------------------------------------------------------------

#: The label of every page's run-manifest download.
MANIFEST_LABEL = "⬇ Run manifest (JSON)"
#: MIME type by file extension (others: Streamlit's default for the data).
_MIME = {".csv": "text/csv", ".json": "application/json", ".zip": "application/zip", ".html": "text/html"}


def metric_row(*items: tuple) -> None:
    """One row of ``st.metric`` in equal columns.

    Each item is ``(label, value)`` or ``(label, value, {"help": …, "delta": …, "delta_color": …})``.
    """
    for col, (label, value, *kw) in zip(st.columns(len(items)), items):
        col.metric(label, value, **(kw[0] if kw else {}))


def verdict(good: bool, text: str) -> None:
    """``st.success`` when ``good`` (a check that holds, an effect outside the random band), else ``st.warning``."""
    (st.success if good else st.warning)(text)


def versus_controls(cmp: Any, lead: str = "") -> None:
    """A ``ControlComparison`` (an effect beside K random controls) in words after ``lead``: ``st.success``
    outside the random band, ``st.warning`` inside it."""
    verdict(not cmp.inside_band, lead + cmp.summary())


def hook_table(rows: Sequence[dict[str, Any]]) -> None:
    """A table with one row per hook: a "layer" column named for people first; the raw ``hook`` column
    only in the research view."""
    import pandas as pd

    table = pd.DataFrame(rows)
    table.insert(0, "layer", [layer_words(h) for h in table["hook"]])
    st.dataframe(table if research() else table.drop(columns="hook"), hide_index=True, width="stretch")


def download_data(data: Any) -> str | bytes:
    """What a download sends: rows (a list of dicts) or a DataFrame as CSV, a dict as indented JSON
    (non-JSON values as text), text or bytes as they are."""
    import json

    import pandas as pd

    if isinstance(data, list):
        data = pd.DataFrame(data)
    if isinstance(data, pd.DataFrame):
        return data.to_csv(index=False)
    if isinstance(data, dict):
        return json.dumps(data, indent=1, default=str)
    return data


def download(label: str, data: Any, file_name: str, key: str, *, where: Any = None) -> None:
    """One download button (in ``where``, a column, or the page); data as :func:`download_data` makes it,
    the MIME type from the file name's extension. ``data`` may be a function of no arguments: the file is then
    made when the button is clicked, not on every rerun. A click does not rerun the page (``on_click="ignore"``):
    with the default rerun, the rerun replaced a deferred file's id while the browser fetched the old one
    ("Deferred file … not found" in a real browser, the download never came)."""
    payload = (lambda: download_data(data())) if callable(data) else download_data(data)
    (where or st).download_button(label, payload, file_name, _MIME.get(Path(file_name).suffix), key=key,
                                  on_click="ignore")


def downloads(*items: tuple[str, Any, str, str]) -> None:
    """A row of download buttons in equal columns; each item is ``(label, data, file_name, key)`` as for :func:`download`."""
    for col, (label, data, file_name, key) in zip(st.columns(len(items)), items):
        download(label, data, file_name, key, where=col)


def run_manifest(model: LoadedModel, acts: CachedActivations | None = None, /, *, core: dict[str, Any] | None = None,
                 **fields: Any) -> dict[str, Any]:
    """A page's JSON run manifest: the core's manifest when there is one, overlaid by :func:`manifest_base`
    (``versions`` merged: the core's and the app's), then the page's own ``fields``."""
    base = manifest_base(model, acts)
    if core is None:
        return {**base, **fields}
    return {**core, **base, "versions": {**core.get("versions", {}), **base["versions"]}, **fields}


# ---------------------------------------------------------------------------------------------
# Regression probes, Logit lens and Interventions (issue 19): their cached core calls. Fits shared by
# every session go on the shelves above; st.cache_data holds results that are small to copy.
# ---------------------------------------------------------------------------------------------


def regression_run(key: str, hooks: tuple[str, ...], label: LabelSpec, rule: str, cv: int, seed: int,
                   split: str = "auto") -> Any:
    """The Regression page's fit over the default α grid (a ``RegressionRun``), shared by every session.

    The label-independent decompositions are kept per rows and split (the 3 latest), so a label change
    refits without a new eigendecomposition.
    """
    from probing_core.analyses import regression as reg

    slot = shared_slot("reg_decompositions", (key, hooks, rule, cv, seed), keep=4)

    def fit(progress: Callable[[float, str], None]) -> Any:
        run = reg.run_regression(get_entry(key), list(hooks), label, rule, alphas=list(reg.alpha_labels().values()),
                                 cv=cv, seed=seed, split_by=split, decompositions=slot, progress=progress)
        return reg.remember_decompositions(slot, run, keep=3)  # identical content for every session

    verb = "Refitting for the new label" if slot else "Fitting ridge probes on every hook (all α at once)"
    return shared_result("reg_runs", (key, hooks, label, rule, cv, seed, split), fit, keep=3, label=verb)


@st.cache_data(max_entries=4, show_spinner="Regressing token properties from W_E over the vocabulary…")
def embedding_regression(_model: LoadedModel, model_key: str, len_thr: int, num_thr: int) -> Any:
    from probing_core.analyses import regression as reg

    return reg.embedding_regression(_model, length_threshold=len_thr, numeric_threshold=num_thr)


@st.cache_data(max_entries=8, show_spinner="Fitting the embedding probe and scoring it on every hook…")
def probe_transfer(_model: LoadedModel, key: str, label: LabelSpec, rule: str, alpha: float, source: str) -> Any:
    from probing_core.analyses import regression as reg

    return reg.probe_transfer(_model, get_entry(key), label, rule, alpha=alpha, source=source)


@st.cache_data(max_entries=32, show_spinner="Running the model…")
def next_token_topk(_model: LoadedModel, key: str, prompt: str, k: int, answer: str | None, bos: bool = True) -> Any:
    from probing_core.analyses import lens

    return lens.next_token_topk(_model, prompt, k=k, answer=answer, prepend_bos=bos)


@st.cache_data(max_entries=16, show_spinner="Reading every layer…")
def logit_lens(_model: LoadedModel, key: str, prompt: str, k: int, incl_mid: bool, bos: bool = True) -> Any:
    from probing_core.analyses import lens

    return lens.logit_lens(_model, prompt, k=k, incl_mid=incl_mid, max_tokens=128, prepend_bos=bos)  # heatmap unreadable beyond


@st.cache_data(max_entries=8, show_spinner="Attributing the logit difference…")
def logit_attribution(_model: LoadedModel, key: str, ps: Any, bos: bool = True) -> tuple[Any, Any]:
    """``(LogitDiffResult, AttributionResult)`` of the prompt set ``ps``."""
    from probing_core.analyses import lens

    return lens.logit_difference(_model, ps, prepend_bos=bos), lens.logit_attribution(_model, ps, prepend_bos=bos)


@st.cache_data(max_entries=16, show_spinner="Making the direction…")
def _direction_bytes(_acts: CachedActivations, key: str, hook: str, label: LabelSpec, rule: str, method: str,
                     neurons: tuple[int, ...], model_key: str) -> tuple[bytes, bytes, Any, Any]:
    from probing_core.analyses import directions as dirs

    d, rows, y = dirs.direction_from_entry(_acts, hook, label, rule, method, model_key=model_key, neurons=neurons)
    return (*dirs.direction_to_bytes(d), rows, y)  # bytes: cheap and safe to copy


def entry_direction(acts: CachedActivations, hook: str, label: LabelSpec, rule: str, method: str, neurons: str,
                    model_key: str) -> tuple[Any, Any, Any]:
    """``(Direction, rows, y)``: a direction made by ``method`` from the entry's rows of a token label (cached);
    ``neurons``: the neuron set's indices as typed ("3, 17, 40"; only for the method "neurons")."""
    from probing_core.analyses import directions as dirs
    from probing_core.analyses import interventions as iv

    idx = tuple(iv.parse_number_list(neurons, what="neuron list", integer=True)) if method == "neurons" else ()
    npy, meta, rows, y = _direction_bytes(acts, acts.key, hook, label, rule, method, idx, model_key)
    return dirs.direction_from_bytes(npy, meta), rows, y


@st.cache_data(max_entries=32, show_spinner="Running the prompt with the intervention and K random controls…")
def prompt_effect(_model: LoadedModel, key: str, prompt: str, d: tuple[bytes, bytes], step: Any, pair: tuple | None,
                  K: int) -> tuple[Any, Any]:
    """``(PromptEffect, LensDiff)`` of intervention ``step`` along the direction ``d`` (``(npy, json)`` bytes)."""
    from probing_core.analyses import directions as dirs
    from probing_core.analyses import interventions as iv

    direction = dirs.direction_from_bytes(*d)
    return (iv.intervene_prompt(_model, prompt, direction, step, answers=pair, k_controls=K, n_generate=8, with_lens=True),
            iv.lens_difference(_model, prompt, direction, step))


@st.cache_data(max_entries=16, show_spinner="Scoring the LM loss with the intervention and K random controls…")
def loss_effect(_model: LoadedModel, _acts: CachedActivations, key: str, d: tuple[bytes, bytes], step: Any, K: int) -> Any:
    """The LM loss on the entry ``key``'s rows with intervention ``step`` along ``d``, beside K random controls."""
    from probing_core.analyses import amnesic
    from probing_core.analyses import directions as dirs

    return amnesic.loss_effect(_model, _acts, dirs.direction_from_bytes(*d), step, n_rows=4, k_controls=K)


def truth_case(model: LoadedModel, name: str, n: int, held: int, K: int, pair: tuple[str, ...]) -> Any:
    """The Interventions page's truth case on the statement set ``name`` (a ``TruthCaseResult``), shared by every
    session; a bad input is shown as a message and stops the page."""
    from probing_core.analyses import truth_case as tc
    from probing_core.data.statements import statements_spec

    with user_errors():
        return shared_result("interventions_truth", (model.key, name, n, held, K, pair), lambda p: tc.truth_case(
            model, load_dataset(statements_spec(name)), n_statements=n, n_heldout=held, k_controls=K, answers=pair,
            progress=p), keep=4, label="Probing truth per layer, then steering")
