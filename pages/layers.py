"""Layer probes: accuracy of a categorical probe at every hook (layer) and position; tree edge preset."""
import streamlit as st

import glue
from probing_core.analyses import layer_probes as lp
from probing_core.plots import layers as plots

Q = "query-params"
OFFSETS, TOP_K = (-5, 2), (2, 50)  # the label sliders' ranges
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
    steps=["pick what to guess (the word before, two back, …)",
           "read the table top to bottom: the embedding, then layer 0, 1, …",
           "where the score jumps is where the model gathers that word"],
)
model = glue.selected_model()


def show(res: lp.LayerAccuracyResult, name: str, params: dict, acts=None) -> None:
    """The table (intervals in an expander), its notes, the two charts and the downloads of one result."""
    table, intervals = plots.accuracy_tables(res, research=glue.research())
    st.caption(lp.table_note(res))
    narrow = {c: st.column_config.Column(width="small", help=c) for c in res.columns} if len(res.columns) > 2 else None
    st.dataframe(table.style.format(precision=3), hide_index=True, width="stretch", column_config=narrow)
    if intervals is not None:
        with st.expander("95 % intervals of these accuracies"):
            st.dataframe(intervals, hide_index=True, width="stretch")
    st.caption(lp.split_note(res, params.get("test_fraction", 0.3)))
    for note in res.notes:
        st.caption("ℹ️ " + note)
    if not res.converged.all():
        st.warning("Some probes did not fully converge; try a smaller C.")
    tab1, tab2 = st.tabs(["Heatmap", "Across layers"])
    state = (name, repr(sorted(params.items())), None if acts is None else acts.key, tuple(res.columns))  # the inputs
    tab1.plotly_chart(glue.cached_figure("layers_heat", state, lambda: plots.accuracy_heatmap(res)), key=f"layers_heat_{name}")
    tab2.plotly_chart(glue.cached_figure("layers_lines", state, lambda: plots.accuracy_lines(res)), key=f"layers_lines_{name}")
    doc = {**glue.manifest_base(model, acts), "page": "layer probes", "params": params, "result": res.to_json()}
    glue.downloads(("⬇ Accuracy table (CSV)", res.table(), f"layer-probes-{name}.csv", f"layers_dl_csv_{name}"),
                   ("⬇ Run manifest (JSON)", doc, f"layer-probes-{name}.json", f"layers_dl_json_{name}"))


@st.fragment
def tree_preset() -> None:
    """The notebook's tree edge preset (a fragment: its controls do not rerun the label section below)."""
    st.subheader("Tree edge probes (notebook preset)")
    st.caption("Seeded trees → cache `hook_embed` + every `resid_post` → probe each edge's source (node 0) and target "
               "(node 1) at its 2nd, 3rd and 4th token.")
    c1, c2, c3 = st.columns(3)
    n_trees = c1.number_input("Trees", 50, 2000, 400, step=50, key="layers_tree_n", bind=Q)
    tseed = c2.number_input("Seed", 0, 10_000, 0, key="layers_tree_seed", bind=Q) if glue.research() else 0
    tC = c3.select_slider("C", [0.01, 0.1, 1.0, 10.0], 1.0, key="layers_tree_C", bind=Q)
    if st.button("Tree edge probes (notebook preset)", type="primary", key="layers_tree_run"):
        st.session_state["layers_tree_on"] = True
    if st.session_state.get("layers_tree_on"):
        with glue.user_errors():
            res, key = glue.tree_edge_probes(model, int(n_trees), int(tseed), float(tC))
        show(res, "tree-edges", {"preset": "tree-edges", "n_samples": int(n_trees), "seed": int(tseed), "C": float(tC), "entry": key})
    st.divider()


@st.fragment
def label_probes() -> None:
    """Any label across layers (a fragment: its controls do not rerun the tree preset above)."""
    st.subheader("Probe a label across layers")
    acts = glue.entry_picker(model, page="layers", hooks_like="resid", build_hooks=glue.DEFAULT_BUILD)
    families, default_fams = lp.families_in(model, acts.hooks)
    fams = st.multiselect("Hooks", families, default=default_fams, key="layers_families", bind=Q)
    hooks = [h for h in model.hook_names(fams) if h in acts.hooks] if fams else []
    cols = sorted(acts.columns())
    l1, l2, l3 = st.columns(3)
    kind = l1.radio("Label", ["Token identity", "Dataset column"] if cols else ["Token identity"], key="layers_label", bind=Q)
    if kind == "Dataset column":
        label = lp.LayerLabelSpec("column", column=l2.selectbox("Column", cols, key="layers_column", bind=Q))
    else:  # opens on the previous token: an answer that changes across layers (the current token is 1.000 everywhere)
        label = lp.LayerLabelSpec("token", offset=int(l2.slider(
            "Token offset (-1 = the token before, -2 = two back, 0 = current, 1 = next)", *OFFSETS, -1, key="layers_offset", bind=Q)))
    top_k = l3.slider("Keep the top-K classes", *TOP_K, 20, key="layers_top_k", bind=Q)
    label = lp.LayerLabelSpec(label.kind, label.offset, label.column, int(top_k))
    p1, p2, p3 = st.columns(3)
    rule = p1.radio("Positions", ["All tokens", "Fixed positions", "Matching tokens", "Every k-th"], key="layers_rule", bind=Q)
    if rule == "Fixed positions":
        text = p2.text_input("Positions (-1 = last token)", "1,2,-1", key="layers_positions", bind=Q)
        with glue.user_errors():
            pos = lp.parse_positions("at:" + text, split=p2.checkbox("One column per position", True, key="layers_split", bind=Q))
    elif rule == "Matching tokens":
        text = p2.text_input("Tokens (comma-separated, e.g. ' the, a')", " the", key="layers_tokens", bind=Q)
        pos = lp.PositionSpec("tokens", tokens=tuple(t for t in text.split(",") if t))
    elif rule == "Every k-th":
        pos = lp.PositionSpec("every", every=int(p2.number_input("k", 1, 64, 4, key="layers_every", bind=Q)))
    else:
        pos = lp.PositionSpec("all")
    C = p3.select_slider("C (inverse L2 strength)", list(glue.LAYERS_C_GRID), 1.0, key="layers_C", bind=Q,
                         help="Once a table is shown, the other C values (and one step of the offset and top-K) are fitted in the "
                              "background: a move there is a lookup.")
    every_row = glue.research() and p3.checkbox("Control on every row (slower)", key="layers_ctrl_all", bind=Q,
                                                help="The control task on every row of the column (up to 6,000), not "
                                                     "on as many rows as the real task (the default: the same n).")
    with glue.user_errors():
        res = glue.layer_probes(acts.key, tuple(hooks), label, pos, float(C), control_samples=None if every_row else "task",
                                nearby=lp.one_step_away(label, OFFSETS, TOP_K))  # fitted next, in the background
    show(res, "custom", {"label": label.name(), "top_k": int(top_k), "positions": pos.name(), "hooks": hooks, "C": float(C),
                         "test_fraction": 0.3, "seed": 0, "control_rows": "all" if every_row else "as many as the task"}, acts)


if model.spec.kind == "tree":
    tree_preset()
label_probes()
