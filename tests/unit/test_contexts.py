"""Context mining on a token table (no model needed) and on a real tiny-model cache entry."""
from __future__ import annotations

import numpy as np
import pytest

from probing_core.data.contexts import mine_contexts, resolve_token_set
from probing_core.errors import LabelError

# A toy vocabulary: id -> text
VOCAB = {0: "<s>", 1: " the", 2: " an", 3: " cat", 4: "ory", 5: " apple", 6: ".", 7: " a", 8: " owl"}


def text_of(ids):
    return [VOCAB[int(i)] for i in ids]


def table(rows):
    """Token table (token_ids, seq, pos, next_ids) of several rows."""
    ids, seq, pos, nxt = [], [], [], []
    for s, row in enumerate(rows):
        ids += row
        seq += [s] * len(row)
        pos += list(range(len(row)))
        nxt += row[1:] + [-1]
    return tuple(np.array(a) for a in (ids, seq, pos, nxt))


def test_whole_word_window_and_samples():
    t = table([[0, 6, 1, 3, 6, 2, 5, 6, 1, 4, 6], [0, 1, 8, 6, 2, 8, 6]])
    ctx = mine_contexts(*t, text_of, [[1], [2]], ["' the'", "' an'"], before=1, after=1)
    # " the" + "ory" is not a whole word; row 2's " the" at pos 1 has 1 token before: kept.
    assert ctx.counts == {"' the'": 2, "' an'": 2}
    assert all(ctx.labels[ctx.rows == r] == 0 for r in (2, 12))
    assert "⟦ the⟧ cat" in ctx.samples["' the'"][0]
    np.testing.assert_array_equal(ctx.next_ids, t[0][ctx.rows + 1])
    strict = mine_contexts(*t, text_of, [[1], [2]], ["the", "an"], before=2, after=1)
    assert strict.counts["the"] == 1  # pos 1 in row 2 lacks 2 tokens of context
    loose = mine_contexts(*t, text_of, [[1], [2]], ["the", "an"], before=1, after=1, whole_word_next=False)
    assert loose.counts["the"] == 3


def test_cap_and_errors():
    t = table([[0, 6] + [1, 3, 2, 5] * 20])
    ctx = mine_contexts(*t, text_of, [[1], [2]], ["the", "an"], before=1, after=1, max_per_class=5)
    assert ctx.counts == {"the": 5, "an": 5} and ctx.found["the"] == 20
    with pytest.raises(LabelError, match="overlap"):
        mine_contexts(*t, text_of, [[1, 2], [2]], ["a", "b"])
    with pytest.raises(LabelError, match="no context"):
        mine_contexts(*t, text_of, [[1], [8]], ["the", "owl"], before=1, after=1)
    with pytest.raises(LabelError, match="two classes"):
        mine_contexts(*t, text_of, [[1]], ["the"])


def test_resolve_token_set_says_what_a_string_splits_into():
    enc = {" the": [1], " an": [2], " theory": [1, 4]}
    assert resolve_token_set([" the", " an"], enc.__getitem__, text_of) == [1, 2]
    with pytest.raises(LabelError, match=r"splits into \[' the', 'ory'\]"):
        resolve_token_set([" theory"], enc.__getitem__, text_of)
    with pytest.raises(LabelError, match="no tokens"):
        resolve_token_set([""], enc.__getitem__, text_of)


def test_on_a_real_cache_entry(tiny_model, tiny_entry):
    from probing_core.store.activations import open_entry
    from probing_core.analyses import sparse

    store, entry = tiny_entry
    acts = open_entry(store, entry.key)
    ctx = sparse.contexts_for(acts, tiny_model.tokenizer.encode, tiny_model.tokenizer.decode_tokens, [["e"], ["a"]],
                              before=4, after=2, whole_word_next=False, max_per_class=100)
    assert set(ctx.counts.values()) == {100}
    assert np.all(acts.token_ids[ctx.rows[ctx.labels == 0]] == tiny_model.tokenizer.encode("e")[0])
    hook = next(h for h in acts.hooks if h.endswith("mlp.hook_post"))
    X = sparse.features(acts, hook, ctx)
    assert X.shape == (200, acts.meta["widths"][hook])
    path = sparse.fit_sparse_path(X, ctx, n_Cs=5)
    assert path.converged.all() and path.test_accuracy.max() > 0.9  # the token itself is in the features
