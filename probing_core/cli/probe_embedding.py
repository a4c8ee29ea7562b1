"""``probe embedding`` and ``probe transfer``: the Regression page's embedding regression on ``W_E``
and its probe transfer, headless, with the same core calls and the same defaults as the page.

``probe embedding`` reads the embedding matrix only: no forward pass and no cache entry (the seed's
first experiment; ``probe regression --dataset vocab --hooks embed`` is the slow way to the same rows).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from probing_core.analyses.regression import (
    EMBEDDING_TASKS,
    EmbeddingRegressionResult,
    PositionRule,
    TransferRun,
    embedding_regression,
    probe_transfer,
    transfer_hooks,
)
from probing_core.cli import _common as common
from probing_core.cli.cache import resolve_hooks
from probing_core.cli.probe_regression import parse_label_params
from probing_core.data.labels import LABELS, LabelSpec
from probing_core.errors import HookError, InputError
from probing_core.solvers.ridge import DEFAULT_ALPHAS

#: The page's default α for the transfer probe (the 9th of the 20-value grid, ≈ 6.16).
TRANSFER_DEFAULT_ALPHA = float(DEFAULT_ALPHAS[8])
TRANSFER_FAMILIES = ["embed", "resid_pre", "resid_mid", "resid_post"]


# ---- results as JSON (also what the tests compare with the core's results) --------------------
def embedding_json(res: EmbeddingRegressionResult, *, cv: int, test_fraction: float, seed: int) -> dict[str, Any]:
    """Every number of an :class:`EmbeddingRegressionResult` but the per-token arrays."""
    tasks = [{
        "task": t.name, "description": t.description, "n_tokens": t.n_tokens, "n_train": t.n_train,
        "n_test": t.n_test, "best_alpha": t.best_alpha, "r2_train": t.r2_train, "r2_cv_mean": t.r2_cv_mean,
        "r2_cv_std": t.r2_cv_std, "r2_test": t.r2_test, "r2_test_ci": list(t.r2_test_ci),
        "r2_ols_all_rows_in_sample": t.r2_ols_all, "baseline_r2": t.baseline_r2, "note": t.note,
    } for t in res.tasks]
    return {"d_vocab": res.d_vocab, "d_model": res.d_model, "length_threshold": res.length_threshold,
            "numeric_threshold": res.numeric_threshold, "number_tokens": list(res.number_tokens),
            "alphas": [float(a) for a in res.alphas], "cv": cv, "test_fraction": test_fraction, "seed": seed,
            "tasks": tasks}


def transfer_json(run: TransferRun) -> dict[str, Any]:
    """Every number of a :class:`TransferRun` but the probe's coefficients."""
    return {"source": run.source, "alpha": run.alpha, "source_r2_in_sample": run.source_r2, "n_fit": run.n_fit,
            "description": run.description, "n_samples": run.transfer.n_samples, "intercept": run.intercept,
            "hooks": run.rows()}


# ---- probe embedding ---------------------------------------------------------------------------
def _embedding(args: argparse.Namespace) -> int:
    if args.cv == 1:
        raise InputError("--cv 1 is not cross-validation; give 0 (α on the test split) or 2 or more folds.")
    model = common.open_model(args, quiet=args.json)
    alphas = args.alphas or DEFAULT_ALPHAS
    res = embedding_regression(model, tuple(args.tasks), length_threshold=args.length_threshold,
                               numeric_threshold=args.numeric_threshold, alphas=alphas,
                               test_fraction=args.test_fraction, cv=args.cv, seed=args.seed)
    if args.json:
        common.print_json({"model": model.describe(), **embedding_json(res, cv=args.cv, test_fraction=args.test_fraction, seed=args.seed)})
        return 0
    print(f"W_E of {model.spec.label()}: {res.d_vocab:,} tokens × {res.d_model}; α chosen on "
          + (f"{args.cv} CV folds of the training rows" if args.cv else "the test split (optimistic)")
          + f"; test = {args.test_fraction:.0%} of the vocabulary (token types the probe never saw)", file=sys.stderr)
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in res.table()]
    common.print_table(rows, [c for c in rows[0] if c != "note"])
    for t in res.tasks:
        if t.note:
            print(f"{t.name}: {t.note}", file=sys.stderr)
    return 0


# ---- probe transfer ----------------------------------------------------------------------------
def _check_hook_args(hooks: list[str] | None) -> None:
    """Families or embed/resid hook names only, checked before the model loads."""
    import re

    for h in hooks or []:
        if h in TRANSFER_FAMILIES or h == "hook_embed" or re.fullmatch(r"blocks\.\d+\.hook_resid_(pre|mid|post)", h):
            continue
        raise HookError(f"--hooks {h!r}: transfer scores the residual stream; give embed, resid_pre, resid_mid, "
                        "resid_post or names like blocks.3.hook_resid_post.")


