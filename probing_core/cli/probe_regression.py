"""``probe regression``: ridge probes per hook on cached activations (building the entry if needed)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from probing_core.store.activations import build_cache, open_entry
from probing_core.cli._common import (
    add_dataset_args,
    add_json_arg,
    add_model_args,
    add_store_args,
    open_dataset,
    open_model,
    open_store,
    print_json,
    print_table,
    tqdm_progress,
)
from probing_core.cli.cache import resolve_hooks
from probing_core.errors import InputError
from probing_core.data.labels import LABELS, LabelSpec
from probing_core.analyses.regression import PositionRule, run_regression
from probing_core.solvers.ridge import DEFAULT_ALPHAS

DEFAULT_FAMILIES = ["embed", "resid_pre", "resid_mid", "resid_post"]


def coerce_value(text: str) -> Any:
    """"3" → 3, "1e3" → 1000.0, "true"/"false" → bool, anything else stays a string (never eval)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_label_params(items: list[str] | None) -> dict[str, Any]:
    """``["max_length=15", "token= the"]`` → ``{"max_length": 15, "token": " the"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--label-param {item!r} is not key=value (e.g. max_length=15).")
        out[key.strip()] = coerce_value(value)
    return out


def _run(args: argparse.Namespace) -> int:
    if args.label not in LABELS:
        raise InputError(f"unknown label {args.label!r}; choose one of: {', '.join(LABELS)}.")
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise InputError(f"--max-tokens must be positive, got {args.max_tokens}.")
    alphas = [args.alpha] if args.alpha is not None else (args.alphas or DEFAULT_ALPHAS)
    spec = LabelSpec.make(args.label, **parse_label_params(args.label_param))
    rule = PositionRule.parse(args.positions)
    store = open_store(args)
    model = open_model(args, quiet=args.json)
    dataset = open_dataset(args)
    hooks = resolve_hooks(model, args.hooks or DEFAULT_FAMILIES)
    update, close = tqdm_progress("cache")
    try:
        entry, built = build_cache(model, dataset, hooks, store=store, max_len=args.max_len,
                                   max_tokens=args.max_tokens, dtype=args.store_dtype, progress=update)
    finally:
        close()
    acts = open_entry(store, entry.key)
    run = run_regression(acts, hooks, spec, rule, alphas=alphas, cv=args.cv, test_fraction=args.test_fraction,
                         seed=args.seed, model_description=model.describe())
    r = run.result
    rows = run.table()
    if args.json:
        print_json({
            "label": spec.to_dict(), "description": run.description, "position_rule": str(rule),
            "cache_key": entry.key, "built": built, "n_samples": run.info.n_selected,
            "n_train": r.n_train, "n_test": r.n_test, "cv_folds": r.n_folds, "alphas": r.alphas,
            "hooks": rows, "manifest": run.manifest,
        })
        return 0
    print(f"{run.description}; {r.n_train} train / {r.n_test} test rows, {r.n_folds} CV folds, "
          f"{len(r.alphas)} α from {r.alphas.min():.3g} to {r.alphas.max():.3g}; entry {entry.key}"
          + (" (built now)" if built else ""), file=sys.stderr)
    print_table([{k: (round(v, 4) if isinstance(v, float) and np.isfinite(v) else v) for k, v in row.items()} for row in rows],
                ["hook", "best_alpha", "r2_train", "r2_test", "r2_cv_mean", "baseline_r2"])
    return 0


def register_probe(probe_sub: argparse._SubParsersAction) -> None:
    p = probe_sub.add_parser("regression", help="ridge regression probe of a token label on every hook",
                             description="Fit ridge probes (whole α path, CV, shuffled baseline) on each hook.")
    add_model_args(p)
    add_dataset_args(p)
    add_store_args(p)
    add_json_arg(p)
    p.add_argument("--label", required=True, help=f"one of: {', '.join(LABELS)}")
    p.add_argument("--label-param", action="append", metavar="KEY=VALUE",
                   help="label parameter, repeatable (e.g. max_length=15, token=' the', pattern='^[A-Z]')")
    p.add_argument("--hooks", nargs="*", default=None, help="hook names or families (default: embed resid_pre resid_mid resid_post)")
    p.add_argument("--positions", default="all", help="all (default; BOS excluded), last, or match:TOK,TOK")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--alpha", type=float, default=None, help="a single ridge strength")
    g.add_argument("--alphas", type=float, nargs="+", default=None, help="α grid (default: 20 values 1e-3…1e6)")
    p.add_argument("--cv", type=int, default=5, help="CV folds for choosing α (0 = none; default 5)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--max-tokens", type=int, default=20_000, help="tokens cached (default 20000)")
    p.add_argument("--max-len", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument("--store-dtype", default="float32", choices=["float32", "float16"])
    p.set_defaults(func=_run)
