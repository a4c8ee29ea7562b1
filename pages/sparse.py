"""Sparse probing: which MLP neurons tell " the" from " an"? L1/L2/elastic-net logistic probes along a C path."""
import pandas as pd
import streamlit as st

import glue
from probing_core.analyses import sparse
from probing_core.plots import sparse as plots

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
hooks = [h for h in acts.hooks if h.endswith("mlp.hook_post") or h.endswith("hook_resid_post")]
NOTEBOOK_HOOK = "blocks.3.mlp.hook_post"  # the reference notebook's layer
c1, c2 = st.columns(2)
cls_a = c1.text_input("Class A tokens (comma-separated, mind the leading space)", " the", key="sparse_a", bind="query-params")
cls_b = c2.text_input("Class B tokens", " an", key="sparse_b", bind="query-params")
c1, c2, c3, c4 = st.columns(4)
before = c1.number_input("Tokens before (N)", 0, 60, 14, key="sparse_before", bind="query-params")
after = c2.number_input("Tokens after (M)", 0, 10, 3, key="sparse_after", bind="query-params")
whole = c3.checkbox("Next token is a whole word", True, key="sparse_whole", bind="query-params")
cap = c4.number_input("Max per class", 10, 5000, 500, key="sparse_cap", bind="query-params")
c1, c2, c3, c4 = st.columns(4)
hook = c1.selectbox("Features (hook at the target)", hooks, index=hooks.index(NOTEBOOK_HOOK) if NOTEBOOK_HOOK in hooks else 0,
                    format_func=str if glue.research() else glue.layer_words, key="sparse_hook", bind="query-params")
penalty, l1_ratio, folds = "l1", 0.5, 0
if glue.research():
    penalty = c2.selectbox("Penalty", ["l1", "l2", "elasticnet"], key="sparse_penalty", bind="query-params")
    l1_ratio = c3.slider("L1 ratio (elastic net)", 0.05, 0.95, 0.5, key="sparse_l1r", disabled=penalty != "elasticnet",
                         bind="query-params")
    folds = c4.number_input("CV folds (choose C, selection frequency; 0 = 3)", 0, 10, 0, key="sparse_cv", bind="query-params")
classes = tuple(tuple(t for t in s.split(",")) for s in (cls_a, cls_b))
read_at = st.radio("Read the features at", list(sparse.PRESETS), horizontal=True, key="sparse_read", bind="query-params",
                   help="The notebook read the class token itself: then the embedding alone says which token it is.")
offset = sparse.PRESETS[read_at]


@st.cache_data(max_entries=16, show_spinner="Mining contexts…")
def _contexts(_acts, key, classes, before, after, whole, cap, offset=0):
    return sparse.contexts_for(_acts, model.tokenizer.encode, model.tokenizer.decode_tokens, classes, before=before,
                               after=after, whole_word_next=whole, max_per_class=cap, offset=offset)


@st.cache_data(max_entries=16, show_spinner="Fitting the whole C path at once…")
def _path(_acts, key, hook, classes, before, after, whole, cap, offset, penalty, l1_ratio, folds, Cs=None):
    ctx = _contexts(_acts, key, classes, before, after, whole, cap, offset)
    return sparse.fit_sparse_path(sparse.features(_acts, hook, ctx), ctx, penalty=penalty, l1_ratio=l1_ratio,
                                  cv=folds or None, Cs=None if Cs is None else list(Cs))


@st.cache_data(max_entries=256, show_spinner=False)
def _layer(_acts, key, hook, classes, before, after, whole, cap, offset, penalty, l1_ratio, C):
    ctx = _contexts(_acts, key, classes, before, after, whole, cap, offset)
    return sparse.fit_hook_at_C(_acts, hook, ctx, C, penalty=penalty, l1_ratio=l1_ratio)


args = (acts.key, classes, int(before), int(after), whole, int(cap), offset)
with glue.user_errors():
    ctx = _contexts(acts, *args)
    X = sparse.features(acts, hook, ctx)
    path = _path(acts, acts.key, hook, *args[1:], penalty, l1_ratio, int(folds))

