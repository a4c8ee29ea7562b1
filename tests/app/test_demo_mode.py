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
