"""The synthetic tree-search task: its generator, tokenizer and the edge-probe targets.

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
``probing_core/tree/checkpoints/tree_search`` (``model.safetensors`` + ``config.json`` +
``model_card.md``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from probing_core.errors import InputError


#: Folder of the shipped checkpoint.
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints" / "tree_search"
#: Largest tree the vocabulary can write (node labels 0…MAX_NODES-1).
MAX_NODES = 16
DEFAULT_N_NODES = 16

PAD, COMMA, COLON, BAR = "<pad>", ",", ":", "|"
ARROW = "→"




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


TOKENIZER = TreeTokenizer()


def prompt_length(n_nodes: int) -> int:
    """Tokens before the path: ``3(n-1)`` for the edges plus ``| goal : root``."""
    return 3 * (n_nodes - 1) + 4


def sequence_length(n_nodes: int) -> int:
    """Longest full sequence (prompt + a path through every node): ``4 n``."""
    return prompt_length(n_nodes) + n_nodes - 1


def check_n_nodes(n_nodes: int) -> None:
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
    check_n_nodes(n_nodes)
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
    check_n_nodes(n_nodes)
    nodes = {v for e in edges_t for v in e}
    if len(nodes) != n_nodes or {c for _, c in edges_t} != nodes - {root} or max(nodes) >= MAX_NODES:
        raise InputError(
            f"the edges do not form a tree rooted at {root} over {n_nodes} distinct nodes 0…{MAX_NODES - 1}; "
            "every node but the root needs exactly one parent."
        )
    path = bfs_path(edges_t, root, goal)
    tok = TOKENIZER
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
    tok = TOKENIZER
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
