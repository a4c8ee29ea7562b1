"""Training the tree-search model on CPU (curriculum over depth, loss on path tokens) and saving its checkpoint."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from probing_core.errors import InputError
from probing_core.tree.model import build_native_model, model_config
from probing_core.tree.task import (
    DEFAULT_N_NODES,
    MAX_NODES,
    TreeSample,
    TreeTokenizer,
    batch_tensors,
    check_n_nodes,
    generate_tree,
    prompt_length,
    sequence_length,
)


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


def _ramp(start: int, end: int, frac: float, over: float) -> int:
    """A curriculum value at training progress ``frac`` (0…1): ``start`` rising linearly to ``end``
    over the first ``over`` of training, then ``end``."""
    return round(start + (end - start) * min(1.0, frac / max(1e-9, over)))


def _max_depth_at(cfg: TreeTrainConfig, frac: float) -> int:
    """Curriculum: the deepest depth-controlled path at training progress ``frac`` (0…1)."""
    top = cfg.n_nodes - 1
    return _ramp(min(max(1, cfg.curriculum_start_depth), top), top, frac, cfg.curriculum_frac)


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
        n_cur = _ramp(min(max(2, cfg.min_nodes), cfg.n_nodes), cfg.n_nodes, frac, cfg.node_curriculum_frac)
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
    check_n_nodes(cfg.n_nodes)
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
