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
    _modules_preorder,
    enable_compat_cached,
    load_model,
    processed_weights_key,
    tiny_native_config,
    weight_fingerprint,
)


def _save_with_random_gains(model, folder: Path, norm_key: str) -> Path:
    """Random LayerNorm gains (parameters whose name holds ``norm_key``), so folding them is not a no-op;
    the model and a byte tokenizer saved like a HF folder."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norm_key in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)
    return folder


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
    return _save_with_random_gains(LlamaForCausalLM(cfg), folder, "norm")


@pytest.fixture()
def allow_folder(monkeypatch, llama_folder):
    monkeypatch.setenv("PROBING_MODEL_ROOTS", str(llama_folder.parent))


TOKENS = torch.tensor([[256, 84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116], [256, 72, 105, 33, 10, 49, 50, 51, 0, 255, 7, 9]])


def _all_hooks(model):
    return model.all_hook_names()


def _transformer_lens_own(folder: Path):
    """The bridge as TransformerLens builds it (build_bridge_from_module), with nothing of ours in between."""
    from transformer_lens.model_bridge.sources._bridge_builder import (
        build_bridge_from_module,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32)
    hf.train(False)
    tok = AutoTokenizer.from_pretrained(str(folder), add_bos_token=True)
    arch = (hf.config.architectures or [type(hf).__name__])[0]
    return build_bridge_from_module(hf, arch, hf_config=hf.config, tokenizer=tok, model_name=folder.name)


def _assert_same_bridge(ours, theirs, tokens):
    """Same hook registry (names, order, each hook's own name), weights, training flags, logits and activations."""
    assert list(ours._hook_registry) == list(theirs._hook_registry)
    assert list(ours.hook_dict) == list(theirs.hook_dict)
    assert all(ours.hook_dict[k].name == theirs.hook_dict[k].name for k in theirs.hook_dict)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert [m.training for m in ours.modules()] == [m.training for m in theirs.modules()]
    assert [sorted(vars(m)) for m in ours.modules()] == [sorted(vars(m)) for m in theirs.modules()]  # aliases set on each
    assert [id(m) for m in _modules_preorder(ours)] == [id(m) for m in ours.modules()]
    assert [m.training for m in ours.original_model.modules()] == [m.training for m in theirs.original_model.modules()]
    s1, s2 = ours.state_dict(), theirs.state_dict()
    assert list(s1) == list(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    with torch.inference_mode():
        l1, c1 = ours.run_with_cache(tokens)
        l2, c2 = theirs.run_with_cache(tokens)
    assert torch.equal(l1, l2)
    assert list(c1.keys()) == list(c2.keys()) and all(torch.equal(c1[k], c2[k]) for k in c1.keys())  # noqa: SIM118 (an ActivationCache)


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
    theirs = _transformer_lens_own(llama_folder)
    theirs.enable_compatibility_mode()
    theirs.train(False)
    assert type(ours.bridge) is not type(theirs)  # the fast construction, against the library's own
    assert set(ours.bridge.hook_dict) == set(theirs.hook_dict)
    s1, s2 = ours.bridge.state_dict(), theirs.state_dict()
    assert set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    with torch.inference_mode():
        l2, c2 = theirs.run_with_cache(TOKENS)
    l1, c1 = ours.bridge.run_with_cache(TOKENS)
    assert torch.equal(l1, l2)
    assert set(c1.keys()) == set(c2.keys()) and all(torch.equal(c1[k], c2[k]) for k in c1.keys())  # noqa: SIM118 (an ActivationCache)
    # and processing changed something (folded LayerNorm gains), so the comparison means something
    raw = _transformer_lens_own(llama_folder)
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


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (joint QKV attention: TransformerLens's qkv bridge has its own __deepcopy__)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=258, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=256, eos_token_id=257))
    return _save_with_random_gains(model, folder, "ln")


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_fast_bridge_construction_equals_transformer_lens_own(which, llama_folder, gpt2_folder):
    """_bridge_from_hf_folder builds the bridge faster (hook scan, block copies, train flags) and must
    give exactly what build_bridge_from_module gives: before compatibility mode and after it."""
    folder = {"llama": llama_folder, "gpt2": gpt2_folder}[which]
    ours, _ = _bridge_from_hf_folder(str(folder), torch.float32, "cpu", folder.name)
    theirs = _transformer_lens_own(folder)
    assert type(ours).__name__ == "FastScanBridge" and type(theirs).__name__ == "TransformerBridge"
    _assert_same_bridge(ours, theirs, TOKENS)
    ours.enable_compatibility_mode()
    theirs.enable_compatibility_mode()
    ours.train(False)
    theirs.train(False)
    _assert_same_bridge(ours, theirs, TOKENS)
    assert not any(m.training for m in ours.modules())


def _same_graph(a, b, seen_a, seen_b, path="template"):
    """Two object graphs match: types, dict keys in order, plain values, and which objects are shared."""
    assert type(a) is type(b), path
    if id(a) in seen_a or id(b) in seen_b:
        assert seen_a.get(id(a)) == seen_b.get(id(b)), f"{path}: sharing differs"
        return
    seen_a[id(a)] = seen_b[id(b)] = len(seen_a)
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _same_graph(a[k], b[k], seen_a, seen_b, f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_graph(x, y, seen_a, seen_b, f"{path}[{i}]")
    elif isinstance(a, (set, frozenset, int, float, str, bytes, bool, type(None))):
        assert a == b, path
    elif hasattr(a, "__dict__") and not isinstance(a, type) and not callable(getattr(a, "__func__", None)):
        _same_graph(vars(a), vars(b), seen_a, seen_b, f"{path}.__dict__")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_block_template_clone_matches_deepcopy(arch, llama_folder, gpt2_folder):
    import copy

    from transformer_lens.factories import architecture_adapter_factory
    from transformer_lens.model_bridge.sources._bridge_builder import (
        build_bridge_config_from_hf,
    )
    from transformers import AutoConfig

    from probing_core.models import _clone_like_deepcopy

    folder = llama_folder if arch.startswith("Llama") else gpt2_folder
    cfg = build_bridge_config_from_hf(AutoConfig.from_pretrained(folder), arch, "x", torch.float32)
    template = architecture_adapter_factory.ArchitectureAdapterFactory.select_architecture_adapter(cfg).get_component_mapping()["blocks"]
    theirs, ours = copy.deepcopy(template), _clone_like_deepcopy(template)
    _same_graph(theirs, ours, {}, {})
    assert ours is not template and all(a is not b for a, b in zip(ours.modules(), template.modules()))
    assert {id(v) for v in vars(ours).values()} & {id(v) for v in vars(template).values()} == \
        {id(v) for v in vars(theirs).values()} & {id(v) for v in vars(template).values()}  # what deepcopy shares, we share


def test_the_gguf_digest_is_remembered_per_file_state(tmp_path):
    import os

    from probing_core.models import _file_digest, _remembered_digest

    f, memo = tmp_path / "m.gguf", tmp_path / "models" / "digest.json"
    f.write_bytes(b"a" * 1000)
    first = _remembered_digest(f, memo)
    assert first == _file_digest(f) and memo.is_file()
    memo.write_text(memo.read_text().replace(first, "0" * 16))  # a memo for this very file is believed…
    assert _remembered_digest(f, memo) == "0" * 16
    f.write_bytes(b"b" * 1000)  # …and a changed file (size or time) is hashed again
    os.utime(f, ns=(1, 1))
    assert _remembered_digest(f, memo) == _file_digest(f) != first
    memo.write_text("{not json")
    assert _remembered_digest(f, memo) == _file_digest(f)


@pytest.mark.slow
def test_embedded_warm_start_equals_transformer_lens_own_load(embedded_model):
    """The embedded model's warm start (processed weights from the cache, the faster bridge) against
    TransformerLens building and processing the same converted folder itself."""
    from probing_core.models import _convert_embedded, default_cache_root

    warm = load_model(ModelSpec("embedded"))
    assert warm.processed_cache == "hit"
    theirs = _transformer_lens_own(_convert_embedded(default_cache_root(), None))
    theirs.enable_compatibility_mode()
    theirs.train(False)
    tokens = torch.tensor([warm.encode("The capital of France is")])
    _assert_same_bridge(warm.bridge, theirs, tokens)
