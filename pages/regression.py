"""Regression probes: R² across layers, embedding regression over the vocabulary, probe transfer."""
import json

import pandas as pd
import streamlit as st

import glue
from probing_core.analyses import regression as reg
from probing_core.data.labels import LABELS, LabelSpec
from probing_core.plots import hook_label, regression as plots
from probing_core.solvers.ridge import DEFAULT_ALPHAS

st.title("📈 Regression probes")
glue.explain(
    "A **ridge regression probe** predicts a number about each token (its length, its position, …) from the "
    "activations at one hook. **R²** says how much of the label's variance the probe explains on tokens it never "
    "saw (1 = perfectly, 0 = no better than guessing the mean; below 0 = worse). The grey line is the same probe "
    "fit on shuffled labels: what noise alone reaches. **α** is the regularization strength — drag it to see how "
    "the curve changes. *Embedding regression* reads properties straight from the embedding matrix; *probe "
    "transfer* checks whether that one embedding probe still works further up the residual stream.",
    demo="Can we read a simple fact about each word — like **how many letters it has** — from the model's numbers? "
         "A probe guesses the fact at every layer; the curve shows how good the guess is (1 = perfect, 0 = no better "
         "than always guessing the average). The grey line is what pure luck reaches.",
    steps=["pick a fact in **Label**", "watch the curve: high = the model knows it at that layer",
           "drag **α** to the right: a simpler probe, a lower curve — if it stays high, the fact is easy to read"],
)
model = glue.selected_model()
acts = glue.entry_picker(model, page="reg", hooks_like="resid", build_hooks=glue.DEFAULT_BUILD)
Q = "query-params"
ALPHAS = [float(a) for a in DEFAULT_ALPHAS]
GRID = {f"{a:.3g}".replace("e+0", "e").replace("e+", "e"): a for a in ALPHAS}  # URL-safe labels ("1e6", no "+")


def _fit(key: str, hooks: tuple, label: LabelSpec, rule: str, cv: int, seed: int, split: str = "auto") -> reg.RegressionRun:
    """A shared run, or a fresh fit; the label-independent decompositions are reused across labels."""
    slot = glue.shared_slot("reg_decompositions", (key, hooks, rule, cv, seed), keep=4)

    def fit(progress):
        run = reg.run_regression(glue.get_entry(key), list(hooks), label, rule, alphas=ALPHAS, cv=cv, seed=seed,
                                 split_by=split, decompositions=slot, progress=progress)
        if all(d is not run.decompositions for d in slot):
            slot[:] = [run.decompositions, *slot][:3]  # bounded; identical content for every session
        return run

    verb = "Refitting for the new label" if slot else "Fitting ridge probes on every hook (all α at once)"
    return glue.shared_result("reg_runs", (key, hooks, label, rule, cv, seed, split), fit, keep=3, label=verb)


@st.cache_data(max_entries=4, show_spinner="Regressing token properties from W_E over the vocabulary…")
def _embed(_model, model_key: str, len_thr: int, num_thr: int) -> reg.EmbeddingRegressionResult:
    return reg.embedding_regression(_model, length_threshold=len_thr, numeric_threshold=num_thr)


@st.cache_data(max_entries=8, show_spinner="Fitting the embedding probe and scoring it on every hook…")
def _transfer(_model, key: str, label: LabelSpec, rule: str, alpha: float, source: str) -> reg.TransferRun:
    return reg.probe_transfer(_model, glue.get_entry(key), label, rule, alpha=alpha, source=source)


label, rule, name = glue.token_label_picker(acts, page="reg")

t1, t2, t3 = st.tabs(["R² across layers", "Embedding regression", "Probe transfer"], key="reg_tab", bind=Q, on_change="rerun")

