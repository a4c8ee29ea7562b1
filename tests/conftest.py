"""Shared fixtures: tiny native models and the embedded model (session scope), real stores on disk.

PROBING_CACHE_DIR points at <repo>/.test-cache for the whole session so the embedded model is
dequantized once per machine, not once per test run.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROBING_CACHE_DIR", str(REPO / ".test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from probing_core.store.activations import build_cache  # noqa: E402
from probing_core.data.datasets import DatasetSpec, load_dataset  # noqa: E402
from probing_core.models import LoadedModel, ModelSpec, load_model, tiny_native_config  # noqa: E402
from probing_core.store.entries import ActivationStore  # noqa: E402

TINY_HOOK_FAMILIES = ("embed", "resid_pre", "resid_mid", "resid_post", "mlp_post")


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    return load_model(ModelSpec.native(tiny_native_config()))


@pytest.fixture(scope="session")
def embedded_model() -> LoadedModel:
    return load_model(ModelSpec("embedded"))


@pytest.fixture(scope="session")
def pydoc_dataset():
    return load_dataset(DatasetSpec("pydoc"))


@pytest.fixture()
def store(tmp_path: Path) -> ActivationStore:
    return ActivationStore(tmp_path / "store")


@pytest.fixture(scope="session")
def tiny_entry(tiny_model, pydoc_dataset, tmp_path_factory):
    """A real cache entry of the tiny model over 3,000 pydoc tokens (session scope)."""
    store = ActivationStore(tmp_path_factory.mktemp("tiny-store"))
    entry, _ = build_cache(
        tiny_model, pydoc_dataset, tiny_model.hook_names(TINY_HOOK_FAMILIES), store=store, max_len=64, max_tokens=3000
    )
    return store, entry


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (use with ``pytest.mark.usefixtures``).

    The test machines are shared 2-core boxes; torch's two OpenMP threads then spin against
    other processes and small ops get 10-100x slower. One thread is faster and deterministic.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp_next_word_rows(model: LoadedModel, dataset, folder: Path, hook: str, max_tokens: int):
    """``(X (n, d_mlp) float32, y (n,))``: a real MLP hook of ``model`` over ``dataset`` (built in ``folder``),
    label = "the next token starts a new word" (a space then a letter or digit); BOS rows and the last token
    of each row left out. The L1 path tests' real data (fewer rows than neurons at a few hundred tokens)."""
    import numpy as np

    from probing_core.store.activations import open_entry

    store = ActivationStore(folder)
    entry, _ = build_cache(model, dataset, [hook], store=store, max_len=64, max_tokens=max_tokens)
    acts = open_entry(store, entry.key)
    rows = np.flatnonzero(~acts.bos_mask() & (acts.next_ids >= 0))
    nxt = acts.text_strings(acts.next_ids[rows])
    y = np.array([s[:1] == " " and s[1:2].isalnum() for s in nxt], dtype=int)
    return np.asarray(acts.hook(hook)[rows], dtype=np.float32), y
