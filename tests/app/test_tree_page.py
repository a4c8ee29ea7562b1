"""AppTest for the Tree search page (needs the shipped tree-search checkpoint; skipped until it exists)."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from probing_core.tree import model as tree_model

REPO = Path(__file__).resolve().parents[2]
TINY = "tiny native model"

pytestmark = pytest.mark.skipif(not tree_model.checkpoint_available(), reason="tree-search checkpoint not trained yet")


@pytest.fixture()
def at() -> AppTest:
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=300)
    app.session_state["model_choice"] = TINY  # the page loads the tree model itself, whatever the sidebar says
    app.run()
    app.switch_page("pages/tree.py").run()
    assert not app.exception, app.exception
    return app


def _metrics(app: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


def test_sample_prediction_and_accuracy(at: AppTest):
    assert at.title[0].value.endswith("Tree search") and not at.error
    m = _metrics(at)
    assert int(m["Path length (depth)"]) >= 1
    assert m["Model's path"] in ("correct ✅", "wrong ❌")
    acc = [v for k, v in m.items() if k.startswith("Whole path right")]
    assert acc and 0.0 <= float(acc[0].rstrip("%")) <= 100.0
    df = at.dataframe[0].value
    assert list(df.columns) == ["depth", "accuracy", "puzzles"] and df["puzzles"].sum() == 300


def test_depth_and_pasted_prompt(at: AppTest):
    at.slider(key="tree_depth").set_value(4).run()
    assert not at.exception and _metrics(at)["Path length (depth)"] == "4"
    at.text_input(key="tree_text").set_value("0 →1 , 0 →2 , 1 →3 , | 3 : 0").run()
    m = _metrics(at)
    assert not at.error and m["Path length (depth)"] == "2" and m["Goal / root"] == "3 / 0"


def test_bad_prompt_shows_error(at: AppTest):
    at.text_input(key="tree_text").set_value("0 →1 , | 7 : 0").run()
    assert not at.exception
    assert at.error and "cannot be reached" in at.error[0].value


def test_node_slider_offers_only_what_the_checkpoint_holds(at: AppTest):
    slider = at.slider(key="tree_nodes")
    n_ctx = int(tree_model.read_checkpoint_config()["bridge_config"]["n_ctx"])
    assert slider.max == tree_model.max_nodes_for_context(n_ctx) >= tree_model.trained_n_nodes()
    assert slider.value == tree_model.trained_n_nodes()
    slider.set_value(slider.max).run()  # the largest size offered still draws a puzzle
    assert not at.exception and not at.error and _metrics(at)["Model's path"] in ("correct ✅", "wrong ❌")


def test_downloads(at: AppTest):
    labels = [b.label for b in at.get("download_button")]
    assert {"⬇ This puzzle (JSON)", "⬇ Test puzzles and predicted paths (CSV)", "⬇ Accuracy by depth (CSV)",
            "⬇ Accuracy (JSON)"} <= set(labels)
