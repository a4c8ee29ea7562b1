"""Layer probes: planted signals read at the right hook, agreement with scikit-learn, bad inputs,
the tree edge preset (on a random tree-vocabulary model; on the shipped checkpoint when present)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from probing_core.solvers import splits
from probing_core.tree import model as tree_model, task as tree_task
from probing_core.store.activations import build_cache, open_entry
from probing_core.data.datasets import DatasetSpec, make_dataset
from probing_core.errors import HookError, InputError, LabelError
from probing_core.analyses.layer_probes import (
    LayerLabelSpec,
    PositionSpec,
    ProbeTask,
    build_tree_cache,
    compute_layer_labels,
    keep_top_classes,
    one_step_away,
    parse_label,
    parse_positions,
    probe_layers,
    probe_tasks,
    probe_tree_edges,
    run_tree_edge_preset,
    select_rows,
    tree_edge_samples,
)
from probing_core.models import LoadedModel, ModelSpec, load_model

HOOKS = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def acts(tiny_entry):
    store, entry = tiny_entry
    return open_entry(store, entry.key)


def test_token_identity_read_at_the_right_hook(acts):
    """hook_embed is W_E[token]: the current token is decodable there, the token 3 back is not."""
    now = probe_layers(acts, HOOKS, LayerLabelSpec("token", 0, top_k=10), PositionSpec("all"), control=False)
    back = probe_layers(acts, HOOKS, LayerLabelSpec("token", -3, top_k=10), PositionSpec("all"), control=False)
    assert now.test_accuracy.shape == (3, 1) and now.columns == ["current token"]
    assert now.test_accuracy[0, 0] == pytest.approx(1.0)
    assert back.test_accuracy[0, 0] < back.chance[0] + 0.15 < now.test_accuracy[0, 0] - 0.5
    assert len(now.classes[0]) == 10 and any("most frequent" in n for n in now.notes)
    assert now.converged.all()


def test_agrees_with_sklearn_on_one_hook(acts):
    spec = LayerLabelSpec("token", -1, top_k=6)
    res = probe_layers(acts, ["blocks.1.hook_resid_post"], spec, PositionSpec("all"), C=0.5, seed=3, control=False)
    rows = select_rows(acts, PositionSpec("all"))[0][1]
    y, ok = compute_layer_labels(acts, rows, spec)
    rows, y = rows[ok], y[ok].astype(str)
    keep, _, _ = keep_top_classes(y, 6)
    rows, y = rows[keep], y[keep]
    _, codes = np.unique(y, return_inverse=True)
    tr, te = splits.stratified_split(codes, test_fraction=0.3, seed=3)
    X = np.asarray(acts.hook("blocks.1.hook_resid_post")[rows], dtype=np.float64)
    mu, sd = X[tr].mean(0), X[tr].std(0)
    Xs = (X - mu) / np.where(sd < 1e-12, 1, sd)
    sk = LogisticRegression(C=0.5, max_iter=5000, tol=1e-8).fit(Xs[tr], codes[tr])
    sk_acc = float((sk.predict(Xs[te]) == codes[te]).mean())
    assert res.n_samples[0] == rows.size
    assert 0.3 < sk_acc < 0.99  # a non-trivial task, so agreement means something
    assert res.test_accuracy[0, 0] == pytest.approx(sk_acc, abs=0.01)


def test_split_positions_and_control(acts):
    seen = []
    res = probe_layers(acts, HOOKS, [LayerLabelSpec("token", 0, top_k=5), LayerLabelSpec("token", 1, top_k=5)],
                       PositionSpec("positions", (1, 2), split=True), progress=lambda f, msg: seen.append((f, msg)))
    # A live bar: once per hook of every column's fit and of the control fit, rising to 1.
    fracs = [f for f, _ in seen]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0
    per_hook = [m for _, m in seen if "(3/3)" in m]
    assert len(per_hook) == 5 and per_hook[-1].startswith("control task")
    assert res.columns == ["current token @ pos 1", "current token @ pos 2", "token at +1 @ pos 1", "token at +1 @ pos 2"]
    assert res.test_accuracy.shape == (3, 4) and res.chance.shape == (4,)
    assert res.control_column == res.columns[0]
    # The control gives every current-token type of the column's rows (not only the top-5) a random
    # class: selectivity is the real accuracy minus the control's, with n and intervals beside them.
    assert np.all(np.isfinite(res.control_accuracy))
    np.testing.assert_allclose(res.selectivity, res.test_accuracy[:, 0] - res.control_accuracy)
    assert res.n_test.shape == (4,) and np.all(res.n_test > 0) and res.control_n_test > 0
    lo, hi = res.test_accuracy_ci[..., 0], res.test_accuracy_ci[..., 1]
    assert np.all(lo <= res.test_accuracy + 1e-12) and np.all(res.test_accuracy <= hi + 1e-12)
    table = res.table()
    assert [r["hook"] for r in table] == HOOKS and "selectivity" in table[0]
    json.dumps(res.to_json())


def test_every_kth_and_token_set_rules(acts):
    rows = select_rows(acts, PositionSpec("every", every=4))[0][1]
    first = 1 if acts.meta.get("has_bos") else 0
    assert rows.size and np.all((np.asarray(acts.pos)[rows] - first) % 4 == 0)
    assert not acts.bos_mask()[rows].any()
    tok = acts.text_strings(acts.token_ids[5:6])[0]
    rows = select_rows(acts, PositionSpec("tokens", tokens=(tok,)))[0][1]
    assert set(acts.text_strings(acts.token_ids[rows])) == {tok}
    last = select_rows(acts, PositionSpec("positions", (-1,)))[0][1]
    assert np.all(acts.next_ids[last] == -1)


def test_column_label_from_documents(tiny_model, store):
    docs = [("cat " if i % 2 else "dog ") + "sat on the mat" for i in range(40)]  # one row per document
    ds = make_dataset(DatasetSpec("texts", "pets"), docs, columns={"animal": ["cat" if i % 2 else "dog" for i in range(40)]})
    entry, _ = build_cache(tiny_model, ds, ["hook_embed", "blocks.0.hook_resid_post"], store=store, max_len=32)
    a = open_entry(store, entry.key)
    first = 1 if a.meta.get("has_bos") else 0
    # At the first text token ('c' vs 'd') the class is in the embedding; elsewhere only attention can carry it.
    res = probe_layers(a, ["hook_embed", "blocks.0.hook_resid_post"], parse_label("column:animal"),
                       PositionSpec("positions", (first,)), control=False)
    assert res.test_accuracy[0, 0] == pytest.approx(1.0) and res.chance[0] == pytest.approx(0.5)
    with pytest.raises(LabelError, match="not in this cache entry"):
        probe_layers(a, ["hook_embed"], parse_label("column:mood"), PositionSpec("all"))


def test_bad_inputs(acts):
    with pytest.raises(HookError, match="not in cache entry"):
        probe_layers(acts, ["blocks.7.hook_resid_post"], LayerLabelSpec(), PositionSpec())
    with pytest.raises(InputError, match="selects no tokens"):
        probe_layers(acts, HOOKS, LayerLabelSpec(), PositionSpec("positions", (10_000,)))
    with pytest.raises(InputError, match="selects no tokens"):
        probe_layers(acts, HOOKS, LayerLabelSpec(), PositionSpec("tokens", tokens=("no-such-token-xyz",)))
    tok = acts.text_strings(acts.token_ids[5:6])[0]
    with pytest.raises(LabelError, match="same label"):
        probe_layers(acts, HOOKS, LayerLabelSpec("token", 0), PositionSpec("tokens", tokens=(tok,)))
    with pytest.raises(LabelError, match="undefined"):
        probe_layers(acts, HOOKS, LayerLabelSpec("token", -5), PositionSpec("positions", (1,)))
    rows = np.arange(6)
    with pytest.raises(LabelError, match="fewer than two classes"):  # every class seen once
        probe_tasks(acts, HOOKS, [ProbeTask("x", rows, np.array(list("abcdef")), rows)])
    with pytest.raises(LabelError):
        keep_top_classes(np.array(["a", "b"]), top_k=1)
    with pytest.raises(LabelError):
        parse_label("length")
    with pytest.raises(InputError):
        parse_positions("at:one")
    assert parse_label("token-offset:-2") == LayerLabelSpec("token", -2)
    assert parse_positions("every:3") == PositionSpec("every", every=3)
    assert parse_positions("tokens: the,Ġa").tokens == (" the", "Ġa")


# ---------------------------------------------------------------------------------- tree preset


@pytest.fixture(scope="module")
def random_tree_model() -> LoadedModel:
    """An untrained model over the tree vocabulary (the preset's machinery without the checkpoint)."""
    from transformer_lens.model_bridge import TransformerBridge

    cfg = tree_model.model_config(n_layers=2, d_model=32, n_heads=1, d_mlp=64, seed=0)
    bridge = TransformerBridge.boot_native(cfg, device="cpu")
    bridge.enable_compatibility_mode()
    bridge.eval()
    return LoadedModel(bridge=bridge, spec=ModelSpec.native(cfg), key="random-tree-test", tokenizer=tree_task.TreeTokenizer(), device="cpu")


def test_tree_preset_on_random_model(random_tree_model, store):
    samples = tree_edge_samples(60, seed=1, n_nodes=16)
    entry = build_tree_cache(random_tree_model, samples, store, seed=1)
    acts = open_entry(store, entry.key)
    assert acts.n_tokens == 60 * tree_task.prompt_length(16) and not acts.meta.get("has_bos")
    res = probe_tree_edges(acts, samples)
    assert res.hooks == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert res.columns[:2] == ["node 0 @ 2nd token (→dst)", "node 1 @ 2nd token (→dst)"] and len(res.columns) == 6
    emb = dict(zip(res.columns, res.test_accuracy[0]))
    assert emb["node 1 @ 2nd token (→dst)"] == pytest.approx(1.0)  # the token →dst *is* the target
    assert emb["node 0 @ 2nd token (→dst)"] < 0.3 and emb["node 1 @ 3rd token (,)"] < 0.3  # chance ≈ 1/16
    assert np.all(res.chance < 0.2)
    with pytest.raises(InputError, match="tree prompts"):
        probe_tree_edges(acts, tree_edge_samples(61, seed=1, n_nodes=16))


@pytest.mark.skipif(not tree_model.checkpoint_available(), reason="tree-search checkpoint not trained yet")
def test_tree_preset_on_checkpoint(store):
    model = load_model(ModelSpec("tree"))
    res = run_tree_edge_preset(model, store, n_samples=150, seed=0)
    acc = dict(zip(res.columns, res.test_accuracy.T))
    assert acc["node 1 @ 2nd token (→dst)"][0] > 0.99  # embed: the arrow token names the target
    assert acc["node 0 @ 2nd token (→dst)"][0] < 0.3  # embed: the source is one position back
    assert acc["node 0 @ 2nd token (→dst)"][1:].max() > 0.8  # attention moves it in after layer 0


# ---------------------------------------------------------------------------------------------
# The page's cheaper control task, and what the page shows (issue 16 / 19)
# ---------------------------------------------------------------------------------------------


def test_control_on_as_many_rows_as_the_task(acts):
    """control_samples="task" (the default, as on the page and in the CLI): the control probe gets the real task's
    n (a seeded subsample of every row of the column, types outside the top-K included); None keeps every row up to
    max_samples."""
    spec = LayerLabelSpec("token", -1, top_k=6)
    full = probe_layers(acts, HOOKS, spec, PositionSpec("all"), control_samples=None)
    same = probe_layers(acts, HOOKS, spec, PositionSpec("all"))
    again = probe_layers(acts, HOOKS, spec, PositionSpec("all"), control_samples="task")
    assert np.array_equal(same.test_accuracy, full.test_accuracy)  # the real task does not change
    n = int(same.n_samples[0])
    assert same.control_n_test == pytest.approx(0.3 * n, abs=len(same.classes[0]) + 1)  # 30 % of n rows held out
    assert full.control_n_test > same.control_n_test
    assert any(f"subsample of {n:,} of its" in note and "as many as the real task" in note for note in same.notes)
    assert not any("as many as the real task" in note for note in full.notes)
    assert np.array_equal(same.control_accuracy, again.control_accuracy)  # seeded: the same table every time
    assert np.allclose(same.selectivity, same.test_accuracy[:, 0] - same.control_accuracy)


def test_page_notes_and_tables(acts, tiny_model):
    from probing_core.analyses.layer_probes import families_in, split_note, table_note
    from probing_core.plots.layers import accuracy_tables

    res = probe_layers(acts, HOOKS, LayerLabelSpec("token", -1, top_k=6), PositionSpec("all"))
    have, default = families_in(tiny_model, acts.hooks)
    assert default == ["embed", "resid_post"] and set(default) <= set(have)
    assert "Each row is one place in the model" in table_note(res) and "token at -1" in table_note(res)
    note = split_note(res, 0.3)
    assert note.startswith("Held out: a stratified 30% of the samples") and f"C = {res.C:g}" in note
    assert f"n_test {int(res.n_test[0]):,}" in note and "control majority" in note
    table, intervals = accuracy_tables(res, research=True)
    assert list(table.columns[:2]) == ["layer", "hook"] and list(table["hook"]) == HOOKS
    assert table["layer"].iloc[0] == "embedding" and not any(c.endswith("95% CI") for c in table.columns)
    assert list(intervals.columns) == ["layer", "token at -1 95% CI"]
    plain, _ = accuracy_tables(res, research=False)
    assert "hook" not in plain.columns and plain["token at -1"].tolist() == table["token at -1"].tolist()


def test_one_step_away_stays_within_the_controls():
    """The labels the page fits in the background: offset ∓1 and top-K ∓1, never outside the sliders' ranges, and no
    offset step for a dataset column."""
    tok = LayerLabelSpec("token", offset=-1, top_k=20)
    assert one_step_away(tok, (-5, 2), (2, 50)) == [
        LayerLabelSpec("token", -2, None, 20), LayerLabelSpec("token", 0, None, 20),
        LayerLabelSpec("token", -1, None, 19), LayerLabelSpec("token", -1, None, 21)]
    edge = LayerLabelSpec("token", offset=2, top_k=2)
    assert one_step_away(edge, (-5, 2), (2, 50)) == [LayerLabelSpec("token", 1, None, 2),
                                                        LayerLabelSpec("token", 2, None, 3)]
    col = LayerLabelSpec("column", column="topic", top_k=50)
    assert one_step_away(col, (-5, 2), (2, 50)) == [LayerLabelSpec("column", 0, "topic", 49)]
