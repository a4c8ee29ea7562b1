"""The processed-weights cache: a second load reads compatibility-mode weights back from a
safetensors file and gives the same model, bit for bit, as processing them again — and the
processing split used for it gives what TransformerLens's own ``enable_compatibility_mode`` gives.

Runs on a tiny Llama folder written here (random weights, a byte-level tokenizer): offline, no mocks.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from probing_core.models import (
    ModelSpec,
    _bridge_from_hf_folder,
    enable_compat_cached,
    load_model,
    processed_weights_key,
    tiny_native_config,
    weight_fingerprint,
)


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """A 2-layer Llama (d_model 32, grouped-query attention, untied unembedding) saved like a HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    cfg = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=256, eos_token_id=257,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # random LayerNorm gains, so folding them is not a no-op
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture()
def allow_folder(monkeypatch, llama_folder):
    monkeypatch.setenv("PROBING_MODEL_ROOTS", str(llama_folder.parent))


TOKENS = torch.tensor([[256, 84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116], [256, 72, 105, 33, 10, 49, 50, 51, 0, 255, 7, 9]])


def _all_hooks(model):
    return model.all_hook_names()


@pytest.mark.usefixtures("allow_folder")
def test_second_load_reads_the_cache_and_equals_a_fresh_processed_load(llama_folder, tmp_path):
    spec = ModelSpec("local", str(llama_folder))
    first = load_model(spec, cache_root=tmp_path / "a")
    files = list((tmp_path / "a" / "models" / "processed").glob("*.safetensors"))
    assert first.processed_cache == "written" and len(files) == 1 and files[0].with_suffix(".json").is_file()
    assert not [p for p in files[0].parent.iterdir() if p.name.startswith(".tmp")]
    warm = load_model(spec, cache_root=tmp_path / "a")
    fresh = load_model(spec, cache_root=tmp_path / "b")  # another cache: processes again
    assert warm.processed_cache == "hit" and fresh.processed_cache == "written"
    assert warm.key == fresh.key == first.key
    assert torch.equal(warm.logits(TOKENS), fresh.logits(TOKENS))
    hooks = _all_hooks(warm)
    _, a = warm.run_with_cache(TOKENS, hooks)
    _, b = fresh.run_with_cache(TOKENS, hooks)
    assert all(torch.equal(a[h], b[h]) for h in hooks)
    assert torch.equal(warm.bridge.W_E, fresh.bridge.W_E) and torch.equal(warm.bridge.W_U, fresh.bridge.W_U)


@pytest.mark.usefixtures("allow_folder")
def test_cached_processing_equals_transformer_lens_own(llama_folder, tmp_path):
    """The split (compute, save, install) must leave the bridge exactly as TransformerLens's own
    ``enable_compatibility_mode()`` does: same hooks, weights, activations and logits."""
    ours = load_model(ModelSpec("local", str(llama_folder)), cache_root=tmp_path)
    ours = load_model(ModelSpec("local", str(llama_folder)), cache_root=tmp_path)  # the warm path
    assert ours.processed_cache == "hit"
    theirs, _ = _bridge_from_hf_folder(str(llama_folder), torch.float32, "cpu", llama_folder.name)
    theirs.enable_compatibility_mode()
    theirs.train(False)
    assert set(ours.bridge.hook_dict) == set(theirs.hook_dict)
    s1, s2 = ours.bridge.state_dict(), theirs.state_dict()
    assert set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    with torch.inference_mode():
        l2, c2 = theirs.run_with_cache(TOKENS)
    l1, c1 = ours.bridge.run_with_cache(TOKENS)
    assert torch.equal(l1, l2)
    assert set(c1.keys()) == set(c2.keys()) and all(torch.equal(c1[k], c2[k]) for k in c1.keys())
    # and processing changed something (folded LayerNorm gains), so the comparison means something
    raw, _ = _bridge_from_hf_folder(str(llama_folder), torch.float32, "cpu", llama_folder.name)
    raw.enable_compatibility_mode(no_processing=True)
    assert not torch.equal(raw.state_dict()["blocks.0.attn.q.weight"], s1["blocks.0.attn.q.weight"])


