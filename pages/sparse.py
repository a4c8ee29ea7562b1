"""Sparse probes: which MLP neurons tell " the" from " an"? L1/L2/elastic-net logistic probes along a C path."""
import pandas as pd
import streamlit as st

import glue
from probing_core.analyses import sparse
from probing_core.plots import sparse as plots

Q = "query-params"
st.title("🧮 Sparse probes")
glue.explain(
    "A **sparse probe** is a logistic regression with an L1 penalty: most neuron weights become exactly zero, so the "
    "few that survive are candidate neurons for the distinction. **C = 1/λ**: small C = strong penalty = few neurons. "
    "Features are standardized; every C is fitted to a certified tolerance (a probe that did not converge is flagged, "
    "unlike scikit-learn's saga at the notebook's C=10). **Selectivity** compares with a control task where each next "
    "word gets a random class: a good probe is accurate on the real task but not on the control.",
    demo="Does the model know whether the next word needs **\"a\"** or **\"an\"** before it writes it? We look at "
         "the model's tiny parts (neurons) right at \" the\" or \" an\" and ask: can a handful of them tell the two "
         "apart? The slider trades accuracy for fewer neurons.",
    steps=["keep \" the\" vs \" an\" (or type two other words)", "slide left until only a few neurons are left",
           "if accuracy stays high, those few neurons carry the answer"],
)
model = glue.selected_model()
acts = glue.entry_picker(model, page="sparse", hooks_like="mlp.hook_post", build_hooks=glue.SPARSE_BUILD)
hooks = sparse.probe_hooks(acts.hooks)
c1, c2 = st.columns(2)
cls_a = c1.text_input("Class A tokens (comma-separated, mind the leading space)", " the", key="sparse_a", bind=Q)
cls_b = c2.text_input("Class B tokens", " an", key="sparse_b", bind=Q)
c1, c2, c3, c4 = st.columns(4)
before = c1.number_input("Tokens before (N)", 0, 60, 14, key="sparse_before", bind=Q)
after = c2.number_input("Tokens after (M)", 0, 10, 3, key="sparse_after", bind=Q)
whole = c3.checkbox("Next token is a whole word", True, key="sparse_whole", bind=Q)
cap = c4.number_input("Max per class", 10, 5000, 500, key="sparse_cap", bind=Q)
c1, c2, c3, c4 = st.columns(4)
hook = c1.selectbox("Features (hook at the target)", hooks, index=hooks.index(sparse.NOTEBOOK_HOOK) if sparse.NOTEBOOK_HOOK
                    in hooks else 0, format_func=str if glue.research() else glue.layer_words, key="sparse_hook", bind=Q)
penalty, l1_ratio, folds = "l1", 0.5, 0
if glue.research():
    penalty = c2.selectbox("Penalty", ["l1", "l2", "elasticnet"], key="sparse_penalty", bind=Q)
    l1_ratio = c3.slider("L1 ratio (elastic net)", 0.05, 0.95, 0.5, key="sparse_l1r", disabled=penalty != "elasticnet", bind=Q)
    folds = c4.number_input("CV folds (choose C, selection frequency; 0 = 3)", 0, 10, 0, key="sparse_cv", bind=Q)
read_at = st.radio("Read the features at", list(sparse.PRESETS), horizontal=True, key="sparse_read", bind=Q,
                   help="The notebook read the class token itself: then the embedding alone says which token it is.")
q = sparse.SparseQuery(sparse.parse_classes(cls_a, cls_b), int(before), int(after), whole, int(cap),
                       sparse.PRESETS[read_at], penalty, l1_ratio, int(folds))
with glue.user_errors():
    fit = glue.sparse_fit(model, acts, hook, q)
ctx, path = fit.ctx, fit.path
with st.expander(f"Contexts: {', '.join(f'{n}: {c:,}' for n, c in ctx.counts.items())} kept"):
    counts, samples = sparse.context_tables(ctx)
    st.dataframe(pd.DataFrame(counts), hide_index=True)
    st.dataframe(pd.DataFrame(samples), hide_index=True, width="stretch")


