"""Interventions: steering, ablation and neuron patches on tiny real models, checked by hand computations."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from scipy import stats

from probing_core.analyses import amnesic
from probing_core.analyses import interventions as iv
from probing_core.analyses.regression import regression_data
from probing_core.data.datasets import DatasetSpec, load_dataset
from probing_core.data.labels import LabelSpec
from probing_core.data.statements import STATEMENT_SETS, load_statements, statements_spec
from probing_core.errors import DatasetError, HookError, InputError, ProbeError
from probing_core.store.activations import open_entry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK = "blocks.0.hook_resid_post"
LAST = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def acts(tiny_entry):
    store, entry = tiny_entry
    return open_entry(store, entry.key)


@pytest.fixture(scope="module")
def space_data(acts):
    """Rows and a binary label (the token is a space) with activations at HOOK and LAST."""
    rows = np.flatnonzero(acts.pos > 0)[:1500]
    y = (acts.token_ids[rows] == ord(" ")).astype(np.int64)
    return rows, y


@pytest.fixture(scope="module")
def mass_mean(tiny_model, acts, space_data):
    rows, y = space_data
    X = np.asarray(acts.hook(HOOK)[rows], np.float32)
    return iv.mass_mean_direction(X, y, model_key=tiny_model.key, hook=HOOK)


def _bare(model, ids):
    with model.lock, torch.inference_mode():
        return model.bridge(torch.tensor([ids])).float()


# ---- no-ops are bit for bit ----------------------------------------------------------------------


def test_c_zero_and_empty_neuron_set_give_the_unmodified_forward_bit_for_bit(tiny_model, mass_mean):
    ids = tiny_model.encode("The cat sat on the mat.")
    bare = _bare(tiny_model, ids)
    out = iv.run_intervened(tiny_model, torch.tensor([ids]), mass_mean, iv.Intervention("steer", "all", 0.0))
    assert torch.equal(out, bare)
    empty = iv.neuron_direction([], model_key=tiny_model.key, hook="blocks.0.mlp.hook_post", width=tiny_model.d_mlp)
    for kind in ("neuron_zero", "neuron_value"):
        out = iv.run_intervened(tiny_model, torch.tensor([ids]), empty, iv.Intervention(kind, "all", value=3.0))
        assert torch.equal(out, bare)
    eff = iv.intervene_prompt(tiny_model, "The cat sat on the mat.", mass_mean, iv.Intervention("steer", "all", 0.0),
                              answers=(" ", "e"), k_controls=3)
    assert eff.kl == 0.0 and eff.logit_diff_after == eff.logit_diff_before
    # and a nonzero c does change it (so the comparison above can fail)
    out = iv.run_intervened(tiny_model, torch.tensor([ids]), mass_mean, iv.Intervention("steer", "all", 1.0))
    assert not torch.equal(out, bare)


# ---- directional ablation ------------------------------------------------------------------------


def test_directional_ablation_zeroes_the_projection_and_a_probe_along_it_is_at_chance(tiny_model, acts, space_data, mass_mean):
    from sklearn.linear_model import LogisticRegression

    rows, y = space_data
    u = torch.from_numpy(mass_mean.unit)
    seqs = np.unique(acts.seq[rows])[:12]
    token_rows = amnesic.entry_token_rows(acts, seqs=seqs)
    before, after, labels = [], [], []
    ablate = iv.Intervention("ablate", "all")
    for r in token_rows:
        mask = iv.position_mask(tiny_model, r.tolist(), "all")
        b = iv._rows_batch(tiny_model, mass_mean, ablate, mask)
        with tiny_model.lock, torch.inference_mode():
            _, c0 = tiny_model.bridge.run_with_cache(torch.from_numpy(r)[None], names_filter=lambda n: n == HOOK)
            with tiny_model.bridge.hooks(fwd_hooks=[(HOOK, iv._hook_fn(b))]):
                _, c1 = tiny_model.bridge.run_with_cache(torch.from_numpy(r)[None], names_filter=lambda n: n == HOOK)
        before.append(c0[HOOK][0, 1:].float() @ u)
        after.append(c1[HOOK][0, 1:].float() @ u)
        labels.append(r[1:] == ord(" "))
    before, after, yy = torch.cat(before).numpy(), torch.cat(after).numpy(), np.concatenate(labels).astype(int)
    assert np.abs(after).max() < 1e-5 * max(1.0, np.abs(before).max())
    chance = max(yy.mean(), 1 - yy.mean())
    acc_before = LogisticRegression().fit(before[:, None], yy).score(before[:, None], yy)
    acc_after = LogisticRegression().fit(after[:, None], yy).score(after[:, None], yy)
    assert acc_before > chance + 0.05  # the direction carried the label …
    assert acc_after == pytest.approx(chance, abs=1e-9)  # … and after ablation a probe along it is at chance


def test_mean_ablation_sets_the_projection_to_its_dataset_mean(tiny_model, mass_mean):
    ids = tiny_model.encode("Mean ablation test.")
    b = iv._rows_batch(tiny_model, mass_mean, iv.Intervention("mean_ablate", "all"), iv.position_mask(tiny_model, ids, "all"))
    x = torch.randn(1, len(ids), tiny_model.d_model)
    y = iv._apply(x, b)
    proj = (y[0, 1:] @ torch.from_numpy(mass_mean.unit)).numpy()
    np.testing.assert_allclose(proj, mass_mean.proj_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[0, 0], x[0, 0])  # BOS untouched under "all"


# ---- steering at the last layer: logits change by exactly c·σ·d̂ through the final norm and W_U ----


def test_steering_at_the_last_layer_matches_a_hand_computation(tiny_model, mass_mean, acts, space_data):
    rows, y = space_data
    d = iv.mass_mean_direction(np.asarray(acts.hook(LAST)[rows]), y, model_key=tiny_model.key, hook=LAST)
    ids = tiny_model.encode("Steering by hand.")
    c = 2.5
    out = iv.run_intervened(tiny_model, torch.tensor([ids]), d, iv.Intervention("steer", "all", c))
    b = tiny_model.bridge
    with torch.inference_mode():
        _, cache = b.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n == LAST)
        x = cache[LAST][0].double()
        W_U, b_U, eps = b.W_U.double(), b.b_U.double(), b.cfg.eps

        def final(r):  # compatibility mode: ln_final's weights are folded into W_U, so it centres and scales
            r = r - r.mean(-1, keepdim=True)
            return r / (r.pow(2).mean(-1, keepdim=True) + eps).sqrt()

        add = torch.zeros_like(x)
        add[1:] = c * d.proj_std * torch.from_numpy(d.unit).double()
        hand_before = final(x) @ W_U + b_U
        hand_after = final(x + add) @ W_U + b_U
        delta_hand = (final(x + add) - final(x)) @ W_U
    torch.testing.assert_close(out[0].double(), hand_after, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close((out[0].double() - _bare(tiny_model, ids)[0].double()), delta_hand, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(_bare(tiny_model, ids)[0].double(), hand_before, atol=2e-4, rtol=1e-4)


# ---- controls -------------------------------------------------------------------------------------


def test_random_controls_are_reproducible_by_seed_and_batched_rows_equal_single_runs(tiny_model, mass_mean):
    R1, R2, R3 = iv.random_directions(32, 5, seed=7), iv.random_directions(32, 5, seed=7), iv.random_directions(32, 5, seed=8)
    np.testing.assert_array_equal(R1, R2)
    assert not np.allclose(R1, R3)
    np.testing.assert_allclose(np.linalg.norm(R1, axis=1), 1.0, rtol=1e-6)
    step = iv.Intervention("steer", "last:3", 4.0)
    e1 = iv.intervene_prompt(tiny_model, "The cat sat.", mass_mean, step, answers=(" ", "e"), k_controls=5, seed=7)
    e2 = iv.intervene_prompt(tiny_model, "The cat sat.", mass_mean, step, answers=(" ", "e"), k_controls=5, seed=7)
    np.testing.assert_array_equal(e1.control_logit_diff, e2.control_logit_diff)
    # control row k of the batch = a single forward steered along random direction k with the same added norm
    ids = tiny_model.encode("The cat sat.")
    for k in (0, 4):
        dk = iv.weights_direction(R1[k], model_key=tiny_model.key, hook=HOOK)
        dk = iv.Direction(**{**dk.__dict__, "proj_std": mass_mean.proj_std})
        lg = iv.run_intervened(tiny_model, torch.tensor([ids]), dk, step)[0, -1]
        a, b = tiny_model.encode(" ", False)[0], tiny_model.encode("e", False)[0]
        assert float(lg[a] - lg[b]) == pytest.approx(float(e1.control_logit_diff[k]), abs=1e-4)


def test_percentile_and_z_score_against_the_controls():
    c = np.array([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    for v in (5.0, 0.0, 10.5, 7.3):
        cmp = iv.compare_with_controls(v, c)
        assert cmp.percentile == pytest.approx(stats.percentileofscore(c, v, kind="mean"))
        assert cmp.z == pytest.approx((v - c.mean()) / c.std(ddof=1))
        assert cmp.inside_band == (1 <= v <= 10)
    assert "inside the random band" in iv.compare_with_controls(5.0, c).summary()


def test_neuron_patch_sets_exactly_the_chosen_coordinates(tiny_model):
    hook = "blocks.0.mlp.hook_post"
    d = iv.neuron_direction([3, 17], model_key=tiny_model.key, hook=hook, width=tiny_model.d_mlp)
    ids = tiny_model.encode("neurons")
    b = iv._rows_batch(tiny_model, d, iv.Intervention("neuron_value", "last", value=2.5), iv.position_mask(tiny_model, ids, "last"))
    x = torch.randn(1, len(ids), tiny_model.d_mlp)
    y = iv._apply(x, b)
    expect = x.clone()
    expect[0, -1, [3, 17]] = 2.5
    torch.testing.assert_close(y, expect)


# ---- neuron read-out and mass-mean against direct computations --------------------------------------


def test_neuron_readout_equals_W_out_times_W_U(tiny_model):
    r = iv.neuron_readout(tiny_model, 1, [0, 5, 100], k=4, coefs=[0.5, -1.0, 2.0])
    direct = (tiny_model.bridge.W_out[1][[0, 5, 100]] @ tiny_model.bridge.W_U).detach().numpy()
    np.testing.assert_allclose(r.logits, direct, rtol=1e-5, atol=1e-6)
    top = np.argsort(-direct, axis=1)[:, :4]
    np.testing.assert_allclose(r.top_values, np.take_along_axis(direct, top, 1), rtol=1e-5)
    np.testing.assert_allclose(r.bottom_values, np.sort(direct, axis=1)[:, :4], rtol=1e-5)
    assert r.rows()[1]["probe_coef"] == -1.0


def test_mass_mean_equals_numpy_difference_of_class_means(tiny_model, acts, space_data, mass_mean):
    rows, y = space_data
    X = np.asarray(acts.hook(HOOK)[rows], np.float64)
    np.testing.assert_allclose(mass_mean.vector, X[y == 1].mean(0) - X[y == 0].mean(0), rtol=1e-5, atol=1e-6)
    proj = X @ mass_mean.unit.astype(np.float64)
    assert mass_mean.proj_std == pytest.approx(proj.std(), rel=1e-4)
    assert mass_mean.proj_mean == pytest.approx(proj.mean(), rel=1e-4, abs=1e-5)


def test_ridge_and_logistic_directions_match_scikit_learn(tiny_model, acts, space_data):
    from sklearn.linear_model import LogisticRegression, Ridge

    rows, y = space_data
    X = np.asarray(acts.hook(HOOK)[rows], np.float32)
    r = iv.ridge_direction(X, y, model_key=tiny_model.key, hook=HOOK, alpha=3.0)
    np.testing.assert_allclose(r.vector, Ridge(alpha=3.0).fit(X.astype(np.float64), y).coef_, rtol=1e-4, atol=1e-6)
    lg = iv.logistic_direction(X, y, model_key=tiny_model.key, hook=HOOK, C=1.0)
    sd = X.std(0)
    ref = LogisticRegression(C=1.0, max_iter=2000).fit((X - X.mean(0)) / sd, y).coef_[0] / sd
    assert np.corrcoef(lg.vector, ref)[0, 1] > 0.9999


# ---- files ----------------------------------------------------------------------------------------


def test_direction_round_trips_through_npy_and_json(tmp_path, mass_mean):
    paths = iv.save_direction(mass_mean, tmp_path / "truth")
    back = iv.load_direction(paths[0])
    np.testing.assert_array_equal(back.vector, mass_mean.vector)
    assert (back.hook, back.model_key, back.method, back.proj_std) == (mass_mean.hook, mass_mean.model_key, "mass_mean", mass_mean.proj_std)
    np.testing.assert_allclose(back.mean_activation, mass_mean.mean_activation, rtol=1e-6)


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(tiny_model, mass_mean, tmp_path):
    other = iv.Direction(**{**mass_mean.__dict__, "model_key": "0123456789abcdef"})
    with pytest.raises(InputError, match="another model"):
        iv.intervene_prompt(tiny_model, "x y", other, iv.Intervention("steer", "all", 1.0))
    wide = iv.weights_direction(np.ones(tiny_model.d_model), model_key=tiny_model.key, hook="blocks.0.mlp.hook_post")
    with pytest.raises(InputError, match="width"):
        iv.check_direction(tiny_model, wide)
    with pytest.raises(HookError):
        iv.check_direction(tiny_model, iv.Direction(**{**mass_mean.__dict__, "hook": "blocks.9.hook_resid_post"}))
    with pytest.raises(InputError, match="zero vector"):
        iv.weights_direction(np.zeros(32), model_key=tiny_model.key, hook=HOOK)
    buf = io.BytesIO()
    np.save(buf, np.array([1.0, np.nan, 2.0], np.float32))
    meta = json.dumps({"model_key": tiny_model.key, "hook": HOOK, "method": "weights", "width": 3})
    with pytest.raises(InputError, match="NaN"):
        iv.direction_from_bytes(buf.getvalue(), meta)
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="plain numeric"):
        iv.direction_from_bytes(obj.getvalue(), meta)
    with pytest.raises(InputError, match="out of range"):
        iv.intervene_prompt(tiny_model, "x y", mass_mean, iv.Intervention("steer", "all", 1e3))
    with pytest.raises(InputError, match="between 1 and"):
        iv.intervene_prompt(tiny_model, "x y", mass_mean, iv.Intervention("steer", "all", 1.0), k_controls=0)
    with pytest.raises(InputError, match="matches no token"):
        iv.intervene_prompt(tiny_model, "x y", mass_mean, iv.Intervention("steer", "match:zebra", 1.0))
    with pytest.raises(InputError, match="out of range"):
        iv.neuron_direction([5, tiny_model.d_mlp], model_key=tiny_model.key, hook="blocks.0.mlp.hook_post", width=tiny_model.d_mlp)
    with pytest.raises(InputError, match="out of range"):
        iv.neuron_readout(tiny_model, 0, [tiny_model.d_mlp + 3])
    with pytest.raises(InputError, match="neuron set"):
        iv.check_intervention(mass_mean, iv.Intervention("neuron_zero"))
    with pytest.raises(ProbeError, match="binary"):
        iv.mass_mean_direction(np.ones((4, 3)), np.array([0, 1, 2, 2]), model_key="k", hook=HOOK)
    with pytest.raises(InputError, match="does not exist"):
        iv.load_direction(tmp_path / "missing")


# ---- effects on the cached dataset --------------------------------------------------------------------


def test_loss_effect_noop_equals_base_and_ablation_is_compared_with_controls(tiny_model, acts, mass_mean):
    same = amnesic.loss_effect(tiny_model, acts, mass_mean, iv.Intervention("steer", "all", 0.0), n_rows=2, k_controls=2)
    assert same.after == pytest.approx(same.base, abs=1e-6)
    eff = amnesic.loss_effect(tiny_model, acts, mass_mean, iv.Intervention("ablate", "all"), n_rows=2, k_controls=3, seed=1)
    assert eff.after != pytest.approx(eff.base, abs=1e-7)
    assert eff.control.shape == (3,) and np.isfinite(eff.control).all()
    assert eff.comparison.value == pytest.approx(eff.after - eff.base)


def test_amnesic_probing_drives_the_probe_toward_chance_faster_than_random_directions(tiny_model, acts, space_data):
    rows, y = space_data
    res = amnesic.amnesic_probing(tiny_model, acts, HOOK, rows, y, k_max=3, later_hook=LAST, n_loss_rows=1, seed=0)
    assert res.k.tolist() == [0, 1, 2, 3]
    assert res.probe_acc[0] > res.chance + 0.05
    assert res.probe_acc[-1] < res.probe_acc[0] and res.probe_acc[-1] <= res.control_acc[-1]
    assert np.isfinite(res.loss).all() and np.isfinite(res.downstream_acc).all()
    assert res.loss[0] == res.control_loss[0]


# ---- the labelled-statements dataset --------------------------------------------------------------------


def test_statement_sets_load_with_binary_labels():
    for name in STATEMENT_SETS:
        ds = load_dataset(statements_spec(name))
        assert ds.n_docs > 300 and set(ds.columns["label"]) == {"0", "1"}
    cities = load_statements(DatasetSpec("statements", "cities"))
    assert cities.n_docs == 1496 and cities.documents[0] == "The city of Krasnodar is in Russia."
    with pytest.raises(DatasetError, match="unknown statement set"):
        load_dataset(DatasetSpec("statements", "nope"))


def test_statements_probe_rows_are_the_final_period(tiny_model, tmp_path):
    from probing_core.store.activations import build_cache
    from probing_core.store.entries import ActivationStore

    ds = load_dataset(statements_spec("sp_en_trans", max_docs=40))
    store = ActivationStore(tmp_path / "s")
    entry, _ = build_cache(tiny_model, ds, [HOOK], store=store, max_len=128, max_tokens=None)
    a = open_entry(store, entry.key)
    X, y, info = regression_data(a, [HOOK], LabelSpec.make("column", column="label"), "last")
    assert info.n_selected == 40 and set(np.unique(y)) == {0.0, 1.0}
    assert set(a.text_strings(a.token_ids[info.rows])) == {"."}


def test_lens_difference_is_zero_before_the_hook_and_matches_the_logits_at_the_end(tiny_model, acts, space_data):
    rows, y = space_data
    d = iv.mass_mean_direction(np.asarray(acts.hook(HOOK)[rows]), y, model_key=tiny_model.key, hook=HOOK)
    step = iv.Intervention("steer", "all", 3.0)
    ld = iv.lens_difference(tiny_model, "The cat sat.", d, step)
    assert ld.labels[0] == "0_pre" and ld.labels[-1] == "final_post"
    np.testing.assert_array_equal(ld.diff[0], 0.0)  # block 0's input is read before the hook …
    assert np.abs(ld.diff[1]).max() > 1e-4  # … block 1's input is blocks.0.hook_resid_post, after it
    ids = tiny_model.encode("The cat sat.")
    target = _bare(tiny_model, ids)[0].argmax(-1)
    p_after = iv.run_intervened(tiny_model, torch.tensor([ids]), d, step)[0].softmax(-1)
    p_before = _bare(tiny_model, ids)[0].softmax(-1)
    expect = (p_after.gather(-1, target[:, None]) - p_before.gather(-1, target[:, None]))[:, 0].numpy()
    np.testing.assert_allclose(ld.diff[-1], expect, atol=1e-5)
    assert np.abs(ld.diff[-1]).max() > 1e-4


def test_neuron_mean_patch_with_random_neuron_set_controls(tiny_model, acts):
    hook = "blocks.0.mlp.hook_post"
    X = np.asarray(acts.hook(hook)[:500], np.float32)
    d = iv.neuron_direction([1, 2, 3], model_key=tiny_model.key, hook=hook, width=tiny_model.d_mlp, X=X)
    np.testing.assert_allclose(d.neuron_means, X[:, [1, 2, 3]].mean(0), rtol=1e-5)
    eff = iv.intervene_prompt(tiny_model, "The cat sat.", d, iv.Intervention("neuron_mean", "all"), k_controls=4, seed=3)
    assert eff.controls["KL"].controls.shape == (4,) and eff.kl > 0
    ids = tiny_model.encode("The cat sat.")
    b = iv._rows_batch(tiny_model, d, iv.Intervention("neuron_mean", "all"), iv.position_mask(tiny_model, ids, "all"),
                       controls=4, seed=3)
    sets = iv.random_neuron_sets(tiny_model.d_mlp, 3, 4, seed=3)
    np.testing.assert_array_equal(b.idx[1:].numpy(), sets)
    np.testing.assert_allclose(b.vals[1:].numpy(), d.mean_activation[sets], rtol=1e-6)


def test_downstream_probe_sees_no_change_for_a_noop_and_reports_controls(tiny_model, acts, space_data, mass_mean):
    rows, y = space_data
    rows, y = rows[:400], y[:400]
    same = amnesic.downstream_probe(tiny_model, acts, mass_mean, iv.Intervention("steer", "all", 0.0), rows, y, LAST, k_controls=2)
    assert same.after == same.base and (same.control == same.base).all()
    assert same.base > same.chance
    abl = amnesic.downstream_probe(tiny_model, acts, mass_mean, iv.Intervention("ablate", "all"), rows, y, LAST, k_controls=2)
    assert abl.control.shape == (2,) and 0 <= abl.after <= 1
    with pytest.raises(InputError, match="must come after"):
        amnesic.downstream_probe(tiny_model, acts, mass_mean, iv.Intervention("ablate"), rows, y, "blocks.0.hook_resid_pre")


@pytest.mark.slow
def test_steering_at_the_last_layer_of_the_embedded_model_matches_a_hand_computation(embedded_model):
    """SmolLM2's final norm is an RMSNorm whose weight compatibility mode folds into W_U."""
    m = embedded_model
    hook = f"blocks.{m.n_layers - 1}.hook_resid_post"
    v = np.random.default_rng(0).standard_normal(m.d_model)
    d = iv.Direction(**{**iv.weights_direction(v, model_key=m.key, hook=hook).__dict__, "proj_std": 2.0})
    ids = m.encode("The capital of France is")
    out = iv.run_intervened(m, torch.tensor([ids]), d, iv.Intervention("steer", "last", 5.0))
    b = m.bridge
    with torch.inference_mode():
        _, cache = b.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n == hook)
        x = cache[hook][0].double()
        x[-1] += 5.0 * 2.0 * torch.from_numpy(d.unit).double()
        if "RMS" in str(b.cfg.normalization_type):
            xn = x / (x.pow(2).mean(-1, keepdim=True) + b.cfg.eps).sqrt()
        else:
            xc = x - x.mean(-1, keepdim=True)
            xn = xc / (xc.pow(2).mean(-1, keepdim=True) + b.cfg.eps).sqrt()
        hand = xn @ b.W_U.double() + b.b_U.double()
    torch.testing.assert_close(out[0].double(), hand, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(out[0, :-1], _bare(m, ids)[0, :-1])  # positions before the last are untouched


def test_cli_prompt_and_readout(tiny_model, mass_mean, tmp_path, capsys):
    from probing_core.cli import main

    iv.save_direction(mass_mean, tmp_path / "d")
    rc = main(["intervene", "prompt", "--model", "tiny", "--direction", str(tmp_path / "d"), "--prompt", "The cat sat.",
               "--c", "2", "--k-controls", "3", "--answer", " ", "--wrong", "e", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["controls"]["KL"]["controls"].__len__() == 3 and out["logit_diff"]["after"] is not None
    rc = main(["intervene", "readout", "--model", "tiny", "--layer", "1", "--neurons", "3,5", "--top-k", "4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["neuron"] for r in out["rows"]] == [3, 5] and len(out["rows"][0]["promotes"]) == 4
    assert main(["intervene", "prompt", "--model", "tiny", "--direction", str(tmp_path / "d"), "--prompt", "x", "--c", "100"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["intervene", "prompt", "--model", "tiny", "--direction", str(tmp_path / "d"), "--prompt", "x y",
                 "--positions", "match:zzz"]) == 2
    assert "matches no token" in capsys.readouterr().err
