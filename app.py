"""Router: page config, the shared sidebar (model and dataset), navigation."""
import streamlit as st

import glue

st.set_page_config(page_title="Probing dashboard", page_icon="🔬", layout="wide")

_PAGES = [
    ("pages/home.py", "Home", "🏠"),
    ("pages/regression.py", "Regression probes", "📈"),
    ("pages/sparse.py", "Sparse probes", "🧮"),
    ("pages/layers.py", "Layer probes", "🧱"),
    ("pages/attention.py", "Attention", "👀"),
    ("pages/lens.py", "Logit lens", "🔭"),
    ("pages/tree.py", "Tree search", "🌳"),
]

pages = [st.Page(path, title=title, icon=icon, default=(i == 0)) for i, (path, title, icon) in enumerate(_PAGES)]
glue.sign_in_gate()  # PROBING_AUTH=1: nothing below runs until the visitor has signed in
glue.sidebar()
nav = st.navigation(pages)
nav.run()