if t1.open:
    with t1:
        fams = reg.families_present(model, acts.hooks)
        default = [f for f in ("embed", "resid_pre", "resid_mid", "resid_post") if f in fams] or list(fams)[:1]
        a, b, c = st.columns([3, 1, 1])
        picked = a.multiselect("Hooks" if glue.research() else "Places in the model", list(fams), default=default,
                               key="reg_families", bind=Q)
        cv, seed = 3, 0  # demo mode: the research defaults, not shown
        if glue.research():
            cv = b.selectbox("CV folds", [0, 2, 3, 5, 10], index=2, key="reg_cv", bind=Q, help="choose α by k-fold CV (0 = by the test split)")
            seed = c.number_input("Split seed", 0, 10_000, 0, key="reg_seed", bind=Q)
        hooks = tuple(h for f in picked for h in fams[f])
        split = st.radio("Test set", ["auto", "type", "tokens"], horizontal=True, key="reg_split", bind=Q,
                         format_func={"auto": "auto (new token types when the token decides the label)",
                                      "type": "new token types", "tokens": "random tokens (mostly seen types)"}.get)
        with glue.user_errors():
            run = _fit(acts.key, hooks, label, rule, int(cv), int(seed), split)
        r = run.result
        choice = st.select_slider("α (ridge strength)", ["best per hook", *GRID], value="best per hook", key="reg_alpha", bind=Q)
        ai = None if choice not in GRID else int(r.alphas.searchsorted(GRID[choice]))
        table = pd.DataFrame(run.table(ai))
        score = "r2_cv_mean" if r.n_folds else "r2_test"
        top = table.loc[table[score].idxmax()]
        m1, m2, m3, m4 = st.columns(4)
        m1.metric(f"Best {'CV' if r.n_folds else 'test'} R²", f"{top[score]:.4f}")
        m2.metric("At hook", hook_label(top["hook"]))
        ci = f" (95 % CI {top['r2_test_ci_low']:.2f}…{top['r2_test_ci_high']:.2f})" if "r2_test_ci_low" in top else ""
        m3.metric("Test R² there", f"{top['r2_test']:.4f}", help=f"n = {r.n_test:,} test rows{ci}")
        m4.metric("Samples (train / test)", f"{r.n_train:,} / {r.n_test:,}")
        ho = run.held_out
        st.caption(f"{run.description}. **Held out:** {reg.SPLITS[run.split_by]}; α chosen on "
                   + ("the CV folds of the training rows" if r.n_folds else "the test split (no CV: optimistic)")
                   + (f"; test rows of seen types {ho.n_seen:,}, of new types {ho.n_new:,} (table: R² on each)."
                      if ho is not None else "."))
        st.plotly_chart(plots.r2_curve(r, ai, title=f"R² of {LABELS[name].title.lower()} across hooks", test_name=run.test_name,
                                       test_ci=None if ho is None else ho.r2_ci,
                                       new_types=None if ho is None or run.split_by == "type" else ho.r2_new), key="reg_curve")
        shown = table.copy()
        shown.insert(0, "layer", [glue.layer_words(h) for h in table["hook"]])
        st.dataframe(shown if glue.research() else shown.drop(columns="hook"), hide_index=True, width="stretch")
        hook = st.selectbox("R² against α for hook", list(r.hooks), key="reg_hook", bind=Q, format_func=glue.layer_words)
        st.plotly_chart(plots.r2_vs_alpha(r, hook), key="reg_vs_alpha")
        alpha = None if ai is None else float(r.alphas[ai])
        base = glue.manifest_base(model, acts)
        manifest = {**run.manifest, **base, "versions": {**run.manifest["versions"], **base["versions"]},
                    "page": "regression", "alpha_shown": alpha or "best per hook"}
        d1, d2, d3 = st.columns(3)
        d1.download_button("⬇ R² curves (CSV)", pd.DataFrame(reg.curve_rows(run)).to_csv(index=False), "r2-curves.csv", "text/csv", key="reg_dl_csv")
        d2.download_button("⬇ Probe weights (.npy per hook, zip)", reg.weights_zip(run, alpha), "probe-weights.zip", "application/zip", key="reg_dl_zip")
        d3.download_button("⬇ Run manifest (JSON)", json.dumps(manifest, indent=1, default=str), "regression-manifest.json", "application/json", key="reg_dl_manifest")

if t2.open:
    with t2:
        a, b = st.columns(2)
        len_thr = a.number_input("Length outlier threshold (characters)", 1, 200, 15, key="reg_len_thr", bind=Q)
        num_thr = b.number_input("Numeric outlier threshold (value)", 1, 10**9, 1000, key="reg_num_thr", bind=Q)
        with glue.user_errors():
            emb = _embed(model, model.key, int(len_thr), int(num_thr))
        st.caption(f"W_E: {emb.d_vocab:,} tokens × {emb.d_model} dims; each row is its own token type, so the 20 % test "
                   "rows are types never seen in training. α chosen on 5-fold CV of the training rows; test R² at that α "
                   "with a 95 % bootstrap CI. `r2_ols_all_rows` is least squares fit and scored on every row (the "
                   f"notebook's in-sample number). Number tokens here: {emb.number_tokens[0]} all-digit, "
                   f"{emb.number_tokens[1]} with a leading space allowed.")
        st.dataframe(pd.DataFrame(emb.table()), hide_index=True, width="stretch")
        for i, t in enumerate(emb.tasks):
            if t.note:
                st.warning(f"**{t.name}**: {t.note}")
                continue
            left, right = st.columns(2)
            left.plotly_chart(plots.predicted_vs_true(t.y_true, t.y_pred, title=f"{t.name}: held-out tokens", x_label=t.name), key=f"reg_box_{i}")
            right.plotly_chart(plots.label_histogram(t.values, title=t.description, x_label=t.name), key=f"reg_hist_{i}")

if t3.open:
    with t3:
        a, b = st.columns(2)
        source = a.radio("Fit the probe on", ["W_E", "hook_embed"], horizontal=True, key="reg_source", bind=Q,
                         format_func={"W_E": "the embedding matrix (whole vocabulary)", "hook_embed": "hook_embed (this corpus)"}.get)
        t_alpha = GRID[b.select_slider("α of the embedding probe", list(GRID), value=list(GRID)[8], key="reg_t_alpha", bind=Q)]
        with glue.user_errors():
            tr = _transfer(model, acts.key, label, rule, float(t_alpha), source)
        st.metric(f"In-sample R² on {source} ({tr.n_fit:,} rows)", f"{tr.source_r2:.4f}")
        st.caption(f"Scored on {tr.transfer.n_samples:,} tokens: {tr.description}. Negative R² = worse than predicting the mean.")
        st.plotly_chart(plots.transfer_curve(tr.transfer, source=source), key="reg_transfer")
        st.plotly_chart(plots.abs_r2_log(tr.transfer.hooks, tr.transfer.r2), key="reg_transfer_log")
        st.dataframe(pd.DataFrame(tr.rows()), hide_index=True, width="stretch")
        st.download_button("⬇ Transfer curve (CSV)", pd.DataFrame(tr.rows()).to_csv(index=False), "probe-transfer.csv", "text/csv", key="reg_dl_transfer")
