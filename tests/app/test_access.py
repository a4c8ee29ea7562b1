"""Who may use a shared server, with AppTest: the optional sign-in gate (PROBING_AUTH=1), the
"open to anyone" note on Home when it is off, and the local-folder allow-list in the sidebar.

The sign-in itself needs an identity provider on the network, so these tests stop short of the
redirect: they check that nothing of the app runs before sign-in, that a missing or incomplete
configuration gives a message (never a traceback), and what a signed-in session sees.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit import config as st_config
from streamlit.runtime.secrets import secrets_singleton
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[2]
AUTH = """[auth]
redirect_uri = "http://localhost:8501/oauth2callback"
cookie_secret = "a-test-cookie-secret-that-is-long-enough-0123456789"
client_id = "probing-test"
client_secret = "not-a-real-secret"
server_metadata_url = "https://login.example.invalid/.well-known/openid-configuration"
"""


@pytest.fixture()
def secrets_file(tmp_path, monkeypatch):
    """Point Streamlit's secrets at one file of ours (missing until written); restore afterwards."""
    path = tmp_path / "secrets.toml"
    before = st_config.get_option("secrets.files")
    st_config.set_option("secrets.files", [str(path)])
    secrets_singleton._reset()
    yield path
    st_config.set_option("secrets.files", before)
    secrets_singleton._reset()


def _app(**state) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.session_state["model_choice"] = "tiny native model"
    at.session_state["dataset_choice"] = "Python documentation (offline corpus)"
    for k, v in state.items():
        at.session_state[k] = v
    return at


def _text(at: AppTest) -> str:
    parts = [e.value for e in (*at.title, *at.markdown, *at.caption, *at.error, *at.warning, *at.info)]
    return "\n".join(str(p) for p in parts)


def test_sign_in_switched_on_without_settings_says_so_and_shows_nothing_else(secrets_file, monkeypatch):
    monkeypatch.setenv("PROBING_AUTH", "1")
    at = _app().run()
    assert not at.exception
    assert len(at.error) == 1
    msg = at.error[0].value
    assert "PROBING_AUTH=1" in msg and "secrets.toml" in msg and "docs/deploy.md" in msg
    assert not at.metric and not at.button and "Cached entries" not in _text(at), "no page may run before sign-in"

    # An [auth] table without a provider: Streamlit's own check names what is missing.
    secrets_file.write_text('[auth]\nredirect_uri = "http://localhost:8501/oauth2callback"\ncookie_secret = "x"\n')
    secrets_singleton._reset()
    at = _app().run()
    assert not at.exception and len(at.error) == 1 and "missing" in at.error[0].value


def test_sign_in_configured_asks_to_sign_in_then_lets_a_signed_in_user_through(secrets_file, monkeypatch):
    monkeypatch.setenv("PROBING_AUTH", "1")
    secrets_file.write_text(AUTH)
    secrets_singleton._reset()
    at = _app().run()
    assert not at.exception and not at.error
    assert [b.label for b in at.button] == ["Sign in"], "only the sign-in button before sign-in"
    assert not at.metric and "Cached entries" not in _text(at)

    at = _app()
    at.user = {"is_logged_in": True, "email": "ada@example.org", "name": "Ada"}
    at.run()
    assert not at.exception and not at.error
    assert "Signed in as ada@example.org" in [c.value for c in at.sidebar.caption]
    assert any(b.label == "Sign out" for b in at.sidebar.button)
    assert [m.value for m in at.metric][:3] == ["2", "32", "4"], "Home runs for a signed-in user"
    assert "No sign-in" not in _text(at)


def test_home_says_the_app_is_open_without_sign_in(monkeypatch):
    monkeypatch.delenv("PROBING_AUTH", raising=False)
    at = _app().run()
    assert not at.exception
    notes = [c.value for c in at.caption if "No sign-in" in c.value]
    assert len(notes) == 1 and "anyone who can reach" in notes[0] and "PROBING_AUTH=1" in notes[0]
    monkeypatch.setenv("PROBING_AUTH", "off")
    assert "No sign-in" in _text(_app().run()), "any value other than on/1/true/yes leaves sign-in off"


def test_local_folder_outside_the_model_roots_gets_a_message(tmp_path, monkeypatch):
    root, outside = tmp_path / "models", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("PROBING_MODEL_ROOTS", str(root))
    for folder in (outside, root / "escape", root / ".." / "elsewhere", "/etc"):
        at = _app(model_choice="Local model folder…", model_local_dir=str(folder)).run()
        assert not at.exception, folder
        assert len(at.error) == 1 and "only from its model folders" in at.error[0].value, (folder, [e.value for e in at.error])
        assert str(root) in at.error[0].value
    box = at.sidebar.text_input(key="model_local_dir")
    assert str(root) in box.help, "the box says where models may come from"
