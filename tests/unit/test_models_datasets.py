"""Model loading (embedded, native, errors) and datasets (pydoc, uploads, bad files)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probing_core.store.activations import build_cache, open_entry
from probing_core.data.datasets import (
    MAX_UPLOAD_BYTES,
    DatasetSpec,
    load_dataset,
    make_dataset,
    parse_upload,
    pydoc_documents,
    tokenize_dataset,
)
from probing_core.errors import DatasetError, InputError, ModelError
from probing_core.models import ModelSpec, load_model, pick_device, spec_from_cli


@pytest.mark.slow
def test_embedded_model_loads_offline_and_answers_paris(embedded_model):
    m = embedded_model
    assert (m.n_layers, m.d_model, m.n_heads, m.d_mlp, m.d_vocab) == (30, 576, 9, 1536, 49152)
    assert m.tokenizer.space_marker == "Ġ"
    ids = torch.tensor([m.encode("The capital of France is")])
    logits = m.logits(ids)
    assert m.to_str_tokens([int(logits[0, -1].argmax())]) == [" Paris"]


@pytest.mark.slow
def test_embedded_store_equals_run_with_cache(embedded_model, store):
    ds = make_dataset(DatasetSpec("texts", "two sentences"), ["The cat sat on the mat.", "Probing reads features from activations."])
    hooks = ["hook_embed", "blocks.3.hook_resid_post", "blocks.29.mlp.hook_post"]
    entry, _ = build_cache(embedded_model, ds, hooks, store=store, max_len=32, max_tokens=None)
    acts = open_entry(store, entry.key)
    ids = embedded_model.encode(ds.documents[1])
    _, direct = embedded_model.run_with_cache(torch.tensor([ids]), hooks)
    rows = acts.seq == 1
    for h in hooks:
        np.testing.assert_allclose(acts.hook(h)[rows], direct[h][0].numpy(), rtol=1e-4, atol=1e-4)
    assert acts.raw_strings(acts.token_ids[rows])[1] == "Pro" or acts.text_strings(acts.token_ids[rows])[0] == "<|im_start|>"


def test_native_model_shapes_and_hooks(tiny_model):
    assert tiny_model.hook_names(["embed", "resid_post"]) == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert tiny_model.hook_width("blocks.0.mlp.hook_post") == tiny_model.d_mlp
    assert tiny_model.encode("ab") == [256, 97, 98]


def test_model_errors_say_what_to_do(tmp_path):
    with pytest.raises(ModelError, match="internet|hub|not a Hugging Face"):
        load_model(ModelSpec("hf", "definitely-not-a-model-xyz"))
    with pytest.raises(ModelError, match="not a Hugging Face model name"):
        load_model(ModelSpec("hf", "bad name with spaces"))
    with pytest.raises(ModelError, match="no config.json"):
        load_model(ModelSpec("local", str(tmp_path)))
    with pytest.raises(ModelError, match="does not exist"):
        spec_from_cli("/no/such/folder")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            pick_device("cuda")
    with pytest.raises(InputError, match="dtype"):
        load_model(ModelSpec("native", json.dumps({"n_layers": 1, "d_model": 8, "n_heads": 1, "d_head": 8, "n_ctx": 8, "d_vocab": 257}), dtype="int8"))


def test_pydoc_corpus_ships_with_python():
    docs = pydoc_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    a, b = load_dataset(DatasetSpec("pydoc")), load_dataset(DatasetSpec("pydoc"))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16


def test_uploads_txt_csv_jsonl():
    txt = parse_upload(b"first doc\nstill first\n\nsecond doc\n", "a.txt")
    assert txt.documents == ("first doc\nstill first", "second doc")
    lines = parse_upload(b"one\ntwo\nthree\n", "b.txt")
    assert lines.n_docs == 3
    csv_ds = parse_upload("text,sentiment\nI loved it,pos\nawful,neg\n".encode(), "c.csv")
    assert csv_ds.columns == {"sentiment": ("pos", "neg")}
    jl = parse_upload(b'{"body": "hi there", "y": 1}\n{"body": "bye", "y": 0}\n', "d.jsonl", text_column="body")
    assert jl.documents == ("hi there", "bye") and jl.columns["y"] == (1, 0)
    assert csv_ds.fingerprint != parse_upload("text,sentiment\nI loved it,neg\nawful,neg\n".encode(), "c.csv").fingerprint


@pytest.mark.parametrize(
    "data,name,match",
    [
        (b"", "e.txt", "empty"),
        (b"\x00\x01\x02binary", "b.txt", "binary"),
        ("caf\u00e9".encode("latin-1"), "l.txt", "not valid UTF-8"),
        (b"a" * (MAX_UPLOAD_BYTES + 1), "big.txt", "limit"),
        (b"body,label\nhello,1\n", "c.csv", "no column 'text'"),
        (b"   \n\n  \n", "w.txt", "no text"),
        (b'{"text": "x"}\nnot json\n', "j.jsonl", "line 2 is not JSON"),
        (b"hello", "x.pdf", "unsupported file type"),
    ],
)
def test_bad_uploads(data, name, match):
    with pytest.raises(DatasetError, match=match):
        parse_upload(data, name)


def test_tokenization_rules(tiny_model):
    ds = make_dataset(DatasetSpec("texts", "t"), ["abcdefghij", "xy"])
    batch = tokenize_dataset(tiny_model, ds, max_len=4)
    # BOS + 3 body tokens per row; "abcdefghij" → 4 rows, "xy" → 1 row
    assert batch.tokens.shape == (5, 4) and list(batch.lengths) == [4, 4, 4, 2, 3]
    assert (batch.tokens[:, 0] == 256).all() and list(batch.doc_index) == [0, 0, 0, 0, 1]
    capped = tokenize_dataset(tiny_model, ds, max_len=4, max_tokens=6)
    assert capped.n_tokens == 6
    with pytest.raises(InputError):
        tokenize_dataset(tiny_model, ds, max_len=0)
    with pytest.raises(InputError, match="context"):
        tokenize_dataset(tiny_model, ds, max_len=10_000)
    with pytest.raises(DatasetError, match="zero tokens"):
        tokenize_dataset(tiny_model, make_dataset(DatasetSpec("texts", "e"), [""]), max_len=8)
