"""``cache build | ls | rm | export``: the activation store from the command line."""
from __future__ import annotations

import argparse
import time

from probing_core.store.activations import build_cache, export_entry
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
from probing_core.errors import HookError

DEFAULT_FAMILIES = ("embed", "resid_post")


def resolve_hooks(model, hooks: list[str] | None) -> list[str]:  # type: ignore[no-untyped-def]
    """Hook arguments may be families (resid_post, mlp_post, …) or concrete names."""
    if not hooks:
        return model.hook_names(DEFAULT_FAMILIES)
    out: list[str] = []
    from probing_core.models import HOOK_FAMILIES

    for h in hooks:
        if h in HOOK_FAMILIES:
            out.extend(model.hook_names([h]))
        else:
            out.append(h)
    model.check_hooks(out)
    return list(dict.fromkeys(out))


def _build(args: argparse.Namespace) -> int:
    if args.max_tokens is not None and args.max_tokens <= 0:
        from probing_core.errors import InputError

        raise InputError(f"--max-tokens must be positive, got {args.max_tokens}.")
    store = open_store(args)
    model = open_model(args, quiet=args.json)
    dataset = open_dataset(args)
    hooks = resolve_hooks(model, args.hooks)
    update, close = tqdm_progress("cache build")
    t0 = time.perf_counter()
    try:
        entry, built = build_cache(
            model, dataset, hooks, store=store, max_len=args.max_len, max_tokens=args.max_tokens,
            dtype=args.store_dtype, batch_size=args.batch_size, progress=update,
        )
    finally:
        close()
    out = {
        "key": entry.key,
        "built": built,
        "n_tokens": entry.n_tokens,
        "hooks": entry.hooks,
        "bytes": entry.bytes,
        "seconds": round(time.perf_counter() - t0, 3),
        "extract_seconds": entry.meta.get("seconds"),
        "tokens_per_second": entry.meta.get("tokens_per_second"),
        "model": entry.meta.get("model_label"),
        "dataset": entry.meta.get("dataset_label"),
        "path": str(entry.path),
    }
    if args.json:
        print_json(out)
    else:
        state = "built" if built else "already cached"
        print(f"{state}: {entry.key}  {entry.n_tokens:,} tokens × {len(entry.hooks)} hooks, {entry.bytes / 1e6:.1f} MB, {out['seconds']} s")
    return 0


def _ls(args: argparse.Namespace) -> int:
    store = open_store(args)
    rows = [e.summary() for e in store.entries()]
    if args.json:
        print_json(rows)
    elif not rows:
        print(f"no entries in {store.root}")
    else:
        for r in rows:
            r["MB"] = round((r["bytes"] or 0) / 1e6, 1)
        print_table(rows, ["key", "model", "dataset", "n_tokens", "n_hooks", "dtype", "MB"])
    return 0


def _rm(args: argparse.Namespace) -> int:
    store = open_store(args)
    missing = [k for k in args.keys if not store.delete(k)]
    for k in args.keys:
        if k not in missing:
            print(f"deleted {k}")
    if missing:
        print(f"no such entry: {' '.join(missing)}")
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    store = open_store(args)
    entry = store.require(args.key)
    if args.hook not in entry.hooks:
        raise HookError(f"entry {args.key} has no hook {args.hook!r}; it holds: {', '.join(entry.hooks)}.")
    paths = export_entry(store, args.key, args.hook, args.out)
    for p in paths:
        print(p)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser("cache", help="build, list, delete and export activation cache entries")
    csub = cache.add_subparsers(dest="cache_cmd", metavar="ACTION")
    cache.set_defaults(func=lambda a: (cache.print_help(), 2)[1])

    b = csub.add_parser("build", help="extract activations into the store (with a progress bar)")
    add_model_args(b)
    add_dataset_args(b)
    add_store_args(b)
    add_json_arg(b)
    b.add_argument("--hooks", nargs="*", default=None, help="hook names or families (embed resid_pre resid_mid resid_post attn_out mlp_out mlp_post); default: embed + resid_*")
    b.add_argument("--max-tokens", type=int, default=20_000, help="cap on tokens extracted (default 20000)")
    b.add_argument("--max-len", type=int, default=128, help="tokens per row (default 128)")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--store-dtype", default="float32", choices=["float32", "float16"])
    b.set_defaults(func=_build)

    ls = csub.add_parser("ls", help="list entries")
    add_store_args(ls)
    add_json_arg(ls)
    ls.set_defaults(func=_ls)

    rm = csub.add_parser("rm", help="delete entries")
    add_store_args(rm)
    rm.add_argument("keys", nargs="+")
    rm.set_defaults(func=_rm)

    ex = csub.add_parser("export", help="write one hook as .npy plus a token table (.tokens.tsv)")
    add_store_args(ex)
    ex.add_argument("key")
    ex.add_argument("--hook", required=True)
    ex.add_argument("--out", required=True, help="output .npy path")
    ex.set_defaults(func=_export)
