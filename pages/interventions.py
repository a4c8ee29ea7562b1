"""Interventions: steer and ablate along what a probe found, against random directions of the same norm."""
import streamlit as st

import glue
from probing_core.analyses import amnesic, directions as dirs, interventions as iv, truth_case as tc
from probing_core.data.statements import STATEMENT_SETS
from probing_core.plots import interventions as plots, lens as lens_plots

st.title("🎛️ Interventions")
glue.explain(
    "A probe shows that information is **decodable**; an intervention asks whether the model **uses** it. Take a "
    "direction a probe found, **steer** (add c standard deviations of it), **ablate** it (project it out, or set it to "
    "its mean) or patch a few **neurons**, and watch the output. Every effect is drawn beside the same intervention "
    "along **K random directions of the same norm** (the grey band): an effect inside the band is no evidence at all.")
model = glue.selected_model()
q = "query-params"
VIEWS = ["Truth case", "Steer / ablate a prompt", "On the cached dataset", "Neuron read-out"]
view = st.radio("View", VIEWS, horizontal=True, key="iv_view", bind=q)
saved: dict = st.session_state.setdefault("iv_directions", {})  # this session's directions: name → (npy, json) bytes


def _keep(d: dirs.Direction, name: str) -> None:
    npy, meta = saved[name] = dirs.direction_to_bytes(d)
    glue.downloads(("⬇ Direction (.npy)", npy, f"{name}.npy", f"iv_dl_npy_{name}"),
                   ("⬇ Its description (.json)", meta, f"{name}.json", f"iv_dl_json_{name}"))


if view == VIEWS[0]:
    c1, c2, c3, c4 = st.columns(4)
    name = c1.selectbox("Statements", list(STATEMENT_SETS), key="iv_set", bind=q, help="Marks & Tegmark, CC BY 4.0")
    n = c2.slider("Statements probed", 100, 1400, 600, 100, key="iv_n", bind=q)
    held = c3.slider("Held-out statements per class", 2, 20, 6, key="iv_held", bind=q)
    K = c4.slider("Random controls K", 5, 50, 20, key="iv_k", bind=q)
    pair = tuple(t.rstrip() for t in st.text_input("Answer pair (one token each)", " True | False", key="iv_tpair", bind=q).split("|"))
    st.caption(f"Steering strengths c (σ units): {', '.join(f'{c:+g}' for c in tc.DEFAULT_COEFS)}; one forward pass "
               f"of 1 + K prompts per held-out statement and c.")
    if st.button("Run the truth case", key="iv_truth_go", type="primary") or st.session_state.get("iv_truth_ran"):
        st.session_state["iv_truth_ran"] = True
        res = glue.truth_case(model, name, n, held, K, pair)  # a bad input: its message, and the page stops
        s = res.summary()
        glue.metric_row(("Best layer (logistic)", s["best_layer"], {"help": s["best_hook"]}),
                        ("Held-out accuracy there", f"{s['best_logistic_accuracy']:.3f}", {"delta": f"chance {s['chance']:.2f}", "delta_color": "off"}),
                        ("Mass-mean probe there", f"{s['mass_mean_accuracy_at_best']:.3f}"))
        st.plotly_chart(plots.truth_curve_figure(res.curve), key="iv_truth_curve")
        st.plotly_chart(plots.steering_sweep_figure(res.sweep), key="iv_truth_sweep")
        st.dataframe([{"case": k, **v} for k, v in s["steering"].items()], hide_index=True)
        st.caption("Few-shot prompt: " + " ⏎ ".join(f"{t} This statement is:{pair[0] if y else pair[1]}" for t, y in res.examples)
                   + f" ⏎ ⟨held-out statement⟩ This statement is: — steered at positions {res.positions}.")
        _keep(res.direction, f"truth-{name}-{res.curve.best_hook}")
        glue.download("⬇ Summary (JSON)", glue.run_manifest(model, **s), "truth-case.json", "iv_dl_truth")

