"""Cache builds in the background, with progress any thread — or another process — can read.

Demo mode builds the default entry before anyone asks, so a visitor finds it ready (or watches it
finish) instead of starting with a two-minute wait:

- ``python -m probing_core.store.background serve -- python -m streamlit run app.py …`` is how
  ``make demo`` and the Docker image start the app. With ``PROBING_DEMO=1`` it first starts the
  default build in its own process (``build-demo``), then becomes the Streamlit server (exec).
- That build writes its progress to ``$PROBING_CACHE_DIR/background/demo-build.json`` (atomically)
  and holds an ``fcntl`` lock on ``demo-build.lock`` for its whole life: a reader tells a live build
  from one whose process died by whether the lock is free, never by a PID. Home reads the file
  (:func:`server_build`); a damaged or foreign file counts as no build.
- Without that process (``streamlit run`` directly, AppTest), the app starts the same build in a
  daemon thread when the model has loaded (:func:`build_in_background`).

Either way the build is the ordinary :func:`build_cache`: the store's per-key lock makes anyone who
asks for the same entry meanwhile wait for it and reuse it, never extract it twice.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the launcher (serve) must start fast: the model and store stack is imported where used
    from probing_core.data.datasets import Dataset
    from probing_core.models import LoadedModel, ModelSpec
    from probing_core.store.activations import Progress
    from probing_core.store.entries import ActivationStore, StoreEntry

BuildState = Literal["running", "done", "failed"]
_STATES = ("running", "done", "failed")


@dataclass(frozen=True)
class BuildStatus:
    """A snapshot of a background build.

    Attributes:
        state: running | done | failed.
        fraction: progress in [0, 1]; message: the build's last progress line.
        entry_key: the entry's key once done; built: whether it was extracted now (False: already cached).
        error: what went wrong (the core's message, saying what to do) when failed.
        seconds: time since the build started (until it ended, once it has).
    """

    state: BuildState
    fraction: float
    message: str
    entry_key: str | None = None
    built: bool = False
    error: str | None = None
    seconds: float = 0.0


class BackgroundBuild:
    """Runs ``target(progress)`` in a daemon thread; :meth:`status` reads its progress from any thread."""

    def __init__(self, target: Callable[[Progress], tuple[StoreEntry, bool]], name: str = "cache-build") -> None:
        self._target = target
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._t1: float | None = None
        self._status = BuildStatus("running", 0.0, "waiting to start…")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> BackgroundBuild:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def _progress(self, fraction: float, message: str) -> None:
        with self._lock:
            self._status = BuildStatus("running", float(fraction), message)

    def _run(self) -> None:
        from probing_core.errors import ProbingError

        try:
            entry, built = self._target(self._progress)
            done = BuildStatus("done", 1.0, f"{entry.n_tokens:,} tokens × {len(entry.hooks)} hooks", entry.key, built)
        except ProbingError as e:
            done = BuildStatus("failed", self.status().fraction, "stopped", error=str(e))
        except Exception as e:  # noqa: BLE001 — a thread's exception would vanish; keep it for the page to show
            done = BuildStatus("failed", self.status().fraction, "stopped", error=f"{type(e).__name__}: {e}")
        with self._lock:
            self._t1 = time.perf_counter()
            self._status = done

    def status(self) -> BuildStatus:
        """The latest state, progress and outcome (with ``seconds`` filled in)."""
        with self._lock:
            s = self._status
            end = self._t1 if self._t1 is not None else time.perf_counter()
        return BuildStatus(s.state, s.fraction, s.message, s.entry_key, s.built, s.error, round(end - self._t0, 1))

    def wait(self, timeout: float | None = None) -> BuildStatus:
        """Block until the build ends (or ``timeout`` seconds pass); returns :meth:`status`."""
        self._thread.join(timeout)
        return self.status()


def build_in_background(
    model: LoadedModel,
    dataset: Dataset,
    hooks: Sequence[str],
    *,
    store: ActivationStore,
    **build_options: Any,
) -> BackgroundBuild:
    """Start :func:`build_cache` for ``hooks`` in a daemon thread and return its handle at once.

    Args:
        build_options: ``max_len``, ``max_tokens``, ``dtype``, ``batch_size``, ``prepend_bos`` as for build_cache.
    Returns:
        A started :class:`BackgroundBuild`; bad arguments show up as its ``failed`` status.
    """
    from probing_core.store.activations import build_cache

    hooks = list(hooks)

    def target(progress: Progress) -> tuple[StoreEntry, bool]:
        return build_cache(model, dataset, hooks, store=store, progress=progress, **build_options)

    return BackgroundBuild(target, name=f"cache-build-{model.key}").start()


# --------------------------------------------------------------------------------------------
# The demo's default entry, built by its own process from the server's start
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoBuild:
    """What demo mode builds at start: Home's default entry (the app's ``DEFAULT_BUILD``, the same key).

    Attributes:
        families: hook families; max_tokens, max_len, dtype: the entry's settings; dataset: a dataset id.
    """

    families: tuple[str, ...] = ("embed", "resid_post")
    max_tokens: int = 5_000
    max_len: int = 128
    dtype: str = "float32"
    dataset: str = "pydoc"


DEMO_BUILD = DemoBuild()
#: The model the demo's build uses (a catalog id, ``PROBING_DEMO_MODEL``; the app's default model is the embedded one).
DEMO_MODEL_ENV = "PROBING_DEMO_MODEL"
PROGRESS_FILE = "demo-build.json"
LOCK_FILE = "demo-build.lock"


def demo_mode() -> bool:
    return os.environ.get("PROBING_DEMO", "0").strip().lower() in ("1", "true", "yes", "on")


def progress_folder(cache_root: Path | str) -> Path:
    """Where the demo build's progress file and lock live (beside the store, under the cache root)."""
    return Path(cache_root) / "background"


