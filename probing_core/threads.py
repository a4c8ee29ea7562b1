"""Thread control: single-threaded BLAS/torch blocks and one hook per worker thread.

A multithreaded LAPACK ``eigh`` of a 576×576 matrix took 0.35–1.1 s on this 2-core machine when
other work was running (its BLAS threads spin while waiting for busy cores), and 0.06–0.07 s on
one thread. Decompositions of d×d Gram matrices (d ≤ a few thousand) are run single-threaded.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

import torch
from threadpoolctl import ThreadpoolController

_controller: tuple[int, ThreadpoolController] | None = None


def _native_pools() -> ThreadpoolController:
    """The loaded BLAS / OpenMP libraries, found once and again only after new modules were
    imported (finding them took ~3 ms a call here; limiting them through a kept controller 0.1 ms)."""
    global _controller
    key = len(sys.modules)
    if _controller is None or _controller[0] != key:
        _controller = (key, ThreadpoolController())
    return _controller[1]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Limit NumPy's BLAS/LAPACK and torch's intra-op pool to one thread inside the block.

    The BLAS limit is process-wide while the block runs (another session's work may run on one
    thread meanwhile); that costs at most the 2× of a second core and avoids the 10× collapse of
    oversubscribed BLAS threads. OpenMP's count (torch's) is the calling thread's own: worker
    threads take it from the caller (:func:`map_hooks`).
    """
    before = torch.get_num_threads()
    with _native_pools().limit(limits=1):
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def workers() -> int:
    """Hooks fitted at once: one per core (each single-threaded), at most 4; PROBING_THREADS overrides."""
    env = os.environ.get("PROBING_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(os.cpu_count() or 1, 4))


def _worker_threads(n: int) -> None:
    """A worker's own OpenMP thread count for torch (MKL, oneDNN and torch's kernels): ``n``."""
    torch.set_num_threads(n)


def map_hooks(fn: Callable[[str, Any], Any], hooks: Sequence[str], X_by_hook: Mapping[str, Any], *,
              parallel: bool = True, progress: Callable[[float, str], None] | None = None) -> list:
    """``[fn(h, X_by_hook[h]) for h in hooks]`` with one hook per worker thread (see :func:`workers`).

    ``X_by_hook`` is read on this thread (a store-backed mapping need not be thread-safe) and at
    most ``workers + 1`` of its values are held at once: a new hook is handed out as soon as any
    one finishes (not in order, so a slow hook holds up no other worker). ``parallel=False``
    (small fits, where thread start-up costs more than it saves) runs serially. NumPy, LAPACK and
    torch release the GIL in the heavy calls, so the workers use the cores; callers run them
    single-threaded (:func:`single_threaded`), and each worker takes the caller's torch thread
    count for its own OpenMP runtimes (a per-thread setting). ``progress(fraction, message)`` is called on this
    thread once per finished hook (fraction = hooks done / all; a UI callback must not run on a
    worker). A worker's error is raised here and the hooks not yet started are dropped.
    """
    total = len(hooks)
    n_workers = min(workers(), total)
    if n_workers <= 1 or not parallel:
        out = []
        for i, h in enumerate(hooks):
            out.append(fn(h, X_by_hook[h]))
            if progress is not None:
                progress((i + 1) / total, f"{h} ({i + 1}/{total})")
        return out
    results: list = [None] * total
    todo = iter(enumerate(hooks))
    in_flight: dict = {}
    # OpenMP's thread count is a per-thread setting: a new thread starts at the machine's default
    # (all cores), so MKL's GEMMs on a worker ran multithreaded whatever the caller had set, and
    # two workers oversubscribed the cores (measured here: two threads' X^T R GEMMs 0.20-0.55 of
    # the throughput they reach when each worker sets its own count first; ~1.0 then).
    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="probe",
                            initializer=_worker_threads, initargs=(torch.get_num_threads(),)) as pool:

        def hand_out() -> None:
            for i, h in todo:
                in_flight[pool.submit(fn, h, X_by_hook[h])] = i
                return

        try:
            for _ in range(n_workers + 1):
                hand_out()
            done = 0
            while in_flight:
                finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for f in finished:
                    i = in_flight.pop(f)
                    results[i] = f.result()  # re-raises a worker's error here
                    done += 1
                    if progress is not None:
                        progress(done / total, f"{hooks[i]} ({done}/{total})")
                    hand_out()
            return results
        except BaseException:
            for f in in_flight:
                f.cancel()
            raise


