"""The tree-search model: its native TransformerLens config, checkpoint I/O, greedy paths and evaluation."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from probing_core.errors import InputError, ModelError
from probing_core.tree.task import CHECKPOINT_DIR, DEFAULT_N_NODES, MAX_NODES, TOKENIZER, TreeSample, TreeTokenizer, batch_tensors, prompt_length, sequence_length


def model_config(
    n_nodes: int = DEFAULT_N_NODES,
    n_layers: int = 6,
    d_model: int = 128,
    n_heads: int = 1,
    d_mlp: int = 512,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``boot_native`` config dict of a tree model (causal, GELU, LayerNorm, learned positions)."""
    if d_model % n_heads:
        raise InputError(f"d_model={d_model} is not divisible by n_heads={n_heads}.")
    return {
        "n_layers": int(n_layers),
        "d_model": int(d_model),
        "n_heads": int(n_heads),
        "d_head": int(d_model // n_heads),
        "d_mlp": int(d_mlp),
        "d_vocab": TreeTokenizer().vocab_size(),
        "n_ctx": sequence_length(n_nodes),
        "act_fn": "gelu",
        "normalization_type": "LN",
        "seed": int(seed),
    }


def build_native_model(config: dict[str, Any]) -> torch.nn.Module:
    """A plain (unwrapped, hook-free, fast to train) TL ``NativeModel`` initialised from ``config["seed"]``.

    Its ``state_dict`` keys (``tok_embed.weight``, ``layers.0.attn.q.weight`` …) are what the
    checkpoint stores; :func:`load_tree_bridge` maps them into a booted bridge.
    """
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources.native.init import initialize_native_model
    from transformer_lens.model_bridge.sources.native.model import NativeModel

    cfg = TransformerBridgeConfig.from_dict(dict(config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.get("seed", 0)))
        model = NativeModel(cfg)
        initialize_native_model(model, cfg)
    return model


def checkpoint_available(folder: Path | None = None) -> bool:
    """True when the shipped checkpoint (weights and config) is present."""
    folder = Path(folder) if folder else CHECKPOINT_DIR
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def read_checkpoint_config(folder: Path | None = None) -> dict[str, Any]:
    """The checkpoint's ``config.json`` (keys: ``bridge_config``, ``task``, ``training``, ``eval``).

    Raises:
        ModelError: missing or unreadable.
    """
    folder = Path(folder) if folder else CHECKPOINT_DIR
    if not checkpoint_available(folder):
        raise ModelError(
            f"no tree-search checkpoint in {folder}; train one with "
            f"`python -m probing_core train-tree --out {folder}` or restore the shipped files from git."
        )
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder / 'config.json'} is unreadable ({e}); restore it from git or retrain.") from e


def _load_plain_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(folder / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 — safetensors raises several types for a bad file
        raise ModelError(f"{folder / 'model.safetensors'} cannot be read ({e}); restore it from git or retrain.") from e


def load_native_model(folder: Path | None = None, device: str = "cpu") -> torch.nn.Module:
    """The checkpoint as a plain ``NativeModel`` (what training produced), eval mode."""
    folder = Path(folder) if folder else CHECKPOINT_DIR
    cfg = read_checkpoint_config(folder)
    model = build_native_model(cfg["bridge_config"])
    model.load_state_dict(_load_plain_state(folder), strict=True)
    return model.to(device).train(False)


_BRIDGE_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^tok_embed\.", "embed."),
    (r"^pos\.", "pos_embed."),
    (r"^layers\.(\d+)\.", r"blocks.\1."),
    (r"\.mlp\.fc_in\.", ".mlp.in."),
    (r"\.mlp\.fc_out\.", ".mlp.out."),
    (r"^ln_out\.", "ln_final."),
    (r"^head\.", "unembed."),
)


def _bridge_key(plain_key: str) -> str:
    """Plain ``NativeModel`` key → the bridge's TransformerLens-style key (``layers.0.mlp.fc_in.weight`` → ``blocks.0.mlp.in.weight``)."""
    k = plain_key
    for pat, rep in _BRIDGE_KEY_RULES:
        k = re.sub(pat, rep, k)
    return k


