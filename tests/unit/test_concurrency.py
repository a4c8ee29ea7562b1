"""Several users at once: one loaded model shared by every session's threads.

Streamlit runs each session's script in its own thread and ``st.cache_resource`` hands all of
them the same :class:`LoadedModel`; its lock serializes forward passes (a bridge's hooks are not
thread-safe). The store's concurrent-build tests live in test_store.py.
"""
from __future__ import annotations

import threading

import torch

from probing_core.models import LoadedModel

N_THREADS = 4
ROUNDS = 5


def _batches(model: LoadedModel) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # Different shapes per thread, so a result landing in the wrong thread would show.
    return [torch.randint(0, model.d_vocab, (1 + i % 3, 12 + 5 * i), generator=gen) for i in range(N_THREADS)]


def test_concurrent_run_with_cache_equals_sequential(tiny_model: LoadedModel):
    hooks = tiny_model.hook_names(("embed", "resid_post"))
    batches = _batches(tiny_model)
    expected = [tiny_model.run_with_cache(b, hooks, return_logits=True) for b in batches]

    results: dict[tuple[int, int], tuple] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(N_THREADS)

    def worker(i: int) -> None:
        try:
            start.wait(timeout=30)
            for r in range(ROUNDS):
                results[i, r] = tiny_model.run_with_cache(batches[i], hooks, return_logits=True)
        except BaseException as e:  # noqa: BLE001 — re-raised in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == N_THREADS * ROUNDS

    for (i, _), (logits, acts) in results.items():
        exp_logits, exp_acts = expected[i]
        assert logits.shape == exp_logits.shape
        torch.testing.assert_close(logits, exp_logits, rtol=0, atol=0)
        assert set(acts) == set(hooks)
        for h in hooks:
            torch.testing.assert_close(acts[h], exp_acts[h], rtol=0, atol=0)


def test_forward_passes_hold_the_lock(tiny_model: LoadedModel):
    """While one thread holds the model's lock, another thread's forward pass waits for it."""
    hooks = tiny_model.hook_names(("embed",))
    tokens = torch.zeros((1, 4), dtype=torch.long)
    done = threading.Event()

    def worker() -> None:
        tiny_model.run_with_cache(tokens, hooks)
        done.set()

    with tiny_model.lock:
        t = threading.Thread(target=worker)
        t.start()
        assert not done.wait(0.5), "run_with_cache ran while another thread held the model's lock"
    assert done.wait(30)
    t.join()