def test_native_model_through_the_cache_equals_transformer_lens_own(tmp_path):
    from transformer_lens.model_bridge import TransformerBridge

    cfg = tiny_native_config()
    ours = TransformerBridge.boot_native(cfg, device="cpu", dtype=torch.float32)
    assert enable_compat_cached(ours, "native-test", dtype="float32", device="cpu", cache_root=tmp_path)[0] == "written"
    again = TransformerBridge.boot_native(cfg, device="cpu", dtype=torch.float32)
    status, fp = enable_compat_cached(again, "native-test", dtype="float32", device="cpu", cache_root=tmp_path)
    assert status == "hit" and fp == weight_fingerprint(again)  # the saved fingerprint is the installed weights' own
    theirs = TransformerBridge.boot_native(cfg, device="cpu", dtype=torch.float32)
    theirs.enable_compatibility_mode()
    toks = TOKENS.clamp(max=256)
    with torch.inference_mode():
        assert torch.equal(ours(toks), theirs(toks)) and torch.equal(again(toks), theirs(toks))


@pytest.mark.usefixtures("allow_folder")
def test_a_damaged_cache_file_is_processed_again(llama_folder, tmp_path):
    spec = ModelSpec("local", str(llama_folder))
    good = load_model(spec, cache_root=tmp_path)
    (path,) = (tmp_path / "models" / "processed").glob("*.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated file (disk full, killed writer)
    again = load_model(spec, cache_root=tmp_path)
    assert again.processed_cache == "written" and path.stat().st_size == len(data)
    path.write_bytes(b"\x00" * 64)  # not safetensors at all
    third = load_model(spec, cache_root=tmp_path)
    assert third.processed_cache == "written"
    assert torch.equal(third.logits(TOKENS), good.logits(TOKENS))


def test_the_key_changes_with_what_changes_the_processed_bytes():
    base = processed_weights_key("local:/m", "float32", "cpu", "00ff")
    assert base == processed_weights_key("local:/m", "float32", "cpu", "00ff")
    others = {processed_weights_key("local:/n", "float32", "cpu", "00ff"),
              processed_weights_key("local:/m", "bfloat16", "cpu", "00ff"),
              processed_weights_key("local:/m", "float32", "cuda:1", "00ff"),
              processed_weights_key("local:/m", "float32", "cpu", "00fe")}
    assert base not in others and len(others) == 4


@pytest.mark.slow
def test_embedded_model_warm_start_reads_the_cache(embedded_model, tmp_path):
    """The embedded fixture's load wrote (or read) the cache under .test-cache; a second load reads it."""
    again = load_model(ModelSpec("embedded"))
    assert again.processed_cache == "hit" and again.key == embedded_model.key
    toks = torch.tensor([again.encode("The capital of France is")])
    assert torch.equal(again.logits(toks), embedded_model.logits(toks))


def test_changed_weights_in_a_local_folder_are_processed_again(tmp_path, monkeypatch):
    """The cache key follows the folder's files: new weights under the same path never read old processed ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "m"
    monkeypatch.setenv("PROBING_MODEL_ROOTS", str(tmp_path))
    cfg = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, bos_token_id=256, eos_token_id=257)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)
    a = load_model(ModelSpec("local", str(folder)), cache_root=tmp_path / "c")
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(folder)  # same path, other weights
    b = load_model(ModelSpec("local", str(folder)), cache_root=tmp_path / "c")
    assert a.processed_cache == b.processed_cache == "written" and a.key != b.key
    assert not torch.equal(a.logits(TOKENS), b.logits(TOKENS))
    assert len(list((tmp_path / "c" / "models" / "processed").glob("*.safetensors"))) == 1  # the old file superseded
    c = load_model(ModelSpec("local", str(folder)), cache_root=tmp_path / "c")
    assert c.processed_cache == "hit" and c.key == b.key and torch.equal(c.logits(TOKENS), b.logits(TOKENS))
