"""AppTest for the Attention page (tiny native model)."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def at() -> AppTest:
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    app.session_state["model_choice"] = "tiny native model"
    app.session_state["dataset_choice"] = "Python documentation (offline corpus)"
    app.run()
    app.switch_page("pages/attention.py").run()
    assert not app.exception, app.exception
    return app


def _downloads(app: AppTest) -> list[str]:
    return [b.label for b in app.get("download_button")]


def test_prompt_view(at: AppTest):
    assert not at.error
    labels = _downloads(at)
    for want in ("CircuitsVis page", "Head scores", "L0H0 pattern", "manifest"):
        assert any(want in lab for lab in labels), (want, labels)
    at.number_input(key="attn_layer").set_value(1).run()
    at.selectbox(key="attn_head").set_value(3).run()
    at.selectbox(key="attn_sel").set_value(2).run()
    assert not at.exception and not at.error
    assert any("L1H3 pattern" in lab for lab in _downloads(at))


def test_long_prompt_truncated_with_notice(at: AppTest):
    at.text_area(key="attn_prompt").set_value("word " * 40).run()
    at.slider(key="attn_max_len").set_value(16).run()
    assert not at.exception
    assert any("only the first 16" in i.value for i in at.info)


def test_dataset_sample(at: AppTest):
    at.radio(key="attn_source").set_value("Dataset sample").run()
    at.number_input(key="attn_doc").set_value(3).run()
    assert not at.exception and not at.error
    assert any("only the first 64" in i.value for i in at.info)  # pydoc documents are longer than 64 tokens


def test_empty_prompt_error(at: AppTest):
    at.text_area(key="attn_prompt").set_value("").run()
    assert not at.exception
    assert at.error and "empty" in at.error[0].value


def test_state_restored_from_url_and_bad_values_ignored():
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    app.session_state["model_choice"] = "tiny native model"
    app.query_params["attn_layer"] = "1"
    app.query_params["attn_head"] = "99"  # out of range for this model: falls back to the default
    app.run()
    app.switch_page("pages/attention.py").run()
    assert not app.exception and not app.error
    assert app.number_input(key="attn_layer").value == 1 and app.selectbox(key="attn_head").value == 0
