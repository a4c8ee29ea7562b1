"""Set-up shared by the page AppTests: a tiny native entry in the session's cache, and the app
opened on a page with the tiny model selected.

`tiny_entry_key` and `open_page` are plain functions (a module fixture in each test file calls the
first with the hook families its page needs; test bodies call the second with their own state).
"""
from __future__ import annotations

import os
from pathlib import Path

from streamlit.testing.v1 import AppTest

from probing_core.data.datasets import DatasetSpec, load_dataset
from probing_core.models import ModelSpec, load_model, tiny_native_config
from probing_core.store.activations import build_cache
from probing_core.store.entries import ActivationStore

REPO = Path(__file__).resolve().parents[2]
TINY = "tiny native model"
PYDOC = "Python documentation (offline corpus)"


def tiny_entry_key(*families: str, max_tokens: int = 1500) -> str:
    """Build (or find, when already on disk) an entry of the tiny native model over pydoc.

    Args:
        families: hook families, e.g. ``"embed", "resid_post"`` (``LoadedModel.hook_names``).
        max_tokens: tokens cached (rows of 64 tokens).
    Returns:
        The entry's key in the store under ``$PROBING_CACHE_DIR/activations`` (the one the app reads).
    """
    model = load_model(ModelSpec.native(tiny_native_config()))
    store = ActivationStore(Path(os.environ["PROBING_CACHE_DIR"]) / "activations")
    entry, _ = build_cache(model, load_dataset(DatasetSpec("pydoc")), model.hook_names(list(families)),
                           store=store, max_len=64, max_tokens=max_tokens)
    return entry.key


def open_page(path: str, entry_key: str | None = None, *, timeout: float = 180,
              query: dict[str, str] | None = None, **state) -> AppTest:
    """Run the app with the tiny model and the pydoc dataset picked, then switch to ``path``.

    Args:
        path: the page file, e.g. ``"pages/layers.py"`` (``"pages/home.py"`` stays on Home).
        entry_key: selected as Home's cache entry when given.
        timeout: AppTest's default timeout per run, in seconds.
        query: URL query parameters set before the first run.
        state: more session-state values (widget keys) set before the first run.
    Returns:
        The AppTest after the page's first run; asserts that no exception element is shown.
    """
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=timeout)
    app.session_state["model_choice"] = TINY
    app.session_state["dataset_choice"] = PYDOC
    if entry_key:
        app.session_state["home_entry_key"] = entry_key
    for k, v in state.items():
        app.session_state[k] = v
    for k, v in (query or {}).items():
        app.query_params[k] = v
    app.run()
    if path != "pages/home.py":
        app.switch_page(path).run()
    assert not app.exception, [e.value for e in app.exception]
    return app
