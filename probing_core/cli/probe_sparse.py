"""``probe sparse``: sparse (L1 / L2 / elastic-net) logistic probe of one layer, e.g. " the" vs " an"."""
from __future__ import annotations

import argparse

from probing_core.analyses import sparse
from probing_core.cli import _common as common
from probing_core.errors import InputError


def _run(args: argparse.Namespace) -> int:
    if args.C is not None and args.Cs:
        raise InputError("give either --C (one value) or --Cs (a sweep), not both.")
    model = common.open_model(args, quiet=args.json)
    if not (0 <= args.layer < model.n_layers):
        raise InputError(f"--layer {args.layer} is out of range; this model has layers 0..{model.n_layers - 1}.")
    hook = f"blocks.{args.layer}.mlp.hook_post" if args.features == "mlp_post" else f"blocks.{args.layer}.hook_resid_post"
    dataset = common.open_dataset(args)
    store = common.open_store(args)
    # hook_embed too: the embed-only baseline is the same probe on it, at the same rows
    acts, _ = common.cached_entry(args, model, dataset, ["hook_embed", hook], store, bar=None if args.json else "extracting")
    classes = [[t for t in c.split(",")] for c in args.classes]
    ctx = sparse.contexts_for(acts, model.tokenizer.encode, model.tokenizer.decode_tokens, classes,
                              before=args.before, after=args.after, whole_word_next=not args.any_next,
                              max_per_class=args.max_per_class, seed=args.seed, offset=args.offset)
    X = sparse.features(acts, hook, ctx)
    Cs = [args.C] if args.C is not None else (args.Cs or None)
    path = sparse.fit_sparse_path(X, ctx, Cs=Cs, penalty=args.penalty, l1_ratio=args.l1_ratio,
                                  test_fraction=args.test_fraction, seed=args.seed, cv=args.cv)
    # C chosen on CV folds of the training rows (never on the test rows), unless --show-C names one
    k = 0 if len(path.Cs) == 1 else (path.nearest_index(args.show_C) if args.show_C else sparse.chosen_index(path))
    summary = sparse.summarize(acts, hook, ctx, path, k=k, seed=args.seed)
    neurons = sparse.neuron_table(X, ctx, path, k, top=args.top)
    report = sparse.report_at(X, ctx, path, k)
    if args.json:
        common.print_json({"model": model.describe(), "hook": hook, "cache_key": acts.key, "classes": ctx.class_names,
                    "counts": ctx.counts, "found": ctx.found, "offset": ctx.offset, "question": ctx.question,
                    "path": path.table(), "chosen_index": k, "chosen_on": "show-C" if args.show_C else "CV",
                    "chosen": path.table()[k], "baselines": summary.rows(), "summary": summary.__dict__,
                    "surviving_neurons": neurons, "classification_report": report, "samples": ctx.samples})
        return 0
    print(f"question: {ctx.question}")
    print(f"{hook}: {', '.join(f'{n} {c}' for n, c in ctx.counts.items())} contexts "
          f"({args.before} before / {args.after} after, features read at offset {ctx.offset:+d}); "
          f"penalty {args.penalty}, features standardized; {summary.n_train} train / {summary.n_test} test rows")
    common.print_table(path.table(), ["C", "lambda", "train_accuracy", "test_accuracy", "density_pct", "n_nonzero",
                               "kkt_residual", "converged"])
    row = path.table()[k]
    print(f"\nat C = {row['C']:.4g}: test accuracy {row['test_accuracy']:.3f}, density {row['density_pct']:.2f} %, "
          f"{row['n_nonzero']} neurons, KKT {row['kkt_residual']:.1e} ({'converged' if row['converged'] else 'NOT converged'})")
    if not path.converged.all():
        print(f"warning: {int((~path.converged).sum())} C value(s) did not converge; their figures are not the answer.")
    print("\nthe probe beside its baselines (test split; 95 % Wilson intervals):")
    common.print_table(summary.rows(), ["probe", "test_accuracy", "95% CI", "n_test"])
    print("\nsurviving neurons (by |coef|):")
    common.print_table(neurons, list(neurons[0]) if neurons else ["neuron"])
    return 0


def register_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sparse", help="sparse (L1) logistic probe of one layer's neurons at a target token")
    common.add_common_args(p)
    p.add_argument("--classes", nargs=2, required=True, type=common.nonempty, metavar="TOKENS",
                   help="two classes, each one token string or a comma-separated set (e.g. ' the' ' an')")
    p.add_argument("--layer", type=common.nonneg_int, required=True, help="layer index")
    p.add_argument("--features", choices=["mlp_post", "resid_post"], default="mlp_post",
                   help="MLP post-activation neurons (default) or the residual stream, at the target position")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--C", type=common.positive_float, default=None, help="one C = 1/λ")
    g.add_argument("--Cs", type=common.positive_float, nargs="+", default=None, help="a sweep of C values (default: 17 automatic)")
    p.add_argument("--show-C", type=common.positive_float, default=None, help="report neurons at the path point nearest this C "
                   "(default: the best mean CV accuracy, converged)")
    p.add_argument("--penalty", choices=["l1", "l2", "elasticnet"], default="l1")
    p.add_argument("--l1-ratio", type=common.unit_interval, default=0.5, help="elastic-net mixing (0 = L2, 1 = L1)")
    p.add_argument("--before", type=common.int_range(0, 100_000), default=14, help="tokens of context required before the target")
    p.add_argument("--after", type=common.int_range(0, 100_000), default=3, help="tokens required after the target")
    p.add_argument("--any-next", action="store_true", help="do not require the next token to be a whole word")
    p.add_argument("--max-per-class", type=common.positive_int, default=None)
    p.add_argument("--test-fraction", type=common.fraction_open, default=0.3)
    p.add_argument("--cv", type=common.int_range(2, 1000), default=None,
                   help=f"k folds of the training rows: choose C and give selection frequency (default {sparse.SELECT_CV})")
    p.add_argument("--offset", type=common.int_range(-100_000, 0), default=-1,
                   help="read features this many tokens from the class token: -1 (default) = the token before it "
                        "(does the layer already know the next word?), 0 = the class token itself (the notebook)")
    p.add_argument("--seed", type=common.seed_int, default=0)
    p.add_argument("--top", type=common.positive_int, default=20, help="surviving neurons to list")
    common.add_entry_size_args(p, store_dtype=False)
    p.set_defaults(func=_run)
