"""AppTest for the Layer probes page (tiny native model, an entry built through the core first)."""
from __future__ import annotations

import pytest
from conftest import REPO, open_page, tiny_entry_key
from streamlit.testing.v1 import AppTest


@pytest.fixture(scope="module")
def entry_key() -> str:
    return tiny_entry_key("embed", "resid_post")


@pytest.fixture()
def at(entry_key: str) -> AppTest:
    return open_page("pages/layers.py", entry_key)


def test_default_table_and_downloads(at: AppTest):
    assert at.title[0].value.endswith("Layer probes")
    assert not at.error
    df = at.dataframe[0].value
    assert list(df["hook"]) == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert df["layer"].iloc[0] == "embedding" and df["layer"].iloc[1].startswith("layer 0")  # names for people
    # The default question has an answer that varies: the previous token, which the embedding alone cannot name
    # (the current token would give 1.000 everywhere and selectivity 0).
    assert "token at -1" in df.columns
    assert df["token at -1"].iloc[0] < 0.9
    assert any("Each row is one place in the model" in c.value for c in at.caption)
    at.slider(key="layers_offset").set_value(0).run()
    assert at.dataframe[0].value["current token"].iloc[0] == pytest.approx(1.0)  # embeddings name the token
    labels = [b.label for b in at.get("download_button")]
    assert any("CSV" in lab for lab in labels) and any("manifest" in lab for lab in labels)


def test_offset_and_fixed_positions(at: AppTest):
    at.slider(key="layers_offset").set_value(-2).run()
    at.radio(key="layers_rule").set_value("Fixed positions").run()
    at.text_input(key="layers_positions").set_value("1,3,4").run()
    assert not at.exception and not at.error
    df = at.dataframe[0].value
    assert {"token at -2 @ pos 3", "token at -2 @ pos 4"} <= set(df.columns) and "token at -2 @ pos 1" not in df.columns
    assert any("left out" in c.value for c in at.caption)


def test_bad_positions_show_error(at: AppTest):
    at.radio(key="layers_rule").set_value("Fixed positions").run()
    at.text_input(key="layers_positions").set_value("5000").run()
    assert not at.exception
    assert at.error and "selects no tokens" in at.error[0].value
    at.text_input(key="layers_positions").set_value("two").run()
    assert not at.exception and at.error and "integers" in at.error[0].value


@pytest.mark.skipif(not __import__("probing_core.tree.model").tree.model.checkpoint_available(),
                    reason="tree-search checkpoint not trained yet")
def test_tree_edge_preset():
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=300)
    app.session_state["model_choice"] = "tree-search model (shipped checkpoint)"
    app.run()
    app.switch_page("pages/layers.py").run()
    app.number_input(key="layers_tree_n").set_value(100).run()
    app.button(key="layers_tree_run").click().run()
    assert not app.exception and not app.error
    df = app.dataframe[0].value
    assert df["hook"].iloc[0] == "hook_embed" and df["hook"].iloc[-1].endswith("hook_resid_post")
    assert df["node 1 @ 2nd token (→dst)"].iloc[0] == pytest.approx(1.0)  # the arrow token names the target


def test_control_on_as_many_rows_as_the_task_unless_asked(at: AppTest):
    """The page's control task uses the real task's n (said under the table); the research checkbox asks for every row."""
    assert any("as many as the real task" in c.value for c in at.caption), [c.value for c in at.caption]
    before = at.dataframe[0].value["control"].tolist()
    at.checkbox(key="layers_ctrl_all").set_value(True).run()
    assert not at.exception and not at.error
    assert not any("as many as the real task" in c.value for c in at.caption)
    assert at.dataframe[0].value["control"].tolist() != before  # a different (larger) control sample
