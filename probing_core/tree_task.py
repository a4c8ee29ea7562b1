"""The synthetic tree-search reasoning task, its small transformer and the shipped checkpoint.

A sample is a random binary tree on ``n_nodes`` nodes (labels ``0…n-1`` shuffled), written as
a shuffled edge list, then the goal and the root; the model continues with the path from the
root to the goal::

    12 →10 , 4 →15 , … , 8 →1 , | 3 : 12 →15 →4 →3
    └─ edges: src →dst , ─────────┘ │ │ │ └─ root  └─ target: path tokens (root excluded)
                                    │ │ └─ ':'
                                    │ └─ goal (always a leaf)
                                    └─ '|'

Every edge, the last one included, ends with ``,``, so all prompts on ``n`` nodes have the
same length ``3(n-1) + 4`` and an edge's tokens sit at fixed positions: edge ``e`` occupies
positions ``3e`` (source), ``3e+1`` (``→target``) and ``3e+2`` (``,``).

The model is a TransformerLens-native transformer (``TransformerBridge.boot_native``) trained
here, on CPU, with the loss on the path tokens only. The trained weights ship in
``probing_core/checkpoints/tree_search`` (``model.safetensors`` + ``config.json`` +
``model_card.md``).
"""
from __future__ import annotations

import json
import math
import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from probing_core.errors import InputError, ModelError

#: Folder of the shipped checkpoint.
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints" / "tree_search"
#: Largest tree the vocabulary can write (node labels 0…MAX_NODES-1).
MAX_NODES = 16
DEFAULT_N_NODES = 16

PAD, COMMA, COLON, BAR = "<pad>", ",", ":", "|"
ARROW = "→"


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class TreeTokenizer:
    """The task's own vocabulary: ``<pad> , : |``, nodes ``0…15`` and arrows ``→0…→15``.

    Implements the ``Tokenizer`` protocol of :mod:`probing_core.models`. There is no BOS token:
    the model was trained without one (``bos_id`` is None), so ``LoadedModel.encode`` never
    prepends anything.

    Ids: 0 ``<pad>``, 1 ``,``, 2 ``:``, 3 ``|``, ``4+k`` node ``k``, ``4+max_nodes+k`` ``→k``.
    """

    space_marker: str = ""
    bos_id: int | None = None

    def __init__(self, max_nodes: int = MAX_NODES) -> None:
        self.max_nodes = int(max_nodes)
        self.vocab: list[str] = [PAD, COMMA, COLON, BAR]
        self.vocab += [str(k) for k in range(self.max_nodes)]
        self.vocab += [f"{ARROW}{k}" for k in range(self.max_nodes)]
        self._index = {s: i for i, s in enumerate(self.vocab)}
        self.pad_id = 0
        self.comma_id = 1
        self.colon_id = 2
        self.bar_id = 3

    # ---- ids of nodes -------------------------------------------------------------------
    def node_id(self, node: int) -> int:
        """Id of the plain node token ``"k"``."""
        return 4 + int(node)

    def arrow_id(self, node: int) -> int:
        """Id of the arrow token ``"→k"``."""
        return 4 + self.max_nodes + int(node)

    def node_of(self, token_id: int) -> int | None:
        """Node label of a node or arrow token, None for punctuation and padding."""
        i = int(token_id)
        if 4 <= i < 4 + self.max_nodes:
            return i - 4
        if 4 + self.max_nodes <= i < 4 + 2 * self.max_nodes:
            return i - 4 - self.max_nodes
        return None

    def is_arrow(self, token_id: int) -> bool:
        return 4 + self.max_nodes <= int(token_id) < 4 + 2 * self.max_nodes

    # ---- protocol -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Parse whitespace-separated tokens (``12 →10 , … | 3 : 12 →15``).

        ``->k`` and ``>k`` are accepted for ``→k``.

        Raises:
            InputError: a token outside the vocabulary, naming it and the valid forms.
        """
        ids: list[int] = []
        for raw in text.split():
            tok = raw
            if tok.startswith("->"):
                tok = ARROW + tok[2:]
            elif tok.startswith(">"):
                tok = ARROW + tok[1:]
            if tok not in self._index:
                raise InputError(
                    f"{raw!r} is not a tree-task token. Write nodes as 0…{self.max_nodes - 1}, "
                    f"edges as 'src →dst ,' and the query as '| goal : root', separated by spaces."
                )
            ids.append(self._index[tok])
        return ids

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self._str(i) for i in ids]

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._str(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a sequence (padding dropped), parseable back by :meth:`encode`."""
        return " ".join(self._str(i) for i in ids if int(i) != self.pad_id)

    def vocab_size(self) -> int:
        return len(self.vocab)

    def _str(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self.vocab):
            raise InputError(f"token id {i} is outside the tree vocabulary (0…{len(self.vocab) - 1}).")
        return self.vocab[i]


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeSample:
    """One task instance.

    Attributes:
        edges: (parent, child) pairs in prompt order (shuffled).
        root: root node label.
        goal: goal node label (a leaf).
        path: nodes from root to goal, both included.
        depth: ``len(path) - 1`` (number of path tokens the model must write).
        prompt_ids: ``[3(n-1) + 4]`` token ids up to and including the root.
        target_ids: ``[depth]`` arrow-token ids of ``path[1:]``.
        text: the whole sample as text (prompt and target).
    """

    edges: tuple[tuple[int, int], ...]
    root: int
    goal: int
    path: tuple[int, ...]
    depth: int
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    text: str

    @property
    def n_nodes(self) -> int:
        return len(self.edges) + 1

    def parents(self) -> dict[int, int]:
        """child → parent."""
        return {c: p for p, c in self.edges}

    def children(self) -> dict[int, list[int]]:
        """parent → children, in prompt order."""
        out: dict[int, list[int]] = {}
        for p, c in self.edges:
            out.setdefault(p, []).append(c)
        return out


