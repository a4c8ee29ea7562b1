"""AppTest for the Regression probes page (tiny native model, an entry built through the core)."""
from __future__ import annotations

import time

import pytest
from conftest import open_page, tiny_entry_key
from streamlit.testing.v1 import AppTest


@pytest.fixture(scope="module")
def entry_key() -> str:
    return tiny_entry_key("embed", "resid_pre", "resid_mid", "resid_post")


def _open(entry_key: str, **query: str) -> AppTest:
    return open_page("pages/regression.py", entry_key, query=query)


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_layer_curve_alpha_slider_and_label_change(entry_key):
    at = _open(entry_key)
    assert at.title[0].value.endswith("Regression probes")
    # the default label (token length) is constant on a byte vocabulary: a message, not a traceback
    assert at.error and "constant" in at.error[0].value
    t0 = time.perf_counter()
    at.selectbox(key="reg_label").set_value("position").run()
    fit_s = time.perf_counter() - t0
    assert not at.exception and not at.error, [e.value for e in at.error]
    m = _metrics(at)
    assert {"Best CV R²", "At hook", "Samples (train / test)"} <= set(m)
    best = float(m["Best CV R²"])
    table = at.dataframe[0].value
    assert list(table["hook"])[0] == "hook_embed" and len(table) == 1 + 3 * 2
    assert {"r2_train", "r2_test", "best_alpha", "baseline_r2"} <= set(table.columns)
    t0 = time.perf_counter()
    at.select_slider(key="reg_alpha").set_value("1e6").run()
    slide_s = time.perf_counter() - t0
    assert not at.exception and not at.error
    strong = float(_metrics(at)["Best CV R²"])
    assert strong < best - 0.05  # heavy shrinkage: the displayed R² drops, from the stored path
    assert set(at.dataframe[0].value["alpha"]) == {1e6}
    labels = [b.label for b in at.get("download_button")]
    for want in ("R² curves", "Probe weights", "manifest"):
        assert any(want in lab for lab in labels), (want, labels)
    t0 = time.perf_counter()
    at.selectbox(key="reg_label").set_value("capitalised").run()
    label_s = time.perf_counter() - t0
    assert not at.exception and not at.error, [e.value for e in at.error]
    print(f"\nfirst fit {fit_s:.2f} s, α slider {slide_s:.2f} s, label change {label_s:.2f} s (AppTest rerun)")


def test_match_rule_and_empty_selection_error(entry_key):
    at = _open(entry_key, reg_label="Position", reg_positions="matching…", reg_match="e,a")  # URL values are the shown labels
    assert not at.error, [e.value for e in at.error]
    assert "match:e,a" in at.caption[0].value or any("match:e,a" in c.value for c in at.caption)
    at.text_input(key="reg_match").set_value("§,¤").run()
    assert not at.exception and at.error and "selects no rows" in at.error[0].value


def test_embedding_tab_notes_on_byte_vocabulary(entry_key):
    at = _open(entry_key, reg_tab="Embedding regression", reg_len_thr="3")
    assert not at.exception
    warnings = " ".join(w.value for w in at.warning)
    assert "gpt2" in warnings and "constant" in warnings
    assert len(at.dataframe[0].value) == 5


def test_transfer_tab(entry_key):
    at = _open(entry_key, reg_tab="Probe transfer", reg_label="Capitalised")
    assert not at.exception and not at.error, [e.value for e in at.error]
    m = _metrics(at)
    key = next(k for k in m if k.startswith("In-sample R² on W_E"))
    assert 0 < float(m[key]) <= 1
    rows = at.dataframe[0].value
    assert list(rows["hook"])[:2] == ["hook_embed", "blocks.0.hook_resid_pre"] and len(rows) == 7
