"""AppTest for the Interventions page (tiny native model; an entry built through the core first)."""
from __future__ import annotations

import pytest
from conftest import open_page, tiny_entry_key
from streamlit.testing.v1 import AppTest


@pytest.fixture(scope="module")
def entry_key() -> str:
    return tiny_entry_key("resid_post")


@pytest.fixture()
def at(entry_key: str) -> AppTest:
    return open_page("pages/interventions.py", entry_key, timeout=240)


def test_truth_case_runs_and_shows_the_best_layer_and_the_random_band(at: AppTest):
    assert at.title[0].value.endswith("Interventions")
    at.selectbox(key="iv_set").set_value("sp_en_trans")
    at.slider(key="iv_n").set_value(100)
    at.slider(key="iv_held").set_value(2)
    at.slider(key="iv_k").set_value(5)
    at.text_input(key="iv_tpair").set_value("T|F").run()
    at.button(key="iv_truth_go").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    labels = {m.label: m.value for m in at.metric}
    assert labels["Best layer (logistic)"] in ("0", "1")
    assert 0.0 <= float(labels["Held-out accuracy there"]) <= 1.0
    cases = at.dataframe[0].value
    assert {"delta", "percentile", "z", "inside_band"} <= set(cases.columns) and len(cases) == 12  # 4 c values × (true, false, all)


def test_truth_case_refuses_a_multi_token_answer(at: AppTest):
    at.button(key="iv_truth_go").click().run()  # " True" is five byte tokens for the tiny model
    assert at.error and "tokens" in at.error[0].value


def test_prompt_view_steers_along_a_direction_from_the_entry(at: AppTest):
    at.radio(key="iv_view").set_value("Steer / ablate a prompt").run()
    at.radio(key="iv_src").set_value("From a cache entry").run()
    assert "constant" in at.error[0].value  # the default label (token length) is always 1 byte here: said plainly
    at.selectbox(key="iv_label").set_value("capitalised").run()
    at.text_input(key="iv_pair").set_value("a|e").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(m.label == "P(a) − P(b)" for m in at.metric)
    assert any("random band" in x.value for x in list(at.success) + list(at.warning))
    at.text_input(key="iv_pos").set_value("match:zzzz").run()
    assert at.error and "matches no token" in at.error[0].value


def test_neuron_readout_and_an_index_out_of_range(at: AppTest):
    at.radio(key="iv_view").set_value("Neuron read-out").run()
    assert not at.error
    assert len(at.dataframe[0].value) == 3
    at.text_input(key="iv_coefs").set_value("0.5, -1, 2").run()
    assert list(at.dataframe[0].value["probe_coef"]) == [0.5, -1.0, 2.0]
    at.text_input(key="iv_coefs").set_value("0.5, x, 2").run()
    assert at.error and "not a number" in at.error[0].value
    at.text_input(key="iv_coefs").set_value("").run()
    at.text_input(key="iv_neurons").set_value("5, 99999").run()
    assert at.error and "out of range" in at.error[0].value


def test_dataset_view_loss_downstream_and_amnesic(at: AppTest):
    at.radio(key="iv_view").set_value("On the cached dataset").run()
    at.selectbox(key="iv_label").set_value("capitalised").run()
    at.selectbox(key="iv_kind").set_value("ablate").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    notes = [x.value for x in list(at.success) + list(at.warning)]
    assert any(n.startswith("LM loss") and "random band" in n for n in notes)
    at.button(key="iv_down_go").click().run()
    assert any("Probe accuracy at" in x.value for x in list(at.success) + list(at.warning))
    at.slider(key="iv_kmax").set_value(2)
    at.button(key="iv_amnesic_go").click().run()
    assert not at.exception and list(at.dataframe[-1].value["k"]) == [0, 1, 2]
