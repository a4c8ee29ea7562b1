"""``probe regression``: ridge probes per hook on cached activations (building the entry if needed)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from probing_core.analyses.regression import SPLITS, PositionRule, run_regression
from probing_core.cli import _common as common
from probing_core.cli.cache import resolve_hooks
from probing_core.data.labels import LABELS, LabelSpec
from probing_core.errors import InputError
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


def parse_label_params(items: list[str] | None, label: str | None = None) -> dict[str, Any]:
    """``["max_length=15", "token= the"]`` → ``{"max_length": 15, "token": " the"}``.

    Raises:
        InputError: an item is not key=value, or (given ``label``) names a parameter that label does not take.
    """
    out: dict[str, Any] = {}
    known = dict(LABELS[label].params) if label in LABELS else None
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--label-param {item!r} is not key=value (e.g. max_length=15).")
        if known is not None and key.strip() not in known:
            takes = ", ".join(known) or "no parameters"
            raise InputError(f"--label-param {key.strip()!r}: label {label!r} takes {takes}.")
        out[key.strip()] = coerce_value(value)
    return out


def _run(args: argparse.Namespace) -> int:
    if args.label not in LABELS:
        raise InputError(f"unknown label {args.label!r}; choose one of: {', '.join(LABELS)}.")
    if args.cv == 1:
        raise InputError("--cv 1 is not cross-validation; give 0 (none) or 2 or more folds.")
    alphas = [args.alpha] if args.alpha is not None else (args.alphas or DEFAULT_ALPHAS)
    spec = LabelSpec.make(args.label, **parse_label_params(args.label_param, args.label))
    rule = PositionRule.parse(args.positions)
    store = common.open_store(args)
    model = common.open_model(args, quiet=args.json)
    dataset = common.open_dataset(args)
    hooks = resolve_hooks(model, args.hooks or DEFAULT_FAMILIES)
    acts, built = common.cached_entry(args, model, dataset, hooks, store)
    run = run_regression(acts, hooks, spec, rule, alphas=alphas, cv=args.cv, test_fraction=args.test_fraction,
                         seed=args.seed, split_by=args.split, model_description=model.describe())
    r = run.result
    rows = run.table()
    if args.json:
        common.print_json({
            "label": spec.to_dict(), "description": run.description, "position_rule": str(rule),
            "cache_key": acts.key, "built": built, "n_samples": run.info.n_selected,
            "n_train": r.n_train, "n_test": r.n_test, "cv_folds": r.n_folds, "alphas": r.alphas,
            "split": run.split_by, "held_out": SPLITS[run.split_by], "test_curve": run.test_name,
            "hooks": rows, "manifest": run.manifest,
        })
        return 0
    print(f"{run.description}; {r.n_train} train / {r.n_test} test rows, {r.n_folds} CV folds, "
          f"{len(r.alphas)} α from {r.alphas.min():.3g} to {r.alphas.max():.3g}; entry {acts.key}"
          + (" (built now)" if built else ""), file=sys.stderr)
    ho = run.held_out
    print(f"held out: {SPLITS[run.split_by]} (--split {run.split_by}); α chosen on "
          + ("CV folds of the training rows" if r.n_folds else "the test split (no CV: optimistic)")
          + (f"; test rows of seen types {ho.n_seen:,}, of new types {ho.n_new:,}" if ho is not None else ""),
          file=sys.stderr)
    cols = ["hook", "best_alpha", "r2_train", "r2_cv_mean", "r2_test", "r2_test_ci_low", "r2_test_ci_high", "n_test",
            "r2_seen_types", "r2_new_types", "baseline_r2"]
    common.print_table([{k: (round(v, 4) if isinstance(v, float) and np.isfinite(v) else v) for k, v in row.items()} for row in rows],
                [c for c in cols if c in rows[0]])
    return 0


def register_probe(probe_sub: argparse._SubParsersAction) -> None:
    p = probe_sub.add_parser("regression", help="ridge regression probe of a token label on every hook",
                             description="Fit ridge probes (whole α path, CV, shuffled baseline) on each hook.")
    common.add_common_args(p)
    p.add_argument("--label", required=True, type=common.nonempty, help=f"one of: {', '.join(LABELS)}")
    p.add_argument("--label-param", action="append", type=common.nonempty, metavar="KEY=VALUE",
                   help="label parameter, repeatable (e.g. max_length=15, token=' the', pattern='^[A-Z]')")
    p.add_argument("--hooks", nargs="*", default=None, type=common.nonempty, help="hook names or families (default: embed resid_pre resid_mid resid_post)")
    p.add_argument("--positions", default="all", help="all (default; BOS excluded), last, or match:TOK,TOK")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--alpha", type=common.positive_float, default=None, help="a single ridge strength")
    g.add_argument("--alphas", type=common.positive_float, nargs="+", default=None, help="α grid (default: 20 values 1e-3…1e6)")
    p.add_argument("--cv", type=common.int_range(0, 1000), default=5, help="CV folds for choosing α (0 = none; default 5)")
    p.add_argument("--test-fraction", type=common.fraction_open, default=0.2, help="held-out share (default 0.2)")
    p.add_argument("--seed", type=common.seed_int, default=0, help="split seed")
    p.add_argument("--split", choices=["auto", "type", "tokens"], default="auto",
                   help="what the test set holds: type = token types never seen in training (CV folds too), tokens = "
                        "random tokens (mostly seen types), auto (default) = type for labels the token's identity decides")
    common.add_entry_size_args(p)
    p.set_defaults(func=_run)