def load_tree_bridge(
    device: str = "cpu", dtype: torch.dtype = torch.float32, folder: Path | None = None
) -> tuple[Any, TreeTokenizer]:
    """Boot a native ``TransformerBridge`` and load the checkpoint's weights into it.

    Compatibility mode is *not* enabled here (``models.load_model`` does it).

    Args:
        device: torch device string.
        dtype: weight dtype.
        folder: checkpoint folder (default: the shipped one).

    Returns:
        (bridge, tokenizer).

    Raises:
        ModelError: checkpoint missing, unreadable or not matching its config.
    """
    folder = Path(folder) if folder else CHECKPOINT_DIR
    cfg = read_checkpoint_config(folder)
    plain = _load_plain_state(folder)
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_native(dict(cfg["bridge_config"]), device=device, dtype=dtype)
    mapped = {_bridge_key(k): v.to(device=device, dtype=dtype) for k, v in plain.items()}
    if "unembed.bias" not in mapped:
        # NativeModel's head has no bias; the bridge exposes one, which must be zero.
        mapped["unembed.bias"] = torch.zeros(int(cfg["bridge_config"]["d_vocab"]), device=device, dtype=dtype)
    expected = set(bridge.state_dict().keys())
    missing, unknown = expected - set(mapped), set(mapped) - expected
    if missing or unknown:
        raise ModelError(
            f"checkpoint in {folder} does not match its config.json (missing {sorted(missing)[:3]}, "
            f"unknown {sorted(unknown)[:3]}); retrain with `python -m probing_core train-tree`."
        )
    bridge.load_state_dict(mapped, strict=True)
    bridge.train(False)
    return bridge, TreeTokenizer(int(cfg.get("task", {}).get("max_nodes", MAX_NODES)))




