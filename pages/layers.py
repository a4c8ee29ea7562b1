"""Layer probes: accuracy of a categorical probe at every hook (layer) and position; tree edge preset."""
import json

import pandas as pd
import streamlit as st

import glue
from probing_core.analyses import layer_probes as lp
from probing_core.plots import layers as plots

st.title("🧱 Layer probes")
glue.explain(
    "Which layer knows what? For every hook (the token embedding, then the residual stream after each block) "
    "a small linear classifier tries to read a **category** out of the activations — e.g. *which token was two "
    "positions back*. If the accuracy is at the **chance** level (always guessing the most common class) the "
    "information is not linearly there; if it jumps at layer 2, the model moved it there by layer 2. The "
    "**control task** gives each token type a random class: a probe that scores high on it is memorizing "
    "tokens, so trust the **selectivity** (real − control) more than the raw accuracy.",
    demo="Can we tell **which word came just before** by looking inside the model? For each layer, a small "
         "classifier looks at one word's numbers and guesses the word before it. Low score = the model has not "
         "looked back yet; high score = it has.",
    steps=["pick what to guess (the word before, two back, …)", "read the table top to bottom: the embedding, "
           "then layer 0, 1, …", "where the score jumps is where the model gathers that word"],
)
model = glue.selected_model()


def _probe(key: str, hooks: tuple, label: lp.LayerLabelSpec, pos: lp.PositionSpec, C: float, test_fraction: float, seed: int):
    """A shared result, or a fresh fit with a live progress bar per hook."""
    return glue.shared_result(
        "layer_probes", repr((key, hooks, label, pos, C, test_fraction, seed)),
        lambda progress: lp.probe_layers(glue.get_entry(key), list(hooks), label, pos, C=C, test_fraction=test_fraction,
                                         seed=seed, progress=progress),
        keep=16, label="Fitting one probe per hook")


@st.cache_data(max_entries=4, show_spinner="Probing the edges at every layer…")
def _tree(key: str, n_samples: int, seed: int, C: float):
    return lp.probe_tree_edges(glue.get_entry(key), lp.tree_edge_samples(n_samples, seed), C=C, seed=seed)


def _show(res: lp.LayerAccuracyResult, name: str, params: dict) -> None:
    table = pd.DataFrame(res.table())
    shown = table.copy()
    shown.insert(0, "layer", [glue.layer_words(h) for h in res.hooks])
    if not glue.research():
        shown = shown.drop(columns="hook")
    st.caption(f"Each row is one place in the model, from the embedding down to the last layer; each number is the share "
               f"of held-out tokens where a probe trained there names the **{res.label}** correctly "
               f"({', '.join(f'{len(c)} classes' for c in res.classes[:1])}). **Control** is the same probe on a task "
               "where each type of the token the label is about (e.g. the token two back) gets a random class "
               "(memorizing types scores there); **selectivity** = real − control: the part the layer really encodes.")
    ci_cols = [c for c in shown.columns if c.endswith("95% CI")]  # many columns (tree: 6) ran off the right edge
    narrow = {c: st.column_config.Column(width="small", help=c) for c in res.columns} if len(res.columns) > 2 else None
    st.dataframe(shown.drop(columns=ci_cols).style.format(precision=3), hide_index=True, width="stretch", column_config=narrow)
    if ci_cols:
        with st.expander("95 % intervals of these accuracies"):
            st.dataframe(shown[["layer", *ci_cols]], hide_index=True, width="stretch")
    st.caption(f"Held out: a stratified {params.get('test_fraction', 0.3):.0%} of the samples per column. Chance (majority class of the test split): "
               f"{', '.join(f'{c} {v:.3f} (n_test {int(n):,})' for c, v, n in zip(res.columns, res.chance, res.n_test))}"
               + (f" · control majority {res.control_chance:.3f}" if res.control_column else "")
               + f" · samples: {', '.join(f'{n:,}' for n in res.n_samples)} · C = {res.C:g}; intervals: 95 % Wilson.")
    for note in res.notes:
        st.caption("ℹ️ " + note)
    if not res.converged.all():
        st.warning("Some probes did not fully converge; try a smaller C.")
    tab1, tab2 = st.tabs(["Heatmap", "Across layers"])
    state = (name, repr(sorted(params.items())), None if acts is None else acts.key, tuple(res.columns))  # the result's inputs
    tab1.plotly_chart(glue.cached_figure("layers_heat", state, lambda: plots.accuracy_heatmap(res)), key=f"layers_heat_{name}")
    tab2.plotly_chart(glue.cached_figure("layers_lines", state, lambda: plots.accuracy_lines(res)), key=f"layers_lines_{name}")
    a, b = st.columns(2)
    a.download_button("⬇ Accuracy table (CSV)", table.to_csv(index=False), f"layer-probes-{name}.csv", "text/csv", key=f"layers_dl_csv_{name}")
    doc = {**glue.manifest_base(model, acts if name == "custom" else None), "page": "layer probes", "params": params, "result": res.to_json()}
    b.download_button("⬇ Run manifest (JSON)", json.dumps(doc, indent=1, default=str), f"layer-probes-{name}.json",
                      "application/json", key=f"layers_dl_json_{name}")


