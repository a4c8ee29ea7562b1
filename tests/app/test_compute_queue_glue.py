"""glue.shared_result takes turns in the server's compute queue: fits of different keys never run more at
once than the queue has slots (real threads; the same process-wide queue every session uses)."""
from __future__ import annotations

import threading
import time

import glue


def test_fits_of_different_keys_take_turns():
    slots = glue._compute_queue().slots
    n = slots + 2
    lock = threading.Lock()
    running, peak = [0], [0]

    def compute(progress):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return threading.get_ident()

    out = {}

    def ask(i):
        out[i] = glue.shared_result("test_compute_queue", ("key", i), compute, keep=n, label="fit")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert len(out) == n and peak[0] == slots  # all ran, never more than the slots at once
    assert glue._compute_queue().counts() == (0, 0)


def test_the_waiting_note_says_how_many_are_ahead():
    assert glue._queue_note(1).startswith("waiting for 1 other computation to finish")
    assert glue._queue_note(3).startswith("waiting for 3 other computations to finish")
