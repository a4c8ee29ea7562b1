"""AppTest for the Sparse probing page (tiny native byte-level model on the pydoc corpus)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from probing_core.store.activations import build_cache
from probing_core.store.entries import ActivationStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sparse_entry(tiny_model, pydoc_dataset):
    store = ActivationStore(Path(os.environ["PROBING_CACHE_DIR"]) / "activations")
    entry, _ = build_cache(tiny_model, pydoc_dataset, tiny_model.hook_names(["mlp_post", "resid_post"]), store=store,
                           max_len=64, max_tokens=4000)
    return entry


@pytest.fixture()
def at(sparse_entry) -> AppTest:
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    app.session_state["model_choice"] = "tiny native model"
    app.session_state["dataset_choice"] = "Python documentation (offline corpus)"
    app.session_state["home_entry_key"] = sparse_entry.key
    app.run()
    app.switch_page("pages/sparse.py").run()
    assert not app.exception, app.exception
    return app


def _metrics(app: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


def test_byte_classes_fit_and_report(at: AppTest):
    # The tiny model's tokens are bytes: " the" is four tokens, so use one-byte classes.
    at.text_input(key="sparse_a").set_value("e").run()
    at.text_input(key="sparse_b").set_value("a").run()
    at.checkbox(key="sparse_whole").set_value(False).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    m = _metrics(at)
    for want in ("Test accuracy", "Density", "Non-zero neurons", "KKT residual", "Selectivity"):
        assert want in m, m
    assert 0 <= float(m["Density"].rstrip(" %")) <= 100
    # The probe beside its baselines: embed-only (same C, same rows) and majority, with n, and the question asked.
    base = next(d.value for d in at.dataframe if "probe" in d.value.columns)
    assert base["probe"].iloc[1].startswith("embed only") and base["probe"].iloc[-1] == "majority class"
    assert (base["n_test"] > 0).all() and any("Question asked" in i.value for i in at.info)
    labels = [b.label for b in at.get("download_button")]
    for want in ("Path (CSV)", "Coefficients (CSV)", "Weights (.npy)", "manifest"):
        assert any(want in lab for lab in labels), labels
    # The report has both classes and the accuracy row.
    report = next(d.value for d in at.dataframe if "accuracy" in set(d.value.index))  # the classification report
    assert {"'e'", "'a'", "accuracy"} <= set(report.index)
    # Move along the path: the stored path answers without refitting.
    slider = at.slider(key="sparse_C")
    slider.set_value(slider.max).run()  # the slider's values are steps along the path
    assert not at.exception
    assert int(_metrics(at)["Non-zero neurons"]) >= 1
    at.toggle(key="sparse_all").set_value(True).run()
    assert not at.exception and not at.error
    assert len(at.dataframe[-1].value) == 2  # two layers of mlp_post


def test_multi_token_target_says_what_it_splits_into(at: AppTest):
    at.text_input(key="sparse_a").set_value(" the").run()
    assert any("splits into" in e.value for e in at.error), [e.value for e in at.error]


def test_overlapping_sets_are_an_error(at: AppTest):
    at.checkbox(key="sparse_whole").set_value(False).run()
    at.text_input(key="sparse_a").set_value("e,a").run()
    at.text_input(key="sparse_b").set_value("a").run()
    assert any("overlap" in e.value for e in at.error), [e.value for e in at.error]


def test_too_few_test_rows_are_flagged(at: AppTest):
    """4,000 tokens of a byte-level model give far fewer than 200 held-out contexts for two bytes at cap 50."""
    at.checkbox(key="sparse_whole").set_value(False).run()
    at.text_input(key="sparse_a").set_value("e").run()
    at.text_input(key="sparse_b").set_value("a").run()
    at.number_input(key="sparse_cap").set_value(50).run()
    assert not at.exception
    # 2 × 50 contexts, 30 % held out
    assert any("Only 30 held-out contexts" in w.value and "too few examples" in w.value for w in at.warning), \
        [w.value for w in at.warning]


def test_c_keeps_its_step_across_hook_changes(at: AppTest):
    """The C slider holds the step along the path (bound to the URL as "3"), so a hook change keeps it valid."""
    at.checkbox(key="sparse_whole").set_value(False).run()
    at.text_input(key="sparse_a").set_value("e").run()
    at.text_input(key="sparse_b").set_value("a").run()
    at.slider(key="sparse_C").set_value(3).run()
    other = [h for h in at.selectbox(key="sparse_hook").options if h != at.selectbox(key="sparse_hook").value][0]
    at.selectbox(key="sparse_hook").set_value(other).run()
    assert not at.exception and not at.error
    assert at.slider(key="sparse_C").value == 3


def test_a_shared_link_opens_the_same_view(sparse_entry):
    """Query parameters (what a copied URL holds) reproduce the model, the entry, the hook and the C step."""
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    app.query_params.update({"model_choice": "tiny native model", "dataset_choice": "Python documentation (offline corpus)"})
    app.run()
    assert app.session_state["_model_spec"].kind == "native", "the model comes from the URL"
    app.query_params.update({"sparse_entry": sparse_entry.key, "sparse_a": "e", "sparse_b": "a", "sparse_whole": "false",
                             "sparse_hook": "blocks.1.mlp.hook_post", "sparse_C": "3"})
    app.switch_page("pages/sparse.py").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert app.selectbox(key="sparse_entry").value == sparse_entry.key
    assert app.selectbox(key="sparse_hook").value == "blocks.1.mlp.hook_post"
    assert app.slider(key="sparse_C").value == 3
    assert (app.text_input(key="sparse_a").value, app.checkbox(key="sparse_whole").value) == ("e", False)


def test_missing_hooks_are_built_in_place(tmp_path, monkeypatch):
    """A store without MLP neurons: the page offers exactly those hooks and builds them in one click."""
    monkeypatch.setenv("PROBING_CACHE_DIR", str(tmp_path))
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=300)
    app.session_state["model_choice"] = "tiny native model"
    app.session_state["dataset_choice"] = "Python documentation (offline corpus)"
    app.run()
    app.switch_page("pages/sparse.py").run()
    assert not app.exception
    assert any("Build these hooks now" == b.label for b in app.button), [b.label for b in app.button]
    app.button(key="sparse_build_hooks").click().run()
    assert not app.exception
    entries = ActivationStore(tmp_path / "activations").entries()
    assert len(entries) == 1
    # exactly the page's hooks: the MLP neurons, and hook_embed for the embed-only baseline
    assert entries[0].hooks == ["hook_embed", "blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert app.selectbox(key="sparse_entry").value == entries[0].key  # the page now runs on it