_TOKENIZER = TreeTokenizer()


def prompt_length(n_nodes: int) -> int:
    """Tokens before the path: ``3(n-1)`` for the edges plus ``| goal : root``."""
    return 3 * (n_nodes - 1) + 4


def sequence_length(n_nodes: int) -> int:
    """Longest full sequence (prompt + a path through every node): ``4 n``."""
    return prompt_length(n_nodes) + n_nodes - 1


def _check_n_nodes(n_nodes: int) -> None:
    if not 2 <= n_nodes <= MAX_NODES:
        raise InputError(f"n_nodes={n_nodes} is out of range; the vocabulary writes trees of 2…{MAX_NODES} nodes.")


def bfs_path(edges: Iterable[tuple[int, int]], root: int, goal: int) -> list[int]:
    """Path root → goal found by breadth-first search over directed edges.

    Raises:
        InputError: if the goal cannot be reached from the root.
    """
    children: dict[int, list[int]] = {}
    for p, c in edges:
        children.setdefault(p, []).append(c)
    prev: dict[int, int | None] = {root: None}
    queue = deque([root])
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for c in children.get(node, []):
            if c not in prev:
                prev[c] = node
                queue.append(c)
    if goal not in prev:
        raise InputError(f"goal {goal} cannot be reached from root {root} in this edge list.")
    path = [goal]
    while prev[path[-1]] is not None:
        path.append(prev[path[-1]])  # type: ignore[arg-type]
    return path[::-1]


