"""Attention: CircuitsVis view of one layer (offline bundle), head-score heatmaps, one head in detail."""
import json
from dataclasses import replace

import pandas as pd
import streamlit as st

import glue
from probing_core.analyses import attention
from probing_core.plots import attention as plots

st.title("👀 Attention")
glue.explain(
    "Each attention head decides, for every token (query), how much to read from each earlier token (key). "
    "The grid shows one layer's heads; the heatmaps summarise every head: **entropy** (spread out vs focused), "
    "**previous-token** score, attention to the **first token** (often a resting place), and attention to a token you pick.",
    demo="When the model reads a word, it **looks back** at earlier words to decide what comes next. Each small "
         "reader inside it (a *head*) looks at different words. Here you see where each head looks: bright = looks "
         "a lot.",
    steps=["keep the example sentence or type your own", "hover the small squares to see which word each head "
           "looks at", "in the heatmaps, bright cells are heads with a clear habit (e.g. always the word before)"],
)
model = glue.selected_model()

source = st.radio("Text", ["Type a prompt", "Dataset sample"], horizontal=True, key="attn_source", bind="query-params")
if source == "Type a prompt":
    text = st.text_area("Prompt", "When Mary and John went to the store, John gave a drink to", key="attn_prompt",
                        bind="query-params", height=80)
else:
    dataset = glue.selected_dataset()
    if not dataset.documents:
        st.warning("This dataset has no documents (the vocabulary lists tokens). Pick a text corpus in the sidebar or type a prompt.")
        st.stop()
    doc = st.number_input(f"Document (0…{dataset.n_docs - 1})", 0, dataset.n_docs - 1, 0, key="attn_doc", bind="query-params")
    text = dataset.documents[int(doc)]
c1, c2 = st.columns(2)
max_len = c1.slider("Max tokens shown", 8, 256, 64, key="attn_max_len", bind="query-params",
                    help="Longer texts are cut; CircuitsVis gets hard to read past ~100 tokens.")
layer = c2.number_input(f"Layer (0…{model.n_layers - 1})", 0, model.n_layers - 1, 0, key="attn_layer", bind="query-params")


def _every_layer(text: str, max_len: int) -> attention.AttentionResult:
    """Every layer's patterns from one forward pass, shared by all sessions: a layer change only slices it."""
    return glue.shared_result("attn_all", (model.key, text, max_len),
                              lambda _: attention.attention_patterns(model, text, layer=None, max_len=max_len),
                              keep=8, label="Running the model (every layer at once)")


def _scores(everything: attention.AttentionResult, max_len: int, selected: int | None) -> attention.HeadScores:
    return glue.shared_result("attn_scores", (model.key, everything.prompt, max_len, selected),
                              lambda _: attention.head_scores(everything.pattern, everything.tokens, selected_token=selected),
                              keep=16, label="Scoring every head")


with glue.user_errors():
    everything = _every_layer(text, int(max_len))
res = replace(everything, pattern=everything.pattern[int(layer)], layer=int(layer))  # one layer of the stored run
if res.notice:
    st.info(res.notice[0].upper() + res.notice[1:])

st.subheader(f"Layer {int(layer)}: all {res.n_heads} heads")
page = glue.shared_result("attn_html", (model.key, text, int(max_len), int(layer)), lambda _: attention.circuitsvis_html(
    res.tokens, res.pattern, title=f"{model.spec.label()} · layer {int(layer)}"), keep=8, label="Drawing the heads")
st.iframe(page, height=plots.circuitsvis_frame_height(res.n_heads))  # the whole view: thumbnails + zoomed pattern
st.download_button("⬇ CircuitsVis page (standalone HTML, works offline)", page, f"attention-layer{int(layer)}.html",
                   "text/html", key="attn_dl_html")


@st.fragment
def head_scores_view(everything: attention.AttentionResult, max_len: int) -> None:
    """Picking a token reruns only this part (not the model, not the 1.3 MB CircuitsVis frame)."""
    st.subheader("Head scores (every layer)")
    positions = list(range(len(everything.tokens)))
    sel = st.selectbox("Attention to token", [None] + positions, key="attn_sel", bind="query-params",
                       format_func=lambda p: "(none)" if p is None else f"{p}: {everything.tokens[p]!r}")
    with glue.user_errors():
        scores = _scores(everything, max_len, sel)
    st.plotly_chart(glue.cached_figure("attn_scores", (model.key, everything.prompt, max_len, sel),
                                       lambda: plots.head_scores_grid(scores)), key="attn_scores_grid")
    st.download_button("⬇ Head scores (CSV)", pd.DataFrame(scores.rows()).to_csv(index=False), "head-scores.csv",
                       "text/csv", key="attn_dl_scores")


@st.fragment
def one_head_view(res: attention.AttentionResult, layer: int, max_len: int) -> None:
    """Picking a head reruns only this part."""
    st.subheader("One head")
    head = st.selectbox("Head", list(range(res.n_heads)), key="attn_head", bind="query-params", format_func=lambda h: f"H{h}")
    with glue.user_errors():
        pat = res.head(int(head))
    st.plotly_chart(glue.cached_figure("attn_head", (model.key, res.prompt, max_len, layer, int(head)),
                                       lambda: plots.head_pattern_heatmap(res.tokens, pat, title=f"L{layer}H{int(head)}")),
                    key="attn_head_map")
    st.download_button(f"⬇ L{layer}H{int(head)} pattern (CSV)", pd.DataFrame(res.head_rows(int(head))).to_csv(index=False),
                       f"pattern-L{layer}H{int(head)}.csv", "text/csv", key="attn_dl_head")
    manifest = {**glue.manifest_base(model), "page": "attention", "source": source, "text": text[:2000], "layer": layer,
                "head": int(head), "max_len": max_len, "selected_token": st.session_state.get("attn_sel"),
                "truncated": res.truncated, "tokens": res.tokens}
    st.download_button("⬇ Run manifest (JSON)", json.dumps(manifest, indent=1, default=str), "attention-manifest.json",
                       "application/json", key="attn_dl_manifest")


head_scores_view(everything, int(max_len))
one_head_view(res, int(layer), int(max_len))