@st.fragment
def at_step() -> None:
    """Everything a C move changes. A move reruns only this fragment: lookups in ``fit``, figures kept per step."""
    # The slider (and URL) holds the step along the path, not C: it stays valid when a hook or class change moves the grid.
    k = st.slider(f"Step along the C path (C = 1/λ from {path.Cs[0]:.3g} to {path.Cs[-1]:.3g}; left = stronger penalty, "
                  "fewer neurons; starts at the C chosen on CV)", 0, len(path.Cs) - 1, sparse.chosen_index(path),
                  key="sparse_C", bind=Q)
    C, state, n_test = float(path.Cs[k]), (acts.key, hook, q, k), f"n = {len(path.test_idx)} held-out contexts"
    st.info(f"**Question asked:** {ctx.question}")
    summary = fit.summary(k)
    st.dataframe(pd.DataFrame(summary.rows()), hide_index=True, key="sparse_baselines")
    st.caption(f"Held out: {summary.n_test} of {summary.n_test + summary.n_train} contexts (stratified); C chosen on "
               f"CV folds of the training rows (step {sparse.chosen_index(path)}); 95 % Wilson intervals.")
    if fit.embed_same is None:
        st.caption("No embed-only baseline: this entry has no hook_embed — build one with the embed family on Home.")
    glue.metric_row(("C", f"{C:.4g}"), ("Test accuracy", f"{100 * path.test_accuracy[k]:.1f} %", {"help": n_test}),
                    ("Density", f"{path.density[k]:.2f} %"), ("Non-zero neurons", int(path.n_nonzero[k])),
                    *[("KKT residual", f"{path.kkt_residual[k]:.1e}")] * glue.research())
    for warning in sparse.step_warnings(path, k):
        st.warning(warning)
    if len(path.test_idx) < sparse.MIN_TEST and acts.n_tokens < glue.SPARSE_BUILD.max_tokens and st.button(
            f"Build {glue.SPARSE_BUILD.max_tokens:,} tokens of {glue.SPARSE_BUILD.what}", key="sparse_build_more"):
        glue.build_hooks_now(model, glue.SPARSE_BUILD)
        st.rerun()

    st.plotly_chart(plots.mark_current_C(glue.cached_figure("sparse_path", state[:3], lambda: plots.density_vs_C(path)), C),
                    key="sparse_fig_path")  # the path's figure is built once; each step marks its C on a copy
    st.subheader("Which neurons survive")
    a, b = st.columns([2, 1])
    a.plotly_chart(glue.cached_figure("sparse_coef", state, lambda: plots.coefficients(path, k)), key="sparse_fig_coef")
    b.plotly_chart(glue.cached_figure("sparse_hist", state, lambda: plots.nonzero_histogram(path, k)), key="sparse_fig_hist")
    if (surv := path.surviving(k)[:20]).size:
        st.plotly_chart(glue.cached_figure("sparse_strips", state, lambda: plots.activation_strips(
            fit.X, ctx.labels, surv, class_names=ctx.class_names)), key="sparse_fig_strips")
    st.dataframe(pd.DataFrame(fit.neurons(k)), key="sparse_neurons")
    if path.cv_selection_frequency is not None:
        st.plotly_chart(glue.cached_figure("sparse_sel", state, lambda: plots.selection_frequency_bars(
            path.cv_selection_frequency[k])), key="sparse_fig_sel")
    st.subheader("Classification report (test split)")
    st.dataframe(pd.DataFrame(fit.report(k)).T, key="sparse_report")

    st.subheader("Control task")
    with glue.user_errors():
        ct = fit.control(k)
    glue.metric_row(("Real task accuracy", f"{100 * ct.accuracy:.1f} %", {"help": n_test}),
                    ("Control task accuracy", f"{100 * ct.control_accuracy:.1f} %",
                     {"help": f"chance {100 * ct.control_chance:.1f} %"}), ("Selectivity", f"{100 * ct.selectivity:.1f} points"))

    st.subheader("All layers at this C")
    if st.toggle("Compute every layer (the one in view is already done)", key="sparse_all"):
        fam = tuple(sparse.same_family(hooks, hook))
        with glue.user_errors():
            pts = glue.shared_result("sparse_layers", (acts.key, q, fam, C), lambda p: sparse.layer_points(
                acts, fam, ctx, C, q, progress=p), keep=16, label="Fitting layers")
        st.plotly_chart(plots.layer_points_curve(pts, C=C, chance=summary.majority), key="sparse_fig_layers")
        st.dataframe(pd.DataFrame([p.__dict__ for p in pts]), key="sparse_layers_table")

    st.subheader("Downloads")  # each file is made when its button is clicked, not on every rerun
    glue.downloads(("⬇ Path (CSV)", lambda: sparse.path_csv(path), "sparse-path.csv", "sparse_dl_path"),
                   ("⬇ Coefficients (CSV)", lambda: sparse.coefs_csv(path, k), "sparse-coefs.csv", "sparse_dl_coef"),
                   ("⬇ Weights (.npy)", lambda: sparse.weights_npy(path, k), "sparse-weights.npy", "sparse_dl_npy"),
                   ("⬇ Run manifest (JSON)", lambda: sparse.manifest(path, ctx, hook, k, glue.manifest_base(model, acts)),
                    "sparse-manifest.json", "sparse_dl_manifest"))


at_step()
