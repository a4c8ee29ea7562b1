"""Core helpers the thin pages call (issue 19): what the Regression, Logit lens and Interventions pages used to
compute inline, now in the core — checked against the inline computations they replace, on tiny real models."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from probing_core.analyses import directions as dirs
from probing_core.analyses import interventions as iv
from probing_core.analyses import lens
from probing_core.analyses import regression as reg
from probing_core.data.labels import LabelSpec
from probing_core.errors import InputError
from probing_core.plots import regression as reg_plots
from probing_core.solvers.ridge import DEFAULT_ALPHAS
from probing_core.store.activations import open_entry

RESID = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def acts(tiny_entry):
    return open_entry(tiny_entry[0], tiny_entry[1].key)  # (store, entry) of conftest's tiny entry


@pytest.fixture(scope="module")
def run(acts):
    return reg.run_regression(acts, RESID, LabelSpec.make("position"), "all", cv=3, seed=0)


# ---- regression --------------------------------------------------------------------------------


def test_alpha_labels_are_url_safe_and_give_back_the_grid_exactly():
    grid = reg.alpha_labels()
    assert list(grid.values()) == [float(a) for a in DEFAULT_ALPHAS]  # every α, in order, none merged
    assert "1e6" in grid and "0.001" in grid and not any("+" in k for k in grid)
    assert reg.alpha_labels([1e6, 2e10, 0.5]) == {"1e6": 1e6, "2e10": 2e10, "0.5": 0.5}


def test_default_families_prefer_the_residual_stream_then_the_first(tiny_model, acts):
    fams = reg.families_present(tiny_model, acts.hooks)
    assert reg.default_families(fams) == [f for f in ("embed", "resid_pre", "resid_mid", "resid_post") if f in fams]
    assert reg.default_families({"mlp_post": ["x"], "attn_out": ["y"]}) == ["mlp_post"]
    assert reg.default_families({}) == []


@pytest.mark.parametrize("alpha_index", [None, 0, 19])
def test_best_row_is_the_row_pandas_idxmax_picked(run, alpha_index):
    """The page used ``table.loc[table[score].idxmax()]``; best_row must pick the same row."""
    table = pd.DataFrame(run.table(alpha_index))
    want = table.loc[table[run.score_name].idxmax()].to_dict()
    got = run.best_row(alpha_index)
    assert got["hook"] == want["hook"] and got[run.score_name] == pytest.approx(want[run.score_name])
    assert run.score_name == "r2_cv_mean"  # cv=3: α chosen on CV folds


def test_best_row_with_every_score_nan_is_the_first_row_not_an_error(acts):
    run0 = reg.run_regression(acts, RESID[:2], LabelSpec.make("position"), "all", cv=0, test_fraction=0.2)
    assert run0.score_name == "r2_test"
    nan = replace(run0, result=replace(run0.result, r2_test=np.full_like(run0.result.r2_test, np.nan)))
    assert np.isnan([r["r2_test"] for r in nan.table()]).all()
    assert nan.best_row()["hook"] == RESID[0]


def test_notes_say_how_many_test_rows_and_what_is_held_out(run):
    best = run.best_row()
    note = run.test_note(best)
    assert note.startswith(f"n = {run.result.n_test:,} test rows (95 % CI ")
    lo, hi = (float(x) for x in note.split("CI ")[1].rstrip(")").split("…"))
    assert lo == pytest.approx(best["r2_test_ci_low"], abs=0.006) and hi == pytest.approx(best["r2_test_ci_high"], abs=0.006)
    assert run.test_note(run.best_row(3)) == f"n = {run.result.n_test:,} test rows"  # one α for all: no interval
    held = run.held_out_note()
    assert held.startswith(reg.SPLITS[run.split_by]) and "the CV folds of the training rows" in held
    assert f"of new types {run.held_out.n_new:,}" in held and held.endswith("(table: R² on each).")


def test_remember_decompositions_keeps_the_latest_first_and_feeds_the_next_fit(acts):
    kept: list = []
    fit = {"cv": 2, "split_by": "tokens"}
    first = reg.remember_decompositions(kept, reg.run_regression(acts, RESID[:2], LabelSpec.make("position"), **fit), keep=2)
    assert kept == [first.decompositions]
    assert reg.remember_decompositions(kept, first, keep=2) is first and len(kept) == 1  # already held: unchanged
    second = reg.run_regression(acts, RESID[:2], LabelSpec.make("capitalised"), **fit, decompositions=kept)
    assert all(second.result.decompositions[h] is first.result.decompositions[h] for h in RESID[:2])  # reused
    other = reg.run_regression(acts, RESID[:2], LabelSpec.make("position"), cv=2, seed=5)
    third = reg.run_regression(acts, RESID[:2], LabelSpec.make("position"), cv=3, seed=6)
    reg.remember_decompositions(kept, other, keep=2)
    reg.remember_decompositions(kept, third, keep=2)
    assert kept == [third.decompositions, other.decompositions]  # bounded, newest first


def test_embedding_description_follows_the_settings(tiny_model):
    emb = reg.embedding_regression(tiny_model, ["length"], cv=5, test_fraction=0.2)
    text = emb.describe()
    assert text.startswith(f"W_E: {emb.d_vocab:,} tokens × {emb.d_model} dims;") and "the 20 % test rows" in text
    assert "α chosen on 5-fold CV of the training rows" in text
    assert text.endswith(f"{emb.number_tokens[0]} all-digit, {emb.number_tokens[1]} with a leading space allowed.")
    no_cv = reg.embedding_regression(tiny_model, ["length"], cv=0, test_fraction=0.25).describe()
    assert "the 25 % test rows" in no_cv and "the test split (no CV: optimistic)" in no_cv


def test_run_r2_curve_draws_what_the_page_drew_by_hand(run):
    ho = run.held_out
    for ai in (None, 4):
        want = reg_plots.r2_curve(run.result, ai, title="t", test_name=run.test_name, test_ci=ho.r2_ci,
                                  new_types=None if run.split_by == "type" else ho.r2_new)
        assert reg_plots.run_r2_curve(run, ai, title="t").to_dict() == want.to_dict()


# ---- logit lens --------------------------------------------------------------------------------


def test_first_k_equals_asking_for_k(tiny_model):
    full = lens.next_token_topk(tiny_model, "hello wor", k=20, answer="l")
    for k in (1, 5, 20):
        want = lens.next_token_topk(tiny_model, "hello wor", k=k, answer="l")
        got = full.first(k)
        assert [r["token_id"] for r in got.rows()] == [r["token_id"] for r in want.rows()]
        np.testing.assert_allclose(got.top_probs, want.top_probs, rtol=1e-5)
        assert got.answer_rank == want.answer_rank and got.tokens == want.tokens


def test_lens_summary_final_row_is_the_models_own_top1(tiny_model):
    res = lens.logit_lens(tiny_model, "hello world", k=3)
    s = res.summary()
    assert s["layers"] == res.labels and s["tokens"] == res.tokens and len(s["final_top1"]) == len(res.tokens)
    assert s["final_top1"][-1] == lens.next_token_topk(tiny_model, "hello world", k=1).top_tokens[0]


def test_attribution_adds_up_and_says_so(tiny_model):
    ps = lens.parse_prompt_lines('abc | "d" | "x"\nhello | "!" | "?"')
    ld, at = lens.logit_difference(tiny_model, ps), lens.logit_attribution(tiny_model, ps)
    assert at.adds_up == (at.max_abs_error <= 1e-3 * max(1.0, abs(at.model_logit_diff))) and at.adds_up
    assert at.sum_message() == "The per-layer components add up to the model's logit difference."
    ci = ld.logit_diff_ci
    assert ld.n_note() == f"n = 2 prompts; 95 % bootstrap CI {ci[0]:.3f}…{ci[1]:.3f}"
    one = lens.logit_difference(tiny_model, lens.parse_prompt_lines('abc | "d" | "x"'))
    assert one.n_note() == "n = 1 prompts"


# ---- interventions -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mass_mean", "logistic", "ridge"])
def test_direction_from_entry_equals_the_makers_on_the_same_rows(tiny_model, acts, method):
    hook, label = "blocks.0.hook_resid_post", LabelSpec.make("capitalised")
    d, rows, y = dirs.direction_from_entry(acts, hook, label, "all", method, model_key=tiny_model.key)
    X, y2, info = reg.regression_data(acts, [hook], label, "all")
    np.testing.assert_array_equal(rows, info.rows)
    np.testing.assert_array_equal(y, y2)
    make = {"mass_mean": dirs.mass_mean_direction, "logistic": dirs.logistic_direction, "ridge": dirs.ridge_direction}[method]
    extra = {} if method == "ridge" else {"positive": y2.max()}
    want = make(X[hook], y2, model_key=tiny_model.key, hook=hook, description=f"{method} of {info.description}", **extra)
    np.testing.assert_allclose(d.vector, want.vector, rtol=1e-5, atol=1e-7)
    assert d.description == want.description and d.proj_std == pytest.approx(want.proj_std)


def test_neuron_sets_and_methods_by_hook(tiny_model, acts):
    hook = "blocks.1.mlp.hook_post"
    assert dirs.methods_at(hook) == ["mass_mean", "logistic", "ridge", "neurons"]
    assert dirs.methods_at("blocks.1.hook_resid_post") == ["mass_mean", "logistic", "ridge"]
    d, rows, _ = dirs.direction_from_entry(acts, hook, LabelSpec.make("capitalised"), "all", "neurons",
                                           model_key=tiny_model.key, neurons=(3, 5))
    assert d.is_neuron_set and d.neurons == (3, 5) and d.description == "2 neurons"
    X = np.asarray(acts.hook(hook)[rows], np.float32)
    assert d.neuron_means == pytest.approx(tuple(X.mean(0, dtype=np.float64)[[3, 5]]), rel=1e-5)
    with pytest.raises(InputError, match="unknown method"):
        dirs.direction_from_data("pca", X, np.zeros(len(X)), model_key=tiny_model.key, hook=hook)


def test_kinds_answer_pairs_and_readout_inputs(tiny_model, acts):
    d, _, _ = dirs.direction_from_entry(acts, "blocks.0.hook_resid_post", LabelSpec.make("capitalised"), "all",
                                        "mass_mean", model_key=tiny_model.key)
    assert iv.kinds_for(d) == ("steer", "ablate", "mean_ablate")
    assert iv.kinds_for(dirs.neuron_direction([1], model_key="m", hook="h", width=4)) == iv.NEURON_KINDS
    for kind in iv.kinds_for(d):  # every kind offered is one check_intervention accepts for it
        iv.check_intervention(d, iv.Intervention(kind, "all", 1.0))
    assert iv.parse_answer_pair(" True | False") == (" True", " False")
    assert iv.parse_answer_pair(" True") is None and iv.parse_answer_pair("a|b|c") is None
    assert iv.parse_readout("0, 1, 2", "") == ([0, 1, 2], None)
    assert iv.parse_readout("0, 1", "0.5, -1") == ([0, 1], [0.5, -1.0])
    with pytest.raises(InputError, match="3 neurons but 2 coefficients"):
        iv.parse_readout("0, 1, 2", "0.5, 2")
    with pytest.raises(InputError, match="not a number"):
        iv.parse_readout("0, 1", "0.5, x")
