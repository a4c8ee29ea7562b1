"""AppTest for the Layer probes page (tiny native model, an entry built through the core first)."""
from __future__ import annotations

import numpy as np
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


@pytest.fixture(autouse=True)
def _no_background_fits_left():
    """The page fits the other C values of a state in a background thread: it must be done after each test."""
    import glue

    yield
    assert glue.layers_grid_join(120), "the Layer probes C-grid thread is still running"


def test_c_moves_are_lookups_with_the_numbers_of_a_cold_fit(entry_key: str, monkeypatch):
    """After the first view every C of the slider is fitted (in the background); a C move then reads a result
    that equals a cold fit at that C — the same numbers whichever order the controls were moved in."""
    import glue
    from probing_core.analyses import layer_probes as lp

    monkeypatch.setattr(glue, "LAYERS_GRID_IN_APPTEST", True)  # AppTest is not a real server
    at = open_page("pages/layers.py", entry_key)
    assert glue.layers_grid_join(120)
    hooks = tuple(at.dataframe[0].value["hook"])
    state = (entry_key, hooks, lp.LayerLabelSpec("token", -1, top_k=20), lp.PositionSpec("all"), 0.3, 0, "task")
    lock, shelves = glue._shelves()
    with lock:
        shelf = dict(shelves["layer_probes"])
    grid = {c: shelf.get(glue._layers_key(state, c)) for c in glue.LAYERS_C_GRID}
    assert all(r is not None for r in grid.values()), [c for c, r in grid.items() if r is None]
    acts = glue.get_entry(entry_key)
    for c in (0.01, 10.0):
        cold = lp.probe_layers(acts, list(hooks), state[2], state[3], C=c)
        np.testing.assert_array_equal(grid[c].test_accuracy, cold.test_accuracy)
        np.testing.assert_array_equal(grid[c].control_accuracy, cold.control_accuracy)
        at.select_slider(key="layers_C").set_value(c).run()
        assert not at.exception and not at.error
        np.testing.assert_allclose(at.dataframe[0].value["token at -1"], cold.test_accuracy[:, 0])
    assert grid[0.001].test_accuracy.mean() < grid[1.0].test_accuracy.mean()  # the C values are really different fits


def test_one_label_step_is_fitted_in_the_background(entry_key: str, monkeypatch):
    """After the first view the background also fits one step of each label control (offset ±1, top-K ±1) at the C
    in view, each equal to a cold fit; moving the offset there reads it (the page shows those numbers)."""
    from dataclasses import replace

    import glue
    from probing_core.analyses import layer_probes as lp

    monkeypatch.setattr(glue, "LAYERS_GRID_IN_APPTEST", True)
    at = open_page("pages/layers.py", entry_key)
    assert glue.layers_grid_join(120)
    hooks = tuple(at.dataframe[0].value["hook"])
    label = lp.LayerLabelSpec("token", -1, top_k=20)
    near = [replace(label, offset=-2), replace(label, offset=0), replace(label, top_k=19), replace(label, top_k=21)]
    lock, shelves = glue._shelves()
    with lock:
        shelf = dict(shelves["layer_probes"])
    keys = {lab: glue._layers_key((entry_key, hooks, lab, lp.PositionSpec("all"), 0.3, 0, "task"), 1.0) for lab in near}
    assert all(k in shelf for k in keys.values()), [lab for lab, k in keys.items() if k not in shelf]
    acts = glue.get_entry(entry_key)
    cold = lp.probe_layers(acts, list(hooks), near[0], lp.PositionSpec("all"), C=1.0)
    np.testing.assert_array_equal(shelf[keys[near[0]]].test_accuracy, cold.test_accuracy)
    np.testing.assert_array_equal(shelf[keys[near[0]]].control_accuracy, cold.control_accuracy)
    at.slider(key="layers_offset").set_value(-2).run()
    assert not at.exception and not at.error
    np.testing.assert_allclose(at.dataframe[0].value["token at -2"], cold.test_accuracy[:, 0])


def test_background_grid_yields_to_a_queued_fit_and_then_finishes():
    """The C-grid thread fits only while no other fit runs or waits: a fit that queues takes the slot within one
    hook (the yielded C is fitted again later), and every C of the grid ends on the shelf exactly once."""
    import threading
    import time
    from collections import OrderedDict

    import glue
    from probing_core.threads import ComputeQueue

    lock, shelves, flights, queue = threading.Lock(), {"layer_probes": OrderedDict()}, {}, ComputeQueue(1)
    grid = glue._LayerGrid(lock, shelves, flights, queue)
    grid.delay = 0.0
    started, finished = [], []

    def fit(c: float, progress) -> str:  # a fit of 10 "hooks" of 50 ms each
        started.append(c)
        for i in range(10):
            time.sleep(0.05)
            progress((i + 1) / 10, f"hook {i}")
        finished.append(c)
        return f"result {c}"

    state = ("entry", ("h",), "label", "pos", 0.3, 0, "task")
    grid.want(state, [(state, fit, c) for c in (1.0, 0.1, 10.0)])
    time.sleep(0.2)  # the background is inside its first fit
    t = time.perf_counter()
    with queue.turn():  # a session's fit: the background gives the slot back at its next hook
        waited = time.perf_counter() - t
        time.sleep(0.3)
        assert finished == []  # nothing ran beside it
    assert waited < 0.2, waited
    assert grid.join(10)
    assert started[0] == 1.0 and started.count(1.0) == 2 and sorted(finished) == [0.1, 1.0, 10.0]
    assert dict(shelves["layer_probes"]) == {
        glue._layers_key(state, c): f"result {c}" for c in (1.0, 0.1, 10.0)}
    assert not flights and not grid.progress


def test_background_grid_tries_a_failing_c_once():
    """A C whose fit raises a user error is left for the session that asks for it (which shows the error)."""
    import threading
    from collections import OrderedDict

    import glue
    from probing_core.errors import LabelError
    from probing_core.threads import ComputeQueue

    shelves, flights, calls = {"layer_probes": OrderedDict()}, {}, []
    grid = glue._LayerGrid(threading.Lock(), shelves, flights, ComputeQueue(1))

    def fit(c: float, progress) -> str:
        calls.append(c)
        if c == 10.0:
            raise LabelError("one class")
        return f"result {c}"

    state = ("entry", ("h",), "label", "pos", 0.3, 0, "task")
    grid.want(state, [(state, fit, c) for c in (1.0, 10.0, 0.1)])
    assert grid.join(10)
    assert sorted(calls) == [0.1, 1.0, 10.0] and len(shelves["layer_probes"]) == 2 and not flights


def test_background_grid_stops_at_exit():
    """At exit (atexit) the running fit yields at its next hook and the thread ends; later requests start nothing."""
    import threading
    import time
    from collections import OrderedDict

    import glue
    from probing_core.threads import ComputeQueue

    shelves, flights = {"layer_probes": OrderedDict()}, {}
    grid = glue._LayerGrid(threading.Lock(), shelves, flights, ComputeQueue(1))
    grid.delay = 0.0

    def fit(c: float, progress) -> str:
        for i in range(100):
            time.sleep(0.05)
            progress(i / 100, "hook")
        return "done"

    state = ("entry", ("h",), "label", "pos", 0.3, 0, "task")
    grid.want(state, [(state, fit, c) for c in (1.0, 10.0)])
    time.sleep(0.2)
    t = time.perf_counter()
    grid.stop()
    assert time.perf_counter() - t < 1.0 and grid.thread is None and not flights and not shelves["layer_probes"]
    grid.want(state, [(state, fit, 1.0)])
    assert grid.thread is None
