"""AppTest of the Home page: pick the tiny model, build a cache entry, see it listed, delete it."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[2]


def _app() -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.session_state["model_choice"] = "tiny native model"
    at.session_state["dataset_choice"] = "Python documentation (offline corpus)"
    return at.run()


def test_home_builds_lists_and_deletes_an_entry():
    at = _app()
    assert not at.exception and not at.error
    assert [m.value for m in at.metric][:3] == ["2", "32", "4"]
    at.number_input(key="home_max_tokens").set_value(1234)
    at.multiselect(key="home_hooks").set_value(["embed", "resid_post", "mlp_post"])
    at.button(key="home_build").click().run()
    assert not at.exception and not at.error
    msg = (at.success or at.info)[0].value
    assert "1,234 tokens" in msg
    key = at.session_state["home_entry_key"]
    table = at.dataframe[0].value
    assert key in list(table["key"])
    at.selectbox(key="home_delete_key").set_value(key)
    at.button(key="home_delete").click().run()
    assert not at.exception
    keys = list(at.dataframe[0].value["key"]) if at.dataframe else []
    assert key not in keys


def test_home_shows_clear_message_for_offline_hub_model():
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.session_state["model_choice"] = "Hugging Face model by name…"
    at.session_state["model_hf_name"] = "not-a-real-model-zz"
    at.run()
    assert not at.exception
    assert at.error and ("internet" in at.error[0].value or "could not load" in at.error[0].value)


def test_home_offers_a_configured_ray_cluster_and_says_when_it_does_not_answer(monkeypatch):
    for var in ("PROBING_RAY_ADDRESS", "RAY_ADDRESS", "PROBING_DEMO"):
        monkeypatch.delenv(var, raising=False)
    at = _app()
    assert not at.exception and "home_engine" not in [r.key for r in at.radio]  # no address: no choice
    monkeypatch.setenv("PROBING_RAY_ADDRESS", "127.0.0.1:1")  # nothing listens on port 1
    at.run()
    engine = at.radio(key="home_engine")
    assert engine.options == ["this machine", "Ray cluster at 127.0.0.1:1"] and engine.value is False
    at.number_input(key="home_max_tokens").set_value(300)
    engine.set_value(True).run()
    at.button(key="home_build").click().run()
    assert not at.exception  # a message, not a traceback, and no entry
    assert "no Ray cluster answers at 127.0.0.1:1" in at.error[0].value and "home_entry_key" not in at.session_state
    monkeypatch.setenv("PROBING_DEMO", "1")  # a demo shows no cluster addresses
    at = _app()
    assert not at.exception and "home_engine" not in [r.key for r in at.radio]