def _transfer(args: argparse.Namespace) -> int:
    if args.label not in LABELS:
        raise InputError(f"unknown label {args.label!r}; choose one of: {', '.join(LABELS)}.")
    spec = LabelSpec.make(args.label, **parse_label_params(args.label_param, args.label))
    rule = PositionRule.parse(args.positions)
    _check_hook_args(args.hooks)
    store = common.open_store(args)
    model = common.open_model(args, quiet=args.json)
    dataset = common.open_dataset(args)
    hooks = resolve_hooks(model, args.hooks or TRANSFER_FAMILIES)
    acts, built = common.cached_entry(args, model, dataset, hooks, store)
    # as the page: every embed/resid hook of the entry, unless hooks were named
    run = probe_transfer(model, acts, spec, rule, alpha=args.alpha, source=args.source,
                         hooks=None if args.hooks is None else transfer_hooks(hooks))
    if args.json:
        common.print_json({"label": spec.to_dict(), "position_rule": str(rule), "cache_key": acts.key, "built": built,
                    **transfer_json(run)})
        return 0
    print(f"probe fit on {run.source} ({run.n_fit:,} rows, α = {run.alpha:.3g}, in-sample R² {run.source_r2:.4f}); "
          f"scored unchanged on {run.transfer.n_samples:,} tokens: {run.description}; entry {acts.key}"
          + (" (built now)" if built else ""), file=sys.stderr)
    common.print_table([{"hook": r["hook"], "r2": round(r["r2"], 4)} for r in run.rows()], ["hook", "r2"])
    return 0


def register_probe(probe_sub: argparse._SubParsersAction) -> None:
    e = probe_sub.add_parser("embedding", help="ridge regression of token properties from W_E (no forward pass)",
                             description="The Regression page's embedding regression: token properties (length, "
                                         "numeric value) regressed from the rows of the embedding matrix W_E.")
    common.add_common_args(e, dataset=False)
    e.add_argument("--tasks", nargs="+", choices=list(EMBEDDING_TASKS), default=list(EMBEDDING_TASKS),
                   metavar="TASK", help=f"tasks to run (default: all of {', '.join(repr(t) for t in EMBEDDING_TASKS)})")
    e.add_argument("--length-threshold", type=common.int_range(1, 10_000), default=15,
                   help="tokens longer than this are outliers in the 'no outliers' tasks (default 15, as the page)")
    e.add_argument("--numeric-threshold", type=common.int_range(1, 10**9), default=1000,
                   help="number tokens above this value are left out of numeric_value (default 1000, as the page)")
    e.add_argument("--alphas", type=common.positive_float, nargs="+", default=None, help="α grid (default: 20 values 1e-3…1e6)")
    e.add_argument("--cv", type=common.int_range(0, 1000), default=5, help="CV folds choosing α (default 5; 0 = on the test split)")
    e.add_argument("--test-fraction", type=common.fraction_open, default=0.2, help="held-out share of the vocabulary (default 0.2)")
    e.add_argument("--seed", type=common.seed_int, default=0, help="split seed")
    e.set_defaults(func=_embedding)

    t = probe_sub.add_parser("transfer", help="fit one probe on the embeddings, score it on every residual hook",
                             description="The Regression page's probe transfer: a ridge probe fit on W_E (or on "
                                         "hook_embed of the corpus) and scored unchanged at every resid hook.")
    common.add_common_args(t)
    t.add_argument("--label", default="length", type=common.nonempty, help=f"one of: {', '.join(LABELS)} (default length)")
    t.add_argument("--label-param", action="append", type=common.nonempty, metavar="KEY=VALUE",
                   help="label parameter, repeatable (e.g. max_length=15)")
    t.add_argument("--positions", default="all", help="all (default; BOS excluded), last, or match:TOK,TOK")
    t.add_argument("--source", choices=["W_E", "hook_embed"], default="W_E",
                   help="fit on W_E (every vocabulary row; default) or on hook_embed of the corpus")
    t.add_argument("--alpha", type=common.positive_float, default=TRANSFER_DEFAULT_ALPHA,
                   help=f"ridge strength of the source fit (default {TRANSFER_DEFAULT_ALPHA:.3g}, the page's)")
    t.add_argument("--hooks", nargs="*", default=None, type=common.nonempty,
                   help="resid hook names or families to cache and score (default: embed resid_pre resid_mid resid_post)")
    common.add_entry_size_args(t)
    t.set_defaults(func=_transfer)
