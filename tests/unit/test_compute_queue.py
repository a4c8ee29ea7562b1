"""threads.ComputeQueue (heavy computations one slot at a time, in arrival order), glue.freeze_long_lived and
threads.lower_thread_priority (page scripts below the event loop).

Real threads, real waits: the queue is what keeps 8 browser sessions' fits from all running at once
on a small server (benchmarks/bench_load.py measures the effect).
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from probing_core.threads import ComputeQueue, compute_slots, lower_thread_priority, script_niceness


def _start(fn, *args) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def test_one_slot_runs_one_computation_at_a_time_in_arrival_order():
    q = ComputeQueue(1)
    lock = threading.Lock()
    running, peak, order = [0], [0], []
    seen: dict[int, list[int]] = {}

    def work(i: int) -> None:
        with q.turn(lambda ahead: seen.setdefault(i, []).append(ahead), poll=0.05):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                order.append(i)
            time.sleep(0.15)
            with lock:
                running[0] -= 1

    threads = []
    for i in range(4):
        threads.append(_start(work, i))
        deadline = time.monotonic() + 5  # the next one arrives only once this one is running or queued
        while sum(q.counts()) < i + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert peak[0] == 1
    assert order == [0, 1, 2, 3]
    assert 0 not in seen  # the first caller never waited
    assert seen[3][0] == 3  # the last saw three computations ahead of it ...
    assert seen[3][-1] == 1 and sorted(set(seen[3]), reverse=True) == [3, 2, 1]  # ... then fewer, in turn
    assert q.counts() == (0, 0)


def test_two_slots_let_two_run_together():
    q = ComputeQueue(2)
    both = threading.Barrier(2, timeout=5)

    def work() -> None:
        with q.turn():
            both.wait()  # raises BrokenBarrierError if the second never gets a slot while the first holds one

    a, b = _start(work), _start(work)
    a.join(10)
    b.join(10)
    assert not both.broken and q.counts() == (0, 0)


def test_a_waiter_that_gives_up_leaves_the_queue():
    q = ComputeQueue(1)
    hold, holding = threading.Event(), threading.Event()
    results = []

    def holder() -> None:
        with q.turn():
            holding.set()
            hold.wait(10)

    class Left(Exception):
        pass

    def quitter(ahead: int) -> None:
        raise Left  # e.g. Streamlit stopping a script whose user moved on

    def impatient() -> None:
        try:
            with q.turn(quitter):
                results.append("ran")  # must not happen
        except Left:
            results.append("left")

    def patient() -> None:
        with q.turn(poll=0.05):
            results.append("patient ran")

    h = _start(holder)
    assert holding.wait(5)
    _start(impatient).join(5)
    assert results == ["left"] and q.counts() == (1, 0)
    p = _start(patient)
    time.sleep(0.1)
    assert results == ["left"]  # still waiting for the holder, not for the one that left
    hold.set()
    p.join(5)
    h.join(5)
    assert results == ["left", "patient ran"] and q.counts() == (0, 0)


def test_an_error_inside_the_turn_frees_the_slot():
    q = ComputeQueue(1)
    with pytest.raises(RuntimeError), q.turn():
        raise RuntimeError("fit failed")
    assert q.counts() == (0, 0)
    with q.turn():
        assert q.counts() == (1, 0)


def test_a_nested_turn_on_the_same_thread_does_not_wait_for_itself():
    q = ComputeQueue(1)
    done = []

    def work() -> None:
        with q.turn():
            with q.turn():  # e.g. a fit that asks for another shared result
                done.append(q.counts())
            done.append(q.counts())

    t = _start(work)
    t.join(5)
    assert not t.is_alive() and done == [(1, 0), (1, 0)] and q.counts() == (0, 0)


def test_slots_must_be_positive():
    with pytest.raises(ValueError):
        ComputeQueue(0)


@pytest.mark.parametrize(("env", "want"), [("3", 3), ("0", None), ("-2", None), ("abc", None), ("", None)])
def test_compute_slots_reads_the_variable_or_uses_half_the_cores(monkeypatch, env, want):
    monkeypatch.setenv("PROBING_COMPUTE_SLOTS", env)
    assert compute_slots() == (want if want is not None else max(1, (os.cpu_count() or 1) // 2))


_FREEZE_SCRIPT = """
import gc, sys, weakref
sys.path.insert(0, {repo!r})
import glue
assert not glue._in_server() and gc.get_freeze_count() == 0  # a plain process (and AppTest) never freezes
class Node:
    pass
old = Node(); old.me = old; keep = weakref.ref(old)  # long-lived and still referenced
dead = Node(); dead.me = dead; gone = weakref.ref(dead); del dead  # garbage already: collected first
glue.freeze_long_lived()  # what a server does after loading a model (a throwaway process here)
assert gone() is None, "garbage was frozen instead of collected"
assert gc.get_freeze_count() > 1000 and keep() is not None
n = Node(); n.me = n; later = weakref.ref(n); del n  # garbage made after the freeze
gc.collect()
assert later() is None, "a cycle made after the freeze was not collected"
print("ok", gc.get_freeze_count())
"""


def test_freeze_long_lived_freezes_what_exists_and_later_garbage_is_still_collected():
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", _FREEZE_SCRIPT.format(repo=repo)], capture_output=True, text=True,
                       timeout=300, cwd=repo, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")


@pytest.mark.parametrize(("env", "want"), [("5", 5), ("0", 0), ("19", 19), ("20", 0), ("-3", 0), ("abc", 0),
                                           ("", 0), (" 7 ", 7)])
def test_script_niceness_reads_the_variable_or_is_off(monkeypatch, env, want):
    monkeypatch.setenv("PROBING_SCRIPT_NICE", env)
    assert script_niceness() == want


def _nice(tid: int) -> int:
    """A thread's niceness as the kernel reports it (/proc: field 19 of its stat line)."""
    stat = open(f"/proc/{os.getpid()}/task/{tid}/stat").read()
    return int(stat.rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="per-thread niceness is Linux's")
def test_a_lowered_thread_runs_below_the_main_thread_and_passes_it_on_to_threads_it_starts():
    main = _nice(threading.get_native_id())
    out: dict[str, object] = {}

    def child() -> None:
        out["child"] = _nice(threading.get_native_id())

    def script() -> None:
        out["first"] = lower_thread_priority(4)
        out["after_first"] = _nice(threading.get_native_id())
        out["second"] = lower_thread_priority(4)  # once per thread: not lowered again
        out["after_second"] = _nice(threading.get_native_id())
        t = threading.Thread(target=child)  # what map_hooks' fit workers are
        t.start()
        t.join()

    t = threading.Thread(target=script)
    t.start()
    t.join()
    want = min(19, main + 4)
    assert out["after_first"] == want and out["after_second"] == want and out["child"] == want
    assert out["first"] is (want > main) and out["second"] is (want > main)
    assert _nice(threading.get_native_id()) == main, "the calling (main) thread must keep its priority"
    assert lower_thread_priority(4) is False and _nice(threading.get_native_id()) == main  # never the main thread
    assert lower_thread_priority(0) is False
