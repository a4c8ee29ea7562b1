"""Logit lens: next-token top-k, layer-by-layer predictions, logit difference and its attribution."""
import pandas as pd
import streamlit as st

import glue
from probing_core.analyses import lens
from probing_core.plots import lens as plots

st.title("🔭 Logit lens")
glue.explain(
    "The **logit lens** asks every layer: *if the model had to answer now, what would it say?* Each layer's "
    "residual stream goes through the model's final LayerNorm and unembedding. **Logit difference** compares two "
    "answers (\" great\" vs \" awful\"); **attribution** splits that difference into what each layer and each "
    "attention head wrote into the residual stream — the parts add up to the model's own logit difference.",
    demo="What would the model say **if it had to answer early**, after only a few of its layers? We stop it at every "
         "layer and read out its best guess for the next word. Early guesses are often odd; watch when the right "
         "answer (\" Paris\") shows up.",
    steps=["type a sentence that stops before a word the model should know", "open **Logit lens** and read the "
           "rows from the first layer to the last", "the row where the right word appears is where the model "
           "figured it out"],
)
model = glue.selected_model()
VIEWS = ["Next token", "Logit lens", "Logit difference & attribution"]
view = st.radio("View", VIEWS, horizontal=True, key="lens_view", bind="query-params")
bos = st.checkbox("Prepend the BOS token (as TransformerLens does; every result here depends on it)", True,
                  key="lens_bos", bind="query-params")
TOP_K_MAX = 20


def _csv(rows, name: str, label: str) -> None:
    glue.download(f"⬇ {label} (CSV)", rows, f"{name}.csv", f"lens_dl_{name}")


def _manifest(params: dict, result: dict) -> None:
    manifest = glue.run_manifest(model, page="logit lens", view=view, params=params, result=result)
    glue.download(glue.MANIFEST_LABEL, manifest, "lens-manifest.json", "lens_dl_manifest")


if view != VIEWS[2]:
    prompt = st.text_area("Prompt", "The capital of France is", key="lens_prompt", bind="query-params", height=80)
    k = st.slider("Top-k", 1, TOP_K_MAX, 5, key="lens_k", bind="query-params")

if view == VIEWS[0]:
    answer = st.text_input("Answer to rank (optional, one token; mind the leading space)", "", key="lens_answer",
                           bind="query-params")
    with glue.user_errors():
        # One forward pass for the slider's whole range: a top-k move only shortens the list.
        res = glue.next_token_topk(model, model.key, prompt, TOP_K_MAX, answer or None, bos).first(k)
    st.caption("Tokens: " + " · ".join(repr(t) for t in res.tokens))
    if res.answer is not None:
        glue.metric_row(("Answer rank (0 = top)", res.answer_rank), ("Answer probability", f"{res.answer_prob:.4f}"),
                        ("Answer logit (centred)", f"{res.answer_logit:.3f}", {"help": "raw logit − its mean over the "
                         "vocabulary (the centred unembedding); probabilities are unchanged"}))
    st.dataframe(pd.DataFrame(res.rows()), hide_index=True)
    st.plotly_chart(plots.next_token_bar(res), key="lens_next_bar")
    _csv(res.rows(), "next-token-topk", "Top-k table")
    _manifest({"prompt": prompt, "k": k, "answer": answer}, res.to_json())

elif view == VIEWS[1]:
    c1, c2 = st.columns(2)
    incl_mid = c1.checkbox("Include mid-layer points (after attention)", False, key="lens_mid", bind="query-params")
    colour = c2.selectbox("Colour by", list(plots.LENS_COLOURS), key="lens_colour", bind="query-params",
                          format_func=plots.LENS_COLOURS.get)
    with glue.user_errors():
        res = glue.logit_lens(model, model.key, prompt, k, incl_mid, bos)
    st.plotly_chart(plots.logit_lens_heatmap(res, value=colour), key="lens_heatmap")
    if len(res.tokens) > 1:
        pos = st.selectbox("Position for the next-token curve", list(range(len(res.tokens) - 1)),
                           index=len(res.tokens) - 2, key="lens_pos", bind="query-params",
                           format_func=lambda p: f"{p}: {res.tokens[p]!r} → {res.tokens[p + 1]!r}")
        st.plotly_chart(plots.next_token_by_layer(res, pos), key="lens_next_curve")
    _csv(res.rows(), "logit-lens", "Logit lens (layer × position × top-k)")
    _manifest({"prompt": prompt, "k": k, "incl_mid": incl_mid}, res.summary())

else:
    source = st.radio("Prompts", ["Sentiment templates", "My prompts"], horizontal=True, key="lens_source",
                      bind="query-params")
    with glue.user_errors():
        if source == "Sentiment templates":
            n_pairs = st.slider("Template pairs (positive + negative)", 1, 25, 4, key="lens_pairs", bind="query-params")
            ps = lens.sentiment_prompt_set(n_pairs)
            st.caption(f'Template: "{lens.SENTIMENT_TEMPLATE}" — positive → (" great", " awful"), negative → (" awful", " great").')
        else:
            text = st.text_area("One per line: prompt | correct answer | incorrect answer", key="lens_pairs_text",
                                value="The capital of France is | Paris | London\nThe capital of Italy is | Rome | Paris",
                                help='Answers get one leading space; write "ing" in quotes to keep it exact.')
            ps = lens.parse_prompt_lines(text)
        ld, at = glue.logit_attribution(model, model.key, ps, bos)
    glue.metric_row(("Model logit difference (mean)", f"{at.model_logit_diff:.4f}", {"help": ld.n_note()}),
                    ("Sum of components", f"{at.decomposition_sum:.4f}"), ("Max |error| per prompt", f"{at.max_abs_error:.2e}"))
    glue.verdict(at.adds_up, at.sum_message())
    st.plotly_chart(plots.logit_diff_bar(ld), key="lens_ld_bar")
    _csv(ld.rows(), "logit-difference", "Logit difference per prompt")
    st.plotly_chart(plots.accumulated_resid_line(at), key="lens_acc_line")
    _csv(at.accumulated_rows(), "accumulated-residual", "Accumulated residual")
    st.plotly_chart(plots.decomposition_bar(at), key="lens_dec_bar")
    _csv(at.decomposition_rows(), "decomposition", "Per-layer decomposition")
    st.plotly_chart(plots.head_dla_heatmap(at), key="lens_head_dla")
    _csv(at.head_rows(), "head-dla", "Head DLA (layer × head)")
    _manifest({"prompts": list(ps.prompts), "answers": [list(x) for x in ps.answers]},
              {**at.check(), "mean_logit_diff": ld.mean, "head_remainder": at.head_remainder})
