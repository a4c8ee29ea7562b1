"""``cache build | ls | rm | export | verify``: the activation store from the command line."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from probing_core.cli._common import (
    add_common_args,
    add_entry_size_args,
    add_json_arg,
    add_store_args,
    float_range,
    int_range,
    nonempty,
    open_dataset,
    open_model,
    open_store,
    out_file_arg,
    print_json,
    print_table,
    tqdm_progress,
)
from probing_core.errors import HookError
from probing_core.store.activations import build_cache, export_entry
from probing_core.store.entries import ActivationStore, StoreEntry

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
    per_token = set(model.all_hook_names())
    if any(h not in per_token for h in out):
        raise HookError(f"hook(s) {[h for h in out if h not in per_token]} are not per-token activations the store can hold "
                        "(attention patterns are [head, query, key]): use the `attention` command for them.")
    return list(dict.fromkeys(out))


def _build(args: argparse.Namespace) -> int:
    store = open_store(args)
    model = open_model(args, quiet=args.json)
    dataset = open_dataset(args)
    hooks = resolve_hooks(model, args.hooks)
    update, close = tqdm_progress("cache build")
    t0 = time.perf_counter()
    try:
        if args.engine == "ray":  # ray is imported only here (it adds seconds to a start)
            from probing_core.store.activations import BuildParams
            from probing_core.store.ray_engine import RayOptions, build_cache_ray

            res = build_cache_ray(
                model, dataset, hooks, store=store, address=args.address, rows_per_shard=args.rows_per_shard,
                params=BuildParams(args.max_len, args.max_tokens, args.store_dtype, args.batch_size),
                options=RayOptions(workers=args.workers, gpus_per_worker=args.gpus_per_worker, write=args.ray_write),
                progress=update,
            )
            entry, built = res.entry, res.built
        else:
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
        "engine": entry.meta.get("engine", "local"),
    }
    if args.json:
        print_json(out)
    else:
        state = "built" if built else "already cached"
        print(f"{state}: {entry.key}  {entry.n_tokens:,} tokens × {len(entry.hooks)} hooks, {entry.bytes / 1e6:.1f} MB, {out['seconds']} s")
    return 0


def _print_entries(args: argparse.Namespace, store: ActivationStore, rows: list[dict], table: Callable[[], None]) -> None:
    """What ``ls`` and ``verify`` print: the rows as JSON (``--json``), a line saying the store is empty, or
    ``table()``; then the store index's problem, if it has one, as a warning on stderr."""
    if args.json:
        print_json(rows)
    elif not rows:
        print(f"no entries in {store.root}")
    else:
        table()
    if store.index_problem:
        print(f"warning: {store.index_problem}", file=sys.stderr)


def _ls(args: argparse.Namespace) -> int:
    store = open_store(args)
    good, broken = store.scan()
    rows = [{**e.summary(), "engine": e.meta.get("engine", "local")} for e in good] + [b.summary() for b in broken]

    def table() -> None:
        for r in rows:
            r["MB"] = round((r["bytes"] or 0) / 1e6, 1)
        print_table(rows, ["key", "status", "model", "dataset", "n_tokens", "n_hooks", "dtype", "MB", "engine"])
        for b in broken:
            print(f"broken {b.key}: {b.reason} — delete it with `cache rm {b.key}`")

    _print_entries(args, store, rows, table)
    return 0


def _verify(args: argparse.Namespace) -> int:
    store = open_store(args)
    good, broken = store.scan()
    keys = [args.key] if args.key else [e.key for e in good] + [b.key for b in broken]
    rows = []
    for key in keys:
        res = store.verify(key)
        ok = isinstance(res, StoreEntry)
        rows.append({"key": key, "status": "ok" if ok else "broken",
                     "problem": None if ok else res.reason,  # type: ignore[union-attr]
                     "checksums": ok and "files" in res.meta})

    def table() -> None:
        for r in rows:
            note = "" if r["status"] == "broken" or r["checksums"] else " (built before checksums: sizes and headers checked)"
            print(f"{r['status']:6}  {r['key']}  {r['problem'] or ''}{note}")

    _print_entries(args, store, rows, table)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


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
    store.path_of(args.key)  # a malformed key fails here, before anything is read
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
    add_common_args(b)
    add_entry_size_args(b)
    b.add_argument("--hooks", nargs="*", default=None, type=nonempty, help="hook names or families (embed resid_pre resid_mid resid_post attn_out mlp_out mlp_post); default: embed + resid_*")
    b.add_argument("--batch-size", type=int_range(1, 1_000_000), default=16, help="rows per forward pass (default 16)")
    b.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process; ray: row ranges over a Ray actor pool, written as shards (docs/scale.md)")
    b.add_argument("--address", default=None, type=nonempty, help="Ray cluster address host:port (default: $RAY_ADDRESS, else a local cluster)")
    b.add_argument("--workers", type=int_range(1, 4096), default=2, help="Ray actors (each loads the model once; default 2)")
    b.add_argument("--gpus-per-worker", type=float_range(0.0, 64.0), default=0.0, help="GPUs reserved per Ray actor (0 = CPU actors)")
    b.add_argument("--ray-write", default="worker", choices=["worker", "driver"],
                   help="worker: actors write shards into the store (shared filesystem); driver: arrays come back and this process writes them")
    b.add_argument("--rows-per-shard", type=int_range(1, 10**9), default=None, help="rows per shard, whole batches (default: about 131k tokens)")
    b.set_defaults(func=_build)

    ls = csub.add_parser("ls", help="list entries")
    add_store_args(ls)
    add_json_arg(ls)
    ls.set_defaults(func=_ls)

    rm = csub.add_parser("rm", help="delete entries")
    add_store_args(rm)
    rm.add_argument("keys", nargs="+", type=nonempty)
    rm.set_defaults(func=_rm)

    ex = csub.add_parser("export", help="write one hook as .npy plus a token table (.tokens.tsv)")
    add_store_args(ex)
    ex.add_argument("key", type=nonempty)
    ex.add_argument("--hook", required=True, type=nonempty)
    ex.add_argument("--out", required=True, type=out_file_arg, help="output .npy path (in an existing folder)")
    ex.set_defaults(func=_export)

    ve = csub.add_parser("verify", help="check entries (sizes, headers, sampled checksums); broken ones are set aside")
    add_store_args(ve)
    add_json_arg(ve)
    ve.add_argument("key", nargs="?", default=None, type=nonempty, help="one entry (default: every entry)")
    ve.set_defaults(func=_verify)
