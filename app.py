"""Router: page config, navigation, the shared sidebar (model and dataset)."""
import streamlit as st

st.set_page_config(page_title="Probing dashboard", page_icon="🔬", layout="wide", initial_sidebar_state="auto")

_PAGES = [
    ("pages/home.py", "Home", "🏠"),
    ("pages/regression.py", "Regression probes", "📈"),
    ("pages/sparse.py", "Sparse probes", "🧮"),
    ("pages/layers.py", "Layer probes", "🧱"),
    ("pages/attention.py", "Attention", "👀"),
    ("pages/lens.py", "Logit lens", "🔭"),
    ("pages/interventions.py", "Interventions", "🎛️"),
    ("pages/tree.py", "Tree search", "🌳"),
]

pages = [st.Page(path, title=title, icon=icon, default=(i == 0)) for i, (path, title, icon) in enumerate(_PAGES)]
# Navigation first: until it has run once, a fresh server shows Streamlit's bare list of the pages/ files,
# and importing glue (torch, TransformerLens) takes seconds on a cold start.
nav = st.navigation(pages)

import glue  # noqa: E402

glue.serve_event_loop_first()  # health checks and every browser before page scripts, on busy cores
glue.page_style()
glue.sign_in_gate()  # PROBING_AUTH=1: nothing below runs until the visitor has signed in
glue.sidebar()
nav.run()
