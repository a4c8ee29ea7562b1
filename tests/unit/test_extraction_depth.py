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


# ---- progress that moves ---------------------------------------------------------------------
def test_a_build_reports_tokenizing_then_every_block_monotonically(tiny_model, tmp_path):
    from probing_core.store.entries import ActivationStore

    calls: list[tuple[float, str]] = []
    data = load_dataset(DatasetSpec("pydoc"))
    build_cache(tiny_model, data, tiny_model.hook_names(["embed", "resid_post"]), store=ActivationStore(tmp_path / "s"),
                max_len=64, max_tokens=1500, progress=lambda f, m: calls.append((f, m)))
    fracs = [f for f, _ in calls]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in fracs)
    tok = [(f, m) for f, m in calls if m.startswith("tokeniz")]
    assert len(tok) >= 2 and tok[0][0] == 0.0 and "1/" in tok[0][1]  # a report as tokenizing starts, one as it ends
    assert calls.index(tok[-1]) < next(i for i, (_, m) in enumerate(calls) if m.startswith("extracting"))


def test_extraction_reports_within_each_pass(deep_model, tmp_path):
    from probing_core.data.datasets import tokenize_dataset
    from probing_core.store.activations import extract_to_folder

    batch = tokenize_dataset(deep_model, load_dataset(DatasetSpec("pydoc")), max_len=32, max_tokens=400)
    per_batch, inner = [], []
    hooks = ["hook_embed", "blocks.2.hook_resid_post"]  # three of the four blocks run
    extract_to_folder(deep_model, batch, hooks, tmp_path, batch_size=4, progress=lambda f, m: per_batch.append(f),
                      within_pass=lambda f, m: inner.append((f, m)))
    n_batches = -(-batch.tokens.shape[0] // 4)
    assert len(per_batch) == n_batches  # once per pass: the sharded engine counts passes by it
    assert [m.split(" ")[0] for _, m in inner[:2]] == ["writing", "reserving"]  # the steps before the first pass
    passes = inner[2:]
    assert len(passes) == 3 * n_batches and [f for f, _ in passes] == sorted(f for f, _ in passes)
    assert passes[-1][0] == 1.0 and "layer 3/3" in passes[-1][1]


def test_build_progress_throttles_and_measures_time_left():
    from probing_core.store.activations import BuildProgress

    now = [0.0]
    seen: list[tuple[float, str]] = []
    p = BuildProgress(lambda f, m: seen.append((f, m)), interval=0.5, clock=lambda: now[0])
    p.tokenizing(0.0, "tokenizing")
    p.tokenizing(0.5, "half")  # same instant: throttled
    p.tokenizing(1.0, "tokenized")  # the end of a step always goes out
    assert [m for _, m in seen] == ["tokenizing", "tokenized"]
    p.extracting(0.0, "start")
    now[0] = 10.0
    p.extracting(0.25, "quarter")  # 10 s for a quarter: 30 s left, measured
    assert seen[-1][1] == "quarter · about 30 s left"
    assert seen[-1][0] == BuildProgress.TOKENIZE_SHARE + (1 - BuildProgress.TOKENIZE_SHARE) * 0.25
    now[0] = 10.1
    p.extracting(0.3, "too soon")
    now[0] = 20.0
    p.extracting(0.2, "backwards")  # never moves the bar back
    assert seen[-1] == (seen[-2][0], "backwards · about 1 min 20 s left") and "too soon" not in [m for _, m in seen]
