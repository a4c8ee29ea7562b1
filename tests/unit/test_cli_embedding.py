"""``probe embedding`` and ``probe transfer`` give the Regression page's numbers: their JSON equals
the core functions' results (the calls the page makes) on a tiny Llama folder whose BPE vocabulary
(trained here, offline) has tokens of many lengths and some numbers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from probing_core.analyses.regression import embedding_regression, probe_transfer
from probing_core.cli import main
from probing_core.cli.probe_embedding import TRANSFER_DEFAULT_ALPHA, embedding_json, transfer_json
from probing_core.data.datasets import DatasetSpec, load_dataset, pydoc_documents
from probing_core.data.labels import LabelSpec
from probing_core.models import ModelSpec, load_model
from probing_core.store.activations import build_cache, open_entry
from probing_core.store.entries import ActivationStore


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = pydoc_documents()[:20] + [" ".join(str(i) for i in range(600))] * 3
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    folder = tmp_path_factory.mktemp("models") / "tiny-bpe-llama"
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def env(monkeypatch, bpe_folder, tmp_path):
    monkeypatch.setenv("PROBING_MODEL_ROOTS", str(bpe_folder.parent))
    return tmp_path / "cache"


def _cli_json(capsys, *argv: str):
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _same(cli: dict, core: dict) -> None:
    np.testing.assert_equal(cli, json.loads(json.dumps(core)))  # NaN-aware, exact floats


def test_probe_embedding_json_equals_the_core_result(capsys, bpe_folder, env):
    out = _cli_json(capsys, "probe", "embedding", "--model", str(bpe_folder), "--cache-dir", str(env), "--json")
    model = load_model(ModelSpec("local", str(bpe_folder)), cache_root=env)
    res = embedding_regression(model, length_threshold=15, numeric_threshold=1000)  # the page's call and defaults
    _same({k: v for k, v in out.items() if k != "model"}, embedding_json(res, cv=5, test_fraction=0.2, seed=0))
    assert out["model"]["key"] == model.key
    by_task = {t["task"]: t for t in out["tasks"]}
    assert by_task["length"]["note"] is None and by_task["length"]["n_tokens"] > 500  # a real fit, not notes only
    assert np.isfinite(by_task["length"]["r2_test"])
    assert not list((env / "activations").glob("entries/*"))  # W_E only: no cache entry, no forward pass


def test_probe_embedding_options_reach_the_core(capsys, bpe_folder, env):
    out = _cli_json(capsys, "probe", "embedding", "--model", str(bpe_folder), "--cache-dir", str(env), "--json",
                    "--tasks", "length (no outliers)", "--length-threshold", "4", "--cv", "0", "--seed", "3")
    model = load_model(ModelSpec("local", str(bpe_folder)), cache_root=env)
    res = embedding_regression(model, ("length (no outliers)",), length_threshold=4, cv=0, seed=3)
    _same({k: v for k, v in out.items() if k != "model"}, embedding_json(res, cv=0, test_fraction=0.2, seed=3))
    assert [t["task"] for t in out["tasks"]] == ["length (no outliers)"]


def test_probe_transfer_json_equals_the_core_result(capsys, bpe_folder, env):
    out = _cli_json(capsys, "probe", "transfer", "--model", str(bpe_folder), "--cache-dir", str(env), "--json",
                    "--max-tokens", "1500", "--max-len", "64")
    model = load_model(ModelSpec("local", str(bpe_folder)), cache_root=env)
    store = ActivationStore(env / "activations")
    entry, built = build_cache(model, load_dataset(DatasetSpec("pydoc")), model.hook_names(), store=store,
                               max_len=64, max_tokens=1500)
    assert not built and entry.key == out["cache_key"]  # the CLI built exactly the entry the page would read
    run = probe_transfer(model, open_entry(store, entry.key), LabelSpec.make("length"), "all", alpha=TRANSFER_DEFAULT_ALPHA,
                         source="W_E")
    _same({k: out[k] for k in transfer_json(run)}, transfer_json(run))
    assert [h["hook"] for h in out["hooks"]][:2] == ["hook_embed", "blocks.0.hook_resid_pre"]
    assert len(out["hooks"]) == 1 + 3 * 3


@pytest.mark.parametrize("argv, says", [
    (["probe", "embedding", "--cv", "1"], "not cross-validation"),
    (["probe", "embedding", "--tasks", "width"], "invalid choice"),
    (["probe", "embedding", "--length-threshold", "0"], "length-threshold"),
    (["probe", "transfer", "--hooks", "mlp_post"], "residual stream"),
    (["probe", "transfer", "--label", "colour"], "unknown label"),
    (["probe", "transfer", "--alpha", "-1"], "alpha"),
    (["probe", "transfer", "--source", "W_U"], "invalid choice"),
    (["probe", "transfer", "--positions", "middle"], "position rule"),
])
def test_bad_arguments_exit_2_with_one_line_before_any_model_loads(capsys, argv, says, tmp_path):
    # --model names a folder that does not exist: a load would fail differently, so these never got there
    code = main([*argv, "--model", str(tmp_path / "no-such-model"), "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "models").exists()
