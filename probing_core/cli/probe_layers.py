"""``probe layers``: categorical probe accuracy at every hook (and position); ``--preset tree-edges``."""
from __future__ import annotations

import argparse

from probing_core.analyses import layer_probes as lp
from probing_core.cli import _common as common
from probing_core.cli.cache import resolve_hooks
from probing_core.errors import InputError


def _run(args: argparse.Namespace) -> int:
    store = common.open_store(args)
    model = common.open_model(args, quiet=args.json)
    if args.preset == "tree-edges":
        if model.spec.kind != "tree":
            raise InputError("--preset tree-edges needs the tree-search model: add --model tree.")
        update, close = common.tqdm_progress("tree edge probes")
        try:
            res = lp.run_tree_edge_preset(model, store, n_samples=args.n_samples, seed=args.seed, C=args.C,
                                          test_fraction=args.test_fraction, progress=update)
        finally:
            close()
        params = {"preset": "tree-edges", "n_samples": args.n_samples, "seed": args.seed, "C": args.C}
    else:
        labels = [lp.parse_label(t, top_k=args.top_k_classes) for t in args.label]
        pos = lp.parse_positions(args.positions, split=args.split_positions)
        if pos.kind == "every" and pos.every < 1:
            raise InputError(f"--positions {args.positions!r}: every:K needs a step K of 1 or more.")
        dataset = common.open_dataset(args)
        hooks = resolve_hooks(model, args.hooks or ["embed", "resid_post"])
        acts, _ = common.cached_entry(args, model, dataset, hooks, store, bar="cache build")
        res = lp.probe_layers(acts, hooks, labels, pos, C=args.C, test_fraction=args.test_fraction, seed=args.seed,
                              max_samples=args.max_samples, control_samples=None if args.control_every_row else "task")
        params = {"labels": args.label, "positions": args.positions, "entry": acts.key, "C": args.C}
    if args.json:
        common.print_json({"model": model.describe(), "params": params, "result": res.to_json()})
        return 0
    rows = res.table()
    print(f"label: {res.label} · positions: {res.position} · C = {res.C:g}")
    common.print_table(rows, list(rows[0].keys()))
    print("chance (majority class of the test split): " + ", ".join(
        f"{c} {v:.3f} (n_test {int(n)})" for c, v, n in zip(res.columns, res.chance, res.n_test)))
    if res.control_column:
        print(f"control task on {res.control_column!r} (each type of the token the label is about gets a random class; "
              f"majority {res.control_chance:.3f}, n_test {res.control_n_test}): 'control' column; "
              "selectivity = accuracy − control")
    for note in res.notes:
        print(f"note: {note}")
    return 0


def register_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="categorical probe accuracy at every hook (token identity, dataset column, tree edges)")
    common.add_common_args(p)
    p.add_argument("--label", action="append", default=None, type=common.nonempty,
                   help="token-offset:N (token N positions away; 0 = current, -2 = two back) or column:NAME; repeat for more columns (default token-offset:0)")
    p.add_argument("--positions", default="all", help="all, at:0,1,-1 (fixed positions; -1 = last), every:K, or tokens:STR1,STR2 (default all)")
    p.add_argument("--split-positions", action="store_true", help="with at:…, one column per position")
    p.add_argument("--control-every-row", action="store_true",
                   help="fit the control task on every row (slower) instead of as many rows as the real task (the page's default)")
    p.add_argument("--hooks", nargs="+", default=None, type=common.nonempty, help="hook families or names (default: embed resid_post)")
    p.add_argument("--top-k-classes", type=common.int_range(2, 1_000_000), default=20, help="keep the K most frequent classes (default 20)")
    p.add_argument("--C", type=common.positive_float, default=1.0, help="inverse L2 strength (default 1)")
    p.add_argument("--test-fraction", type=common.fraction_open, default=0.3)
    p.add_argument("--seed", type=common.seed_int, default=0)
    p.add_argument("--max-samples", type=common.positive_int, default=lp.DEFAULT_MAX_SAMPLES, help="seeded subsample per column above this")
    common.add_entry_size_args(p, store_dtype=False)
    p.add_argument("--preset", choices=["tree-edges"], default=None, help="tree-edges: the tree notebook's edge-probe table (--model tree)")
    p.add_argument("--n-samples", type=common.int_range(1, 10_000_000), default=400, help="trees for --preset tree-edges (default 400)")
    p.set_defaults(func=_run_default)


def _run_default(args: argparse.Namespace) -> int:
    if not args.label:
        args.label = ["token-offset:0"]
    return _run(args)