def generate_tree(
    rng: np.random.Generator, n_nodes: int = DEFAULT_N_NODES, depth: int | None = None, label_pool: int | None = None
) -> TreeSample:
    """Draw one random binary tree, a leaf goal and its path.

    Without ``depth`` the tree grows by attaching each node to a uniformly chosen node that has
    fewer than two children, and the goal is a uniformly chosen leaf. With ``depth`` a chain
    root → … → goal of exactly that length is laid first and the remaining nodes attach
    anywhere except under the goal, so the goal stays a leaf at that depth.

    Args:
        rng: numpy random generator (the only source of randomness).
        n_nodes: 2…16.
        depth: path length 1…n_nodes-1, or None.
        label_pool: draw the node labels from ``0…label_pool-1`` (default: exactly ``0…n_nodes-1``).

    Returns:
        A :class:`TreeSample`.

    Raises:
        InputError: n_nodes or depth out of range.
    """
    _check_n_nodes(n_nodes)
    if depth is not None and not 1 <= depth <= n_nodes - 1:
        raise InputError(f"depth={depth} is impossible with {n_nodes} nodes; choose 1…{n_nodes - 1}.")
    if label_pool is None or label_pool == n_nodes:
        labels = [int(x) for x in rng.permutation(n_nodes)]
    else:
        if not n_nodes <= label_pool <= MAX_NODES:
            raise InputError(f"label_pool={label_pool} must be between n_nodes={n_nodes} and {MAX_NODES}.")
        labels = [int(x) for x in rng.choice(label_pool, size=n_nodes, replace=False)]
    root = labels[0]
    n_children = {root: 0}
    edges: list[tuple[int, int]] = []
    if depth is None:
        for node in labels[1:]:
            free = [v for v in n_children if n_children[v] < 2]
            parent = free[int(rng.integers(len(free)))]
            edges.append((parent, node))
            n_children[parent] += 1
            n_children[node] = 0
        leaves = [v for v in n_children if n_children[v] == 0]
        goal = leaves[int(rng.integers(len(leaves)))]
    else:
        for a, b in zip(labels[:depth], labels[1 : depth + 1]):
            edges.append((a, b))
            n_children[a] += 1
            n_children[b] = 0
        goal = labels[depth]
        for node in labels[depth + 1 :]:
            free = [v for v in n_children if n_children[v] < 2 and v != goal]
            parent = free[int(rng.integers(len(free)))]
            edges.append((parent, node))
            n_children[parent] += 1
            n_children[node] = 0
    order = rng.permutation(len(edges))
    shuffled = tuple(edges[int(i)] for i in order)
    return make_sample(shuffled, root, goal)


def make_sample(edges: Sequence[tuple[int, int]], root: int, goal: int) -> TreeSample:
    """Build a :class:`TreeSample` from an explicit edge list (in prompt order).

    Raises:
        InputError: not a tree on 2…16 nodes, or the goal unreachable.
    """
    edges_t = tuple((int(p), int(c)) for p, c in edges)
    n_nodes = len(edges_t) + 1
    _check_n_nodes(n_nodes)
    nodes = {v for e in edges_t for v in e}
    if len(nodes) != n_nodes or {c for _, c in edges_t} != nodes - {root} or max(nodes) >= MAX_NODES:
        raise InputError(
            f"the edges do not form a tree rooted at {root} over {n_nodes} distinct nodes 0…{MAX_NODES - 1}; "
            "every node but the root needs exactly one parent."
        )
    path = bfs_path(edges_t, root, goal)
    tok = _TOKENIZER
    prompt: list[int] = []
    for p, c in edges_t:
        prompt += [tok.node_id(p), tok.arrow_id(c), tok.comma_id]
    prompt += [tok.bar_id, tok.node_id(goal), tok.colon_id, tok.node_id(root)]
    target = [tok.arrow_id(v) for v in path[1:]]
    return TreeSample(
        edges=edges_t,
        root=int(root),
        goal=int(goal),
        path=tuple(path),
        depth=len(path) - 1,
        prompt_ids=tuple(prompt),
        target_ids=tuple(target),
        text=tok.decode(prompt + target),
    )


