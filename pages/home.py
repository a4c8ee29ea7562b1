"""Home: pick hooks, build the activation cache with a progress bar, list and delete entries."""
import pandas as pd
import streamlit as st

import glue
from probing_core.store.activations import BuildParams
from probing_core.store.ray_engine import build_cache_on, ray_address_from_env

st.title("🏠 Home")
st.caption("Cache a model's activations once, then probe them: R² curves, sparse L1 paths, layer accuracy, attention and the logit lens.")
glue.explain(
    "A **probe** is a small linear model that tries to read a property (say, a token's length) out of a "
    "model's internal activations. If a simple probe can read it at layer 5 but not at layer 1, the model "
    "has computed that property by layer 5. This page runs text through the model once and saves the "
    "activations so every other page can fit probes in seconds.",
    demo="A language model turns every word into a long list of numbers, layer after layer. A **probe** is a tiny "
         "test that checks whether some fact (say, how long a word is) can be read from those numbers. This page "
         "runs some text through the model once and saves the numbers, so every other page answers in seconds.",
    steps=["click **Build cache** below", "wait for the bar to finish",
           "open a page in the sidebar (start with **Regression probes**)"],
)

glue.open_access_note()
model = glue.selected_model()
dataset = glue.selected_dataset()

c1, c2, c3, c4 = st.columns(4)
c1.metric("Layers", model.n_layers)
c2.metric("d_model" if glue.research() else "Numbers per token", model.d_model)
c3.metric("Heads" if glue.research() else "Attention heads per layer", model.n_heads)
c4.metric("Documents" if dataset.spec.kind != "vocab" else "Vocabulary", f"{dataset.n_docs:,}" if dataset.spec.kind != "vocab" else f"{model.d_vocab:,}")
if glue.research():
    st.caption(f"{model.spec.label()} · key `{model.key}` · {model.device} · " + " · ".join(model.notes))
else:
    st.caption(model.spec.label())

glue.show_demo_build(model)  # demo mode: the example entry building in the background since the model loaded
st.subheader("Build a cache entry")
families = {
    "embed": "token embedding (hook_embed)",
    "resid_pre": "residual stream before each block",
    "resid_mid": "residual stream between attention and MLP",
    "resid_post": "residual stream after each block",
    "attn_out": "attention output of each block",
    "mlp_out": "MLP output of each block",
    "mlp_post": "MLP neurons after the activation (d_mlp wide)",
}
picked = st.multiselect(
    "Hooks" if glue.research() else "Places in the model to save", list(families),
    default=list(glue.DEFAULT_BUILD.families),
    format_func=(lambda f: f"{f} — {families[f]}") if glue.research() else families.get, key="home_hooks",
)
st.caption("The **Sparse probes** page needs the MLP neurons (`mlp_post`); it offers to build them itself in one click.")
cap = glue.max_tokens_cap()
a, b, c = st.columns(3)
max_tokens = a.number_input("Max tokens", min_value=1, max_value=cap, value=min(glue.DEFAULT_BUILD.max_tokens, cap), step=1000, key="home_max_tokens")
max_len = b.number_input("Tokens per row", min_value=2, max_value=min(model.n_ctx, 1024), value=min(128, model.n_ctx), key="home_max_len")
store_dtype = "float32"
if glue.research():
    store_dtype = c.selectbox("Storage dtype", ["float32", "float16"], key="home_store_dtype", help="float16 halves disk and read time; R² changes by ≤ 1.5e-4")

address = None if glue.demo_mode() else ray_address_from_env()  # a configured Ray cluster (docs/scale.md)
on_ray = bool(address) and st.radio("Build on", [False, True], horizontal=True, key="home_engine",
                                    format_func=lambda r: f"Ray cluster at {address}" if r else "this machine")
if st.button("Build cache", type="primary", disabled=not picked, key="home_build"):
    with glue.user_errors():
        update, done = glue.progress_bar("Building cache")
        entry, built = build_cache_on(model, dataset, model.hook_names(picked), store=glue.get_store(),
                                      params=BuildParams(int(max_len), int(max_tokens), store_dtype),
                                      ray_address=address if on_ray else None, progress=update)
        done()
    st.session_state["home_entry_key"] = entry.key
    name = f"`{entry.key}`" if glue.research() else "the cache"
    if built:
        st.success(f"Built {name}: {entry.n_tokens:,} tokens × {len(entry.hooks)} hooks in {entry.meta['seconds']:.1f} s ({entry.meta['tokens_per_second']:,.0f} tokens/s), {entry.bytes / 1e6:.1f} MB.")
    else:
        st.info(f"Already cached as {name} ({entry.n_tokens:,} tokens) — nothing to recompute.")
    bad = {h: n for h, n in entry.meta.get("nonfinite", {}).items() if n}
    if bad:
        st.warning(f"Non-finite values (overflow?) in {len(bad)} hooks: {bad}. Rebuild with float32 storage.")

st.subheader("Cached entries")
store = glue.get_store()
entries, broken = store.scan()
if not entries:
    st.write("Nothing cached yet.")
else:
    rows = [
        {
            "key": e.key, "model": e.meta.get("model_label"), "dataset": e.meta.get("dataset_label"),
            "tokens": e.n_tokens, "hooks": len(e.hooks), "dtype": e.meta.get("dtype"),
            "MB": round(e.bytes / 1e6, 1), "this model": e.meta.get("model_key") == model.key,
        }
        for e in entries
    ]
    table = pd.DataFrame(rows)
    if not glue.research():  # no keys, paths or delete buttons in a demo
        st.dataframe(table.drop(columns=["key", "dtype"]), hide_index=True, width="stretch")
    else:
        st.dataframe(table, hide_index=True, width="stretch")
        st.caption(f"{sum(e.bytes for e in entries) / 1e6:.1f} MB of {store.size_limit / 1e9:.0f} GB limit in `{store.root}` (least recently used entries are evicted past the limit).")
        d1, d2 = st.columns([3, 1])
        to_delete = d1.selectbox("Entry", [e.key for e in entries], key="home_delete_key", label_visibility="collapsed")
        if d2.button("Delete entry", key="home_delete"):
            with glue.user_errors():
                store.delete(to_delete)
            st.session_state.pop("home_entry_key", None)
            st.rerun()
for b in broken:  # damaged entries are set aside (never read); say so and offer to delete them
    w1, w2 = st.columns([4, 1])
    w1.warning(f"Broken cache entry `{b.key}`: {b.reason}. It is not used; delete it and build it again.")
    if glue.research() and w2.button("Delete", key=f"home_delete_broken_{b.key}"):
        with glue.user_errors():
            store.delete(b.key)
        st.rerun()
if store.index_problem:
    st.warning(store.index_problem)
