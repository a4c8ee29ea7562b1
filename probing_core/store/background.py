"""Cache builds in a background thread, with progress any thread can read.

Demo mode builds the default entry this way as soon as the app has its model, so a visitor finds it
ready (or watches it finish) instead of starting with a two-minute wait. The build is the ordinary
:func:`build_cache` — the store's per-key lock makes a page that asks for the same entry meanwhile
wait for this build and reuse it, never extract it twice.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from probing_core.data.datasets import Dataset
from probing_core.errors import ProbingError
from probing_core.models import LoadedModel
from probing_core.store.activations import Progress, build_cache
from probing_core.store.entries import ActivationStore, StoreEntry

BuildState = Literal["running", "done", "failed"]


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

    def start(self) -> "BackgroundBuild":
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def _progress(self, fraction: float, message: str) -> None:
        with self._lock:
            self._status = BuildStatus("running", float(fraction), message)

    def _run(self) -> None:
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
    hooks = list(hooks)

    def target(progress: Progress) -> tuple[StoreEntry, bool]:
        return build_cache(model, dataset, hooks, store=store, progress=progress, **build_options)

    return BackgroundBuild(target, name=f"cache-build-{model.key}").start()
