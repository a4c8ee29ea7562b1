"""glue.shared_result: one fit per key across sessions; the others wait for it (no duplicate work)."""
from __future__ import annotations

import threading
import time

import pytest

import glue


def test_two_sessions_asking_for_the_same_key_compute_it_once():
    calls = []
    started = threading.Event()

    def compute(progress):
        calls.append(1)
        started.set()
        time.sleep(0.5)  # long enough for the second caller to arrive while this one runs
        return object()

    out = {}

    def ask(name):
        out[name] = glue.shared_result("test_single_flight", ("k", 1), compute, keep=2, label="fit")

    a = threading.Thread(target=ask, args=("a",))
    a.start()
    assert started.wait(10)
    b = threading.Thread(target=ask, args=("b",))
    b.start()
    a.join(10)
    b.join(10)
    assert len(calls) == 1
    assert out["a"] is out["b"]


def test_a_failed_fit_is_not_stored_and_the_waiting_session_computes_it():
    first = threading.Event()
    release = threading.Event()
    calls = []

    def failing(progress):
        calls.append("fail")
        first.set()
        release.wait(10)
        raise RuntimeError("boom")

    def ok(progress):
        calls.append("ok")
        return "result"

    errors, out = [], {}

    def ask_fail():
        try:
            glue.shared_result("test_single_flight_fail", "k", failing, keep=2, label="fit")
        except RuntimeError as e:
            errors.append(e)

    def ask_ok():
        out["b"] = glue.shared_result("test_single_flight_fail", "k", ok, keep=2, label="fit")

    a = threading.Thread(target=ask_fail)
    a.start()
    assert first.wait(10)
    b = threading.Thread(target=ask_ok)
    b.start()
    time.sleep(0.2)
    assert calls == ["fail"]  # b waits while a runs
    release.set()
    a.join(10)
    b.join(10)
    assert len(errors) == 1 and out["b"] == "result" and calls == ["fail", "ok"]


@pytest.mark.parametrize("keep", [1, 2])
def test_shelves_keep_at_most_keep_results(keep):
    for i in range(keep + 2):
        glue.shared_result(f"test_keep_{keep}", i, lambda progress, i=i: i, keep=keep, label="fit")
    n = []
    glue.shared_result(f"test_keep_{keep}", 0, lambda progress: n.append(1) or 0, keep=keep, label="fit")
    assert n == [1]  # the oldest key was dropped, so it is computed again
