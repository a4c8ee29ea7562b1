"""AppTest for the Logit lens page (tiny native model: fast, offline)."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[2]
TINY = "tiny native model"


@pytest.fixture()
def at() -> AppTest:
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    app.session_state["model_choice"] = TINY
    app.run()
    app.switch_page("pages/lens.py").run()
    assert not app.exception, app.exception
    return app


def _metrics(app: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


def test_next_token_view(at: AppTest):
    assert at.title[0].value.endswith("Logit lens")
    at.text_area(key="lens_prompt").set_value("hello wor").run()
    at.text_input(key="lens_answer").set_value("l").run()
    assert not at.exception and not at.error
    m = _metrics(at)
    assert "Answer rank (0 = top)" in m and int(m["Answer rank (0 = top)"]) >= 0
    df = at.dataframe[0].value
    assert list(df.columns) == ["rank", "token", "token_id", "logit (centred)", "prob"] and len(df) == 5
    labels = [b.label for b in at.get("download_button")]
    assert any("Top-k table" in lab for lab in labels) and any("manifest" in lab for lab in labels)
    # BOS is a visible option: without it the prompt has one token fewer
    with_bos = next(c.value for c in at.caption if c.value.startswith("Tokens:"))
    at.checkbox(key="lens_bos").set_value(False).run()
    assert not at.exception and not at.error
    without = next(c.value for c in at.caption if c.value.startswith("Tokens:"))
    assert without.count(" · ") == with_bos.count(" · ") - 1


def test_multi_token_answer_shows_error(at: AppTest):
    at.text_input(key="lens_answer").set_value("ab").run()
    assert not at.exception
    assert at.error and "2 tokens" in at.error[0].value


def test_empty_prompt_shows_error(at: AppTest):
    at.text_area(key="lens_prompt").set_value("   ").run()
    assert not at.exception
    assert at.error and "empty" in at.error[0].value


def test_logit_lens_view(at: AppTest):
    at.radio(key="lens_view").set_value("Logit lens").run()
    at.checkbox(key="lens_mid").check().run()
    assert not at.exception and not at.error
    labels = [b.label for b in at.get("download_button")]
    assert any("Logit lens" in lab for lab in labels)


def test_attribution_view_sum_check(at: AppTest):
    at.radio(key="lens_view").set_value("Logit difference & attribution").run()
    at.radio(key="lens_source").set_value("My prompts").run()
    at.text_area(key="lens_pairs_text").set_value('abc | "d" | "x"\nhello | "!" | "?"').run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    m = _metrics(at)
    assert float(m["Max |error| per prompt"]) < 1e-3
    assert float(m["Sum of components"]) == pytest.approx(float(m["Model logit difference (mean)"]), abs=1e-3)
    assert at.success
    labels = [b.label for b in at.get("download_button")]
    for want in ("Logit difference per prompt", "Accumulated residual", "Per-layer decomposition", "Head DLA", "manifest"):
        assert any(want in lab for lab in labels), (want, labels)


def test_templates_on_tiny_model_explain_multi_token_answers(at: AppTest):
    """The byte-level tiny model splits ' great' into two tokens: the page says so instead of crashing."""
    at.radio(key="lens_view").set_value("Logit difference & attribution").run()
    assert not at.exception
    assert at.error and "tokens" in at.error[0].value


def test_sentiment_templates_embedded():
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    app.session_state["model_choice"] = "SmolLM2-135M-Instruct (embedded, offline)"
    app.run()
    app.switch_page("pages/lens.py").run()
    app.radio(key="lens_view").set_value("Logit difference & attribution").run()
    app.slider(key="lens_pairs").set_value(2).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    m = _metrics(app)
    assert float(m["Max |error| per prompt"]) < 2e-3
    assert float(m["Model logit difference (mean)"]) > 0  # SmolLM2 gets the sentiment right on average


def test_state_restored_from_url():
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    app.session_state["model_choice"] = TINY
    app.query_params["lens_view"] = "Logit lens"
    app.query_params["lens_prompt"] = "abc"
    app.query_params["lens_k"] = "3"
    app.run()
    app.switch_page("pages/lens.py").run()
    assert not app.exception and not app.error
    assert app.radio(key="lens_view").value == "Logit lens"
    assert app.text_area(key="lens_prompt").value == "abc" and app.slider(key="lens_k").value == 3
