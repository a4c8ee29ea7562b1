"""The Sparse page's whole-path fit (issue 16): a C move is a lookup that gives what a fit at that C gives."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from probing_core.analyses import sparse
from probing_core.errors import LabelError
from probing_core.solvers.logistic_path import fit_logistic_path
from probing_core.store.activations import open_entry

HOOK = "blocks.1.mlp.hook_post"


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_entry):
    store, entry = tiny_entry
    acts = open_entry(store, entry.key)
    q = sparse.SparseQuery((("e",), ("a",)), before=2, after=0, whole_word_next=False, max_per_class=None, offset=-1)
    ctx = sparse.mine(acts, tiny_model.tokenizer, q)
    return acts, q, ctx, sparse.fit_sparse(acts, HOOK, ctx, q)


def test_query_mines_what_contexts_for_mines(tiny_model, setup):
    acts, _q, ctx, _ = setup
    direct = sparse.contexts_for(acts, tiny_model.tokenizer.encode, tiny_model.tokenizer.decode_tokens, [["e"], ["a"]],
                                 before=2, after=0, whole_word_next=False, offset=-1)
    assert np.array_equal(ctx.rows, direct.rows) and np.array_equal(ctx.labels, direct.labels)
    assert sparse.parse_classes(" the", " an, a") == ((" the",), (" an", " a"))
    counts, samples = sparse.context_tables(ctx)
    assert [r["kept"] for r in counts] == list(ctx.counts.values()) and all("⟦" in r["example (target in ⟦ ⟧)"] for r in samples)


def test_control_along_the_path_equals_the_control_task_at_each_C(setup):
    """The control task fitted once along the path gives, at every step, what the one-C control task gives."""
    _acts, _q, ctx, fit = setup
    path = fit.path
    for k in (0, len(path.Cs) // 2, len(path.Cs) - 1):
        one = sparse.control_task(fit.X, ctx, path, float(path.Cs[k]))
        at = fit.control(k)
        n_test = len(path.test_idx)
        # same objective, split and certified tolerance: the same test predictions, up to one borderline row
        assert at.accuracy == pytest.approx(one.accuracy, abs=1.01 / n_test)
        assert at.control_accuracy == pytest.approx(one.control_accuracy, abs=1.01 / n_test)
        assert at.control_chance == pytest.approx(one.control_chance)
        assert at.selectivity == pytest.approx(at.accuracy - at.control_accuracy)


def test_summary_at_each_step_matches_summarize_and_the_embed_fits(setup):
    acts, _q, ctx, fit = setup
    path = fit.path
    assert np.array_equal(fit.embed_same.Cs, path.Cs)  # "embed only, same C": the same C values and split
    assert np.array_equal(fit.embed_same.test_idx, path.test_idx)
    direct = fit_logistic_path(sparse.features(acts, "hook_embed", ctx), ctx.labels, Cs=path.Cs, test_fraction=0.3)
    assert np.allclose(fit.embed_same.test_accuracy, direct.test_accuracy)
    for k in (0, sparse.chosen_index(path), len(path.Cs) - 1):
        s = fit.summary(k)
        assert s == sparse.summarize(acts, HOOK, ctx, path, k=k, embed_path=fit.embed_same, embed_best=fit.embed_best)
        assert s.C == path.Cs[k] and s.embed_accuracy == fit.embed_same.test_accuracy[k]
        assert s.embed_best_C == fit.embed_best.Cs[sparse.chosen_index(fit.embed_best)]
        assert fit.neurons(k) == sparse.neuron_table(fit.X, ctx, path, k)
        assert fit.report(k) == sparse.report_at(fit.X, ctx, path, k)


def test_the_embed_baseline_does_not_depend_on_the_hook(setup):
    """A hook change reuses the embed-only baseline (its own grid, C on CV): fitting it per hook gives the same."""
    acts, q, ctx, fit = setup
    other = sparse.fit_sparse(acts, "blocks.0.mlp.hook_post", ctx, q, embed_best=fit.embed_best)
    fresh = sparse.fit_sparse(acts, "blocks.0.mlp.hook_post", ctx, q)
    assert other.embed_best is fit.embed_best
    assert np.array_equal(fresh.embed_best.test_accuracy, fit.embed_best.test_accuracy)
    assert np.array_equal(fresh.embed_best.Cs, fit.embed_best.Cs)
    assert fresh.summary(3).embed_best_accuracy == fit.summary(3).embed_best_accuracy


def test_a_fit_does_not_depend_on_what_was_fitted_before(setup):
    """No warm start across states: the same query after another one gives the same path."""
    acts, q, ctx, fit = setup
    sparse.fit_sparse(acts, "blocks.0.mlp.hook_post", ctx, q)
    again = sparse.fit_sparse(acts, HOOK, ctx, q)
    assert np.array_equal(again.path.coefs, fit.path.coefs)
    assert np.array_equal(again.controls.control_accuracy, fit.controls.control_accuracy)


def test_step_warnings_say_when_a_score_rests_on_too_few_rows_or_did_not_converge(setup):
    _, _, _, fit = setup
    path = fit.path
    n_test = len(path.test_idx)
    assert n_test < sparse.MIN_TEST  # 3,000 tokens of a byte-level model
    k = sparse.chosen_index(path)
    msgs = sparse.step_warnings(path, k)
    assert any(f"Only {n_test} held-out contexts" in m for m in msgs)
    unconverged = dataclasses.replace(path, converged=np.zeros_like(path.converged), test_idx=np.arange(400))
    msgs = sparse.step_warnings(unconverged, k)
    assert len(msgs) == 1 and msgs[0].startswith(f"Not converged at C = {path.Cs[k]:.4g}")


def test_a_control_task_that_cannot_be_formed_is_said_at_lookup(setup):
    acts, q, ctx, _ = setup
    one_type = dataclasses.replace(ctx, next_ids=np.zeros_like(ctx.next_ids))  # every next word the same type
    fit = sparse.fit_sparse(acts, HOOK, one_type, q)
    assert fit.controls is None
    with pytest.raises(LabelError, match="control task"):
        fit.control(0)
    assert fit.summary(0).n_test == len(fit.path.test_idx)  # the rest of the page still works


def test_all_layers_at_one_C(setup):
    acts, q, ctx, fit = setup
    hooks = sparse.same_family(sparse.probe_hooks(acts.hooks), HOOK)
    assert hooks == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    C = float(fit.path.Cs[sparse.chosen_index(fit.path)])
    seen = []
    pts = sparse.layer_points(acts, hooks, ctx, C, q, progress=lambda f, m: seen.append(f))
    assert [p.hook for p in pts] == hooks and seen == [0.5, 1.0]
    assert pts[1].test_accuracy == pytest.approx(sparse.fit_hook_at_C(acts, HOOK, ctx, C).test_accuracy)


def test_marking_the_current_C_equals_building_the_figure_with_it(setup):
    """The page builds the path figure once and marks each C step on a copy: same figure, base unchanged."""
    from probing_core.plots import sparse as plots

    _, _, _, fit = setup
    path = fit.path
    base = plots.density_vs_C(path)
    assert not base.layout.shapes
    for k in (0, 5):
        C = float(path.Cs[k])
        marked = plots.mark_current_C(base, C)
        assert sorted((s.xref, s.x0, s.yref) for s in marked.layout.shapes) == sorted(
            [("x", pytest.approx(1 / C), "y domain"), ("x2", pytest.approx(C), "y3 domain")])
        m, b = json.loads(marked.to_json()), json.loads(base.to_json())
        assert m["data"] == b["data"] and {k: v for k, v in m["layout"].items() if k != "shapes"} == b["layout"]
    assert not base.layout.shapes  # the shared base figure is never changed


def test_parallel_fits_give_the_sequential_numbers_and_leave_no_thread(setup, monkeypatch):
    """fit_sparse runs its independent fits on one thread per core: the same numbers as one after the other
    (PROBING_THREADS=1), the same grid as fit_sparse_path picks, and no worker thread left running."""
    import threading

    acts, q, ctx, fit = setup
    monkeypatch.setenv("PROBING_THREADS", "1")
    one = sparse.fit_sparse(acts, HOOK, ctx, q)
    monkeypatch.setenv("PROBING_THREADS", "2")
    two = sparse.fit_sparse(acts, HOOK, ctx, q)
    assert not [t for t in threading.enumerate() if t.name.startswith("sparse-fit")]
    assert np.array_equal(two.path.Cs, sparse.fit_sparse_path(two.X, ctx).Cs)
    for a, b in ((one.path, two.path), (one.embed_same, two.embed_same), (one.embed_best, two.embed_best)):
        assert np.allclose(a.coefs, b.coefs, atol=1e-5) and np.allclose(a.test_accuracy, b.test_accuracy)
    assert np.allclose(one.path.cv_accuracy, two.path.cv_accuracy)
    assert np.allclose(one.controls.control_accuracy, two.controls.control_accuracy)
    assert np.allclose(fit.controls.control_accuracy, two.controls.control_accuracy)


def test_the_fold_jobs_give_the_one_call_cv_path_and_embed_baseline(setup):
    """fit_sparse fits the path's CV folds (and the embed-only baseline's) as separate jobs: the same path, CV fields
    and chosen C as fit_sparse_path with its CV in one call, and the same baseline as fit_embed_baseline."""
    acts, _q, ctx, fit = setup
    one = sparse.fit_sparse_path(fit.X, ctx)
    for f in ("Cs", "coefs", "test_accuracy", "cv_accuracy", "cv_selection_frequency", "cv_converged"):
        assert np.array_equal(getattr(fit.path, f), getattr(one, f)), f
    assert sparse.chosen_index(fit.path) == sparse.chosen_index(one)
    base = sparse.fit_embed_baseline(acts, ctx)
    for f in ("Cs", "coefs", "test_accuracy", "cv_accuracy", "cv_converged"):
        assert np.array_equal(getattr(fit.embed_best, f), getattr(base, f)), f