def _lock_is_held(lock_path: Path) -> bool:
    """True while some process holds the build's lock (it is released when that process ends, even by kill -9)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops a lock taken just now
    return False


def write_progress(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as JSON to ``path`` atomically (temp file in the same folder, then rename)."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_progress(path: Path) -> dict[str, Any] | None:
    """The progress record at ``path``, or None when it is absent, damaged or not one of ours.

    Checked: a JSON object whose state is running/done/failed, a fraction in [0, 1], text fields as
    text, a start time as a number, an entry key once done; anything else is treated as no file.
    """
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("state") not in _STATES:
        return None
    frac = rec.get("fraction")
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not (0.0 <= frac <= 1.0):
        return None
    for k in ("message", "entry_key", "error", "model_key"):
        if rec.get(k) is not None and not isinstance(rec[k], str):
            return None
    started = rec.get("started")
    if isinstance(started, bool) or not isinstance(started, (int, float)) or not math.isfinite(started):
        return None
    if not isinstance(rec.get("model_id"), str) or not isinstance(rec.get("built", False), bool):
        return None
    if rec["state"] == "done" and not rec.get("entry_key"):
        return None
    return rec


class ServerBuild:
    """The demo build that started with the server, seen through its progress file (same API as
    :class:`BackgroundBuild`: :meth:`status`)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / PROGRESS_FILE
        self.lock_path = folder / LOCK_FILE

    def record(self) -> dict[str, Any] | None:
        return read_progress(self.path)

    def status(self) -> BuildStatus:
        """The file's state; a "running" build whose process has ended (its lock is free) is failed."""
        rec = self.record()
        if rec is None:
            return BuildStatus("failed", 0.0, "stopped", error="the example's progress file is missing or damaged")
        seconds = round(max(0.0, float(rec.get("ended") or time.time()) - float(rec["started"])), 1)
        if rec["state"] == "running" and not _lock_is_held(self.lock_path):
            return BuildStatus("failed", float(rec["fraction"]), "stopped", seconds=seconds,
                               error="the process building the example stopped before it finished; reload to build it here")
        return BuildStatus(rec["state"], float(rec["fraction"]), str(rec.get("message") or ""), rec.get("entry_key"),
                           bool(rec.get("built", False)), rec.get("error"), seconds)


def server_build(cache_root: Path | str, spec: ModelSpec, model_key: str | None = None) -> ServerBuild | None:
    """The demo build started with the server for this model, if it is running or has finished.

    None when there is none, its file is damaged, it is for another model, or it failed or died:
    the caller then builds the entry itself (the store's lock still allows only one extraction).
    """
    from probing_core.errors import ProbingError
    from probing_core.models import spec_from_cli

    job = ServerBuild(progress_folder(cache_root))
    rec = job.record()
    if rec is None:
        return None
    try:
        if spec_from_cli(rec["model_id"]) != spec:
            return None
    except ProbingError:  # a model id that names nothing here: not this model's build
        return None
    if model_key is not None and rec.get("model_key") not in (None, model_key):
        return None
    return job if job.status().state in ("running", "done") else None


