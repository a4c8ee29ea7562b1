"""Tree-search task: generator invariants, tokenizer round trip, the shipped checkpoint, training determinism."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from probing_core.tree import model as tree_model, task as tree_task, train as tree_train
from probing_core.errors import InputError, ModelError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models on a shared 2-core machine: 2 torch threads ran these 35x slower than 1
    under load (spin-waiting threads), so run single-threaded and restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


def _is_tree(sample: tree_task.TreeSample) -> bool:
    nodes = {v for e in sample.edges for v in e}
    children = [c for _, c in sample.edges]
    if len(nodes) != sample.n_nodes or len(set(children)) != len(children) or sample.root in children:
        return False
    # every node reachable from the root and at most two children each
    seen, stack = set(), [sample.root]
    kids = sample.children()
    while stack:
        v = stack.pop()
        seen.add(v)
        stack.extend(kids.get(v, []))
    return seen == nodes and all(len(c) <= 2 for c in kids.values())


@pytest.mark.parametrize("n_nodes", [2, 5, 16])
def test_generated_samples_are_binary_trees_with_bfs_paths(n_nodes: int) -> None:
    for s in tree_task.make_dataset(200, seed=3, n_nodes=n_nodes):
        assert _is_tree(s)
        assert list(s.path) == tree_task.bfs_path(s.edges, s.root, s.goal)
        assert s.path[0] == s.root and s.path[-1] == s.goal and s.depth == len(s.path) - 1 >= 1
        assert s.goal not in s.children()  # the goal is a leaf
        assert len(s.prompt_ids) == tree_task.prompt_length(n_nodes)
        assert len(s.target_ids) == s.depth


def test_depth_control_gives_exact_depth() -> None:
    rng = np.random.default_rng(0)
    for depth in range(1, 16):
        s = tree_task.generate_tree(rng, 16, depth=depth)
        assert s.depth == depth and _is_tree(s) and s.goal not in s.children()
    with pytest.raises(InputError):
        tree_task.generate_tree(rng, 16, depth=16)
    with pytest.raises(InputError):
        tree_task.generate_tree(rng, 17)


def test_generator_is_seeded() -> None:
    a = tree_task.make_dataset(20, seed=7)
    b = tree_task.make_dataset(20, seed=7)
    c = tree_task.make_dataset(20, seed=8)
    assert a == b and a != c


def test_text_format_and_tokenizer_round_trip() -> None:
    tok = tree_task.TreeTokenizer()
    assert tok.vocab_size() == 36 and tok.bos_id is None and tok.space_marker == ""
    for s in tree_task.make_dataset(50, seed=1):
        ids = tok.encode(s.text)
        assert ids == list(s.prompt_ids + s.target_ids)
        assert tok.decode(ids) == s.text
        assert tree_task.parse_sample(s.text) == s
        strings = tok.token_strings(ids)
        P = tree_task.prompt_length(16)
        assert strings[P - 4] == "|" and strings[P - 2] == ":" and strings[P - 1] == str(s.root)
        assert strings[P - 3] == str(s.goal) and strings[-1] == f"→{s.goal}"
        # every edge reads "src →dst ," at positions 3e, 3e+1, 3e+2
        for e, (p, c) in enumerate(s.edges):
            assert strings[3 * e : 3 * e + 3] == [str(p), f"→{c}", ","]
    assert tok.encode("12 ->10 , >3") == tok.encode("12 →10 , →3")
    with pytest.raises(InputError, match="not a tree-task token"):
        tok.encode("12 → 10")


def test_bfs_path_on_known_tree() -> None:
    edges = [(12, 10), (12, 15), (15, 4), (4, 3), (4, 8)]
    s = tree_task.make_sample(edges, root=12, goal=3)
    assert s.path == (12, 15, 4, 3)
    assert s.text.endswith("| 3 : 12 →15 →4 →3")
    with pytest.raises(InputError):
        tree_task.make_sample([(1, 2), (3, 2)], root=1, goal=2)  # node 2 has two parents


def test_edge_probe_targets_point_at_the_right_tokens() -> None:
    samples = tree_task.make_dataset(10, seed=2)
    t = tree_task.edge_probe_targets(samples)
    tok = tree_task.TreeTokenizer()
    n_e = 15
    assert len(t.label) == 10 * (n_e * 2 * 2 + (n_e - 1) * 2)
    for offset, name in t.tasks():
        seq, pos, lab = t.select(offset, name)
        for i, p, y in zip(seq, pos, lab):
            ids = samples[i].prompt_ids
            e = p // 3
            src, dst = samples[i].edges[e if offset != "fourth" else (p - 3) // 3]
            assert y == (src if name == "source" else dst)
            if offset == "second":
                assert tok.decode_tokens([ids[p]])[0] == f"→{dst}"
            elif offset == "third":
                assert ids[p] == tok.comma_id
            else:
                assert tok.node_of(ids[p]) is not None and not tok.is_arrow(ids[p])


# ---------------------------------------------------------------------------------------------
# Shipped checkpoint
# ---------------------------------------------------------------------------------------------

needs_checkpoint = pytest.mark.skipif(not tree_model.checkpoint_available(), reason="no shipped tree checkpoint")


@pytest.fixture(scope="module")
def shipped() -> tuple[torch.nn.Module, dict]:
    return tree_model.load_native_model(), tree_model.read_checkpoint_config()


@needs_checkpoint
def test_shipped_checkpoint_reaches_reported_accuracy(shipped: tuple[torch.nn.Module, dict]) -> None:
    model, conf = shipped
    reported = conf["eval"]["natural"]["accuracy"]
    res = tree_model.evaluate(model, tree_task.make_dataset(200, seed=4242, n_nodes=conf["task"]["n_nodes"]))
    assert res.accuracy >= reported - 0.05, res.to_json()


@needs_checkpoint
def test_bridge_matches_plain_model_and_survives_compatibility_mode(shipped: tuple[torch.nn.Module, dict]) -> None:
    from probing_core.models import ModelSpec, load_model

    model, conf = shipped
    n_nodes = conf["task"]["n_nodes"]
    samples = tree_task.make_dataset(64, seed=99, n_nodes=n_nodes)
    x = tree_task.prompt_tensor(samples)
    bridge, tok = tree_model.load_tree_bridge("cpu", torch.float32)
    assert isinstance(tok, tree_task.TreeTokenizer)
    with torch.inference_mode():
        ref = model(x)
        got = bridge(x)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    loaded = load_model(ModelSpec("tree", device="cpu"))
    lp = loaded.logits(x).log_softmax(-1)
    torch.testing.assert_close(lp, ref.log_softmax(-1), atol=1e-4, rtol=1e-4)
    assert tree_model.greedy_paths(loaded, samples) == tree_model.greedy_paths(model, samples)
    assert loaded.encode(samples[0].text, prepend_bos=True) == list(samples[0].prompt_ids + samples[0].target_ids)
    _, acts = loaded.run_with_cache(x, ["hook_embed", f"blocks.{loaded.n_layers - 1}.hook_resid_post"])
    assert acts["hook_embed"].shape == (64, tree_task.prompt_length(n_nodes), loaded.d_model)


@needs_checkpoint
def test_evaluation_rows_are_the_downloads(shipped: tuple[torch.nn.Module, dict]) -> None:
    model, conf = shipped
    samples = tree_task.make_dataset(60, seed=7, n_nodes=conf["task"]["n_nodes"], natural_fraction=0.0)
    res = tree_model.evaluate(model, samples)
    assert len(res.predictions) == 60 and list(res.predictions) == [tuple(p) for p in tree_model.greedy_paths(model, samples)]
    rows = [tree_model.sample_row(s, p, root_included=False) for s, p in zip(samples, res.predictions)]
    assert np.mean([r["correct"] for r in rows]) == pytest.approx(res.accuracy)
    assert all(r["correct"] == (r["true_path"] == r["predicted_path"]) for r in rows)
    assert sum(r["puzzles"] for r in res.depth_rows()) == 60
    one = tree_model.sample_row(samples[0], tree_model.predict_path(model, samples[0]))
    assert one == rows[0] and tree_task.parse_sample(one["prompt"]).path == samples[0].path


def test_missing_checkpoint_says_how_to_fix(tmp_path: Path) -> None:
    assert not tree_model.checkpoint_available(tmp_path)
    with pytest.raises(ModelError, match="train-tree"):
        tree_model.load_tree_bridge("cpu", torch.float32, folder=tmp_path)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

_TINY = dict(n_nodes=6, n_layers=2, d_model=32, n_heads=2, d_mlp=64, steps=4, batch_size=8, warmup_steps=2)


def test_training_is_deterministic_and_round_trips_through_a_bridge(tmp_path: Path) -> None:
    cfg = tree_train.TreeTrainConfig(**_TINY, seed=5)
    a = tree_train.train_tree_model(cfg, progress=False)
    b = tree_train.train_tree_model(cfg, progress=False)
    c = tree_train.train_tree_model(tree_train.TreeTrainConfig(**_TINY, seed=6), progress=False)
    assert a.losses == b.losses and len(a.losses) == 4
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.losses != c.losses

    tree_train.save_checkpoint(a.model, cfg, tmp_path, eval_results={"natural": {"accuracy": 0.0}})
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["task"]["n_nodes"] == 6 and conf["bridge_config"]["n_ctx"] == 24
    bridge, _ = tree_model.load_tree_bridge("cpu", torch.float32, folder=tmp_path)
    x = tree_task.prompt_tensor(tree_task.make_dataset(8, seed=0, n_nodes=6))
    with torch.inference_mode():
        torch.testing.assert_close(bridge(x), a.model(x), atol=1e-5, rtol=1e-5)


def test_training_lowers_the_loss() -> None:
    cfg = tree_train.TreeTrainConfig(**{**_TINY, "steps": 60, "batch_size": 16, "lr": 3e-3}, seed=0)
    res = tree_train.train_tree_model(cfg, progress=False)
    assert np.mean(res.losses[-10:]) < np.mean(res.losses[:5]) - 0.3


def test_plot_tree_draws_paths() -> None:
    from probing_core.plots.tree import plot_tree, tree_layout

    s = tree_task.make_sample([(12, 10), (12, 15), (15, 4), (4, 3), (4, 8)], root=12, goal=3)
    pos = tree_layout(s)
    assert pos[12][1] == 0 and pos[3][1] == -3
    fig = plot_tree(s, predicted_path=[12, 15, 4, 8])
    names = [tr.name for tr in fig.data]
    assert "true path" in names and "predicted path" in names
    assert "wrong" in fig.layout.title.text
    assert "correct" in plot_tree(s, predicted_path=list(s.path)).layout.title.text


def test_size_curriculum_left_pads_small_trees_into_the_full_frame() -> None:
    cfg = tree_train.TreeTrainConfig(min_nodes=4, batch_size=32)
    batch = tree_train.train_batch(cfg, np.random.default_rng(0), frac=0.05)
    assert min(s.n_nodes for s in batch) >= 4 and max(s.n_nodes for s in batch) < 16
    assert max(max(s.path) for s in batch) >= 6  # labels come from the whole 0…15 pool
    toks, mask = tree_task.batch_tensors(batch, frame_nodes=16)
    P = tree_task.prompt_length(16)
    tok = tree_task.TreeTokenizer()
    for b, s in enumerate(batch):
        row = toks[b].tolist()
        assert row[P - 4] == tok.bar_id and row[P - 1] == tok.node_id(s.root)
        assert row[: P - len(s.prompt_ids)] == [tok.pad_id] * (P - len(s.prompt_ids))
        assert row[P : P + s.depth] == list(s.target_ids)
        assert mask[b].nonzero().ravel().tolist() == list(range(P - 1, P - 1 + s.depth))
    full = tree_train.train_batch(cfg, np.random.default_rng(0), frac=0.9)
    assert all(s.n_nodes == 16 for s in full)
