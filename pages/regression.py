"""Regression probes: R² across layers, embedding regression over the vocabulary, probe transfer."""
import pandas as pd
import streamlit as st

import glue
from probing_core.analyses import regression as reg
from probing_core.data.labels import LABELS
from probing_core.plots import hook_label, regression as plots

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
GRID = reg.alpha_labels()  # URL-safe labels ("1e6", no "+") → α: the grid glue.regression_run fits
label, rule, name = glue.token_label_picker(acts, page="reg")

t1, t2, t3 = st.tabs(["R² across layers", "Embedding regression", "Probe transfer"], key="reg_tab", bind=Q, on_change="rerun")

if t1.open:
    with t1:
        fams = reg.families_present(model, acts.hooks)
        a, b, c = st.columns([3, 1, 1])
        picked = a.multiselect("Hooks" if glue.research() else "Places in the model", list(fams),
                               default=reg.default_families(fams), key="reg_families", bind=Q)
        cv, seed = 3, 0  # demo mode: the research defaults, not shown
        if glue.research():
            cv = b.selectbox("CV folds", [0, 2, 3, 5, 10], index=2, key="reg_cv", bind=Q, help="choose α by k-fold CV (0 = by the test split)")
            seed = c.number_input("Split seed", 0, 10_000, 0, key="reg_seed", bind=Q)
        hooks = tuple(h for f in picked for h in fams[f])
        split = st.radio("Test set", list(reg.SPLIT_CHOICES), horizontal=True, key="reg_split", bind=Q,
                         format_func=reg.SPLIT_CHOICES.get)
        with glue.user_errors():
            run = glue.regression_run(acts.key, hooks, label, rule, int(cv), int(seed), split)
        r = run.result
        choice = st.select_slider("α (ridge strength)", ["best per hook", *GRID], value="best per hook", key="reg_alpha", bind=Q)
        ai = None if choice not in GRID else int(r.alphas.searchsorted(GRID[choice]))
        top = run.best_row(ai)
        glue.metric_row((f"Best {'CV' if r.n_folds else 'test'} R²", f"{top[run.score_name]:.4f}"), ("At hook", hook_label(top["hook"])),
                        ("Test R² there", f"{top['r2_test']:.4f}", {"help": run.test_note(top)}),
                        ("Samples (train / test)", f"{r.n_train:,} / {r.n_test:,}"))
        st.caption(f"{run.description}. **Held out:** {run.held_out_note()}")
        st.plotly_chart(plots.run_r2_curve(run, ai, title=f"R² of {LABELS[name].title.lower()} across hooks"), key="reg_curve")
        glue.hook_table(run.table(ai))
        hook = st.selectbox("R² against α for hook", list(r.hooks), key="reg_hook", bind=Q, format_func=glue.layer_words)
        st.plotly_chart(plots.r2_vs_alpha(r, hook), key="reg_vs_alpha")
        alpha = None if ai is None else float(r.alphas[ai])
        glue.downloads(("⬇ R² curves (CSV)", lambda: reg.curve_rows(run), "r2-curves.csv", "reg_dl_csv"),  # made on click
                       ("⬇ Probe weights (.npy per hook, zip)", lambda: reg.weights_zip(run, alpha), "probe-weights.zip", "reg_dl_zip"),
                       (glue.MANIFEST_LABEL, lambda: glue.run_manifest(model, acts, core=run.manifest, page="regression",
                                                                       alpha_shown=alpha or "best per hook"), "regression-manifest.json", "reg_dl_manifest"))

if t2.open:
    with t2:
        a, b = st.columns(2)
        len_thr = a.number_input("Length outlier threshold (characters)", 1, 200, 15, key="reg_len_thr", bind=Q)
        num_thr = b.number_input("Numeric outlier threshold (value)", 1, 10**9, 1000, key="reg_num_thr", bind=Q)
        with glue.user_errors():
            emb = glue.embedding_regression(model, model.key, int(len_thr), int(num_thr))
        st.caption(emb.describe())
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
        source = a.radio("Fit the probe on", list(reg.TRANSFER_SOURCES), horizontal=True, key="reg_source", bind=Q,
                         format_func=reg.TRANSFER_SOURCES.get)
        t_alpha = GRID[b.select_slider("α of the embedding probe", list(GRID), value=list(GRID)[8], key="reg_t_alpha", bind=Q)]
        with glue.user_errors():
            tr = glue.probe_transfer(model, acts.key, label, rule, float(t_alpha), source)
        st.metric(f"In-sample R² on {source} ({tr.n_fit:,} rows)", f"{tr.source_r2:.4f}")
        st.caption(f"Scored on {tr.transfer.n_samples:,} tokens: {tr.description}. Negative R² = worse than predicting the mean.")
        st.plotly_chart(plots.transfer_curve(tr.transfer, source=source), key="reg_transfer")
        st.plotly_chart(plots.abs_r2_log(tr.transfer.hooks, tr.transfer.r2), key="reg_transfer_log")
        st.dataframe(pd.DataFrame(tr.rows()), hide_index=True, width="stretch")
        glue.download("⬇ Transfer curve (CSV)", tr.rows(), "probe-transfer.csv", "reg_dl_transfer")
