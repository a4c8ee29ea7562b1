"""Every chart tells the truth about its data: checked on the figure's own data (not pixels).

Figures are built from real result types (the tiny native model and its cache entry, the real
analysis functions). Generic checks (``check_figure``) apply to every chart:
  - log axes: explicit ranges are log10 units inside the data's decades; shapes on them hold
    values and annotations log10 values (plotly.js 4), both inside the data's decades (an
    annotation given a value lands at 10^value: the 10^162 α axis);
  - every trace whose colours carry a meaning has a legend entry or a colour bar;
  - numeric axes say how to print their ticks (``tickformat``, explicit ``ticktext`` or powers);
  - hooks on a category axis are named for people, never ``blocks.5.hook_resid_post``;
  - a legend never sits on the plot, its tick labels or a (panel) title.
Each chart then gets a test of what was seen wrong on it. ``render_gallery`` (run this file as a
script) writes every figure to HTML for a look in Chromium.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from probing_core.analyses import attention as att
from probing_core.analyses import lens
from probing_core.analyses import sparse
from probing_core.analyses.layer_probes import LayerLabelSpec, PositionSpec, probe_layers
from probing_core.analyses.regression import run_regression, probe_transfer
from probing_core.data.labels import LabelSpec
from probing_core.plots import attention as attention_plots
from probing_core.plots import layers as layer_plots
from probing_core.plots import lens as lens_plots
from probing_core.plots import regression as reg_plots
from probing_core.plots import sparse as sparse_plots
from probing_core.plots import tree as tree_plots
from probing_core.plots._common import hook_label
from probing_core.store.activations import open_entry
from probing_core.tree import task as tree_task

HOOKS = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
         "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]


# ---------------------------------------------------------------- generic checks

def _axis_name(ref: str | None, letter: str) -> str:
    ref = ref or letter
    return f"{letter}axis{ref[1:]}"


def _values(v) -> np.ndarray:
    if v is None:
        return np.array([])
    try:
        a = np.asarray(v, dtype=float).ravel()
    except (TypeError, ValueError):
        return np.array([])
    return a[np.isfinite(a)]


def _axis_data(fig: go.Figure, name: str) -> np.ndarray:
    letter = name[0]
    out = []
    for t in fig.data:
        if t.type in ("heatmap",) and letter == "x" and t.x is None:
            continue
        if _axis_name(getattr(t, f"{letter}axis", None), letter) == name:
            out.append(_values(getattr(t, letter, None)))
    return np.concatenate(out) if out else np.array([])


def _axes(fig: go.Figure) -> dict:
    full = fig.layout.to_plotly_json()
    return {k: v for k, v in full.items() if k[:5] in ("xaxis", "yaxis")} | {
        n: {} for t in fig.data for n in (_axis_name(getattr(t, "xaxis", None), "x"), _axis_name(getattr(t, "yaxis", None), "y"))
        if n not in full}


def _legend_colours(fig: go.Figure) -> set[str]:
    out = set()
    for t in fig.data:
        if t.showlegend is False:
            continue
        for c in (getattr(getattr(t, "marker", None), "color", None), getattr(getattr(t, "line", None), "color", None)):
            if isinstance(c, str):
                out.add(c.lower())
    return out


def _has_colour_scale(t) -> bool:
    if t.type in ("heatmap", "contour"):
        return t.showscale is not False
    m = getattr(t, "marker", None)
    return bool(m is not None and m.showscale)


def check_log_axes(fig: go.Figure) -> None:
    for name, ax in _axes(fig).items():
        if ax.get("type") != "log":
            continue
        data = _axis_data(fig, name)
        data = data[data > 0]
        assert data.size, f"{name}: log axis without positive data"
        lo, hi = math.log10(data.min()), math.log10(data.max())
        if ax.get("range") is not None:
            r0, r1 = ax["range"]
            assert r0 <= lo + 1e-9 and r1 >= hi - 1e-9, f"{name}: range {ax['range']} (log10) misses data {lo:.2f}…{hi:.2f}"
            assert r0 >= min(lo, 0.0) - 1.5 and r1 <= hi + 1.5, f"{name}: range {ax['range']} (log10) is far outside the data's decades"
        ref = name[0] + name[5:]
        letter = name[0]
        # plotly.js 4: shapes on a log axis take data values, annotations take log10 values
        for s in fig.layout.shapes:
            if (getattr(s, f"{letter}ref") or "") == ref:  # "x domain" shapes span the plot: fractions
                for v in (getattr(s, f"{letter}0"), getattr(s, f"{letter}1")):
                    assert float(v) > 0 and lo - 1 <= math.log10(float(v)) <= hi + 1, \
                        f"shape at {v} on log axis {name}: outside the data ({10 ** lo:.3g}…{10 ** hi:.3g})"
        for a in fig.layout.annotations:
            if (getattr(a, f"{letter}ref") or "") == ref:
                v = float(getattr(a, letter))
                assert lo - 1 <= v <= hi + 1, f"annotation at {v} on log axis {name} (log10 units: 10^{v})"


def check_explicit_ranges(fig: go.Figure) -> None:
    for name, ax in _axes(fig).items():
        if ax.get("type") in ("log", "category") or ax.get("range") is None:
            continue
        data = _axis_data(fig, name)
        if data.size:
            r0, r1 = sorted(ax["range"])
            span = max(data.max() - data.min(), 1e-9)
            assert r0 <= data.min() + 1e-9 * span and r1 >= data.max() - 1e-9 * span, f"{name}: {ax['range']} cuts the data"


def check_colours_explained(fig: go.Figure) -> None:
    legend = _legend_colours(fig)
    for t in fig.data:
        if t.type in ("heatmap", "contour"):
            assert t.showscale is not False, f"heatmap {t.name!r} without a colour bar"
            continue
        colours = getattr(getattr(t, "marker", None), "color", None)
        if colours is None or isinstance(colours, str):
            continue
        distinct = {str(c).lower() for c in colours}
        if len(distinct) > 1 and not _has_colour_scale(t):
            missing = distinct - legend
            assert not missing, f"trace {t.name!r}: colours {sorted(missing)} mean something but have no legend entry"
    named = {t.name for t in fig.data if t.showlegend is not False and t.name}
    if len(named) > 1:
        assert fig.layout.showlegend is not False, "several named series but the legend is off"


def check_ticks_readable(fig: go.Figure) -> None:
    for name, ax in _axes(fig).items():
        if ax.get("visible") is False:
            continue
        kind = ax.get("type")
        data = _axis_data(fig, name)
        if kind == "category" or not data.size:
            continue
        if kind == "log":
            ok = ax.get("tickformat") or ax.get("exponentformat") == "power" or ax.get("ticktext")
        else:
            ok = ax.get("tickformat") is not None or ax.get("ticktext")
        assert ok, f"{name}: numeric ticks without a tickformat (plotly picks e.g. '1,170.382' or '10.87604k')"
    for t in fig.data:
        for letter in ("x", "y"):
            v = getattr(t, letter, None)
            if v is None or not len(v) or not isinstance(v[0], str):
                continue
            raw = [s for s in v if isinstance(s, str) and ("blocks." in s or s.startswith("hook_"))]
            assert not raw, f"raw hook names on an axis: {raw[:3]} (use hook_label)"


def check_legend_clear(fig: go.Figure) -> None:
    shown = [t for t in fig.data if t.showlegend is not False and (t.showlegend or len(fig.data) > 1)]
    if not shown or fig.layout.showlegend is False:
        return
    lg = fig.layout.legend
    titles = [a for a in fig.layout.annotations if a.yref == "paper" and (a.y or 0) >= 1.0]  # panel titles
    if lg.yref == "container":
        assert (lg.y or 0) <= 0.05 and lg.yanchor == "bottom", "container legend must sit at the figure's bottom"
        assert (fig.layout.margin.b or 0) >= 60, "no room under the axis for the legend band"
        return
    if lg.x is not None and lg.x >= 1.0 and (lg.xanchor in (None, "left")):
        return  # to the right of the plot
    if lg.y is None and lg.x is None and lg.orientation != "h":
        return  # plotly's default: right of the plot area
    if lg.y is not None and lg.y >= 1.0 and lg.yanchor == "bottom":
        assert not titles, "a legend above the plots covers the panel titles"
        assert (fig.layout.margin.t or 0) >= 80, "no room between the title and the plot for the legend"
        return
    raise AssertionError(f"legend at x={lg.x}, y={lg.y} ({lg.orientation}) sits on the plot, its ticks or its title")


def check_figure(fig: go.Figure) -> None:
    assert fig.layout.title.text, "every chart says what it shows"
    check_log_axes(fig)
    check_explicit_ranges(fig)
    check_colours_explained(fig)
    check_ticks_readable(fig)
    check_legend_clear(fig)


# ---------------------------------------------------------------- real results

@pytest.fixture(scope="module")
def acts(tiny_entry):
    store, entry = tiny_entry
    return open_entry(store, entry.key)


def build_regression(acts):
    return run_regression(acts, HOOKS, LabelSpec.make("position"), "all", cv=3, test_fraction=0.2, seed=1).result


def build_transfer(model, acts):
    return probe_transfer(model, acts, LabelSpec.make("position"), "all", alpha=10.0, source="hook_embed").transfer


def build_sparse(model, acts):
    ctx = sparse.contexts_for(acts, model.tokenizer.encode, model.tokenizer.decode_tokens, [["e"], ["a"]],
                              before=4, after=2, whole_word_next=False, max_per_class=100)
    hook = "blocks.0.mlp.hook_post"
    X = sparse.features(acts, hook, ctx)
    return sparse.fit_sparse_path(X, ctx, n_Cs=9), ctx


def build_lens(model):
    return lens.logit_lens(model, "the cat sat on the mat", k=3, incl_mid=True)


def build_layer_probes(acts):
    return probe_layers(acts, HOOKS, [LayerLabelSpec("token", 0, top_k=5), LayerLabelSpec("token", -1, top_k=5)],
                        PositionSpec("all"), max_samples=1500)


def all_figures(model, acts) -> dict[str, go.Figure]:
    """Every chart of probing_core.plots from real results (the gallery and the generic test)."""
    r = build_regression(acts)
    tr = build_transfer(model, acts)
    path, ctx = build_sparse(model, acts)
    X = sparse.features(acts, "blocks.0.mlp.hook_post", ctx)
    k = int(np.argmax(path.n_nonzero > 0)) + 1
    ll = build_lens(model)
    ps = lens.PromptSet(("The capital of France is", "The capital of Italy is"), (("a", "b"), ("b", "a")))
    ld = lens.logit_difference(model, ps)
    at = lens.logit_attribution(model, ps)
    pats = att.attention_patterns(model, "When Mary and John went to the store", layer=None)
    scores = att.head_scores(pats.pattern, pats.tokens, selected_token=1)
    s = tree_task.make_sample([(12, 10), (12, 15), (15, 4), (4, 3), (4, 8)], root=12, goal=3)
    lp = build_layer_probes(acts)
    figs = {
        "reg_r2_curve": reg_plots.r2_curve(r),
        "reg_r2_curve_alpha": reg_plots.r2_curve(r, 3),
        "reg_r2_vs_alpha": reg_plots.r2_vs_alpha(r, HOOKS[2]),
        "reg_transfer": reg_plots.transfer_curve(tr),
        "reg_transfer_log": reg_plots.abs_r2_log(tr.hooks, tr.r2),
        "lens_heatmap": lens_plots.logit_lens_heatmap(ll),
        "lens_heatmap_rank": lens_plots.logit_lens_heatmap(ll, value="next_rank_log"),
        "lens_next_by_layer": lens_plots.next_token_by_layer(ll),
        "lens_logit_diff": lens_plots.logit_diff_bar(ld),
        "lens_accumulated": lens_plots.accumulated_resid_line(at),
        "lens_decomposition": lens_plots.decomposition_bar(at),
        "lens_head_dla": lens_plots.head_dla_heatmap(at),
        "attn_grid": attention_plots.head_scores_grid(scores),
        "attn_prev": attention_plots.head_score_heatmap(scores, "prev_token"),
        "attn_entropy": attention_plots.head_score_heatmap(scores, "entropy"),
        "sparse_density_vs_C": sparse_plots.density_vs_C(path, float(path.Cs[k])),
        "sparse_layers": sparse_plots.layers_curve(HOOKS[3::3], path.test_accuracy[[k, -1]], path.density[[k, -1]],
                                                   chance=0.5, C=float(path.Cs[k])),
        "layers_heatmap": layer_plots.accuracy_heatmap(lp),
        "layers_lines": layer_plots.accuracy_lines(lp),
        "tree": tree_plots.plot_tree(s, predicted_path=[12, 15, 4, 8]),
        "tree_accuracy": tree_plots.accuracy_by_depth([1, 2, 3, 4], [1.0, 0.9, 0.75, 0.5], [25, 25, 24, 26]),
        "sparse_coefficients": sparse_plots.coefficients(path, k),
        "sparse_nonzero_hist": sparse_plots.nonzero_histogram(path, k),
        "sparse_strips": sparse_plots.activation_strips(X, ctx.labels, path.surviving(k)[:5], class_names=ctx.class_names),
        "sparse_selection": sparse_plots.selection_frequency_bars(np.linspace(0, 1, 40)),
        "lens_next_token_bar": lens_plots.next_token_bar(lens.next_token_topk(model, "the cat", k=5)),
        "attn_head_pattern": attention_plots.head_pattern_heatmap(pats.tokens, pats.pattern[0, 1]),
    }
    return figs


@pytest.fixture(scope="module")
def figures(tiny_model, acts):
    return all_figures(tiny_model, acts)


@pytest.mark.parametrize("name", [
    "reg_r2_curve", "reg_r2_curve_alpha", "reg_r2_vs_alpha", "reg_transfer", "reg_transfer_log", "lens_heatmap",
    "lens_heatmap_rank", "lens_next_by_layer", "lens_logit_diff", "lens_accumulated", "lens_decomposition",
    "lens_head_dla", "attn_grid", "attn_prev", "attn_entropy", "sparse_density_vs_C", "sparse_layers",
    "layers_heatmap", "layers_lines", "tree", "tree_accuracy", "sparse_coefficients", "sparse_nonzero_hist", "sparse_strips",
    "sparse_selection", "lens_next_token_bar", "attn_head_pattern"])
def test_every_chart_passes_the_generic_checks(figures, name):
    check_figure(figures[name])


# ---------------------------------------------------------------- hook names

def test_hook_label_names_layers_for_people():
    assert hook_label("blocks.5.hook_resid_post") == "layer 5 · resid post"
    assert hook_label("blocks.12.mlp.hook_post") == "layer 12 · MLP neurons"
    assert hook_label("blocks.0.hook_attn_out") == "layer 0 · attn out"
    assert hook_label("hook_embed") == "embedding"
    assert hook_label("3_mid") == "layer 3 · resid mid" and hook_label("3_attn_out") == "layer 3 · attn out"
    assert hook_label("final_post") == "final layer"
    assert hook_label("something else") == "something else"
    labels = [hook_label(h) for h in HOOKS]
    assert len(set(labels)) == len(labels)


# ---------------------------------------------------------------- regression

def _positions(fig: go.Figure, text: str) -> list[float]:
    """Where the line and the label that say ``text`` sit, in data units on a log x axis.

    plotly.js 4 reads a shape's x on a log axis as a value and an annotation's x as log10 of it.
    """
    out = []
    for t in fig.data:
        if (t.name and text in t.name or any(text in str(v) for v in (t.text or ()))) and t.x is not None:
            out += [float(v) for v in t.x if v is not None]
    for s in fig.layout.shapes:
        if s.xref == "x" and s.x0 == s.x1:
            out.append(float(s.x0))
    out += [10 ** min(float(a.x), 300.0) for a in fig.layout.annotations if a.text and text in a.text and a.xref == "x"]
    assert out, f"no marker {text!r}"
    return out


def test_r2_vs_alpha_marks_the_best_alpha_where_it_is(acts):
    r = build_regression(acts)
    for i, hook in enumerate(HOOKS):
        fig = reg_plots.r2_vs_alpha(r, hook)
        best = float(r.best_alpha[i])
        assert _positions(fig, "best α") == pytest.approx([best] * len(_positions(fig, "best α")), rel=1e-9)
        lo, hi = fig.layout.xaxis.range
        assert 10 ** lo <= best <= 10 ** hi and 10 ** lo <= r.alphas.min() and 10 ** hi >= r.alphas.max()
        assert hi - lo < np.log10(r.alphas.max() / r.alphas.min()) + 1  # within the α grid's decades
        marker = next(t for t in fig.data if t.name == "best α")
        assert any(f"{best:.3g}" in str(s) for s in marker.text)  # the label is on the line itself
        assert hook_label(hook) in fig.layout.title.text
        y0, y1 = fig.layout.yaxis.range  # enough decimals that ticks over this span differ ("0.01, 0.01" did not)
        assert (y1 - y0) * 10 ** int(fig.layout.yaxis.tickformat[1:-1]) >= 2, (hook, fig.layout.yaxis.tickformat, y1 - y0)


def test_r2_curve_names_hooks_and_keeps_the_legend_off_the_ticks(acts):
    r = build_regression(acts)
    fig = reg_plots.r2_curve(r)
    test = next(t for t in fig.data if t.name == "test")
    assert list(test.x) == [hook_label(h) for h in HOOKS]
    np.testing.assert_allclose(test.y, r.r2_test[np.arange(len(HOOKS)), r.best_index])
    assert fig.layout.legend.yref == "container" and fig.layout.xaxis.tickangle is not None
    # the bottom margin holds the rotated labels and the legend band
    longest = max(len(x) for x in test.x)
    assert fig.layout.margin.b >= 4 * longest + 24


# ---------------------------------------------------------------- logit lens

def test_next_token_rank_axis_keeps_the_top_rank_and_prints_ranks(tiny_model):
    ll = build_lens(tiny_model)
    ranks = ll.next_rank.copy()
    ranks[-2:, :] = np.where(ranks[-2:, :] >= 0, 0, ranks[-2:, :])  # the model is sure at the top, as SmolLM2 was
    ll = dataclasses.replace(ll, next_rank=ranks)
    fig = lens_plots.next_token_by_layer(ll, 2)
    rank = next(t for t in fig.data if t.name.startswith("rank"))
    y = np.asarray(rank.y, dtype=float)
    assert np.all(y > 0) and y.size == len(ll.labels)  # every layer drawn on the log axis (rank 0 had no log)
    np.testing.assert_array_equal(y, ranks[:, 2] + 1)
    ax = fig.layout.yaxis2
    assert ax.type == "log" and ax.tickformat == ",d" and ax.dtick == 1
    assert ax.range[0] <= 0 <= np.log10(y.max()) <= ax.range[1]
    check_figure(fig)


def test_logit_diff_bar_names_prompts_and_explains_colours(tiny_model):
    # the tiny model reads bytes: one-byte answers, classes as the sentiment templates have them
    ps = lens.PromptSet(("I liked it, it was", "I hated it, it was", "so good", "so bad"),
                        (("g", "a"), ("a", "g"), ("g", "a"), ("a", "g")), ("positive", "negative") * 2)
    ld = lens.logit_difference(tiny_model, ps)
    fig = lens_plots.logit_diff_bar(ld)
    bars = fig.data[0]
    np.testing.assert_allclose(bars.y, ld.logit_diff)
    assert fig.layout.xaxis.type == "category" and all(isinstance(x, str) and len(x) > 3 for x in bars.x)
    assert len(set(bars.x)) == len(ld.prompts)
    lo, hi = fig.layout.yaxis.range
    assert lo <= min(ld.logit_diff.min(), ld.mean, 0) and hi >= max(ld.logit_diff.max(), ld.mean, 0)
    mean = next(t for t in fig.data if t.name.startswith("mean"))
    np.testing.assert_allclose(mean.y, ld.mean)
    assert {t.name for t in fig.data if t.showlegend} >= {"positive", "negative"}
    check_figure(fig)


# ---------------------------------------------------------------- attention

def test_head_score_grid_has_a_colour_bar_per_panel(figures):
    fig = figures["attn_grid"]
    xs = [t.colorbar.x for t in fig.data]
    assert all(t.showscale for t in fig.data) and len(set(xs)) == len(xs)  # one bar under each panel
    assert all(t.colorbar.y < 0 for t in fig.data)  # under the panels, not over them
    ent = fig.data[0]
    assert ent.zmax == pytest.approx(np.nanmax(np.asarray(ent.z, dtype=float)))


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Chromium at /usr/bin/chromium")
def test_circuitsvis_frame_fits_the_whole_view(tmp_path):
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    rng = np.random.default_rng(0)
    args = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    # Playwright's sync API refuses to start where an asyncio loop is running (an earlier test in
    # the same session can leave one on the main thread), so the browser runs on its own thread.
    failures = []

    def measure():
        try:
            with sync_playwright() as p:
                _measure_frames(p, args, rng, tmp_path)
        except BaseException as e:  # re-raised on the test's thread below
            failures.append(e)

    worker = threading.Thread(target=measure)
    worker.start()
    worker.join()
    if failures:
        raise failures[0]


def _measure_frames(p, args, rng, tmp_path):
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
    try:
        for n_heads, T in ((9, 64), (12, 16)):
            pat = np.tril(rng.random((n_heads, T, T))).astype(np.float32)
            pat /= pat.sum(-1, keepdims=True)
            page_html = att.circuitsvis_html([f"t{i}" for i in range(T)], pat)
            for width in (768, 1240):  # the app's main column at 800 px and 1400 px windows
                page = browser.new_page(viewport={"width": width, "height": 400})
                file = tmp_path / f"cv-{n_heads}-{T}.html"
                file.write_text(page_html)
                page.goto(file.as_uri())
                need = 0
                for _ in range(40):  # React renders after load; wait until the height settles
                    page.wait_for_timeout(250)
                    now = page.evaluate("document.body.scrollHeight")
                    if now == need and now > 500:
                        break
                    need = now
                page.close()
                assert need <= attention_plots.circuitsvis_frame_height(n_heads), (n_heads, T, width, need)
                assert need > 720  # the old fixed frame cut the view
    finally:
        browser.close()


# ---------------------------------------------------------------- sparse

def test_density_vs_C_accuracy_axis_ends_at_100_and_legend_clears_titles(tiny_model, acts):
    path, _ = build_sparse(tiny_model, acts)
    fig = sparse_plots.density_vs_C(path, float(path.Cs[3]))
    acc = 100 * path.test_accuracy
    for t in fig.data:
        if t.name == "test accuracy (%)":
            ax = fig.layout[_axis_name(t.yaxis, "y")]
            lo, hi = ax.range
            assert 100 <= hi <= 102 and lo >= 0 and lo <= acc.min() and lo % 10 == 0
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis2.type == "log"
    assert fig.layout.legend.yref == "container"  # under the plots, not over "against C"
    # the current-C line sits at λ = 1/C and at C (shapes take data values on a plotly.js 4 log axis)
    xs = sorted(float(s.x0) for s in fig.layout.shapes)
    assert xs == pytest.approx(sorted([1 / path.Cs[3], path.Cs[3]]))


def test_layers_curve_percent_axis():
    fig = sparse_plots.layers_curve(["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"], np.array([0.871, 1.0]),
                                    np.array([2.0, 1.0]), chance=0.5)
    lo, hi = fig.layout.yaxis.range
    assert lo == 50 and 100 <= hi <= 102 and fig.layout.yaxis.dtick == 10
    assert list(fig.data[0].x) == ["layer 0 · MLP neurons", "layer 1 · MLP neurons"]
    check_figure(fig)


# ---------------------------------------------------------------- tree

def _luminance(hex_colour: str) -> float:
    rgb = [int(hex_colour.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _contrast(a: str, b: str) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def test_tree_nodes_are_readable_and_explained():
    s = tree_task.make_sample([(12, 10), (12, 15), (15, 4), (4, 3), (4, 8)], root=12, goal=3)
    fig = tree_plots.plot_tree(s, predicted_path=[12, 15, 4, 8])
    nodes = [t for t in fig.data if t.mode == "markers+text"]
    assert {t.name for t in nodes} == {"root", "goal", "on the path", "other node"}
    assert all(t.showlegend for t in nodes)
    shown = sorted(int(v) for t in nodes for v in t.text)
    assert shown == sorted({v for e in s.edges for v in e})
    for t in nodes:
        assert _contrast(t.marker.color, t.textfont.color) >= 4.5, t.name  # WCAG AA for the node numbers
    assert [int(v) for v in next(t for t in nodes if t.name == "root").text] == [12]
    assert [int(v) for v in next(t for t in nodes if t.name == "goal").text] == [3]
    check_figure(fig)


def test_tree_accuracy_by_depth_in_percent():
    fig = tree_plots.accuracy_by_depth([1, 2, 3], [1.0, 0.5, 0.25], [10, 12, 8])
    np.testing.assert_allclose(fig.data[0].y, [100, 50, 25])
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[0].text) == ["n=10", "n=12", "n=8"]
    assert list(fig.layout.yaxis.range) == [0, 100]
    check_figure(fig)


# ---------------------------------------------------------------- gallery

def render_gallery(out: Path) -> list[Path]:
    """Write every figure as HTML (plotly.js beside it, offline) into ``out``; returns the files."""
    from probing_core.models import ModelSpec, load_model, tiny_native_config
    from probing_core.data.datasets import DatasetSpec, load_dataset
    from probing_core.store.activations import build_cache
    from probing_core.store.entries import ActivationStore

    model = load_model(ModelSpec.native(tiny_native_config()))
    store = ActivationStore(out / "store")
    entry, _ = build_cache(model, load_dataset(DatasetSpec("pydoc")),
                           model.hook_names(("embed", "resid_pre", "resid_mid", "resid_post", "mlp_post")),
                           store=store, max_len=64, max_tokens=3000)
    files = []
    for name, fig in all_figures(model, open_entry(store, entry.key)).items():
        path = out / f"{name}.html"
        fig.write_html(path, include_plotlyjs="directory", full_html=True)
        files.append(path)
    shutil.rmtree(out / "store", ignore_errors=True)
    return files


if __name__ == "__main__":  # python tests/unit/test_plots.py test-output/plots
    import sys

    for f in render_gallery(Path(sys.argv[1] if len(sys.argv) > 1 else "test-output/plots")):
        print(f)
