"""Demo mode (PROBING_DEMO=1) and session isolation, with AppTest.

Demo mode: every page opens with a plain-language explanation box (st.info, 💡) at the top,
inputs are capped, and the embedded model is the one preselected. AppTest runs the script in
this process, so the environment variable is set here (and restored) before each run.

Session isolation: two AppTest instances are two sessions; one's choices never show in the other's.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import glue
from probing_core.models import EMBEDDED_NAME

REPO = Path(__file__).resolve().parents[2]
TINY = "tiny native model"
PYDOC = "Python documentation (offline corpus)"


def existing_pages() -> list[str]:
    """The pages app.py lists whose file exists (others are still being written)."""
    listed = re.findall(r'"(pages/[\w/]+\.py)"', (REPO / "app.py").read_text())
    assert listed, "app.py lists no pages"
    return [p for p in listed if (REPO / p).exists()]


@pytest.fixture()
def demo_env():
    old = os.environ.get("PROBING_DEMO")
    os.environ["PROBING_DEMO"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PROBING_DEMO", None)
        else:
            os.environ["PROBING_DEMO"] = old


def _app(model: str | None = TINY) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=240)
    if model is not None:
        at.session_state["model_choice"] = model
    at.session_state["dataset_choice"] = PYDOC
    return at


def _top_level(at: AppTest) -> list:
    return [at.main.children[i] for i in sorted(at.main.children)]


def test_demo_mode_reads_the_environment(demo_env):
    assert glue.demo_mode()
    assert glue.max_tokens_cap() <= 5_000
    os.environ["PROBING_DEMO"] = "0"
    assert not glue.demo_mode() and glue.max_tokens_cap() > 5_000


@pytest.mark.parametrize("page", existing_pages())
def test_every_page_opens_with_an_explanation_in_demo_mode(demo_env, page):
    at = _app().run()
    if page != "pages/home.py":
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    top = _top_level(at)
    infos = [i for i, el in enumerate(top) if getattr(el, "type", "") == "info" and el.proto.icon == "💡"]
    assert infos, f"{page}: no explanation box (glue.explain) in demo mode"
    before = {getattr(el, "type", "?") for el in top[: infos[0]]}
    assert before <= {"title", "header", "subheader", "caption", "markdown"}, (
        f"{page}: the explanation must come at the top, before any widget or output; found {before} first"
    )
    assert len(top[infos[0]].value) > 40, "an explanation, not a label"


def test_demo_mode_caps_inputs_and_hides_custom_models(demo_env):
    at = _app().run()
    assert not at.exception
    assert at.number_input(key="home_max_tokens").max == glue.max_tokens_cap()
    options = glue._model_options()
    assert list(options)[0] == EMBEDDED_NAME, "the embedded model is the default choice"
    assert not any(name.endswith("…") for name in options), "no free-form model names in demo mode"


def test_two_sessions_keep_their_own_choices():
    """Session A: tiny model on Home with custom hooks. Session B: the same app, another page and
    other widget values. Neither sees the other's choices."""
    a = _app(TINY).run()
    a.multiselect(key="home_hooks").set_value(["embed"]).run()
    a.number_input(key="home_max_tokens").set_value(777).run()

    b = _app(TINY).run()
    assert b.multiselect(key="home_hooks").value == ["embed", "resid_post"], "B got A's hook choice"
    assert b.number_input(key="home_max_tokens").value != 777
    # A page whose widgets do not depend on what the store holds (a fresh clone has no entries).
    other = "pages/attention.py" if "pages/attention.py" in existing_pages() else None
    if other is not None:
        b.switch_page(other).run()
        assert not b.exception
    b.session_state["model_choice"] = EMBEDDED_NAME  # B changes model; A must not follow

    a.run()
    assert a.session_state["model_choice"] == TINY
    assert a.session_state["_model_spec"].kind == "native"
    assert a.multiselect(key="home_hooks").value == ["embed"]
    assert a.number_input(key="home_max_tokens").value == 777
    if other is not None:
        only_b = {k for k in _widget_keys(b) if not k.startswith(("_", "home_", "model_", "dataset_"))}
        assert only_b, f"B's page {other} keeps no choices in session_state"
        assert not only_b & _widget_keys(a), "A's session holds B's page choices"


def _widget_keys(at: AppTest) -> set[str]:
    return {str(k) for k in at.session_state.keys()}


# ---------------------------------------------------------------------------------------------
# What demo mode hides and shows (issue 16), against the research view of the same page
# ---------------------------------------------------------------------------------------------

GUIDED = ["pages/home.py", "pages/regression.py", "pages/sparse.py", "pages/layers.py", "pages/attention.py", "pages/lens.py"]


