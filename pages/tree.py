"""Tree search: a seeded task instance, the model's predicted path drawn on the tree, accuracy by depth."""
import json

import numpy as np
import pandas as pd
import streamlit as st

import glue
from probing_core.tree import model as tree_model, task as tree_task
from probing_core.models import ModelSpec
from probing_core.plots.tree import accuracy_by_depth, plot_tree

st.title("🌳 Tree search")
glue.explain(
    "A small transformer trained by this project solves a path-finding puzzle. The prompt lists the edges of a "
    "random binary tree in shuffled order (`12 →10 ,` means *12 is the parent of 10*), then asks "
    "`| goal : root` — and the model must write the path from the root down to the goal, one node at a time. "
    "To do that it has to find the goal's parent, that node's parent, and so on, all inside its layers. "
    "Below: a random puzzle with the **true path** (green) and the **model's path** (blue when right, red when "
    "wrong), and how often the model gets the whole path right as the path gets longer. The **Layer probes** "
    "page shows where in the model each edge's two nodes can be read out."
)

if not tree_model.checkpoint_available():
    st.warning(
        "The tree-search checkpoint is not there yet (expected in `probing_core/tree/checkpoints/tree_search/`). "
        "Train it with `python -m probing_core train-tree`, then reload this page."
    )
    st.stop()
with glue.user_errors():
    model = glue.get_model(ModelSpec("tree"))
    trained_n = tree_model.trained_n_nodes()
    max_n = max(trained_n, tree_model.max_nodes_for_context(model.n_ctx))  # larger trees do not fit its context


@st.cache_data(max_entries=64, show_spinner=False)
def _predict(key: str, seed: int, n_nodes: int, depth: int | None, text: str) -> tuple[tree_task.TreeSample, list[int]]:
    sample = tree_task.parse_sample(text) if text else tree_task.generate_tree(np.random.default_rng(seed), n_nodes, depth)
    return sample, tree_model.predict_path(model, sample)


@st.cache_data(max_entries=8, show_spinner="Decoding the test set…")
def _accuracy(key: str, seed: int, n_samples: int, n_nodes: int) -> tuple[dict, list[dict], list[dict]]:
    samples = tree_task.make_dataset(n_samples, seed, n_nodes, depths=list(range(1, n_nodes)), natural_fraction=0.0)
    ev = tree_model.evaluate(model, samples)
    rows = [tree_model.sample_row(s, p, root_included=False) for s, p in zip(samples, ev.predictions)]
    return ev.to_json(), ev.depth_rows(), rows


st.subheader("One puzzle")
c1, c2, c3 = st.columns(3)
seed = int(c1.number_input("Seed", 0, 1_000_000, 0, key="tree_seed", bind="query-params"))
n_nodes = int(c2.slider("Nodes", 3, max_n, trained_n, key="tree_nodes", bind="query-params",
                        help=f"The loaded model's context holds trees of up to {max_n} nodes; it was trained on {trained_n}."))
depth = int(c3.slider("Goal depth (0 = a random leaf)", 0, n_nodes - 1, 0, key="tree_depth", bind="query-params"))
text = st.text_input("…or paste a prompt (e.g. `0 →1 , 0 →2 , 1 →3 , | 3 : 0`)", "", key="tree_text").strip()
if n_nodes != trained_n and not text:
    st.caption(f"The model was trained on trees of {trained_n} nodes; other sizes are out of its training frame.")
with glue.user_errors():
    sample, pred = _predict(model.key, seed, n_nodes, depth or None, text)
correct = pred == list(sample.path)
m1, m2, m3 = st.columns(3)
m1.metric("Path length (depth)", sample.depth)
m2.metric("Model's path", "correct ✅" if correct else "wrong ❌")
m3.metric("Goal / root", f"{sample.goal} / {sample.root}")
st.plotly_chart(plot_tree(sample, pred), key="tree_plot")
st.code(f"prompt: {model.tokenizer.decode(sample.prompt_ids)}\ntrue:   {' '.join(f'→{v}' for v in sample.path[1:])}\n"
        f"model:  {' '.join(f'→{v}' if v >= 0 else '?' for v in pred[1:])}", language=None)

st.subheader("Accuracy by depth")
a1, a2 = st.columns(2)
n_test = int(a1.select_slider("Test puzzles", [60, 150, 300, 600, 1200], 300, key="tree_n_test", bind="query-params"))
test_seed = int(a2.number_input("Test seed", 0, 1_000_000, 12345, key="tree_test_seed", bind="query-params"))
with glue.user_errors():
    ev, by_depth, rows = _accuracy(model.key, test_seed, n_test, trained_n)
st.metric(f"Whole path right ({ev['n_samples']} puzzles, depths 1–{trained_n - 1} equally often)", f"{ev['accuracy']:.1%}")
df = pd.DataFrame(by_depth)
st.plotly_chart(accuracy_by_depth(df["depth"], df["accuracy"], df["puzzles"]), key="tree_depth_plot")
st.dataframe(df, hide_index=True, width="stretch")
st.caption("Exact-path accuracy of greedy decoding: a puzzle counts only if every node of the path is right.")

st.subheader("Downloads")
params = {"seed": seed, "n_nodes": n_nodes, "depth": depth, "prompt": text, "test_seed": test_seed, "n_test": n_test}
d1, d2, d3, d4 = st.columns(4)
d1.download_button("⬇ This puzzle (JSON)", json.dumps({**tree_model.sample_row(sample, pred), "params": params}, indent=1),
                   "tree-puzzle.json", "application/json", key="tree_dl_puzzle")
d2.download_button("⬇ Test puzzles and predicted paths (CSV)", pd.DataFrame(rows).to_csv(index=False),
                   "tree-predictions.csv", "text/csv", key="tree_dl_predictions")
d3.download_button("⬇ Accuracy by depth (CSV)", df.to_csv(index=False), "tree-accuracy-by-depth.csv", "text/csv",
                   key="tree_dl_depth")
d4.download_button("⬇ Accuracy (JSON)", json.dumps({**glue.manifest_base(model), "page": "tree search", "params": params,
                                                     "trained_n_nodes": trained_n, "result": ev}, indent=1, default=str),
                   "tree-accuracy.json", "application/json", key="tree_dl_json")