def _logits_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A [batch, pos] → [batch, pos, d_vocab] function for a NativeModel, bridge or LoadedModel."""
    if hasattr(model, "logits") and hasattr(model, "lock"):
        return lambda t: model.logits(t).float().cpu()
    device = next(model.parameters()).device

    def run(t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(t.to(device)).float().cpu()

    return run


def greedy_paths(
    model: Any, samples: Sequence[TreeSample], batch_size: int = 256, frame_nodes: int | None = None
) -> list[list[int]]:
    """Greedy-decode each sample's path (root excluded) until the model writes ``→goal``.

    Decoding stops at the first ``→goal``, at a non-arrow token (kept as ``-1``), or after
    ``n_nodes - 1`` tokens. Each step feeds only the prefix (the model is causal).

    Args:
        model: a plain ``NativeModel``, a ``TransformerBridge`` or a ``LoadedModel``.
        samples: same ``n_nodes`` each, unless ``frame_nodes`` is given.
        frame_nodes: left-pad smaller trees into this frame (as the size curriculum trained them).

    Returns:
        One list of predicted node labels per sample.
    """
    if not samples:
        return []
    fn = _logits_fn(model)
    tok = TOKENIZER
    n = frame_nodes or samples[0].n_nodes
    P = prompt_length(n)
    L = sequence_length(n) - 1
    out: list[list[int]] = []
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start : start + batch_size])
        toks, _ = batch_tensors(chunk, frame_nodes=frame_nodes)
        toks = toks[:, :L].clone()
        toks[:, P:] = tok.pad_id
        goals = torch.tensor([tok.arrow_id(s.goal) for s in chunk])
        done = torch.zeros(len(chunk), dtype=torch.bool)
        preds = [[] for _ in chunk]  # type: list[list[int]]
        for step in range(max(c.n_nodes for c in chunk) - 1):
            # Causal model: nothing after the read position matters, so feed only the prefix.
            logits = fn(toks[:, : P + step])[:, -1]
            nxt = logits.argmax(-1)
            for b in range(len(chunk)):
                if done[b]:
                    continue
                node = tok.node_of(int(nxt[b]))
                if node is None or not tok.is_arrow(int(nxt[b])):
                    preds[b].append(-1)
                    done[b] = True
                    continue
                preds[b].append(node)
                if int(nxt[b]) == int(goals[b]) or len(preds[b]) >= chunk[b].n_nodes - 1:
                    done[b] = True
            if P + step < L:
                # Finished rows get the token too; they are never read again.
                toks[:, P + step] = nxt
            if bool(done.all()):
                break
        out.extend(preds)
    return out


def predict_path(model: Any, sample: TreeSample) -> list[int]:
    """Greedy path for one sample, root included (e.g. ``[12, 15, 4, 3]``).

    Raises:
        InputError: the tree is too large for the model's context.
    """
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if n_ctx is not None and sequence_length(sample.n_nodes) > int(n_ctx):
        raise InputError(
            f"a tree of {sample.n_nodes} nodes needs {sequence_length(sample.n_nodes)} tokens; this model's "
            f"context is {n_ctx} (at most {max_nodes_for_context(int(n_ctx))} nodes)."
        )
    return [sample.root] + greedy_paths(model, [sample])[0]


def max_nodes_for_context(n_ctx: int) -> int:
    """The largest tree whose prompt and longest path fit in ``n_ctx`` tokens."""
    return max(n for n in range(2, MAX_NODES + 1) if sequence_length(n) <= n_ctx or n == 2)


def trained_n_nodes(folder: Path | None = None) -> int:
    """Tree size the shipped checkpoint was trained on (DEFAULT_N_NODES when there is none)."""
    if not checkpoint_available(folder):
        return DEFAULT_N_NODES
    return int(read_checkpoint_config(folder).get("task", {}).get("n_nodes", DEFAULT_N_NODES))


@dataclass(frozen=True)
class TreeEvalResult:
    """Exact-path accuracy (greedy decoding) overall and by depth.

    Attributes:
        accuracy: share of samples whose whole path was right.
        depths: [n_depths] depths present, ascending.
        accuracy_by_depth: [n_depths].
        count_by_depth: [n_depths] samples per depth.
        correct: [n_samples] bool, per sample.
        seconds: wall time of decoding.
        predictions: per sample, the greedy path after the root (``-1`` = a non-node token).
    """

    accuracy: float
    depths: np.ndarray
    accuracy_by_depth: np.ndarray
    count_by_depth: np.ndarray
    correct: np.ndarray
    seconds: float
    predictions: tuple[tuple[int, ...], ...] = ()

    def depth_rows(self) -> list[dict[str, Any]]:
        """One row per depth: depth, accuracy, puzzles."""
        return [{"depth": int(d), "accuracy": float(a), "puzzles": int(c)}
                for d, a, c in zip(self.depths, self.accuracy_by_depth, self.count_by_depth)]

    def by_depth(self) -> dict[int, float]:
        return {int(d): float(a) for d, a in zip(self.depths, self.accuracy_by_depth)}

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": round(self.accuracy, 4),
            "n_samples": int(self.correct.size),
            "by_depth": {str(int(d)): {"accuracy": round(float(a), 4), "n": int(c)}
                         for d, a, c in zip(self.depths, self.accuracy_by_depth, self.count_by_depth)},
        }


def evaluate(
    model: Any, samples: Sequence[TreeSample], batch_size: int = 256, frame_nodes: int | None = None
) -> TreeEvalResult:
    """Exact-path accuracy of greedy decoding, overall and by path depth.

    Args:
        model: plain ``NativeModel``, ``TransformerBridge`` or ``LoadedModel``.
        samples: held-out samples.
        frame_nodes: see :func:`greedy_paths`.

    Returns:
        A :class:`TreeEvalResult`.
    """
    if not samples:
        raise InputError("no samples to evaluate; generate some with make_dataset(n, seed).")
    t0 = time.perf_counter()
    preds = greedy_paths(model, samples, batch_size=batch_size, frame_nodes=frame_nodes)
    correct = np.array([p == list(s.path[1:]) for p, s in zip(preds, samples)], dtype=bool)
    depth_arr = np.array([s.depth for s in samples])
    depths = np.unique(depth_arr)
    acc = np.array([correct[depth_arr == d].mean() for d in depths])
    cnt = np.array([(depth_arr == d).sum() for d in depths])
    return TreeEvalResult(float(correct.mean()), depths, acc, cnt, correct, time.perf_counter() - t0,
                          tuple(tuple(int(v) for v in p) for p in preds))


def sample_row(sample: TreeSample, predicted_path: Sequence[int], *, root_included: bool = True) -> dict[str, Any]:
    """One puzzle and the model's answer as a flat row (CSV/JSON downloads).

    Args:
        sample: the puzzle.
        predicted_path: the model's path, root included (as :func:`predict_path` returns) unless
            ``root_included`` is False (as :attr:`TreeEvalResult.predictions` holds it).

    Returns:
        ``n_nodes, root, goal, depth, edges ("p→c" in prompt order), prompt, true_path,
        predicted_path, correct`` (paths as space-separated nodes from the root; ``?`` = not a node).
    """
    pred = [int(v) for v in predicted_path]
    if not root_included:
        pred = [sample.root, *pred]
    return {
        "n_nodes": sample.n_nodes, "root": sample.root, "goal": sample.goal, "depth": sample.depth,
        "edges": " ".join(f"{p}→{c}" for p, c in sample.edges), "prompt": TOKENIZER.decode(sample.prompt_ids),
        "true_path": " ".join(map(str, sample.path)),
        "predicted_path": " ".join(str(v) if v >= 0 else "?" for v in pred),
        "correct": pred == list(sample.path),
    }
