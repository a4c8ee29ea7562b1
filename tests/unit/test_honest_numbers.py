"""Issue 20: what is held out, what is chosen on what, and the baseline beside every score.

Every test here failed on the code before issue 20 (no type split, α/C chosen on or beside the test
rows, control task on the current token, no embed-only baseline, no n / intervals).
"""
from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.linear_model import LinearRegression

from probing_core.analyses import sparse
from probing_core.analyses.layer_probes import chance_note, parse_label, parse_positions, probe_layers
from probing_core.analyses.lens import logit_difference, next_token_topk
from probing_core.analyses.regression import embedding_regression, run_regression
from probing_core.cli import main
from probing_core.data.datasets import DatasetSpec, load_dataset, make_dataset
from probing_core.data.labels import LABELS, LabelSpec, number_token_counts
from probing_core.errors import LabelError
from probing_core.models import ModelSpec, load_model, tiny_native_config
from probing_core.solvers.ridge import fit_ridge_path, make_split
from probing_core.solvers.splits import accuracy_ci, bootstrap_r2_ci, bootstrap_r2_ci_many, grouped_blocks, r2_score, seen_in_training
from probing_core.store.activations import build_cache, open_entry
from probing_core.store.entries import ActivationStore


@pytest.fixture(scope="module")
def wide_acts(tmp_path_factory):
    """A tiny random model with d_model 128 over ~70 byte types: hook_embed can memorise every type."""
    model = load_model(ModelSpec.native(tiny_native_config(d_model=128)))
    store = ActivationStore(tmp_path_factory.mktemp("wide"))
    entry, _ = build_cache(model, load_dataset(DatasetSpec("pydoc")), model.hook_names(["embed", "resid_post"]),
                           store=store, max_len=64, max_tokens=3000)
    return open_entry(store, entry.key)


# ---------------------------------------------------------------------------------------------
# 1. Held-out R² on seen vs new token types
# ---------------------------------------------------------------------------------------------
def test_grouped_blocks_never_put_a_type_on_two_sides():
    g = np.random.default_rng(0).zipf(1.6, 3000) % 400
    block = grouped_blocks(g, test_fraction=0.2, cv=5, seed=3)
    assert set(np.unique(block)) == {0, 1, 2, 3, 4, 5}
    for b in range(6):
        assert not set(g[block == b]) & set(g[block != b])  # test set and every CV fold: new types only
    assert 0.1 < np.mean(block == 0) < 0.3
    assert not seen_in_training(g, block)[block == 0].any()
    rnd = make_split(g.size, test_fraction=0.2, cv=5, seed=3).block
    assert seen_in_training(g, rnd)[rnd == 0].mean() > 0.8  # a random split re-scores seen types


def test_label_decided_by_token_identity_scores_only_on_seen_types(wide_acts):
    # With random embeddings (a random model), "capitalised" is pure token identity: the probe can
    # only memorise which types are capitals. High on a random-token split, nothing on new types.
    label = LabelSpec.make("capitalised")
    assert LABELS["capitalised"].by_type and not LABELS["position"].by_type
    rand = run_regression(wide_acts, ["hook_embed"], label, cv=3, split_by="tokens")
    typed = run_regression(wide_acts, ["hook_embed"], label, cv=3)  # auto → by type
    r_rand = rand.result.r2_test[0, rand.result.best_index[0]]
    r_type = typed.result.r2_test[0, typed.result.best_index[0]]
    assert typed.split_by == "type" and rand.split_by == "tokens"
    assert r_rand > 0.8 and r_type < 0.1, (r_rand, r_type)
    assert typed.test_name == "new token types" and "seen" in rand.test_name
    ho = rand.held_out
    assert ho.n_seen + ho.n_new == rand.result.n_test and ho.n_seen > 10 * max(ho.n_new, 1)
    assert ho.r2[0] == pytest.approx(r_rand, abs=1e-4)  # the scored predictions are the table's probe
    assert typed.held_out.n_seen == 0 and typed.held_out.r2_new[0] == pytest.approx(r_type, abs=1e-4)
    assert rand.manifest["split"]["by"] == "tokens" and typed.manifest["split"]["n_test_seen_types"] == 0
    row = rand.table()[0]
    assert {"n_test", "r2_test_ci_low", "r2_test_ci_high", "r2_seen_types", "r2_new_types"} <= set(row)


def test_embedding_rows_are_types_so_the_random_split_is_by_type(embedded_model):
    strs = embedded_model.tokenizer.token_strings(list(range(embedded_model.d_vocab)))
    kept = [s for s in strs if isinstance(s, str) and s]
    assert len(set(kept)) == len(kept)  # one W_E row per token string: no type is in train and test


