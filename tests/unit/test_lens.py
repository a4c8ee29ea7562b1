"""Logit lens, next-token view, logit difference and attribution on real (tiny and embedded) models."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from probing_core.analyses import lens
from probing_core.errors import InputError


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def emb(embedded_model):
    return embedded_model


def _plain_logits(model, text: str) -> torch.Tensor:
    with model.lock, torch.inference_mode():
        return model.bridge(torch.tensor([model.encode(text)]))[0].float()


# ---------------------------------------------------------------------------------------------
# next-token view
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "emb"])
def test_next_token_topk_equals_plain_forward(which, request):
    model = request.getfixturevalue(which)
    prompt = "The capital of France is"
    res = lens.next_token_topk(model, prompt, k=7)
    logits = _plain_logits(model, prompt)[-1]
    top = torch.topk(logits, 7)
    assert res.top_ids.tolist() == top.indices.tolist()
    np.testing.assert_allclose(res.top_logits, top.values.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.top_probs, logits.softmax(-1)[top.indices].numpy(), rtol=1e-5, atol=1e-7)
    assert res.tokens[0] == model.to_str_tokens([model.tokenizer.bos_id])[0]
    assert len(res.tokens) == len(model.encode(prompt))


def test_next_token_answer_rank_and_prob_tiny(tiny):
    res = lens.next_token_topk(tiny, "hello", k=3, answer="x")
    logits = _plain_logits(tiny, "hello")[-1]
    aid = ord("x")
    assert res.answer_id == aid
    assert res.answer_rank == int((logits > logits[aid]).sum())
    assert res.answer_prob == pytest.approx(float(logits.softmax(-1)[aid]), rel=1e-5)
    # Asking about the top token gives rank 0.
    top = lens.next_token_topk(tiny, "hello", k=1, answer=res.top_tokens[0])
    assert top.answer_rank == 0


def test_embedded_knows_paris(emb):
    res = lens.next_token_topk(emb, "The capital of France is", k=5, answer=" Paris")
    assert res.top_tokens[0] == " Paris"
    assert res.answer_rank == 0 and res.answer_prob > 0.3


# ---------------------------------------------------------------------------------------------
# logit lens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "emb"])
def test_final_layer_lens_equals_model_logits(which, request):
    model = request.getfixturevalue(which)
    prompt = "Hello world, this is"
    res = lens.logit_lens(model, prompt, k=4, incl_mid=True)
    logits = _plain_logits(model, prompt)  # [pos, d_vocab]
    n = model.n_layers
    assert res.labels[-1] == "final_post" and len(res.labels) == 2 * n + 1
    assert res.top_probs.shape == (2 * n + 1, len(res.tokens), 4)
    top = torch.topk(logits, 4)
    assert res.top_ids[-1].tolist() == top.indices.tolist()
    probs = logits.softmax(-1)
    np.testing.assert_allclose(res.top_probs[-1], probs.gather(-1, top.indices).numpy(), rtol=1e-4, atol=1e-6)
    nxt = torch.tensor(res.next_ids[:-1])
    np.testing.assert_allclose(res.next_prob[-1, :-1], probs[:-1].gather(-1, nxt[:, None])[:, 0].numpy(),
                               rtol=1e-4, atol=1e-7)
    assert np.isnan(res.next_prob[:, -1]).all() and (res.next_rank[:, -1] == -1).all()
    expected_rank = (logits[:-1] > logits[:-1].gather(-1, nxt[:, None])).sum(-1)
    assert res.next_rank[-1, :-1].tolist() == expected_rank.tolist()
    assert res.top_tokens[-1][0][0] == model.to_str_tokens([int(top.indices[0, 0])])[0]


def test_lens_matches_transformer_lens_rank_trajectory(tiny):
    """Every layer's next-token rank agrees with TransformerLens's own logit-lens tool."""
    from transformer_lens.tools.analysis.logit_lens import logit_lens as tl_logit_lens

    prompt = "abc def ghi"
    res = lens.logit_lens(tiny, prompt, k=2)
    toks = torch.tensor([tiny.encode(prompt)])
    with tiny.lock, torch.inference_mode():
        tl = tl_logit_lens(tiny.bridge, toks[:, :-1], positions=None, targets=toks[:, 1:])
    ranks = tl.rank_trajectory()  # [layer, batch, pos]
    assert tl.labels == res.labels
    assert ranks[:, 0].tolist() == res.next_rank[:, :-1].tolist()


def test_lens_rows_and_input_prob(tiny):
    res = lens.logit_lens(tiny, "ab", k=2)
    rows = res.rows()
    assert len(rows) == len(res.labels) * len(res.tokens) * 2
    assert ((res.input_prob > 0) & (res.input_prob <= 1)).all()
    assert (np.diff(res.top_probs, axis=-1) <= 1e-7).all()  # best first


# ---------------------------------------------------------------------------------------------
# logit difference and attribution
# ---------------------------------------------------------------------------------------------


def test_sentiment_prompt_set():
    ps = lens.sentiment_prompt_set()
    assert len(ps) == 50
    assert ps.prompts[0] == ("This movie was a perfect viewing experience, and the plot and acting were fantastic. "
                             "Overall, the film was")
    assert ps.classes[:2] == ("positive", "negative")
    assert ps.answers[0] == (" great", " awful") and ps.answers[1] == (" awful", " great")
    assert len(lens.sentiment_prompt_set(3)) == 6
    with pytest.raises(InputError, match="between 1 and 25"):
        lens.sentiment_prompt_set(30)


def test_parse_prompt_lines():
    ps = lens.parse_prompt_lines('The capital of France is | Paris | London\n\nI am | "ing" | walking\n')
    assert ps.prompts == ("The capital of France is", "I am")
    assert ps.answers == ((" Paris", " London"), ("ing", " walking"))
    with pytest.raises(InputError, match="line 1"):
        lens.parse_prompt_lines("no separators here")
    with pytest.raises(InputError, match="no prompts"):
        lens.parse_prompt_lines("  \n ")


def test_logit_difference_tiny(tiny):
    prompts = ["abc", "hello there"]  # different lengths: each prompt read at its own last position
    res = lens.logit_difference(tiny, prompts, ("a", "b"))
    for i, p in enumerate(prompts):
        last = _plain_logits(tiny, p)[-1]
        assert res.logit_diff[i] == pytest.approx(float(last[ord("a")] - last[ord("b")]), abs=1e-4)
        assert res.correct_prob[i] == pytest.approx(float(last.softmax(-1)[ord("a")]), rel=1e-4)
    assert res.mean == pytest.approx(float(res.logit_diff.mean()))
    assert res.n_tokens.tolist() == [4, 12]
    assert len(res.rows()) == 2


def _check_attribution(model, prompts, answers, tol):
    res = lens.logit_attribution(model, prompts, answers)
    ld = lens.logit_difference(model, prompts, answers)
    # The model's logit difference is reproduced, and the decomposition adds up to it.
    np.testing.assert_allclose(res.model_logit_diff_per_prompt, ld.logit_diff, atol=tol)
    np.testing.assert_allclose(res.decomposition_per_prompt.sum(0), ld.logit_diff, atol=tol)
    assert res.max_abs_error < tol
    assert res.decomposition_sum == pytest.approx(ld.mean, abs=tol)
    assert res.model_logit_diff == pytest.approx(ld.mean, abs=tol)
    # The accumulated residual's last point is the whole logit difference (minus an unembed bias term).
    bias = (res.decomposition[res.decomposition_labels.index("unembed_bias")]
            if "unembed_bias" in res.decomposition_labels else 0.0)
    assert res.accumulated[-1] + bias == pytest.approx(ld.mean, abs=tol)
    assert res.accumulated_labels[-1] == "final_post" and res.accumulated_labels[1] == "0_mid"
    assert res.head_dla.shape == (model.n_layers, model.n_heads)
    return res


def _tl_cache(model, prompt):
    with model.lock, torch.inference_mode():
        return model.bridge.run_with_cache(torch.tensor([model.encode(prompt)]))


def test_attribution_tiny_adds_up_and_matches_logit_attrs(tiny):
    prompts = ["the cat sat", "a dog ran!"]
    res = _check_attribution(tiny, prompts, [("a", "b"), ("b", "x")], tol=1e-4)
    # Compare with TransformerLens's own cache.logit_attrs on prompt 0.
    _, cache = _tl_cache(tiny, prompts[0])
    with torch.inference_mode():
        dec = cache.decompose_resid(layer=-1, pos_slice=-1)
        tl_dec = cache.logit_attrs(dec, tokens=torch.tensor([ord("a")]), incorrect_tokens=torch.tensor([ord("b")]),
                                   pos_slice=-1)[:, 0]
        heads = cache.stack_head_results(layer=-1, pos_slice=-1)
        tl_heads = cache.logit_attrs(heads, tokens=torch.tensor([ord("a")]),
                                     incorrect_tokens=torch.tensor([ord("b")]), pos_slice=-1)[:, 0]
    n = len(tl_dec)
    np.testing.assert_allclose(res.decomposition_per_prompt[:n, 0], tl_dec.numpy(), atol=1e-5)
    np.testing.assert_allclose(res.head_dla_per_prompt[..., 0].reshape(-1), tl_heads.numpy(), atol=1e-5)


def test_attribution_embedded_heads_sum_to_attn_out(emb):
    ps = lens.sentiment_prompt_set(1)
    res = _check_attribution(emb, ps, None, tol=2e-3)
    assert res.classes == ("positive", "negative")
    # SmolLM2 has no attention output bias, so each layer's heads add up to its attn_out term.
    for layer in range(emb.n_layers):
        j = res.decomposition_labels.index(f"{layer}_attn_out")
        assert res.head_dla[layer].sum() == pytest.approx(res.decomposition[j], abs=2e-3)
    assert res.head_remainder == pytest.approx(res.model_logit_diff - res.head_dla.sum(), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_inputs(tiny):
    with pytest.raises(InputError, match="empty"):
        lens.next_token_topk(tiny, "   ", k=3)
    with pytest.raises(InputError, match="empty"):
        lens.logit_lens(tiny, "", k=3)
    with pytest.raises(InputError, match="top-k"):
        lens.next_token_topk(tiny, "abc", k=0)
    with pytest.raises(InputError, match=r"2 tokens \(\['a', 'b'\]\)"):
        lens.next_token_topk(tiny, "abc", answer="ab")
    with pytest.raises(InputError, match=f"context is {tiny.n_ctx} tokens"):
        lens.logit_lens(tiny, "x" * tiny.n_ctx, max_tokens=None)
    with pytest.raises(InputError, match="limited to 5 tokens"):
        lens.logit_lens(tiny, "abcdefgh", max_tokens=5)
    with pytest.raises(InputError, match="same token"):
        lens.logit_difference(tiny, ["abc"], ("a", "a"))
    with pytest.raises(InputError, match=r"prompt 2 \('abcd'\) is 5 tokens but prompt 1 \('abc'\) is 4 tokens"):
        lens.logit_attribution(tiny, ["abc", "abcd"], ("a", "b"), require_same_length=True)
    with pytest.raises(InputError, match="answer pairs"):
        lens.logit_difference(tiny, ["abc", "abd"], [("a", "b")] * 3)
    with pytest.raises(InputError, match="correct answer of prompt 2"):
        lens.logit_difference(tiny, ["abc", "abd"], [("a", "b"), ("ab", "c")])


def test_multi_token_answer_message_embedded(emb):
    with pytest.raises(InputError) as e:
        lens.next_token_topk(emb, "The film was", answer="greatness")
    msg = str(e.value)
    assert "'greatness' is" in msg and "tokens" in msg and "[" in msg
    with pytest.raises(InputError, match="leading space"):
        lens.next_token_topk(emb, "The film was", answer="awful")


def test_lens_figures(tiny):
    from probing_core.plots import lens as plots

    nt = lens.next_token_topk(tiny, "abc", k=4, answer="d")
    fig = plots.next_token_bar(nt)
    np.testing.assert_allclose(fig.data[0].x, nt.top_probs[::-1])
    ll = lens.logit_lens(tiny, "abc", k=3, incl_mid=True)
    for value in ("top_prob", "next_prob", "next_rank_log"):
        hm = plots.logit_lens_heatmap(ll, value=value)
        assert np.asarray(hm.data[0].z).shape == (len(ll.labels), len(ll.tokens))
    assert hm.data[0].text[-1][0] == ll.top_tokens[-1][0][0].replace(" ", "·")
    assert len(plots.next_token_by_layer(ll).data) == 2
    ps = ["abc", "xyz"]
    ld = lens.logit_difference(tiny, ps, ("a", "b"))
    np.testing.assert_allclose(plots.logit_diff_bar(ld).data[0].y, ld.logit_diff)
    at = lens.logit_attribution(tiny, ps, ("a", "b"))
    np.testing.assert_allclose(plots.accumulated_resid_line(at).data[0].x, [0, 0.5, 1, 1.5, 2])
    np.testing.assert_allclose(plots.decomposition_bar(at).data[0].y, at.decomposition)
    np.testing.assert_allclose(plots.head_dla_heatmap(at).data[0].z, at.head_dla)


def test_cli_lens_json(capsys):
    import json

    from probing_core.cli import main

    assert main(["lens", "--model", "tiny", "--prompt", "hello", "--answer", "a", "--wrong", "b", "--top-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["next_token"]["top_k"]) == 3 and out["next_token"]["answer"]["text"] == "a"
    assert out["logit_lens_last_position"][-1]["layer"] == "final_post"
    assert out["attribution"]["max_abs_error"] < 1e-4
    assert main(["lens", "--model", "tiny", "--prompt", "hello", "--answer", "ab"]) == 2
    assert "2 tokens" in capsys.readouterr().err