def parse_sample(text: str) -> TreeSample:
    """Inverse of ``sample.text``: parse ``a →b , … | goal : root [→x …]`` (the path is recomputed).

    Raises:
        InputError: malformed text.
    """
    tok = _TOKENIZER
    ids = tok.encode(text)
    try:
        bar = ids.index(tok.bar_id)
    except ValueError:
        raise InputError("no '|' in the text; write the edges, then '| goal : root'.") from None
    body, query = ids[:bar], ids[bar + 1 :]
    if len(body) % 3 != 0:
        raise InputError("the edge list must be groups of three tokens 'src →dst ,'.")
    edges = []
    for i in range(0, len(body), 3):
        s, d, c = body[i : i + 3]
        ps, pd = tok.node_of(s), tok.node_of(d)
        if ps is None or pd is None or tok.is_arrow(s) or not tok.is_arrow(d) or c != tok.comma_id:
            raise InputError(f"edge #{i // 3} is not 'src →dst ,': {tok.decode([s, d, c])!r}.")
        edges.append((ps, pd))
    if len(query) < 3 or query[1] != tok.colon_id:
        raise InputError("after '|' write 'goal : root'.")
    goal, root = tok.node_of(query[0]), tok.node_of(query[2])
    if goal is None or root is None:
        raise InputError("goal and root must be node tokens 0…15.")
    return make_sample(edges, root, goal)


def make_dataset(
    n_samples: int,
    seed: int,
    n_nodes: int = DEFAULT_N_NODES,
    depths: Sequence[int] | None = None,
    natural_fraction: float = 1.0,
) -> list[TreeSample]:
    """A seeded list of samples.

    Args:
        n_samples: how many.
        seed: numpy seed; the same arguments always give the same samples.
        n_nodes: tree size.
        depths: if given, the depths a depth-controlled sample draws from (uniformly).
        natural_fraction: share of unconstrained trees (random leaf goal); the rest use
            ``depths`` (ignored when ``depths`` is None).

    Returns:
        ``n_samples`` :class:`TreeSample` objects.
    """
    if n_samples < 0:
        raise InputError("n_samples must be ≥ 0.")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_samples):
        if depths is None or rng.random() < natural_fraction:
            out.append(generate_tree(rng, n_nodes))
        else:
            out.append(generate_tree(rng, n_nodes, int(depths[int(rng.integers(len(depths)))])))
    return out