def compute_slots() -> int:
    """Heavy computations run at once by the app: ``PROBING_COMPUTE_SLOTS``, else half the cores (at least 1).

    Each computation already uses up to :func:`workers` threads, so half the cores keeps the server's
    own thread (which answers every browser) from queueing behind them.
    """
    env = os.environ.get("PROBING_COMPUTE_SLOTS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // 2)


class ComputeQueue:
    """At most ``slots`` heavy computations at once; the others wait their turn in arrival order.

    Shared by every session of a server. A fit already uses every core (:func:`map_hooks`), so fits
    started together only share the cores and hold their working arrays at the same time; queued,
    the first caller's fit finishes first and memory holds at most ``slots`` working sets.
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.slots = slots
        self._cond = threading.Condition()
        self._running = 0
        self._queue: deque[object] = deque()
        self._mine = threading.local()  # turns held by this thread: a nested turn must not wait for itself

    def counts(self) -> tuple[int, int]:
        """``(running, waiting)`` now."""
        with self._cond:
            return self._running, len(self._queue)

    @contextlib.contextmanager
    def turn(self, on_wait: Callable[[int], None] | None = None, *, poll: float = 1.0) -> Iterator[None]:
        """Hold one slot inside the block, waiting for it first if all are taken.

        Args:
            on_wait: ``on_wait(ahead)``, called on this thread while it waits (``ahead``: computations
                running or queued before this one): at first, when ``ahead`` changes and every
                ``poll`` seconds. It may raise (e.g. a UI whose user moved on) to give up the place
                in the queue; the exception propagates.
            poll: seconds between ``on_wait`` calls while nothing changes.

        A thread that already holds a turn enters a nested one at once (it would otherwise wait for itself).
        """
        depth = getattr(self._mine, "depth", 0)
        if depth:
            self._mine.depth = depth + 1
            try:
                yield
            finally:
                self._mine.depth = depth
            return
        ticket = object()
        last, call = -1, True
        with self._cond:
            self._queue.append(ticket)
        try:
            while True:
                with self._cond:
                    if self._queue[0] is ticket and self._running < self.slots:
                        self._queue.popleft()
                        self._running += 1
                        self._cond.notify_all()  # the next in line re-reads its place
                        break
                    ahead = self._running + self._queue.index(ticket)
                    if ahead == last and not call:
                        call = not self._cond.wait(poll)  # timed out: tell on_wait again
                        continue
                last, call = ahead, False
                if on_wait is not None:
                    on_wait(ahead)  # outside the lock: it may be slow, or raise
        except BaseException:
            with self._cond:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    self._cond.notify_all()
            raise
        self._mine.depth = 1
        try:
            yield
        finally:
            self._mine.depth = 0
            with self._cond:
                self._running -= 1
                self._cond.notify_all()



def script_niceness() -> int:
    """How much lower than the server's own thread a page's script thread runs: ``PROBING_SCRIPT_NICE``
    (0–19), default 0 (the same priority). Anything else (empty, words, negative, above 19) gives 0.

    Off by default: a lowered script thread that holds the GIL (a garbage collection, any long C call) is
    itself starved by other processes on the machine while the event loop waits for it — measured with
    browsers on the same cores (docs/deploy.md, Load). Worth it only where nothing else competes for the CPU.
    """
    env = os.environ.get("PROBING_SCRIPT_NICE", "").strip()
    return int(env) if env.isdigit() and int(env) <= 19 else 0


def lower_thread_priority(by: int) -> bool:
    """Run the calling OS thread ``by`` nice levels below the process's main thread (Linux; once per thread).

    The server's main thread runs the event loop that answers every browser and ``/_stcore/health``;
    page scripts and their fits run on other threads. Lower priority for those lets the kernel run the
    event loop first whenever it has work, on a machine whose cores are all busy. Niceness is per thread
    on Linux and threads inherit it from the thread that starts them (fit workers, BLAS/OpenMP pools).
    A thread can only be lowered (raising needs privileges), so this never raises one back; the main
    thread is never touched. Returns whether this thread now runs lower than the main thread.
    """
    if by <= 0 or not sys.platform.startswith("linux") or threading.current_thread() is threading.main_thread():
        return False
    tid = threading.get_native_id()
    try:
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + by)  # the main thread's niceness + by
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
        return os.getpriority(os.PRIO_PROCESS, tid) > os.getpriority(os.PRIO_PROCESS, os.getpid())
    except OSError:  # a sandbox without setpriority: run at the same priority
        return False
