"""Token labels on hand-made GPT-2 style (Ġ) and SentencePiece (▁) vocabularies, and bad input."""
from __future__ import annotations

import numpy as np
import pytest

from probing_core.errors import LabelError
from probing_core.data.labels import LABELS, LabelSpec, compute_labels, detect_space_marker

GPT2 = ["Ġthe", "The", "Ġan", "123", "Ġ42", "7", "Ġ1000000", "hello", "ĠParis", "!", "ĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠ"]
SP = ["▁the", "The", "▁an", "123", "▁42", "7", "▁Paris", "ing", "▁▁"]


def lab(name, toks=GPT2, **params):
    return compute_labels(LabelSpec.make(name, **params), toks)


def test_detect_space_marker():
    assert detect_space_marker(GPT2) == "Ġ"
    assert detect_space_marker(SP) == "▁"
    assert detect_space_marker([" a", "b", " c"]) == " "


def test_lengths_with_and_without_marker_and_outlier_mask():
    r = lab("length")
    np.testing.assert_array_equal(r.values[:4], [4, 3, 3, 3])
    assert r.mask.all() and r.values[-1] == 17
    r = lab("length_no_space")
    np.testing.assert_array_equal(r.values[:5], [3, 3, 2, 3, 2])
    r = lab("length", max_length=15)
    assert not r.mask[-1] and r.mask[:-1].all() and r.values[-1] == 0
    sp = compute_labels(LabelSpec.make("length_no_space"), SP)
    np.testing.assert_array_equal(sp.values[:3], [3, 3, 2])


def test_numbers_and_numeric_value_with_threshold():
    r = lab("is_number")
    np.testing.assert_array_equal(r.values, [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
    v = lab("numeric_value", min_count=2)  # as in the notebook: digits only, no leading space
    assert v.mask.tolist() == [False] * 3 + [True, False, True] + [False] * 5
    np.testing.assert_array_equal(v.selected(), [123, 7])
    v = lab("numeric_value", allow_space=True, min_count=2, max_value=1000)
    np.testing.assert_array_equal(v.selected(), [123, 42, 7])
    sp = compute_labels(LabelSpec.make("numeric_value", allow_space=True, min_count=3), SP)
    np.testing.assert_array_equal(sp.selected(), [123, 42, 7])


def test_too_few_number_tokens_says_try_gpt2():
    digits = [str(i) for i in range(10)] + ["Ġa", "b"]
    with pytest.raises(LabelError, match="single digits; try gpt2"):
        compute_labels(LabelSpec.make("numeric_value"), digits)


def test_capitalised_starts_with_space_position():
    np.testing.assert_array_equal(lab("capitalised").values, [0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(compute_labels(LabelSpec.make("starts_with_space"), SP).values, [1, 0, 1, 0, 1, 0, 1, 0, 1])
    r = compute_labels(LabelSpec.make("position"), ["a", "b", "c"], positions=[0, 1, 2])
    np.testing.assert_array_equal(r.values, [0, 1, 2])
    with pytest.raises(LabelError, match="positions"):
        compute_labels(LabelSpec.make("position"), ["a", "b"])


def test_regex_and_equals():
    r = lab("regex", pattern=r"^ [A-Z]")  # the marker is shown as a space
    np.testing.assert_array_equal(np.flatnonzero(r.values), [8])
    r = compute_labels(LabelSpec.make("regex", pattern=r"\d+$"), SP)
    assert r.values.sum() == 3
    r = lab("equals", token=" the")
    np.testing.assert_array_equal(np.flatnonzero(r.values), [0])
    r = compute_labels(LabelSpec.make("equals", token=" an"), SP)
    np.testing.assert_array_equal(np.flatnonzero(r.values), [2])
    with pytest.raises(LabelError, match="does not compile"):
        lab("regex", pattern="([a-z")
    with pytest.raises(LabelError, match="matches no token"):
        lab("regex", pattern="zzz")
    with pytest.raises(LabelError, match="no token equals"):
        lab("equals", token=" nope")


def test_next_token_labels():
    toks = ["Ġthe", "Ġcat", "Ġan", "apple", "."]
    nxt = ["Ġcat", "Ġan", "apple", ".", None]
    r = compute_labels(LabelSpec.make("next_starts_with_space"), toks, next_token_strings=nxt)
    np.testing.assert_array_equal(r.values[:4], [1, 1, 0, 0])
    assert r.mask.tolist() == [True, True, True, True, False]
    r = compute_labels(LabelSpec.make("next_equals", token=" an"), toks, next_token_strings=nxt)
    np.testing.assert_array_equal(r.values, [0, 1, 0, 0, 0])
    with pytest.raises(LabelError, match="following token"):
        compute_labels(LabelSpec.make("next_starts_with_space"), toks)


def test_column_labels_numeric_categorical_missing():
    r = compute_labels(LabelSpec.make("column"), ["a"] * 4, column_values=[1.5, 2.0, 3.0, 0.5])
    np.testing.assert_array_equal(r.values, [1.5, 2.0, 3.0, 0.5])
    r = compute_labels(LabelSpec.make("column"), ["a"] * 4, column_values=["pos", "neg", "pos", "neg"])
    assert r.categories == ("neg", "pos")
    np.testing.assert_array_equal(r.values, [1, 0, 1, 0])
    with pytest.raises(LabelError, match="missing"):
        compute_labels(LabelSpec.make("column"), ["a"] * 3, column_values=[1.0, np.nan, 2.0])
    r = compute_labels(LabelSpec.make("column", drop_missing=True), ["a"] * 3, column_values=[1.0, np.nan, 2.0])
    assert r.mask.tolist() == [True, False, True]
    with pytest.raises(LabelError, match="inf"):
        compute_labels(LabelSpec.make("column"), ["a"] * 3, column_values=[1.0, np.inf, 2.0])


def test_constant_label_and_unknown_label_raise():
    with pytest.raises(LabelError, match="constant"):
        compute_labels(LabelSpec.make("starts_with_space"), ["Ġa", "Ġb", "Ġc"])
    r = compute_labels(LabelSpec.make("starts_with_space"), ["Ġa", "Ġb"], allow_constant=True)
    assert r.values.tolist() == [1.0, 1.0]
    with pytest.raises(LabelError, match="unknown label"):
        compute_labels(LabelSpec("eval('1')"), ["a"])


def test_registry_and_spec_are_serialisable():
    assert {"length", "length_no_space", "numeric_value", "regex", "equals", "position", "column"} <= set(LABELS)
    s = LabelSpec.make("length", max_length=15)
    assert s == LabelSpec.make("length", max_length=15) and hash(s) == hash(LabelSpec.make("length", max_length=15))
    assert s.to_dict() == {"name": "length", "params": {"max_length": 15}}
    assert all(info.title and info.description for info in LABELS.values())