def batch_tensors(
    samples: Sequence[TreeSample], seq_len: int | None = None, frame_nodes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad samples to one fixed length for teacher-forced training.

    Args:
        samples: all with the same ``n_nodes``, unless ``frame_nodes`` is given.
        seq_len: total length (default ``4 n``).
        frame_nodes: lay every sample out in the frame of an ``frame_nodes``-node tree; smaller
            trees are left-padded with ``<pad>`` (the training curriculum uses this).

    Returns:
        tokens [batch, seq_len] int64 (prompt, path, padding),
        loss_mask [batch, seq_len - 1] bool, True where the *next* token is a path token
        (i.e. at positions ``P-1 … P+depth-2``, ``P`` the prompt length).
    """
    if not samples:
        raise InputError("no samples to batch.")
    n = frame_nodes or samples[0].n_nodes
    if frame_nodes is None and any(s.n_nodes != n for s in samples):
        raise InputError("all samples in a batch need the same number of nodes (or pass frame_nodes).")
    if any(s.n_nodes > n for s in samples):
        raise InputError(f"a sample has more than frame_nodes={n} nodes.")
    L = seq_len or sequence_length(n)
    P = prompt_length(n)
    toks = np.zeros((len(samples), L), dtype=np.int64)
    mask = np.zeros((len(samples), L - 1), dtype=bool)
    for b, s in enumerate(samples):
        # Smaller trees are left-padded so that '| goal : root' and the path keep their positions.
        shift = P - len(s.prompt_ids)
        ids = s.prompt_ids + s.target_ids
        toks[b, shift : shift + len(ids)] = ids
        mask[b, P - 1 : P - 1 + s.depth] = True
    return torch.from_numpy(toks), torch.from_numpy(mask)


# --------------------------------------------------------------------------------------------
# The model: config, build, load
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Inference and evaluation
# --------------------------------------------------------------------------------------------


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
    tok = _TOKENIZER
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
    """

    accuracy: float
    depths: np.ndarray
    accuracy_by_depth: np.ndarray
    count_by_depth: np.ndarray
    correct: np.ndarray
    seconds: float

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
    return TreeEvalResult(float(correct.mean()), depths, acc, cnt, correct, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# Edge probes (the layer-probe preset)
# --------------------------------------------------------------------------------------------

#: Token offset inside an edge → name. Offset 3 is the next edge's first token.
EDGE_OFFSETS: dict[int, str] = {1: "second", 2: "third", 3: "fourth"}


@dataclass(frozen=True)
class EdgeProbeTargets:
    """Long-format targets for multiclass probes of each edge's source and target node.

    One row per (sample, edge, token offset, label). Rows for the ``fourth`` offset exist only
    for edges followed by another edge (the last edge's fourth token is ``|``), as in the
    reference notebook, which probed the first n-2 edges there.

    Attributes:
        seq_index: [rows] index of the sample.
        position: [rows] token position read.
        edge_index: [rows] edge number in the prompt.
        offset: [rows] ``"second"`` (``→dst``), ``"third"`` (``,``), ``"fourth"`` (next edge's source).
        label_name: [rows] ``"source"`` or ``"target"``.
        label: [rows] the node (class 0…n-1).
        n_classes: number of node classes.
    """

    seq_index: np.ndarray
    position: np.ndarray
    edge_index: np.ndarray
    offset: np.ndarray
    label_name: np.ndarray
    label: np.ndarray
    n_classes: int

    def select(self, offset: str, label_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of one probe task.

        Returns:
            (seq_index [m], position [m], label [m]).
        """
        if offset not in EDGE_OFFSETS.values() or label_name not in ("source", "target"):
            raise InputError(f"offset must be one of {list(EDGE_OFFSETS.values())} and label_name 'source' or 'target'.")
        m = (self.offset == offset) & (self.label_name == label_name)
        return self.seq_index[m], self.position[m], self.label[m]

    def tasks(self) -> list[tuple[str, str]]:
        """All (offset, label_name) pairs, in reading order."""
        return [(o, n) for o in EDGE_OFFSETS.values() for n in ("source", "target")]


def edge_probe_targets(samples: Sequence[TreeSample], offsets: Sequence[int] = (1, 2, 3)) -> EdgeProbeTargets:
    """Source/target node of every edge at the edge's 2nd, 3rd and 4th token positions.

    Edge ``e`` starts at position ``3e``; offset 1 reads ``→dst`` (``3e+1``), 2 reads ``,``
    (``3e+2``), 3 reads the next edge's source (``3e+3``).

    Args:
        samples: tree samples (any sizes).
        offsets: which of 1, 2, 3 to include.

    Returns:
        :class:`EdgeProbeTargets` (class count = ``MAX_NODES``).
    """
    bad = [o for o in offsets if o not in EDGE_OFFSETS]
    if bad:
        raise InputError(f"offsets {bad} are not edge token offsets; use 1 (→dst), 2 (,) or 3 (next edge).")
    seq, pos, edge, off, name, lab = [], [], [], [], [], []
    for i, s in enumerate(samples):
        n_e = len(s.edges)
        for e, (src, dst) in enumerate(s.edges):
            for o in offsets:
                if o == 3 and e == n_e - 1:
                    continue
                for label_name, value in (("source", src), ("target", dst)):
                    seq.append(i)
                    pos.append(3 * e + o)
                    edge.append(e)
                    off.append(EDGE_OFFSETS[o])
                    name.append(label_name)
                    lab.append(value)
    return EdgeProbeTargets(
        seq_index=np.asarray(seq, dtype=np.int64),
        position=np.asarray(pos, dtype=np.int64),
        edge_index=np.asarray(edge, dtype=np.int64),
        offset=np.asarray(off, dtype=object).astype(str),
        label_name=np.asarray(name, dtype=object).astype(str),
        label=np.asarray(lab, dtype=np.int64),
        n_classes=MAX_NODES,
    )


def prompt_tensor(samples: Sequence[TreeSample]) -> torch.Tensor:
    """Prompts (up to the root) as one [batch, 3(n-1)+4] int64 tensor — what probes run on."""
    if not samples:
        raise InputError("no samples.")
    n = samples[0].n_nodes
    if any(s.n_nodes != n for s in samples):
        raise InputError("all samples need the same number of nodes.")
    return torch.tensor([list(s.prompt_ids) for s in samples], dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeTrainConfig:
    """Everything that determines a training run (same config → same weights).

    ``natural_fraction`` of each batch are unconstrained random trees; the rest have a path
    depth drawn uniformly from 1…``max_depth(step)``, where the curriculum raises the maximum
    linearly from ``curriculum_start_depth`` to n-1 over the first ``curriculum_frac`` of steps.
    With ``min_nodes`` > 0 there is also a tree-size curriculum: the current size grows from
    ``min_nodes`` to ``n_nodes`` over the first ``node_curriculum_frac`` of training; half the trees
    have the current size, half a uniform size in ``min_nodes``…current (left-padded into the
    ``n_nodes`` frame); after ``final_full_frac`` every tree has ``n_nodes`` nodes.
    """

    n_nodes: int = DEFAULT_N_NODES
    n_layers: int = 6
    d_model: int = 128
    n_heads: int = 1
    d_mlp: int = 512
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_frac: float = 0.1
    natural_fraction: float = 0.5
    curriculum_start_depth: int = 3
    curriculum_frac: float = 0.5
    min_nodes: int = 0
    node_curriculum_frac: float = 0.4
    final_full_frac: float = 0.7
    grad_clip: float = 1.0
    seed: int = 0

    def bridge_config(self) -> dict[str, Any]:
        return model_config(self.n_nodes, self.n_layers, self.d_model, self.n_heads, self.d_mlp, self.seed)


@dataclass
class TreeTrainResult:
    """What a training run produced.

    Attributes:
        model: the trained plain ``NativeModel`` (eval mode).
        config: the run's config.
        losses: [steps_done] training loss per step.
        steps_done: steps actually run (fewer when a time limit stopped it).
        seconds: wall time of training.
    """

    model: torch.nn.Module
    config: TreeTrainConfig
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    seconds: float = 0.0


def _max_depth_at(cfg: TreeTrainConfig, frac: float) -> int:
    """Curriculum: the deepest depth-controlled path at training progress ``frac`` (0…1)."""
    top = cfg.n_nodes - 1
    start = min(max(1, cfg.curriculum_start_depth), top)
    return int(round(start + (top - start) * min(1.0, frac / max(1e-9, cfg.curriculum_frac))))


def _lr_at(cfg: TreeTrainConfig, step: int, frac: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine to ``min_lr_frac`` as ``frac`` goes 0…1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    w = cfg.warmup_steps / max(1, cfg.steps)
    t = (frac - w) / max(1e-9, 1 - w)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, t)))))


def train_batch(cfg: TreeTrainConfig, rng: np.random.Generator, frac: float) -> list[TreeSample]:
    """The samples of one training step at progress ``frac`` (curriculum and natural/depth-controlled mixture)."""
    top = _max_depth_at(cfg, frac)
    n_cur = cfg.n_nodes
    if cfg.min_nodes > 0:
        lo = min(max(2, cfg.min_nodes), cfg.n_nodes)
        n_cur = int(round(lo + (cfg.n_nodes - lo) * min(1.0, frac / max(1e-9, cfg.node_curriculum_frac))))
    out = []
    for _ in range(cfg.batch_size):
        n = n_cur
        if cfg.min_nodes > 0 and frac < cfg.final_full_frac and rng.random() < 0.5:
            n = int(rng.integers(min(max(2, cfg.min_nodes), n_cur), n_cur + 1))
        if rng.random() < cfg.natural_fraction:
            out.append(generate_tree(rng, n, label_pool=cfg.n_nodes))
        else:
            out.append(generate_tree(rng, n, int(rng.integers(1, min(top, n - 1) + 1)), label_pool=cfg.n_nodes))
    return out


def path_loss(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on path tokens only, and the per-token accuracy.

    Args:
        tokens: [batch, seq] ids; mask: [batch, seq-1] True where the next token is a path token.

    Returns:
        (loss scalar with grad, token accuracy scalar).
    """
    logits = model(tokens[:, :-1])
    pred = logits[mask]
    tgt = tokens[:, 1:][mask]
    loss = F.cross_entropy(pred.float(), tgt)
    acc = (pred.argmax(-1) == tgt).float().mean()
    return loss, acc.detach()


def train_tree_model(
    cfg: TreeTrainConfig,
    *,
    progress: bool = True,
    max_seconds: float | None = None,
    on_checkpoint: Callable[[torch.nn.Module, int, list[float]], None] | None = None,
    checkpoint_every: int = 0,
    init_state: dict[str, torch.Tensor] | None = None,
) -> TreeTrainResult:
    """Train a tree-search model on freshly generated batches (AdamW, warmup + cosine).

    Deterministic for a given ``cfg`` on a given machine and thread count: the weights come
    from ``cfg.seed`` and the data from ``numpy.random.default_rng(cfg.seed + 1)``.

    Args:
        cfg: the run's config.
        progress: draw a tqdm bar on stderr.
        max_seconds: stop early (keeping the weights) after this much wall time.
        on_checkpoint: called as ``f(model, step, losses)`` every ``checkpoint_every`` steps.
        init_state: plain state dict to start from (fine-tuning a previous run).

    Returns:
        A :class:`TreeTrainResult`.
    """
    _check_n_nodes(cfg.n_nodes)
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise InputError("steps and batch_size must be ≥ 1.")
    model = build_native_model(cfg.bridge_config())
    if init_state is not None:
        model.load_state_dict(init_state, strict=True)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    rng = np.random.default_rng(cfg.seed + 1)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="train-tree", file=sys.stderr, mininterval=2.0)
    step = 0
    try:
        for step in range(cfg.steps):
            # Progress drives the LR schedule and the curriculum. With a time budget it is the
            # larger of step and time fractions, so the schedule still anneals before the
            # deadline (such a run is then no longer bit-reproducible).
            frac = step / cfg.steps
            if max_seconds:
                frac = max(frac, (time.perf_counter() - t0) / max_seconds)
            if frac >= 1.0:
                break
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step, frac)
            toks, mask = batch_tensors(train_batch(cfg, rng, frac), frame_nodes=cfg.n_nodes)
            loss, acc = path_loss(model, toks, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}", tok_acc=f"{float(acc):.3f}",
                                    max_depth=_max_depth_at(cfg, frac), lr=f"{_lr_at(cfg, step, frac):.1e}")
            if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
                model.train(False)
                on_checkpoint(model, step + 1, losses)
                model.train()
    finally:
        if bar is not None:
            bar.close()
    model.train(False)
    return TreeTrainResult(model=model, config=cfg, losses=losses, steps_done=len(losses), seconds=time.perf_counter() - t0)


def save_checkpoint(
    model: torch.nn.Module,
    cfg: TreeTrainConfig,
    out: Path,
    *,
    training: dict[str, Any] | None = None,
    eval_results: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out`` (temp name, then rename).

    Returns:
        The folder.
    """
    import os

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "kind": "tree-search-native"})
    os.replace(tmp, out / "model.safetensors")
    conf = {
        "bridge_config": cfg.bridge_config(),
        "task": {
            "n_nodes": cfg.n_nodes,
            "max_nodes": MAX_NODES,
            "prompt_length": prompt_length(cfg.n_nodes),
            "sequence_length": sequence_length(cfg.n_nodes),
            "vocab": TreeTokenizer().vocab,
            "bos": None,
            "format": "src →dst , (every edge, shuffled) | goal : root →n1 … →goal",
        },
        "training": {"config": asdict(cfg), **(training or {})},
        "eval": eval_results or {},
    }
    tmpc = out / ".config.json.tmp"
    tmpc.write_text(json.dumps(conf, indent=1, ensure_ascii=False))
    os.replace(tmpc, out / "config.json")
    return out