# ---------------------------------------------------------------------------------------------
# 2. Selection never reads the test rows
# ---------------------------------------------------------------------------------------------
def test_ridge_alpha_does_not_depend_on_test_labels():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 40)).astype(np.float32)
    y = X @ rng.normal(size=40) + rng.normal(scale=3.0, size=600)
    split = make_split(600, test_fraction=0.25, cv=5, seed=1)
    test = np.flatnonzero(split.block == 0)
    y2 = y.copy()
    y2[test] = rng.permutation(y[test]) * 5 + 100  # wreck the test labels
    a = fit_ridge_path({"h": X}, y, cv=5, test_fraction=0.25, seed=1)
    b = fit_ridge_path({"h": X}, y2, cv=5, test_fraction=0.25, seed=1)
    assert a.best_alpha[0] == b.best_alpha[0]
    assert a.r2_test[0, a.best_index[0]] != pytest.approx(b.r2_test[0, b.best_index[0]])


def test_embedding_regression_chooses_alpha_on_cv(embedded_model):
    assert inspect.signature(embedding_regression).parameters["cv"].default >= 2
    res = embedding_regression(embedded_model, tasks=("length",))
    t = res.tasks[0]
    assert np.isfinite(t.r2_cv_mean) and t.n_test > 0 and t.r2_test_ci[0] <= t.r2_test <= t.r2_test_ci[1]
    # the "OLS in-sample" figure is what its name says: least squares fit and scored on every row
    strs = embedded_model.tokenizer.token_strings(list(range(embedded_model.d_vocab)))
    W = embedded_model.bridge.W_E.detach().float().numpy()
    y = np.array([len(s) for s in strs], dtype=np.float64)
    ok = np.array([isinstance(s, str) and s != "" for s in strs])
    sk = LinearRegression().fit(W[ok].astype(np.float64), y[ok]).score(W[ok].astype(np.float64), y[ok])
    assert t.r2_ols_all == pytest.approx(sk, abs=2e-4)
    assert "r2_ols_all_rows (in-sample)" in res.table()[0]


def test_sparse_C_is_chosen_on_cv_not_test(tiny_model, tiny_entry):
    store, entry = tiny_entry
    acts = open_entry(store, entry.key)
    ctx = sparse.contexts_for(acts, tiny_model.tokenizer.encode, tiny_model.tokenizer.decode_tokens,
                              [["e"], ["a"]], before=2, after=0, whole_word_next=False, offset=-1)
    path = sparse.fit_sparse_path(sparse.features(acts, "blocks.1.mlp.hook_post", ctx), ctx, n_Cs=6)
    assert path.cv_accuracy is not None  # CV by default: C needs it
    k = sparse.chosen_index(path)
    scrambled = dataclasses.replace(path, test_accuracy=np.random.default_rng(0).permutation(path.test_accuracy[::-1]))
    assert sparse.chosen_index(scrambled) == k
    best = np.where(path.converged & path.cv_converged, path.cv_accuracy, -np.inf)
    assert path.cv_accuracy[k] == pytest.approx(best.max())


# ---------------------------------------------------------------------------------------------
# 3. Sparse: the embed-only and majority baselines, and the question asked
# ---------------------------------------------------------------------------------------------
def test_sparse_embed_only_baseline_at_the_class_token_and_before_it(tiny_model, tiny_entry):
    store, entry = tiny_entry
    acts = open_entry(store, entry.key)
    enc, dec = tiny_model.tokenizer.encode, tiny_model.tokenizer.decode_tokens
    out = {}
    for off in (0, -1):
        ctx = sparse.contexts_for(acts, enc, dec, [["e"], ["a"]], before=2, after=0, whole_word_next=False, offset=off)
        assert np.array_equal(ctx.feature_rows, ctx.rows + off)
        path = sparse.fit_sparse_path(sparse.features(acts, "blocks.1.mlp.hook_post", ctx), ctx, n_Cs=6)
        out[off] = (ctx, sparse.summarize(acts, "blocks.1.mlp.hook_post", ctx, path))
    ctx0, s0 = out[0]
    ctx1, s1 = out[-1]
    # At the class token the embedding alone says which token it is: the task is identity.
    assert s0.embed_best_accuracy == pytest.approx(1.0) and "identity" in s0.question
    # One token earlier the embedding holds the previous token only: far from perfect.
    assert s1.embed_best_accuracy < 0.9 and "next token will be" in s1.question
    for s in (s0, s1):
        labels = (ctx0 if s is s0 else ctx1).labels
        assert 0.5 <= s.majority < 1 and s.n_test > 0 and s.test_ci[0] <= s.test_accuracy <= s.test_ci[1]
        assert [r["probe"].split(" ")[0] for r in s.rows()] == ["blocks.1.mlp.hook_post", "embed", "embed", "majority"]
        assert s.majority == pytest.approx(np.bincount(labels).max() / labels.size, abs=0.05)
    with pytest.raises(LabelError, match="offset"):
        sparse.contexts_for(acts, enc, dec, [["e"], ["a"]], offset=1)
    assert set(sparse.PRESETS.values()) == {0, -1}


