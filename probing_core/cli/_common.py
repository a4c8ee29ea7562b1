"""Shared CLI options and helpers: model/dataset arguments, the store, progress bars, JSON output."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from probing_core.data.datasets import Dataset, DatasetSpec, load_dataset
from probing_core.errors import DatasetError
from probing_core.models import LoadedModel, load_model, spec_from_cli
from probing_core.store.entries import DEFAULT_SIZE_LIMIT, ActivationStore
from probing_core.models import default_cache_root


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="catalog id (embedded, tree, tiny), HF name, or local folder (default: embedded)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model weights dtype")


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="pydoc", help="pydoc (offline corpus), vocab, a .txt/.csv/.jsonl path, or hf:NAME[:CONFIG]")
    p.add_argument("--text-column", default="text", help="text column of a CSV/JSONL file")
    p.add_argument("--max-docs", type=int, default=None, help="use at most this many documents")


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None, help="store folder (default: $PROBING_CACHE_DIR or ./cache)")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def open_store(args: argparse.Namespace) -> ActivationStore:
    root = Path(args.cache_dir) if getattr(args, "cache_dir", None) else default_cache_root()
    limit = int(float(os.environ.get("PROBING_CACHE_LIMIT_GB", DEFAULT_SIZE_LIMIT / 1024**3)) * 1024**3)
    return ActivationStore(root / "activations", size_limit=limit)


def open_model(args: argparse.Namespace, quiet: bool = False) -> LoadedModel:
    spec = spec_from_cli(args.model, device=args.device, dtype=args.dtype)
    root = Path(args.cache_dir) if getattr(args, "cache_dir", None) else None
    say: Callable[[str], None] | None = None if quiet else (lambda s: print(s, file=sys.stderr))
    return load_model(spec, cache_root=root, progress=say)


def dataset_spec_from_arg(arg: str, text_column: str = "text", max_docs: int | None = None) -> DatasetSpec:
    if arg in ("pydoc", "vocab"):
        return DatasetSpec(arg, max_docs=max_docs)  # type: ignore[arg-type]
    if arg.startswith("hf:"):
        return DatasetSpec("hf", arg[3:], text_column=text_column, max_docs=max_docs)
    return DatasetSpec("upload", arg, text_column=text_column, max_docs=max_docs)


def open_dataset(args: argparse.Namespace) -> Dataset:
    spec = dataset_spec_from_arg(args.dataset, args.text_column, args.max_docs)
    if spec.kind == "upload":
        path = Path(spec.name)
        if not path.is_file():
            raise DatasetError(f"dataset {spec.name!r} is neither pydoc, vocab, hf:NAME nor an existing file.")
        return load_dataset(DatasetSpec("upload", path.name, spec.text_column, spec.max_docs), upload=path.read_bytes())
    return load_dataset(spec)


def tqdm_progress(desc: str) -> tuple[Callable[[float, str], None], Callable[[], None]]:
    """A progress callback drawing a tqdm bar on stderr, and a closer."""
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=desc, file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(frac: float, msg: str) -> None:
        bar.n = int(max(0.0, min(1.0, frac)) * 1000)
        bar.set_postfix_str(msg, refresh=True)

    return update, bar.close


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ",".join(map(str, v)) if len(v) <= 4 else f"{len(v)} items"
    return "" if v is None else str(v)
