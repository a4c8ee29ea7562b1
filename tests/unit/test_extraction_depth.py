"""Extraction runs the model only as deep as the deepest hook asked for: the activations equal a
full forward pass's, and fewer blocks run (counted with forward hooks on the real blocks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probing_core.data.datasets import DatasetSpec, load_dataset
from probing_core.models import ModelSpec, load_model, tiny_native_config
from probing_core.store.activations import build_cache, open_entry


@pytest.fixture(scope="module")
def deep_model():
    """A 4-layer tiny native model of this module's own (forward hooks are added to it)."""
    return load_model(ModelSpec.native(tiny_native_config(n_layers=4, seed=3)))


class BlockCounter:
    """Counts forward calls of each block of a bridge while in a ``with``."""

    def __init__(self, model):
        self.model = model
        self.calls = [0] * model.n_layers

    def __enter__(self):
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(self.model.bridge.blocks)]
        return self

    def _hook(self, i):
        def hook(module, args, output):
            self.calls[i] += 1
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    @property
    def blocks_run(self) -> int:
        return sum(c > 0 for c in self.calls)


TOKENS = torch.tensor([[256, 84, 104, 101, 32, 99, 97, 116], [256, 72, 105, 33, 10, 49, 50, 51]])


@pytest.mark.parametrize(
    "hooks, blocks",
    [
        (["hook_embed"], 0),
        (["hook_embed", "blocks.0.hook_resid_pre"], 1),  # blocks.0.hook_resid_pre fires inside block 0
        (["blocks.1.hook_resid_post", "blocks.1.mlp.hook_post", "hook_embed"], 2),
        (["blocks.2.hook_attn_out", "blocks.0.hook_resid_mid"], 3),
        (["blocks.3.hook_resid_post"], 4),
    ],
)
def test_activations_equal_the_full_run_with_fewer_blocks(deep_model, hooks, blocks):
    with BlockCounter(deep_model) as full:
        _, ref = deep_model.run_with_cache(TOKENS, hooks, return_logits=True)  # logits wanted: the whole model runs
    assert full.blocks_run == 4
    with BlockCounter(deep_model) as short:
        _, acts = deep_model.run_with_cache(TOKENS, hooks)
    assert short.blocks_run == blocks
    assert all(short.calls[i] == 0 for i in range(blocks, 4))
    for h in hooks:
        assert torch.equal(acts[h], ref[h]), h


def test_stop_layer_rules(deep_model):
    assert deep_model.stop_layer(["hook_embed"]) == 0
    assert deep_model.stop_layer(["blocks.2.attn.hook_pattern"]) == 3
    assert deep_model.stop_layer(["blocks.3.hook_resid_post", "hook_embed"]) is None  # the last block: a full run
    assert deep_model.stop_layer(["ln_final.hook_normalized"]) is None  # unknown depth: a full run


def test_store_entry_of_embed_alone_runs_no_block(deep_model, tmp_path):
    from probing_core.store.entries import ActivationStore

    data = load_dataset(DatasetSpec("pydoc"))
    store = ActivationStore(tmp_path / "store")
    with BlockCounter(deep_model) as counter:
        entry, built = build_cache(deep_model, data, ["hook_embed"], store=store, max_len=32, max_tokens=300)
    assert built and counter.blocks_run == 0
    acts = open_entry(store, entry.key)
    W_E = deep_model.bridge.W_E.detach().numpy()
    np.testing.assert_array_equal(acts.hook("hook_embed"), W_E[acts.token_ids])  # native model: embed = W_E rows
