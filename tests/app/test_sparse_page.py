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
    labels = [b.label for b in at.get("download_button")]
    for want in ("Path (CSV)", "Coefficients (CSV)", "Weights (.npy)", "manifest"):
        assert any(want in lab for lab in labels), labels
    # The report has both classes and the accuracy row.
    report = at.dataframe[1].value  # [neuron table, report]
    assert {"'e'", "'a'", "accuracy"} <= set(report.index)
    # Move along the path: the stored path answers without refitting.
    at.select_slider(key="sparse_C").set_value(at.select_slider(key="sparse_C").options[-1]).run()
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