@pytest.fixture(scope="module")
def tiny_entries(tiny_model, pydoc_dataset):
    """A default-style entry (embed + resid_post) and one with MLP neurons, in the tests' store."""
    from probing_core.store.activations import build_cache
    from probing_core.store.entries import ActivationStore

    store = ActivationStore(Path(os.environ["PROBING_CACHE_DIR"]) / "activations")
    resid, _ = build_cache(tiny_model, pydoc_dataset, tiny_model.hook_names(["embed", "resid_post"]), store=store,
                           max_len=64, max_tokens=1500)
    mlp, _ = build_cache(tiny_model, pydoc_dataset, tiny_model.hook_names(["mlp_post", "resid_post"]), store=store,
                         max_len=64, max_tokens=4000)
    return resid.key, mlp.key


def _open(page: str, entry: str | None = None) -> AppTest:
    at = _app()
    if entry:
        at.session_state["home_entry_key"] = entry
    at.run()
    if page != "pages/home.py":
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


_WIDGETS = ("selectbox", "button", "number_input", "multiselect", "text_input", "slider", "select_slider", "checkbox",
            "radio", "toggle", "text_area")


def _keys(at: AppTest) -> set[str]:
    """Keys of every widget on the page and in the sidebar."""
    keys = {str(w.key) for typ in _WIDGETS for w in getattr(at, typ) if w.key}
    assert keys, "no widgets found: the check below would be empty"
    return keys


def _texts(at: AppTest) -> str:
    parts = [m.label + " " + str(m.value) for m in at.metric]
    parts += [c.value for c in at.caption] + [b.label for b in at.button] + [m.value for m in at.markdown]
    return "\n".join(parts)


@pytest.mark.parametrize("page", [p for p in GUIDED if p in existing_pages()])
def test_demo_boxes_speak_plainly_and_guide(demo_env, page):
    at = _open(page)
    box = next(el for el in _top_level(at) if getattr(el, "type", "") == "info" and el.proto.icon == "💡").value
    first = box.split(". ")[0]
    for jargon in ("L1", "LayerNorm", "unembedding", "residual", "logistic", "ridge", "C=", "saga", "KKT",
                   "tolerance", "activations"):
        assert jargon not in first, f"{page}: the first sentence says {jargon!r}: {first!r}"
    assert "**1.**" in box and "**2.**" in box and "**3.**" in box, f"{page}: no guided path in {box!r}"


def test_home_hides_keys_paths_delete_and_dtype_in_demo(demo_env, tiny_entries):
    at = _open("pages/home.py")
    keys, text = _keys(at), _texts(at)
    assert not {"home_delete", "home_delete_key", "home_store_dtype", "model_device", "model_dtype"} & keys, keys
    assert "Delete entry" not in text and "d_model" not in text
    assert tiny_entries[0] not in text and tiny_entries[0][:8] not in text, "an entry key is shown"
    assert "key" not in at.dataframe[0].value.columns
    assert str(glue.get_store().root) not in text and "activations" not in text.lower().split("`")[1::2]


def test_research_view_keeps_every_control(tiny_entries):
    """Outside demo mode the same pages show what demo mode hides."""
    os.environ.pop("PROBING_DEMO", None)
    home = _open("pages/home.py")
    keys = _keys(home)
    assert {"home_delete", "home_delete_key", "home_store_dtype", "model_device", "model_dtype"} <= keys, keys
    assert "d_model" in _texts(home)
    reg = _open("pages/regression.py", tiny_entries[0])
    assert {"reg_cv", "reg_seed"} <= _keys(reg)
    sp = _open("pages/sparse.py", tiny_entries[1])
    assert {"sparse_cv", "sparse_penalty"} <= _keys(sp)


def test_research_controls_hidden_in_demo(demo_env, tiny_entries):
    reg = _open("pages/regression.py", tiny_entries[0])
    assert not {"reg_cv", "reg_seed"} & _keys(reg)
    reg.selectbox(key="reg_label").set_value("position").run()  # byte tokens: the default (length) is constant
    tables = [d.value for d in reg.dataframe]
    assert any("layer" in t.columns and "hook" not in t.columns for t in tables), "hooks not named in words"
    entry_label = reg.selectbox(key="reg_entry").format_func(reg.selectbox(key="reg_entry").value) \
        if hasattr(reg.selectbox(key="reg_entry"), "format_func") else reg.selectbox(key="reg_entry").options[0]
    assert tiny_entries[0][:8] not in str(entry_label), "the entry picker shows a key"
    sp = _open("pages/sparse.py", tiny_entries[1])
    assert not {"sparse_cv", "sparse_penalty", "sparse_l1r"} & _keys(sp)
    assert "KKT residual" not in [m.label for m in sp.metric]
    layers = _open("pages/layers.py", tiny_entries[0])
    assert "hook" not in layers.dataframe[0].value.columns and "layer" in layers.dataframe[0].value.columns