elif view == VIEWS[1] or view == VIEWS[2]:
    src = st.radio("Direction", ["Made here", "From a cache entry", "Upload .npy + .json"], horizontal=True, key="iv_src")
    with glue.user_errors():
        if src == "From a cache entry" or view == VIEWS[2]:
            acts = glue.entry_picker(model, page="iv")
            hook = st.selectbox("Hook", acts.hooks, index=len(acts.hooks) // 2, key="iv_hook", bind=q)
            label, rule, _ = glue.token_label_picker(acts, page="iv")
            method = st.radio("Method", dirs.methods_at(hook), horizontal=True, key="iv_method", bind=q,
                              help="mass-mean (difference of class means) first: often the more causal direction")
            neurons = st.text_input("Neurons", "0, 1", key="iv_set_neurons") if method == "neurons" else ""
            direction, rows, y = glue.entry_direction(acts, hook, label, rule, method, neurons, model.key)
            _keep(direction, f"{method}-{hook}")
        elif src == "Upload .npy + .json":
            f1, f2 = st.file_uploader("Vector (.npy)", ["npy"], key="iv_up_npy"), st.file_uploader("Description (.json)", ["json"], key="iv_up_json")
            direction = dirs.direction_from_bytes(f1.getvalue(), f2.getvalue()) if f1 and f2 else None
        else:
            pick = st.selectbox("Direction made this session", list(saved), key="iv_pick") if saved else None
            direction = dirs.direction_from_bytes(*saved[pick]) if pick else None
        if direction is None:
            st.info("Make a direction first (Truth case, or from a cache entry), or upload one.")
            st.stop()
        dirs.check_direction(model, direction)
        st.caption(f"{direction.method} at {direction.hook}: {direction.description} · σ along it {direction.proj_std or float('nan'):.4g}")
        c1, c2, c3 = st.columns(3)
        kind = c1.selectbox("Intervention", list(iv.kinds_for(direction)), key="iv_kind", bind=q)
        coef = c2.slider("c (σ along the direction)", -20.0, 20.0, 4.0, 0.5, key="iv_c", bind=q, disabled=kind not in ("steer", "neuron_value"))
        pos = c3.text_input("Positions", "all", key="iv_pos", bind=q, help="all, last, last:N, match:TOK,TOK, idx:I,J")
        step = iv.Intervention(kind, pos, coef, value=coef)  # neuron_value writes c
        K = st.slider("Random controls K", 1, 50, 20, key="iv_k2", bind=q)
        if view == VIEWS[1]:
            prompt = st.text_area("Prompt", "The city of Paris is in France. This statement is:", key="iv_prompt", bind=q)
            answers = iv.parse_answer_pair(st.text_input("Answer pair (a | b)", " True | False", key="iv_pair", bind=q))
            eff, ld = glue.prompt_effect(model, model.key, prompt, dirs.direction_to_bytes(direction), step, answers, K)
            if eff.answers:
                st.metric("P(a) − P(b)", f"{eff.prob_diff_after:+.4f}", f"{eff.prob_diff_after - eff.prob_diff_before:+.4f} vs before")
            for cmp in eff.controls.values():
                glue.versus_controls(cmp)
                st.plotly_chart(plots.controls_figure(cmp), key=f"iv_ctl_{cmp.metric[:8]}")
            st.plotly_chart(plots.topk_before_after(eff), key="iv_topk")
            t1, t2 = st.tabs(["Logit lens: after − before", "Logit lens after"])
            t1.plotly_chart(plots.lens_diff_heatmap(ld), key="iv_lens")
            t2.plotly_chart(lens_plots.logit_lens_heatmap(eff.lens_after), key="iv_lens_after")
            st.text(f"before: {eff.continuation_before!r}\nafter:  {eff.continuation_after!r}")
        else:
            le = glue.loss_effect(model, acts, acts.key, dirs.direction_to_bytes(direction), step, K)
            glue.versus_controls(le.comparison, f"LM loss {le.base:.4f} → {le.after:.4f}. ")
            st.plotly_chart(plots.loss_figure(le), key="iv_loss")
            kmax = st.slider("Amnesic probing: directions removed", 1, 10, 3, key="iv_kmax", bind=q)
            later = st.selectbox("Downstream hook", [h for h in acts.hooks if acts.hooks.index(h) > acts.hooks.index(hook)] or [None], key="iv_later")
            if later and st.button("Fresh probe downstream (this intervention vs 3 random)", key="iv_down_go"):
                dn = amnesic.downstream_probe(model, acts, direction, step, rows, y, later, k_controls=3)
                glue.versus_controls(dn.comparison, f"Probe accuracy at {later}: {dn.base:.3f} → {dn.after:.3f} (chance {dn.chance:.3f}). ")
            if st.button("Run amnesic probing", key="iv_amnesic_go"):
                res = amnesic.amnesic_probing(model, acts, hook, rows, y, k_max=kmax, later_hook=later, n_loss_rows=2)
                st.plotly_chart(plots.amnesic_figure(res), key="iv_amnesic")
                st.dataframe(res.rows(), hide_index=True)

else:
    c1, c2, c3 = st.columns(3)
    layer = c1.number_input("Layer", 0, model.n_layers - 1, model.n_layers // 2, key="iv_layer", bind=q)
    neurons = c2.text_input("Neurons (comma-separated)", "0, 1, 2", key="iv_neurons", bind=q)
    k = c3.slider("Tokens each way", 3, 20, 8, key="iv_rk", bind=q)
    coefs = st.text_input("Their probe coefficients (optional, same order; e.g. from the Sparse page)", "", key="iv_coefs", bind=q)
    with glue.user_errors():
        idx, cf = iv.parse_readout(neurons, coefs)
        r = iv.neuron_readout(model, int(layer), idx, k=k, coefs=cf)
    st.dataframe(r.rows(), hide_index=True)
    st.caption("Each neuron's output weights W_out[n] times the unembedding W_U (final norm folded): the tokens it "
               "pushes up and down when it fires. Probe coefficients appear when the neurons come from a sparse probe.")