acts = None
if model.spec.kind == "tree":
    st.subheader("Tree edge probes (notebook preset)")
    st.caption("Seeded trees → cache `hook_embed` + every `resid_post` → probe each edge's source (node 0) and target "
               "(node 1) at its 2nd, 3rd and 4th token.")
    c1, c2, c3 = st.columns(3)
    n_trees = c1.number_input("Trees", 50, 2000, 400, step=50, key="layers_tree_n", bind="query-params")
    tseed = c2.number_input("Seed", 0, 10_000, 0, key="layers_tree_seed", bind="query-params") if glue.research() else 0
    tC = c3.select_slider("C", [0.01, 0.1, 1.0, 10.0], 1.0, key="layers_tree_C", bind="query-params")
    if st.button("Tree edge probes (notebook preset)", type="primary", key="layers_tree_run"):
        st.session_state["layers_tree_on"] = True
    if st.session_state.get("layers_tree_on"):
        with glue.user_errors():
            update, done = glue.progress_bar("Caching tree prompts")
            entry = lp.build_tree_cache(model, lp.tree_edge_samples(int(n_trees), int(tseed)), glue.get_store(), seed=int(tseed), progress=update)
            done()
            res = _tree(entry.key, int(n_trees), int(tseed), float(tC))
        _show(res, "tree-edges", {"preset": "tree-edges", "n_samples": int(n_trees), "seed": int(tseed), "C": float(tC), "entry": entry.key})
    st.divider()

st.subheader("Probe a label across layers")
acts = glue.entry_picker(model, page="layers", hooks_like="resid", build_hooks=glue.DEFAULT_BUILD)
families = [f for f in ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
            if any(h in acts.hooks for h in model.hook_names([f]))]
default_fams = [f for f in ("embed", "resid_post") if f in families] or families[:1]
fams = st.multiselect("Hooks", families, default=default_fams, key="layers_families", bind="query-params")
hooks = [h for h in model.hook_names(fams) if h in acts.hooks] if fams else []

cols = sorted(acts.columns())
l1, l2, l3 = st.columns(3)
kind = l1.radio("Label", ["Token identity", "Dataset column"] if cols else ["Token identity"], key="layers_label", bind="query-params")
if kind == "Dataset column":
    column = l2.selectbox("Column", cols, key="layers_column", bind="query-params")
    label = lp.LayerLabelSpec("column", column=column)
else:
    # Opens on the previous token: a question whose answer changes across layers (the current token is
    # 1.000 everywhere, selectivity 0: nothing to read).
    offset = l2.slider("Token offset (-1 = the token before, -2 = two back, 0 = current, 1 = next)", -5, 2, -1,
                       key="layers_offset", bind="query-params")
    label = lp.LayerLabelSpec("token", offset=int(offset))
top_k = l3.slider("Keep the top-K classes", 2, 50, 20, key="layers_top_k", bind="query-params")
label = lp.LayerLabelSpec(label.kind, label.offset, label.column, int(top_k))

p1, p2, p3 = st.columns(3)
rule = p1.radio("Positions", ["All tokens", "Fixed positions", "Matching tokens", "Every k-th"], key="layers_rule", bind="query-params")
if rule == "Fixed positions":
    text = p2.text_input("Positions (-1 = last token)", "1,2,-1", key="layers_positions", bind="query-params")
    with glue.user_errors():
        pos = lp.parse_positions("at:" + text, split=p2.checkbox("One column per position", True, key="layers_split", bind="query-params"))
elif rule == "Matching tokens":
    text = p2.text_input("Tokens (comma-separated, e.g. ' the, a')", " the", key="layers_tokens", bind="query-params")
    pos = lp.PositionSpec("tokens", tokens=tuple(t for t in text.split(",") if t))
elif rule == "Every k-th":
    pos = lp.PositionSpec("every", every=int(p2.number_input("k", 1, 64, 4, key="layers_every", bind="query-params")))
else:
    pos = lp.PositionSpec("all")
C = p3.select_slider("C (inverse L2 strength)", [0.001, 0.01, 0.1, 1.0, 10.0, 100.0], 1.0, key="layers_C", bind="query-params")

with glue.user_errors():
    res = _probe(acts.key, tuple(hooks), label, pos, float(C), 0.3, 0)
_show(res, "custom", {"label": label.name(), "top_k": int(top_k), "positions": pos.name(), "hooks": hooks, "C": float(C),
                      "test_fraction": 0.3, "seed": 0})