with st.expander(f"Contexts: {', '.join(f'{n}: {c:,}' for n, c in ctx.counts.items())} kept"):
    st.dataframe(pd.DataFrame({"class": list(ctx.counts), "found": [ctx.found[n] for n in ctx.counts],
                               "kept": list(ctx.counts.values())}), hide_index=True)
    st.dataframe(pd.DataFrame([{"class": n, "example (target in ⟦ ⟧)": x} for n, xs in ctx.samples.items() for x in xs]),
                 hide_index=True, width="stretch")

# The slider (and the URL) holds the step along the path, not the C value: every path has the same steps, so a
# link stays valid and in sync when the hook, the classes or the data change the C grid.
k = st.slider(f"Step along the C path (C = 1/λ from {path.Cs[0]:.3g} to {path.Cs[-1]:.3g}; left = stronger penalty, "
              "fewer neurons; starts at the C chosen on CV)", 0, len(path.Cs) - 1, sparse.chosen_index(path),
              key="sparse_C", bind="query-params")
C = float(path.Cs[k])
st.info(f"**Question asked:** {ctx.question}")
embed_path = None
if "hook_embed" in acts.hooks:
    with glue.user_errors():  # the same probe, C grid and split on hook_embed at the same rows
        embed_path = _path(acts, acts.key, "hook_embed", *args[1:], penalty, l1_ratio, int(folds), tuple(path.Cs))
state = (acts.key, hook, *args[1:], penalty, l1_ratio, int(folds))  # everything the path depends on


def per_step(name: str, compute):  # a result at this C step, shared by every session (a move back is free)
    return glue.shared_result(f"sparse_{name}", (state, k), lambda _: compute(), keep=64, label=f"Computing {name}")


def step_jobs(j: int) -> list:
    """What the page shows at C step ``j`` as ``(shelf, key, compute)``, keyed as per_step and glue.cached_figure ask."""
    Cj, surv_j = float(path.Cs[j]), path.surviving(j)[:20]
    jobs = [(f"sparse_{n}", (state, j), f) for n, f in (
        ("summary", lambda: sparse.summarize(acts, hook, ctx, path, k=j, embed_path=embed_path)),
        ("neurons", lambda: sparse.neuron_table(X, ctx, path, j)),
        ("report", lambda: sparse.report_at(X, ctx, path, j)),
        ("control task", lambda: sparse.control_task(X, ctx, path, Cj)))]
    figs = [("sparse_path", lambda: plots.density_vs_C(path, Cj)), ("sparse_coef", lambda: plots.coefficients(path, j)),
            ("sparse_hist", lambda: plots.nonzero_histogram(path, j))]
    if surv_j.size:
        figs.append(("sparse_strips", lambda: plots.activation_strips(X, ctx.labels, surv_j, class_names=ctx.class_names)))
    return jobs + [("figures", (n, (state, j)), f) for n, f in figs]


summary = per_step("summary", lambda: sparse.summarize(acts, hook, ctx, path, k=k, embed_path=embed_path))
st.dataframe(pd.DataFrame(summary.rows()), hide_index=True, key="sparse_baselines")
st.caption(f"Held out: {summary.n_test} of {summary.n_test + summary.n_train} contexts (stratified); C chosen on "
           f"CV folds of the training rows (step {sparse.chosen_index(path)}); 95 % Wilson intervals.")
if embed_path is None:
    st.caption("No embed-only baseline: this entry has no hook_embed — build one with the embed family on Home.")
m = st.columns(5 if glue.research() else 4)
m[0].metric("C", f"{C:.4g}")
m[1].metric("Test accuracy", f"{100 * path.test_accuracy[k]:.1f} %", help=f"n = {len(path.test_idx)} held-out contexts")
m[2].metric("Density", f"{path.density[k]:.2f} %")
m[3].metric("Non-zero neurons", int(path.n_nonzero[k]))
if glue.research():
    m[4].metric("KKT residual", f"{path.kkt_residual[k]:.1e}")
n_test = len(path.test_idx)
if n_test < 200:  # one context is > 0.5 accuracy points: too few to back a claim
    st.warning(f"Only {n_test} held-out contexts: each is worth {100 / n_test:.1f} accuracy points, so this score "
               "rests on too few examples. Use more text (a bigger cache entry) or raise “Max per class”.")
    if acts.n_tokens < glue.SPARSE_BUILD.max_tokens and st.button(
            f"Build {glue.SPARSE_BUILD.max_tokens:,} tokens of {glue.SPARSE_BUILD.what}", key="sparse_build_more"):
        glue.build_hooks_now(model, glue.SPARSE_BUILD)
        st.rerun()
