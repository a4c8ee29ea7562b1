"""``python -m probing_core train-tree`` — train the tree-search model on CPU and write a checkpoint.

Example (what made the shipped checkpoint is recorded in its model_card.md)::

    python -m probing_core train-tree --steps 3000 --seed 0 --out probing_core/tree/checkpoints/tree_search
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from probing_core.cli._common import (
    device_arg,
    existing_folder_arg,
    folder_arg,
    int_range,
    nonneg_int,
    positive_float,
    positive_int,
    seed_int,
    unit_interval,
)
from probing_core.errors import InputError


def register(subparsers: Any) -> None:
    """Add the ``train-tree`` command."""
    p = subparsers.add_parser(
        "train-tree",
        help="train the tree-search path-finding transformer and save a checkpoint",
        description="Train the tree-search model (loss on path tokens only) and write "
        "model.safetensors + config.json + model_card.md into --out.",
    )
    p.add_argument("--steps", type=positive_int, default=3000, help="optimizer steps (default 3000)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of weights and data (default 0)")
    p.add_argument("--n-nodes", type=int_range(2, 16), default=16, help="tree size, 2…16 (default 16)")
    p.add_argument("--out", default="probing_core/tree/checkpoints/tree_search", type=folder_arg, help="output folder")
    p.add_argument("--device", default="cpu", type=device_arg, help="torch device (default cpu)")
    p.add_argument("--eval-samples", type=int_range(0, 10_000_000), default=1000, help="held-out trees for the final evaluation (0 = skip)")
    p.add_argument("--eval-seed", type=int_range(0, 2**32 - 2), default=10_000, help="seed of the held-out trees")
    p.add_argument("--batch-size", type=int_range(1, 1_000_000), default=64)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--n-layers", type=int_range(1, 1000), default=6)
    p.add_argument("--d-model", type=int_range(1, 65536), default=128)
    p.add_argument("--n-heads", type=int_range(1, 1024), default=1)
    p.add_argument("--d-mlp", type=int_range(1, 1_000_000), default=512)
    p.add_argument("--warmup-steps", type=nonneg_int, default=100)
    p.add_argument("--natural-fraction", type=unit_interval, default=0.5, help="share of unconstrained trees per batch")
    p.add_argument("--curriculum-start-depth", type=int_range(1, 16), default=3)
    p.add_argument("--min-nodes", type=int_range(0, 16), default=0, help="tree-size curriculum start (0 = off; smaller trees are left-padded)")
    p.add_argument("--threads", type=int_range(1, 4096), default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--max-minutes", type=positive_float, default=None, help="stop early after this wall time, keeping the weights")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=500, help="save to --out every N steps (0 = only at the end)")
    p.add_argument("--init-from", default=None, type=existing_folder_arg, help="checkpoint folder to continue from (same architecture)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=run_train_tree)


def run_train_tree(args: argparse.Namespace) -> int:
    """Handler: train, evaluate by depth, save. Returns the exit status."""
    from probing_core.tree import model as tree_model
    from probing_core.tree import task as tree_task
    from probing_core.tree import train as tree_train

    if args.d_model % args.n_heads:
        raise InputError(f"--d-model {args.d_model} must be a multiple of --n-heads {args.n_heads}.")
    if args.min_nodes and args.min_nodes > args.n_nodes:
        raise InputError(f"--min-nodes {args.min_nodes} is above --n-nodes {args.n_nodes}.")
    if args.device != "cpu" and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device} asked for but no CUDA GPU is visible; use --device cpu.")
    torch.set_num_threads(args.threads)
    cfg = tree_train.TreeTrainConfig(
        n_nodes=args.n_nodes, n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
        d_mlp=args.d_mlp, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, natural_fraction=args.natural_fraction,
        curriculum_start_depth=args.curriculum_start_depth, min_nodes=args.min_nodes, seed=args.seed,
    )
    out = Path(args.out)
    init_state = None
    if args.init_from:
        init_state = tree_model.load_native_model(Path(args.init_from)).state_dict()
    t_start = time.perf_counter()

    def snapshot(model: torch.nn.Module, step: int, losses: list[float]) -> None:
        tail = losses[-50:]
        tree_train.save_checkpoint(model, cfg, out, training={
            "steps_done": step, "seconds": round(time.perf_counter() - t_start, 1),
            "final_loss": sum(tail) / len(tail), "partial": True,
        })
        print(f"\n[train-tree] step {step}: saved to {out} (loss {sum(tail) / len(tail):.4f})", file=sys.stderr)

    res = tree_train.train_tree_model(
        cfg, progress=not args.no_progress,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        on_checkpoint=snapshot, checkpoint_every=args.checkpoint_every, init_state=init_state,
    )
    tail = res.losses[-50:]
    training = {
        "steps_done": res.steps_done,
        "seconds": round(res.seconds, 1),
        "final_loss": round(sum(tail) / len(tail), 5),
        "threads": args.threads,
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "init_from": args.init_from,
        "partial": False,
    }
    evals: dict[str, Any] = {}
    if args.eval_samples > 0:
        natural = tree_task.make_dataset(args.eval_samples, args.eval_seed, n_nodes=args.n_nodes)
        uniform = tree_task.make_dataset(args.eval_samples, args.eval_seed + 1, n_nodes=args.n_nodes,
                                  depths=list(range(1, args.n_nodes)), natural_fraction=0.0)
        evals["natural"] = tree_model.evaluate(res.model, natural).to_json()
        evals["uniform_depth"] = tree_model.evaluate(res.model, uniform).to_json()
        evals["eval_seed"] = args.eval_seed
    tree_train.save_checkpoint(res.model, cfg, out, training=training, eval_results=evals)
    print(json.dumps({"out": str(out), "training": training, "eval": evals}, indent=1))
    return 0
