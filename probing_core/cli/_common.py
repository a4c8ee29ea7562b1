"""Shared CLI options and helpers: model/dataset arguments, the store, progress bars, JSON output,
and the argument types that validate every value before anything is loaded.

Every bad argument ends as one line on stderr and exit status 2 (:class:`OneLineParser`), never a
usage dump or a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from probing_core.data.datasets import Dataset, DatasetSpec, load_dataset
from probing_core.errors import DatasetError
from probing_core.models import (
    LoadedModel,
    default_cache_root,
    load_model,
    spec_from_cli,
)
from probing_core.store.entries import ActivationStore, size_limit_from_env

#: Seeds go to NumPy/torch generators, which take 0 … 2**32 - 1 everywhere.
MAX_SEED = 2**32 - 1
#: Upper bound for counts (tokens, samples, steps): far above any real run, below overflow.
MAX_COUNT = 10**12


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (``error: <command>: <message>``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog.removeprefix('python -m ')}: {message}\n")


# ---- argument types: each raises ArgumentTypeError with a message saying what is expected -------
def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def int_range(lo: int, hi: int = MAX_COUNT) -> Callable[[str], int]:
    """An argparse type: a whole number in [lo, hi]."""

    def parse(text: str) -> int:
        v = _int(text)
        if v < lo:
            need = "a positive whole number" if lo == 1 else ("0 or more" if lo == 0 else f"at least {lo:,}")
            raise argparse.ArgumentTypeError(f"must be {need}, got {v:,}")
        if v > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi:,}, got {v:,}")
        return v

    parse.__name__ = "whole number"
    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)
seed_int = int_range(0, MAX_SEED)


def float_range(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number between lo and hi (open ends as given)."""

    def parse(text: str) -> float:
        try:
            v = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            left, right = ("(" if lo_open else "["), (")" if hi_open or hi == math.inf else "]")
            raise argparse.ArgumentTypeError(f"{text} is out of range; give a finite number in {left}{lo:g}, {hi:g}{right}")
        return v

    parse.__name__ = "number"
    return parse


positive_float = float_range(0.0, lo_open=True)
fraction_open = float_range(0.0, 1.0, lo_open=True, hi_open=True)
unit_interval = float_range(0.0, 1.0)


def nonempty(text: str) -> str:
    """An argparse type: any text but the empty (or all-blank) string."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


def device_arg(text: str) -> str:
    """An argparse type: auto, cpu, mps, cuda or cuda:N (availability is checked when loading)."""
    if not _DEVICE_RE.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return text.strip()


def folder_arg(text: str) -> str:
    """An argparse type: a folder path that is not an existing file (it may not exist yet)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return text


def existing_folder_arg(text: str) -> str:
    """An argparse type: a folder that exists."""
    if not text.strip() or not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"folder {text!r} does not exist")
    return text


def out_file_arg(text: str) -> str:
    """An argparse type: a file to write, in an existing writable folder, and not itself a folder."""
    path = Path(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if path.is_dir() or text.endswith(os.sep):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name inside it")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {parent} is not writable; pick another")
    return text


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", type=nonempty, help="catalog id (embedded, tree, tiny), HF name, or local folder (default: embedded)")
    p.add_argument("--device", default="auto", type=device_arg, help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model weights dtype")


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="pydoc", type=nonempty, help="pydoc (offline corpus), vocab, statements:cities, a .txt/.csv/.jsonl path, or hf:NAME[:CONFIG]")
    p.add_argument("--text-column", default="text", type=nonempty, help="text column of a CSV/JSONL file")
    p.add_argument("--max-docs", type=positive_int, default=None, help="use at most this many documents")


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None, type=folder_arg, help="store folder (default: $PROBING_CACHE_DIR or ./cache)")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def add_common_args(p: argparse.ArgumentParser, *, dataset: bool = True) -> None:
    """The options of every command that loads a model: ``--model/--device/--dtype``, the dataset's
    (``--dataset/--text-column/--max-docs``; not with ``dataset=False``), ``--cache-dir`` and ``--json``."""
    add_model_args(p)
    if dataset:
        add_dataset_args(p)
    add_store_args(p)
    add_json_arg(p)


def add_entry_size_args(p: argparse.ArgumentParser, *, store_dtype: bool = True) -> None:
    """The size of the cache entry a command builds when its hooks are not cached yet: ``--max-tokens``,
    ``--max-len`` and (not with ``store_dtype=False``: those commands store float32) ``--store-dtype``."""
    p.add_argument("--max-tokens", type=positive_int, default=20_000, help="tokens cached (default 20000)")
    p.add_argument("--max-len", type=int_range(2, 1_000_000), default=128, help="tokens per row (default 128)")
    if store_dtype:
        p.add_argument("--store-dtype", default="float32", choices=["float32", "float16"],
                       help="dtype of the arrays on disk (default float32; float16 halves them)")


def open_store(args: argparse.Namespace) -> ActivationStore:
    root = Path(args.cache_dir) if getattr(args, "cache_dir", None) else default_cache_root()
    return ActivationStore(root / "activations", size_limit=size_limit_from_env())


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
    if arg.startswith("statements:"):  # the built-in Geometry of Truth sets (interventions' truth case)
        return DatasetSpec("statements", arg[len("statements:"):], text_column="statement", max_docs=max_docs)
    return DatasetSpec("upload", arg, text_column=text_column, max_docs=max_docs)


def open_dataset(args: argparse.Namespace) -> Dataset:
    spec = dataset_spec_from_arg(args.dataset, args.text_column, args.max_docs)
    if spec.kind == "upload":
        path = Path(spec.name)
        if not path.is_file():
            raise DatasetError(f"dataset {spec.name!r} is neither pydoc, vocab, hf:NAME nor an existing file.")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DatasetError(f"cannot read {path} ({e.strerror or e}); check its permissions.") from e
        return load_dataset(DatasetSpec("upload", path.name, spec.text_column, spec.max_docs), upload=data)
    return load_dataset(spec)


def tqdm_progress(desc: str) -> tuple[Callable[[float, str], None], Callable[[], None]]:
    """A progress callback drawing a tqdm bar on stderr, and a closer.

    The bar appears at the first update, so an argument refused before any work starts leaves
    stderr with its one error line.
    """
    from tqdm import tqdm

    bars: list[Any] = []

    def update(frac: float, msg: str) -> None:
        if not bars:
            bars.append(tqdm(total=1000, desc=desc, file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}"))
        bars[0].n = int(max(0.0, min(1.0, frac)) * 1000)
        bars[0].set_postfix_str(msg, refresh=True)

    def close() -> None:
        for bar in bars:
            bar.close()

    return update, close


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


def cached_entry(args: argparse.Namespace, model: LoadedModel, dataset: Dataset, hooks: list[str],
                 store: ActivationStore, *, bar: str | None = "cache"):
    """The store entry for these hooks (built if missing, with the sizes of :func:`add_entry_size_args`), opened.

    Args:
        bar: label of the progress bar drawn on stderr while building; ``None`` draws none.
    Returns:
        ``(CachedActivations, built)``.
    """
    from probing_core.store.activations import build_cache, open_entry

    update, close = tqdm_progress(bar) if bar else (None, lambda: None)
    try:
        entry, built = build_cache(model, dataset, hooks, store=store, max_len=args.max_len,
                                   max_tokens=args.max_tokens, progress=update,
                                   dtype=getattr(args, "store_dtype", "float32"))  # no --store-dtype: float32
    finally:
        close()
    return open_entry(store, entry.key), built