def run_demo_build(cache_root: Path | str, model_id: str = "embedded", plan: DemoBuild = DEMO_BUILD) -> int:
    """Build the demo's default entry for ``model_id`` in this process, writing progress for the app.

    Returns:
        0 when the entry is ready (built now or already there) or another process is building it; 1 when it failed.
    """
    folder = progress_folder(cache_root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only cache: the app then builds the entry itself and shows the store's message
        print(f"demo build not started: cannot write {folder} ({e.strerror}); set PROBING_CACHE_DIR to a writable folder",
              file=sys.stderr)
        return 1
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another server's build is running: it writes the progress
        rec: dict[str, Any] = {"state": "running", "fraction": 0.0, "message": "starting…", "model_id": model_id,
                               "model_key": None, "entry_key": None, "built": False, "error": None,
                               "started": time.time(), "ended": None, "pid": os.getpid()}
        write_progress(folder / PROGRESS_FILE, rec)  # before the imports (seconds): a first visit already sees it
        return _build_with_progress(Path(cache_root), folder / PROGRESS_FILE, rec, plan)
    finally:
        os.close(lock_fd)


def _build_with_progress(cache_root: Path, path: Path, rec: dict[str, Any], plan: DemoBuild) -> int:
    from probing_core.data.datasets import DatasetSpec, load_dataset
    from probing_core.errors import ProbingError
    from probing_core.models import load_model, spec_from_cli
    from probing_core.store.activations import build_cache
    from probing_core.store.entries import ActivationStore, size_limit_from_env

    def progress(fraction: float, message: str) -> None:
        rec.update(fraction=min(1.0, max(0.0, float(fraction))), message=message)
        with contextlib.suppress(OSError):  # a full disk costs the progress display, not the build
            write_progress(path, rec)

    try:
        progress(0.0, "loading the model…")
        model = load_model(spec_from_cli(rec["model_id"]), cache_root=cache_root)
        rec["model_key"] = model.key
        progress(0.0, "reading the example text…")
        store = ActivationStore(cache_root / "activations", size_limit=size_limit_from_env())
        entry, built = build_cache(model, load_dataset(DatasetSpec(plan.dataset)), model.hook_names(list(plan.families)),
                                   store=store, max_len=min(plan.max_len, model.n_ctx), max_tokens=plan.max_tokens,
                                   dtype=plan.dtype, progress=progress)
        rec.update(state="done", fraction=1.0, message=f"{entry.n_tokens:,} tokens × {len(entry.hooks)} hooks",
                   entry_key=entry.key, built=built, ended=time.time())
        code = 0
    except ProbingError as e:
        rec.update(state="failed", message="stopped", error=str(e), ended=time.time())
        code = 1
    except Exception as e:  # noqa: BLE001 — the app shows the message; a traceback would go only to a log
        rec.update(state="failed", message="stopped", error=f"{type(e).__name__}: {e}", ended=time.time())
        code = 1
    write_progress(path, rec)
    return code


def start_demo_build(env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``build-demo`` in a child process (lower CPU priority than the server) and return at once."""
    cmd = [sys.executable, "-m", "probing_core.store.background", "build-demo"]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=lambda: os.nice(5))  # noqa: PLW1509


def serve(command: Sequence[str]) -> None:
    """Become ``command`` (the Streamlit server); in demo mode start the default build first.

    Raises:
        SystemExit: no command given.
    """
    if not command:
        raise SystemExit("usage: python -m probing_core.store.background serve -- COMMAND …")
    if demo_mode():
        start_demo_build()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], list(command))


def main(argv: Sequence[str] | None = None) -> int:
    """``serve -- COMMAND…`` (start the server, with the demo build in demo mode) or ``build-demo``."""
    ap = argparse.ArgumentParser(prog="python -m probing_core.store.background", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve", help="run COMMAND (after --); with PROBING_DEMO=1 start the default build first")
    sv.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("build-demo", help="build the demo's default entry here, writing progress for the app")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        serve(command)
        return 0  # not reached: exec replaced this process
    from probing_core.models import default_cache_root

    return run_demo_build(default_cache_root(), os.environ.get(DEMO_MODEL_ENV, "embedded"))


if __name__ == "__main__":
    sys.exit(main())
