"""Thread-pool control for small dense linear algebra.

A multithreaded LAPACK ``eigh`` of a 576×576 matrix took 0.35–1.1 s on this 2-core machine when
other work was running (its BLAS threads spin while waiting for busy cores), and 0.06–0.07 s on
one thread. Decompositions of d×d Gram matrices (d ≤ a few thousand) are run single-threaded.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Limit NumPy's BLAS/LAPACK and torch's intra-op pool to one thread inside the block.

    Both limits are process-wide while the block runs (another session's work may run on one
    thread meanwhile); that costs at most the 2× of a second core and avoids the 10× collapse of
    oversubscribed BLAS threads.
    """
    before = torch.get_num_threads()
    with threadpool_limits(limits=1):
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