# ---------------------------------------------------------------------------------------------
# 4. Selectivity: the control task maps the type of the token the label is about
# ---------------------------------------------------------------------------------------------
def test_control_task_on_the_token_two_back_gives_positive_selectivity(tmp_path):
    # 94 characters in one fixed cycle: the token two back is decided by the current token, so
    # hook_embed solves "token at -2" (5 kept classes) outright. A control that gives every type at
    # -2 (all 94) a random class needs memorising 94 points in 16 dimensions: it cannot.
    # (The old control used the current token's 5 types: as easy as the task, selectivity ≈ 0.)
    model = load_model(ModelSpec.native(tiny_native_config(d_model=16)))
    alphabet = "".join(chr(c) for c in range(33, 127))
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(60):
        s = int(rng.integers(len(alphabet)))
        docs.append("".join(alphabet[(s + j) % len(alphabet)] for j in range(60)))
    store = ActivationStore(tmp_path / "s")
    entry, _ = build_cache(model, make_dataset(DatasetSpec("texts", "cycle"), docs), ["hook_embed"], store=store,
                           max_len=64, max_tokens=None)
    res = probe_layers(open_entry(store, entry.key), ["hook_embed"], parse_label("token-offset:-2", top_k=5),
                       parse_positions("all"))
    assert res.test_accuracy[0, 0] > 0.9
    assert res.selectivity[0] > 0.3, (res.test_accuracy, res.control_accuracy)
    assert any("types of the token the label is about" in n for n in res.notes)
    assert f"{res.chance[0]:.3f}" in chance_note(res) and "measured" in chance_note(res)
    json.dumps(res.to_json())


# ---------------------------------------------------------------------------------------------
# 5. Small things
# ---------------------------------------------------------------------------------------------
def test_number_token_counts_come_from_the_vocabulary(embedded_model):
    strs = embedded_model.tokenizer.token_strings(list(range(embedded_model.d_vocab)))
    plain, spaced = number_token_counts([s for s in strs if isinstance(s, str) and s])
    res = embedding_regression(embedded_model, tasks=("numeric_value",))
    assert res.number_tokens == (plain, spaced) and plain <= spaced
    assert f"only {plain} number tokens" in res.tasks[0].note and f"{spaced} with a leading space" in res.tasks[0].note


def test_lens_logits_are_labelled_centred_and_bos_is_an_option(tiny_model, capsys):
    res = next_token_topk(tiny_model, "hello world", k=3)
    assert "logit (centred)" in res.rows()[0] and res.prepend_bos
    import torch

    ids = tiny_model.encode("hello world", prepend_bos=True)
    assert float(tiny_model.logits(torch.tensor([ids]))[0, -1].mean()) == pytest.approx(0.0, abs=1e-4)
    with_bos = logit_difference(tiny_model, ["hello world"], ("a", "b"))
    no_bos = logit_difference(tiny_model, ["hello world"], ("a", "b"), prepend_bos=False)
    assert with_bos.n_tokens[0] == no_bos.n_tokens[0] + 1 and not no_bos.prepend_bos
    assert with_bos.logit_diff[0] != pytest.approx(no_bos.logit_diff[0], abs=1e-6)
    assert main(["lens", "--model", "tiny", "--prompt", "hello", "--no-bos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prepend_bos"] is False and len(out["next_token"]["tokens"]) == len("hello")


# ---------------------------------------------------------------------------------------------
# 6. Uncertainty: n and intervals
# ---------------------------------------------------------------------------------------------
def test_wilson_interval_matches_scipy_and_bootstrap_covers_r2():
    lo, hi = accuracy_ci(50, 54)
    ref = binomtest(50, 54).proportion_ci(confidence_level=0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert tuple(accuracy_ci(21, 21)) == pytest.approx(tuple(binomtest(21, 21).proportion_ci(method="wilson")), abs=1e-9)
    rng = np.random.default_rng(0)
    y = rng.normal(size=200)
    pred = y + rng.normal(scale=0.7, size=200)
    a, b = bootstrap_r2_ci(y, pred)
    assert a < r2_score(y, pred) < b and b - a < 0.5
    small = bootstrap_r2_ci(y[:20], pred[:20])
    assert small[1] - small[0] > b - a  # fewer rows, wider interval
    # several probes at once (the regression page's path): the same intervals up to resampling noise
    many = bootstrap_r2_ci_many(y, np.stack([pred, y + rng.normal(scale=0.3, size=200)]))
    assert many[0] == pytest.approx((a, b), abs=0.04) and many[1, 0] > many[0, 1]
