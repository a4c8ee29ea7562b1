"""Attention patterns, head scores and offline CircuitsVis HTML."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from probing_core.analyses import attention as att
from probing_core.errors import InputError


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def emb(embedded_model):
    return embedded_model


def _assert_valid_causal(pattern: np.ndarray) -> None:
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
    T = pattern.shape[-1]
    upper = np.triu(np.ones((T, T), bool), k=1)
    assert np.abs(pattern[..., upper]).max(initial=0.0) < 1e-7
    assert (pattern >= 0).all()


@pytest.mark.parametrize("which", ["tiny", "emb"])
def test_patterns_are_causal_distributions(which, request):
    model = request.getfixturevalue(which)
    res = att.attention_patterns(model, "When Mary and John went to the store", layer=model.n_layers - 1)
    T = len(model.encode("When Mary and John went to the store"))
    assert res.pattern.shape == (model.n_heads, T, T)
    assert len(res.tokens) == T and not res.truncated and res.notice is None
    _assert_valid_causal(res.pattern)
    allp = att.attention_patterns(model, "When Mary and John went to the store", layer=None)
    assert allp.pattern.shape == (model.n_layers, model.n_heads, T, T)
    _assert_valid_causal(allp.pattern)
    np.testing.assert_allclose(allp.pattern[-1], res.pattern, atol=1e-6)
    np.testing.assert_allclose(allp.head(2, layer=model.n_layers - 1), res.head(2), atol=1e-6)


def test_truncation_notice(tiny):
    res = att.attention_patterns(tiny, "abcdefghijklmnop", layer=0, max_len=8)
    assert res.truncated and res.n_tokens_original == 17
    assert res.pattern.shape == (tiny.n_heads, 8, 8) and len(res.tokens) == 8
    assert "17 tokens" in res.notice and "first 8" in res.notice
    full = att.attention_patterns(tiny, "x" * (tiny.n_ctx + 5), layer=0, max_len=None)
    assert full.truncated and full.pattern.shape[-1] == tiny.n_ctx
    assert "context" in full.notice


def test_head_rows(tiny):
    res = att.attention_patterns(tiny, "abc", layer=1)
    rows = res.head_rows(0)
    assert len(rows) == 16 and rows[0]["query_token"] == "<bos>"
    assert sum(r["weight"] for r in rows if r["query_pos"] == 3) == pytest.approx(1.0, abs=1e-5)


def test_head_scores_hand_built():
    prev_head = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    uniform = np.array([[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]], float)
    pats = np.stack([prev_head, uniform])[None]  # [layer=1, head=2, 3, 3]
    tokens = ["<bos>", "a", "b"]
    s = att.head_scores(pats, tokens, selected_token=1)
    np.testing.assert_allclose(s.entropy[0], [0.0, (math.log(2) + math.log(3)) / 2], rtol=1e-6)
    np.testing.assert_allclose(s.prev_token[0], [1.0, (0.5 + 1 / 3) / 2], rtol=1e-6)
    np.testing.assert_allclose(s.first_token[0], [0.5, (0.5 + 1 / 3) / 2], rtol=1e-6)
    np.testing.assert_allclose(s.selected[0], [0.5, (0.5 + 1 / 3) / 2], rtol=1e-6)
    s2 = att.head_scores(pats[0], tokens, selected_token=2)  # a 3-D array is one layer
    np.testing.assert_allclose(s2.selected[0], [0.0, 1 / 3], rtol=1e-6)
    assert s2.selected_token == 2 and s.table().keys() >= {"entropy", "prev_token", "first_token"}
    assert len(s.rows()) == 2 and s.rows()[1]["head"] == 1
    one = att.head_scores(np.ones((1, 1, 1, 1)), ["<bos>"])
    assert one.entropy[0, 0] == 0.0 and one.first_token[0, 0] == 1.0 and one.selected is None


def test_head_scores_on_model_patterns(tiny):
    res = att.attention_patterns(tiny, "hello world", layer=None)
    s = att.head_scores(res.pattern, res.tokens, selected_token=3)
    assert s.entropy.shape == (tiny.n_layers, tiny.n_heads)
    T = len(res.tokens)
    assert (s.entropy >= 0).all() and (s.entropy <= math.log(T) + 1e-5).all()
    for arr in (s.prev_token, s.first_token, s.selected):
        assert ((arr >= 0) & (arr <= 1 + 1e-6)).all()
    np.testing.assert_allclose(s.prev_token[1, 2], np.mean([res.pattern[1, 2, q, q - 1] for q in range(1, T)]), rtol=1e-5)


def test_circuitsvis_html_is_offline(tmp_path):
    import circuitsvis

    tokens = ["<bos>", "The", " cat"]
    pat = np.tril(np.ones((2, 3, 3)))
    pat /= pat.sum(-1, keepdims=True)
    for kind in ("heads", "patterns"):
        page = att.circuitsvis_html(tokens, pat, kind=kind)
        out = tmp_path / f"{kind}.html"
        out.write_text(page, encoding="utf-8")
        assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
        bundle = (Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js").read_text(encoding="utf-8")
        assert bundle[:2000].replace("</script>", "") in page  # the inlined bundle, not a link to it
        assert len(page) > 1_000_000
        lower = page.lower()
        for cdn in ("unpkg", "jsdelivr", "cdnjs"):
            assert cdn not in lower
        assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", lower)
        assert not re.search(r"\bimport\b[^;]*?from\s*[\"']https?://", page)
        assert "CircuitsVis.render(" in page
    assert "AttentionHeads" in att.circuitsvis_html(tokens, pat)


def test_attention_bad_inputs(tiny):
    with pytest.raises(InputError, match="empty"):
        att.attention_patterns(tiny, "  ", layer=0)
    with pytest.raises(InputError, match=r"layer 5 is out of range; this model has layers 0…1"):
        att.attention_patterns(tiny, "abc", layer=5)
    with pytest.raises(InputError, match="layer -1 is out of range"):
        att.attention_patterns(tiny, "abc", layer=-1)
    res = att.attention_patterns(tiny, "abc", layer=0)
    with pytest.raises(InputError, match="head 9 is out of range"):
        res.head(9)
    with pytest.raises(InputError, match="selected token position 7 is out of range"):
        att.head_scores(res.pattern, res.tokens, selected_token=7)
    with pytest.raises(InputError, match="tokens for patterns"):
        att.head_scores(res.pattern, res.tokens[:-1])
    with pytest.raises(InputError, match="unknown CircuitsVis view"):
        att.circuitsvis_html(res.tokens, res.pattern, kind="nope")
    with pytest.raises(InputError, match="pattern must be"):
        att.circuitsvis_html(res.tokens[:-1], res.pattern)


def test_attention_figures(tiny):
    from probing_core.plots import attention as plots

    res = att.attention_patterns(tiny, "a b", layer=None)
    s = att.head_scores(res.pattern, res.tokens, selected_token=1)
    for m in ("entropy", "prev_token", "first_token", "selected"):
        fig = plots.head_score_heatmap(s, m)
        assert np.asarray(fig.data[0].z).shape == (tiny.n_layers, tiny.n_heads)
    assert len(plots.head_scores_grid(s).data) == 4
    fig = plots.head_pattern_heatmap(res.tokens, res.head(1, layer=0))
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.isnan(z[0, 1]) and z[1, 0] == pytest.approx(res.pattern[0, 1, 1, 0])


def test_circuitsvis_html_token_cannot_close_the_script():
    tokens = ["<bos>", "</script><script>alert(1)</script>", "<!-- x"]
    pat = np.tril(np.ones((1, 3, 3)))
    pat /= pat.sum(-1, keepdims=True)
    page = att.circuitsvis_html(tokens, pat)
    assert page.count("</script>") == 1  # only the real end of the inline module
    assert "<\\/script><script>alert(1)<\\/script>" in page and "<!-- x" not in page


def test_cli_attention_html_and_json(tmp_path, capsys):
    import json

    from probing_core.cli import main

    html = tmp_path / "a.html"
    assert main(["attention", "--model", "tiny", "--prompt", "hello world", "--layer", "1", "--html", str(html),
                 "--token", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["head_scores"]) == 4 and "attn_to_pos_2" in out["head_scores"][0]
    assert html.stat().st_size > 1_000_000 and "unpkg" not in html.read_text(encoding="utf-8")
    assert main(["attention", "--model", "tiny", "--prompt", "hi", "--layer", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