if not path.converged[k]:
    st.warning(f"Not converged at C = {C:.4g} (KKT residual {path.kkt_residual[k]:.1e} > {path.tol}); "
               "do not read its neurons as the answer — pick a smaller C.")

st.plotly_chart(glue.cached_figure("sparse_path", (state, k), lambda: plots.density_vs_C(path, C)), key="sparse_fig_path")
st.subheader("Which neurons survive")
a, b = st.columns([2, 1])
a.plotly_chart(glue.cached_figure("sparse_coef", (state, k), lambda: plots.coefficients(path, k)), key="sparse_fig_coef")
b.plotly_chart(glue.cached_figure("sparse_hist", (state, k), lambda: plots.nonzero_histogram(path, k)), key="sparse_fig_hist")
surv = path.surviving(k)[:20]
if surv.size:
    st.plotly_chart(glue.cached_figure("sparse_strips", (state, k), lambda: plots.activation_strips(
        X, ctx.labels, surv, class_names=ctx.class_names)), key="sparse_fig_strips")
st.dataframe(pd.DataFrame(per_step("neurons", lambda: sparse.neuron_table(X, ctx, path, k))), key="sparse_neurons")
if path.cv_selection_frequency is not None:
    st.plotly_chart(plots.selection_frequency_bars(path.cv_selection_frequency[k]), key="sparse_fig_sel")

st.subheader("Classification report (test split)")
st.dataframe(pd.DataFrame(per_step("report", lambda: sparse.report_at(X, ctx, path, k))).T, key="sparse_report")

st.subheader("Control task")
with glue.user_errors():
    ct = per_step("control task", lambda: sparse.control_task(X, ctx, path, C))
c1, c2, c3 = st.columns(3)
c1.metric("Real task accuracy", f"{100 * ct.accuracy:.1f} %", help=f"n = {len(path.test_idx)} held-out contexts")
c2.metric("Control task accuracy", f"{100 * ct.control_accuracy:.1f} %", help=f"chance {100 * ct.control_chance:.1f} %")
c3.metric("Selectivity", f"{100 * ct.selectivity:.1f} points")

st.subheader("All layers at this C")
if st.toggle("Compute every layer (the one in view is already done)", key="sparse_all"):
    fam = "mlp.hook_post" if "mlp" in hook else "hook_resid_post"
    layer_hooks = [h for h in hooks if h.endswith(fam)]
    bar = st.progress(0.0, "Fitting layers…")
    pts = []
    with glue.user_errors():
        for i, h in enumerate(layer_hooks):
            pts.append(_layer(acts, acts.key, h, *args[1:], penalty, l1_ratio, C))
            bar.progress((i + 1) / len(layer_hooks), f"{h}")
    bar.empty()
    st.plotly_chart(plots.layers_curve([p.hook for p in pts], [p.test_accuracy for p in pts],
                                       [p.density for p in pts], C=C, chance=summary.majority,
                                       ci=[(p.ci_low, p.ci_high) for p in pts]), key="sparse_fig_layers")
    st.dataframe(pd.DataFrame([p.__dict__ for p in pts]), key="sparse_layers_table")

st.subheader("Downloads")
d1, d2, d3, d4 = st.columns(4)
d1.download_button("⬇ Path (CSV)", sparse.path_csv(path), "sparse-path.csv", "text/csv", key="sparse_dl_path")
d2.download_button("⬇ Coefficients (CSV)", sparse.coefs_csv(path, k), "sparse-coefs.csv", "text/csv", key="sparse_dl_coef")
d3.download_button("⬇ Weights (.npy)", sparse.weights_npy(path, k), "sparse-weights.npy", key="sparse_dl_npy")
d4.download_button("⬇ Run manifest (JSON)", sparse.manifest(path, ctx, hook, k, glue.manifest_base(model, acts)),
                   "sparse-manifest.json", "application/json", key="sparse_dl_manifest")

# The other C steps are filled in the background, nearest first: the next slider moves find them ready.
glue.warm_shelves([job for j in sorted(range(len(path.Cs)), key=lambda j: abs(j - k)) for job in step_jobs(j)])
