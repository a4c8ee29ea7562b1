"""Regression pipeline on real tiny-model cache entries: selection, ridge per hook, transfer, errors, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from probing_core.store.activations import build_cache, open_entry
from probing_core.cli import main
from probing_core.cli.probe_regression import coerce_value, parse_label_params
from probing_core.data.datasets import DatasetSpec, make_dataset
from probing_core.errors import HookError, InputError, LabelError, ProbeError
from probing_core.data.labels import LabelSpec
from probing_core.analyses.regression import (
    PositionRule,
    curve_rows,
    embedding_regression,
    probe_transfer,
    regression_data,
    run_regression,
    transfer_hooks,
)

RESID = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
POSITION = LabelSpec.make("position")


@pytest.fixture(scope="module")
def acts(tiny_entry):
    store, entry = tiny_entry
    return open_entry(store, entry.key)


def test_run_regression_reads_position_from_positional_embedding(acts):
    run = run_regression(acts, RESID, POSITION, "all", cv=3, test_fraction=0.2, seed=1)
    r = run.result
    assert r.hooks == tuple(RESID) and r.r2_test.shape == (4, r.alphas.size)
    # labels are the token positions of the selected rows, BOS excluded
    assert not np.any(acts.pos[run.info.rows] == 0) and run.info.n_selected == acts.n_tokens - int(acts.bos_mask().sum())
    best_test = r.r2_test[np.arange(4), r.best_index]
    # hook_embed has no positional information; resid_pre 0 = token + (random, 64 positions in 32 dims) positional embedding
    assert best_test[1] > 0.25 and best_test[1] > best_test[0] + 0.15, best_test
    assert np.all(r.baseline_r2 < 0.05)
    m = run.manifest
    assert m["label"] == {"name": "position", "params": {}} and m["split"]["seed"] == 1 and m["split"]["cv_folds"] == 3
    assert m["cache_entry"]["dataset_fingerprint"] == acts.meta["dataset_fingerprint"] and len(m["alphas"]) == r.alphas.size
    assert len(curve_rows(run)) == 4 * r.alphas.size
    w = run.weights()
    assert w["hook_embed"].shape == (33,) and w["hook_embed"].dtype == np.float32
    # the stored probe predicts what the table says: in-sample R² of coef on all rows ≈ train R² at best α
    X, y, _ = regression_data(acts, ["blocks.0.hook_resid_pre"], POSITION)
    pred = r.predict("blocks.0.hook_resid_pre", X["blocks.0.hook_resid_pre"])
    assert 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum() == pytest.approx(best_test[1], abs=0.1)
    assert r.r2_train[1, r.best_index[1]] >= best_test[1] - 0.05


def test_decompositions_are_reused_for_a_new_label_on_the_same_rows(acts):
    first = run_regression(acts, RESID[:2], POSITION, "all", cv=2, split_by="tokens")
    second = run_regression(acts, RESID[:2], LabelSpec.make("capitalised"), "all", cv=2, split_by="tokens",
                            decompositions=first.decompositions)
    assert second.result.decompositions["hook_embed"] is first.result.decompositions["hook_embed"]
    # "auto" splits capitalised (decided by the token) by type: another split, so no reuse …
    by_type = run_regression(acts, RESID[:2], LabelSpec.make("capitalised"), "all", cv=2, decompositions=first.decompositions)
    assert by_type.split_by == "type" and by_type.result.decompositions["hook_embed"] is not first.result.decompositions["hook_embed"]
    # … but two type-decided labels on the same rows share the type split's decompositions
    again = run_regression(acts, RESID[:2], LabelSpec.make("starts_with_space"), "all", cv=2,
                           decompositions=[first.decompositions, by_type.decompositions])
    assert again.result.decompositions["hook_embed"] is by_type.result.decompositions["hook_embed"]
    # other rows (last tokens): the cached decompositions must not be used
    third = run_regression(acts, RESID[:2], POSITION, "last", cv=2, decompositions=first.decompositions)
    assert third.result.decompositions["hook_embed"] is not first.result.decompositions["hook_embed"]


def test_position_rules(acts):
    _, _, last = regression_data(acts, ["hook_embed"], POSITION, "last")
    assert np.all(acts.next_ids[last.rows] == -1) and last.n_selected == len(np.unique(acts.seq))
    rule = PositionRule.parse("match: ,e")
    assert rule.tokens == (" ", "e") and str(rule) == "match: ,e"
    X, y, info = regression_data(acts, ["hook_embed"], POSITION, rule)
    assert set(acts.text_strings(acts.token_ids[info.rows])) == {" ", "e"} and X["hook_embed"].shape == (info.n_selected, 32)
    assert info.n_candidates == info.n_selected and np.array_equal(y, acts.pos[info.rows])
    with pytest.raises(ProbeError, match="unknown position rule"):
        PositionRule.parse("first")


def test_transfer_to_its_own_hook_equals_in_sample_score(tiny_model, acts):
    tr = probe_transfer(tiny_model, acts, LabelSpec.make("capitalised"), "all", alpha=0.1, source="hook_embed")
    assert tr.transfer.hooks == tuple(transfer_hooks(acts.hooks)) and tr.transfer.hooks[0] == "hook_embed"
    assert len(tr.transfer.hooks) == 1 + 3 * tiny_model.n_layers
    assert tr.transfer.r2[0] == pytest.approx(tr.source_r2, abs=1e-5)
    vocab = probe_transfer(tiny_model, acts, LabelSpec.make("capitalised"), "all", alpha=0.1, source="W_E")
    assert vocab.n_fit == tiny_model.d_vocab and np.all(np.isfinite(vocab.transfer.r2))
    # hook_embed rows are rows of W_E: the transferred score there is the probe's R² on W_E[corpus tokens]
    ids = acts.token_ids[~acts.bos_mask()]
    W = tiny_model.bridge.W_E.detach().numpy()
    y = np.array([c.isupper() for c in acts.raw_strings(ids)], dtype=float)
    pred = W[ids] @ vocab.coef + vocab.intercept
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert vocab.transfer.r2[0] == pytest.approx(r2, abs=1e-4)


def test_errors_name_the_fix(acts):
    with pytest.raises(LabelError, match="constant"):
        regression_data(acts, ["hook_embed"], LabelSpec.make("length"))  # every byte token has length 1
    with pytest.raises(ProbeError, match="selects no rows"):
        regression_data(acts, ["hook_embed"], POSITION, "match:§§")
    with pytest.raises(ProbeError, match="different widths"):
        regression_data(acts, ["hook_embed", "blocks.0.mlp.hook_post"], POSITION)
    with pytest.raises(HookError, match="not in cache entry"):
        regression_data(acts, ["blocks.0.hook_attn_out"], POSITION)
    with pytest.raises(ProbeError, match="no hooks"):
        regression_data(acts, [], POSITION)


def test_nan_activations_and_numeric_columns(tiny_model, store):
    docs = [f"Row {i} says hello to World {i % 7}" for i in range(30)]
    ds = make_dataset(DatasetSpec("texts", "rows"), docs, columns={"score": [i * 0.5 for i in range(30)]})
    entry, _ = build_cache(tiny_model, ds, ["hook_embed", "blocks.0.hook_resid_post"], store=store, max_len=16, max_tokens=None)
    acts = open_entry(store, entry.key)
    X, y, info = regression_data(acts, ["hook_embed"], LabelSpec.make("column", column="score"), "last")
    assert info.categories == () and np.allclose(y, acts.doc_index[acts.seq[info.rows]] * 0.5)
    before = run_regression(acts, ["blocks.0.hook_resid_post"], POSITION, "all", cv=3)
    arr = np.load(entry.path / next(p.name for p in entry.path.iterdir() if "resid_post" in p.name), mmap_mode="r+")
    arr[3, 5] = np.nan
    arr.flush()
    del arr
    X, _, _ = regression_data(acts, ["blocks.0.hook_resid_post"], POSITION)
    with pytest.raises(ProbeError, match=r"blocks\.0\.hook_resid_post.*float32"):
        X["blocks.0.hook_resid_post"]
    # The fit reads the stored arrays in place: a NaN is caught there too, also on a label change
    # that reuses the decompositions built before the value went bad.
    with pytest.raises(ProbeError, match=r"blocks\.0\.hook_resid_post.*float32"):
        run_regression(acts, ["blocks.0.hook_resid_post"], POSITION, "all", cv=3)
    with pytest.raises(ProbeError, match=r"blocks\.0\.hook_resid_post.*float32"):
        run_regression(acts, ["blocks.0.hook_resid_post"], LabelSpec.make("capitalised"), "all", cv=3,
                       decompositions=before.decompositions)


def test_embedding_regression_notes_instead_of_crashing(tiny_model):
    res = embedding_regression(tiny_model, length_threshold=3)
    by = {t.name: t for t in res.tasks}
    assert [t.name for t in res.tasks] == ["length", "length_no_space", "length (no outliers)",
                                           "length_no_space (no outliers)", "numeric_value"]
    # byte vocabulary: every token has length 1 except "<bos>" (5), which the threshold removes
    assert by["length"].note is None and by["length"].n_tokens == 257 and by["length"].y_true.size == by["length"].y_pred.size > 0
    assert "constant" in by["length (no outliers)"].note
    assert "gpt2" in by["numeric_value"].note
    assert len(res.table()) == 5 and res.d_vocab == 257


@pytest.mark.slow
def test_embedding_regression_on_smollm2(embedded_model):
    res = embedding_regression(embedded_model, tasks=("length", "numeric_value"))  # ~4 s after the model load
    by = {t.name: t for t in res.tasks}
    assert by["length"].note is None and by["length"].r2_test > 0.4 and by["length"].baseline_r2 < 0.05
    assert by["length"].y_true.shape == by["length"].y_pred.shape and by["length"].y_true.size > 5000
    assert by["numeric_value"].note and "gpt2" in by["numeric_value"].note


def test_label_param_coercion():
    assert parse_label_params(["max_length=15", "token= the", "allow_space=true", "x=1e3"]) == {
        "max_length": 15, "token": " the", "allow_space": True, "x": 1000.0}
    assert coerce_value("__import__('os')") == "__import__('os')"
    with pytest.raises(InputError):
        parse_label_params(["novalue"])


def test_cli_json_on_tiny_model(tmp_path, capsys):
    rc = main(["probe", "regression", "--model", "tiny", "--dataset", "pydoc", "--label", "position",
               "--hooks", "embed", "resid_pre", "--max-tokens", "600", "--max-len", "32", "--cv", "2",
               "--alphas", "0.1", "10", "--json", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads(out)
    assert doc["label"] == {"name": "position", "params": {}} and doc["alphas"] == [0.1, 10.0] and doc["cv_folds"] == 2
    assert [h["hook"] for h in doc["hooks"]] == ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    assert all(set(h) >= {"r2_train", "r2_test", "best_alpha", "baseline_r2"} for h in doc["hooks"])
    assert doc["hooks"][1]["r2_test"] > doc["hooks"][0]["r2_test"] and doc["manifest"]["split"]["seed"] == 0
    rc = main(["probe", "regression", "--model", "tiny", "--label", "regex", "--label-param", "pattern=[",
               "--hooks", "embed", "--max-tokens", "600", "--max-len", "32", "--cache-dir", str(tmp_path)])
    assert rc == 2 and "does not compile" in capsys.readouterr().err
