"""Bad values in each page's text and number inputs, a bad PROBING_CACHE_LIMIT_GB, and a broken
store entry: every one gives a message on the page, never an exception element (issue 15)."""
from __future__ import annotations

import json

import pytest
from conftest import open_page, tiny_entry_key
from streamlit.testing.v1 import AppTest

from probing_core.data.datasets import DatasetSpec, load_dataset
from probing_core.models import ModelSpec, load_model, tiny_native_config
from probing_core.store.activations import build_cache
from probing_core.store.entries import ActivationStore


@pytest.fixture(scope="module")
def entry_key() -> str:
    """A tiny entry in the session's cache (the probe pages need one to show their inputs)."""
    return tiny_entry_key("embed", "resid_post", "mlp_post")


_page = open_page


def _says_so(app: AppTest, *words: str) -> None:
    assert not app.exception, [e.value for e in app.exception]
    shown = " ".join(str(m.value) for m in [*app.error, *app.warning])
    assert shown, "no message shown"
    for w in words:
        assert w.lower() in shown.lower(), shown


@pytest.mark.parametrize("value", ["abc", "", "nan", "inf", "-1", "0"])
def test_bad_cache_limit_is_a_message(value, monkeypatch):
    monkeypatch.setenv("PROBING_CACHE_LIMIT_GB", value)
    _says_so(_page("pages/home.py"), "PROBING_CACHE_LIMIT_GB")


# (page, widget kind, key, bad value, words the message holds)
CASES = [
    ("pages/lens.py", "text_area", "lens_prompt", "", "empty"),
    ("pages/lens.py", "text_area", "lens_prompt", "   ", "empty"),
    ("pages/lens.py", "text_input", "lens_answer", "ab", "tokens"),
    ("pages/attention.py", "text_area", "attn_prompt", "", "empty"),
    ("pages/attention.py", "text_area", "attn_prompt", " \n ", "empty"),
    ("pages/sparse.py", "text_input", "sparse_a", "", ""),
    ("pages/sparse.py", "text_input", "sparse_b", " ,, ", ""),
    ("pages/layers.py", "text_input", "layers_positions", "abc", "positions"),
    ("pages/layers.py", "text_input", "layers_positions", "", ""),
    ("pages/regression.py", "text_input", "reg_match", "", ""),
    ("pages/home.py", "text_input", "model_local_dir", "/no/such/model/folder", "/no/such/model/folder"),
    ("pages/tree.py", "text_input", "tree_text", "not a tree at all", ""),
    ("pages/tree.py", "text_input", "tree_text", "0 →1 , | 9 : 0", ""),
    ("pages/interventions.py", "text_input", "iv_neurons", "abc", ""),
    ("pages/interventions.py", "text_input", "iv_neurons", "99999", ""),
]


@pytest.mark.parametrize("page,kind,key,value,words", CASES, ids=[f"{c[0][6:-3]}-{c[2]}={c[3]!r}" for c in CASES])
def test_bad_page_input_is_a_message(entry_key, page, kind, key, value, words):
    state = {"layers_rule": "Fixed positions"} if key == "layers_positions" else {}
    if key == "iv_neurons":
        state["iv_view"] = "Neuron read-out"
    if key == "reg_match":
        state["reg_positions"] = "match"
    if key == "model_local_dir":  # the sidebar's folder box, typed before the page runs
        state.update(model_choice="Local model folder…", model_local_dir=value)
    app = _page(page, entry_key, **state)
    assert not app.exception, [e.value for e in app.exception]
    if key not in state:
        getattr(app, kind)(key=key).set_value(value).run()
    _says_so(app, *([words] if words else []))


def test_broken_entry_is_listed_on_home_with_a_delete_button(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBING_CACHE_DIR", str(tmp_path))
    model = load_model(ModelSpec.native(tiny_native_config()))
    store = ActivationStore(tmp_path / "activations")
    ds = load_dataset(DatasetSpec("pydoc"))
    good, _ = build_cache(model, ds, ["hook_embed"], store=store, max_len=32, max_tokens=200)
    bad, _ = build_cache(model, ds, ["hook_embed"], store=store, max_len=32, max_tokens=300)
    (bad.path / "meta.json").write_text(json.dumps([]))
    app = _page("pages/home.py")
    _says_so(app, bad.key, "broken")
    assert list(app.dataframe[0].value["key"]) == [good.key]  # the good entry still listed and usable
    app.button(key=f"home_delete_broken_{bad.key}").click().run()
    assert not app.exception
    assert not bad.path.exists() and store.broken_entries() == []
    assert not any(bad.key in str(w.value) for w in app.warning)
