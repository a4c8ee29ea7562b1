"""What makes an entry trustworthy: the proof of completeness at commit, and the checks after.

Three levels, from cheap to thorough:

- :func:`inspect_folder` (every listing): meta.json parses and is well formed, no broken mark,
  every file is present with the exact size recorded and the size meta.json's ``n_tokens`` implies
  (one ``stat`` per file).
- :func:`open_problem` (when an entry is opened for reading): every ``.npy`` header matches
  meta.json and vocab.json has its fields.
- :func:`checksum_problem` (``cache verify``): the sampled blake2b of every array and the hash of
  every JSON file against what was recorded at commit, and no all-zero hook.

:func:`seal_entry` is what a build must pass before it is committed: rows written = n_tokens for
every hook, every array of the expected shape and dtype; it records the checksums in meta.json.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probing_core.errors import StoreError

#: Token-table arrays every entry holds: [n_tokens] int32 each (doc_index: [n_seq], one per row).
TABLE_ARRAYS = ("token_ids", "seq", "pos", "next_ids", "doc_index")
STORE_DTYPE_NAMES = ("float32", "float16")
#: Rows hashed per file for the sampled checksum (evenly spaced, first and last included).
SAMPLE_ROWS = 128
#: Written into an entry found damaged (its reason); the entry is then set aside.
BROKEN_MARKER = "broken.json"


@dataclass(frozen=True)
class StoreEntry:
    """Metadata of one stored entry (the contents of its meta.json)."""

    key: str
    path: Path
    meta: dict[str, Any]

    @property
    def hooks(self) -> list[str]:
        return list(self.meta["hooks"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def bytes(self) -> int:
        return int(self.meta.get("bytes", 0))

    def summary(self) -> dict[str, Any]:
        m = self.meta
        return {
            "key": self.key,
            "status": "ok",
            "model": m.get("model_label"),
            "dataset": m.get("dataset_label"),
            "n_tokens": m.get("n_tokens"),
            "n_hooks": len(m.get("hooks", [])),
            "hooks": m.get("hooks"),
            "dtype": m.get("dtype"),
            "max_len": m.get("max_len"),
            "bytes": m.get("bytes"),
            "seconds": m.get("seconds"),
            "created": m.get("created"),
            "checksums": "files" in m,
        }


@dataclass(frozen=True)
class BrokenEntry:
    """An entry folder that failed a check: set aside, never read, deletable.

    Attributes:
        reason: what is wrong, in words.
        meta: the parsed meta.json when it was a JSON object, else ``{}``.
    """

    key: str
    path: Path
    reason: str
    meta: dict[str, Any]

    @property
    def bytes(self) -> int:
        return _folder_bytes(self.path)

    def message(self) -> str:
        return (f"cache entry {self.key} is broken: {self.reason}. Delete it (`cache rm {self.key}` or the "
                "Delete button on Home) and build it again.")

    def summary(self) -> dict[str, Any]:
        m = self.meta
        return {
            "key": self.key,
            "status": "broken",
            "problem": self.reason,
            "model": m.get("model_label") if isinstance(m.get("model_label"), str) else None,
            "dataset": m.get("dataset_label") if isinstance(m.get("dataset_label"), str) else None,
            "bytes": self.bytes,
        }


def hook_filename(hook: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.]+", hook) or hook.startswith("."):
        raise StoreError(f"hook name {hook!r} has characters a store file name cannot hold.")
    return f"{hook}.npy"



# ---- proving an entry complete, and checking it later ------------------------------------------
#: numpy parses a ``.npy`` header with ``ast.literal_eval``, and CPython 3.11's AST constructor is
#: not safe under concurrent use (python/cpython#106905: "SystemError: AST constructor recursion
#: depth mismatch", seen with 8 browser sessions reading entries at once). Every header this
#: package parses goes through this one lock; the data itself is mapped or read outside it.
_HEADER_LOCK = threading.Lock()


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of a ``.npy`` file, reading only its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        with _HEADER_LOCK:
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        if fortran:
            raise ValueError("Fortran-ordered array")
        if dtype.hasobject:
            raise ValueError("an object array (would need pickle)")
        return tuple(shape), dtype, f.tell()


def load_npy(path: Path, *, mmap: bool = True) -> np.ndarray:
    """A ``.npy`` file as a read-only memmap (or an array when ``mmap`` is False), its header parsed
    under the header lock: a thread-safe ``np.load(path, mmap_mode="r", allow_pickle=False)``.

    Raises:
        OSError, ValueError, EOFError: missing, unreadable or malformed file.
    """
    shape, dtype, offset = _npy_header(path)
    count = int(np.prod(shape))
    if mmap and count:
        return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)
    with open(path, "rb") as f:
        f.seek(offset)
        arr = np.fromfile(f, dtype=dtype, count=count)
    if arr.size != count:
        raise EOFError(f"{path.name} holds {arr.size} of {count} values")
    return arr.reshape(shape)


def sample_hash(arr: np.ndarray) -> str:
    """blake2b of an array's dtype, shape and a fixed sample of rows (evenly spaced, first and last)."""
    n = arr.shape[0]
    rows = np.unique(np.linspace(0, n - 1, num=min(n, SAMPLE_ROWS)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr[rows]).tobytes())
    return h.hexdigest()


def _file_hash(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def _expected_arrays(meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    n = int(meta["n_tokens"])
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {f"{t}.npy": ((n,), np.dtype(np.int32)) for t in TABLE_ARRAYS}
    out["doc_index.npy"] = ((int(meta["n_seq"]),), np.dtype(np.int32))  # one per row, not per token
    # A sharded entry keeps its hooks under shards/, checked against shards.json (store/shards.py).
    for h in ([] if meta.get("layout") == "sharded" else meta["hooks"]):
        out[hook_filename(h)] = ((n, int(meta["widths"][h])), np.dtype(meta["dtype"]))
    return out


def seal_entry(folder: Path, meta: dict[str, Any]) -> None:
    """Prove a freshly built entry complete and record its checksums in ``meta`` (in place).

    Checks: meta's fields are well formed; ``rows_written[hook] == n_tokens`` for every hook (a
    build that ran no forward pass writes none); every array has the shape and dtype meta says.
    Records ``meta["files"][name] = {bytes, header, sample}`` (size, header length and
    :func:`sample_hash`) for every ``.npy`` file, ``{bytes, blake2b}`` for each JSON file, and
    ``meta["bytes"]``.

    Raises:
        StoreError: anything missing or incomplete (the caller removes the folder).
    """
    problem = _meta_problem(meta)
    if problem:
        raise StoreError(f"the build is incomplete ({problem}); nothing was stored. This is a bug: please report it.")
    n = int(meta["n_tokens"])
    written = meta.get("rows_written")
    if not isinstance(written, dict):
        raise StoreError("the build did not report the rows it wrote per hook; nothing was stored.")
    short = {h: written.get(h) for h in meta["hooks"] if written.get(h) != n}
    if short:
        raise StoreError(f"the build wrote fewer rows than the {n:,} tokens it had for {len(short)} hook(s) "
                         f"({', '.join(f'{h}: {r}' for h, r in list(short.items())[:3])}); nothing was stored. "
                         "Check --batch-size and the dataset, then build again.")
    files: dict[str, dict[str, Any]] = {}
    for fname, (shape, dtype) in _expected_arrays(meta).items():
        path = folder / fname
        if not path.is_file():
            raise StoreError(f"the build left no {fname}; nothing was stored.")
        arr = load_npy(path)
        if arr.shape != shape or arr.dtype != dtype:
            raise StoreError(f"the build wrote {fname} as {arr.dtype}{arr.shape}, expected {dtype}{shape}; nothing was stored.")
        files[fname] = {"bytes": path.stat().st_size, "header": int(getattr(arr, "offset", 0)), "sample": sample_hash(arr)}
        del arr
    for path in sorted(folder.glob("*.json")):
        if path.name != "meta.json":
            files[path.name] = {"bytes": path.stat().st_size, "blake2b": _file_hash(path)}
    if "vocab.json" not in files:
        raise StoreError("the build left no vocab.json; nothing was stored.")
    meta["files"] = files
    meta["bytes"] = sum(f["bytes"] for f in files.values())


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with a meta.json's fields, or None."""
    if not isinstance(meta, dict):
        return f"meta.json holds a {type(meta).__name__}, not an object"
    hooks, n, widths, dtype = meta.get("hooks"), meta.get("n_tokens"), meta.get("widths"), meta.get("dtype", "float32")
    if not isinstance(hooks, list) or not hooks or not all(isinstance(h, str) for h in hooks):
        return "meta.json has no list of hooks"
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"meta.json's n_tokens {n!r} is not a positive integer"
    n_seq = meta.get("n_seq")
    if not isinstance(n_seq, int) or isinstance(n_seq, bool) or not 1 <= n_seq <= n:
        return f"meta.json's n_seq {n_seq!r} is not a row count between 1 and n_tokens"
    if not isinstance(widths, dict) or not all(
        isinstance(widths.get(h), int) and not isinstance(widths.get(h), bool) and widths[h] >= 1 for h in hooks
    ):
        return "meta.json's widths do not give every hook a positive width"
    if dtype not in STORE_DTYPE_NAMES:
        return f"meta.json's dtype {dtype!r} is not float32 or float16"
    try:
        for h in hooks:
            hook_filename(h)
    except StoreError as e:
        return str(e)
    files = meta.get("files")
    if files is not None and not (isinstance(files, dict) and all(isinstance(v, dict) for v in files.values())):
        return "meta.json's file checksums are malformed"
    return None


def inspect_folder(key: str, path: Path) -> StoreEntry | BrokenEntry:
    """The cheap checks: meta.json parses and is well formed, no broken mark, every file present
    with the size meta.json implies (and, when recorded, exactly the size recorded)."""
    marker = path / BROKEN_MARKER
    meta: Any
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return BrokenEntry(key, path, "meta.json is missing (an unfinished or damaged entry)", {})
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return BrokenEntry(key, path, f"meta.json is not valid JSON ({e})", {})
    safe_meta = meta if isinstance(meta, dict) else {}
    if marker.exists():
        try:
            reason = json.loads(marker.read_text(encoding="utf-8")).get("reason", "marked broken")
        except (OSError, ValueError, AttributeError):
            reason = "marked broken"
        return BrokenEntry(key, path, str(reason), safe_meta)
    problem = _meta_problem(meta)
    if problem is None and meta.get("key", key) != key:
        problem = f"meta.json belongs to entry {meta.get('key')!r}, not {key}"
    if problem is None:
        problem = _size_problem(path, meta)
    if problem:
        return BrokenEntry(key, path, problem, safe_meta)
    return StoreEntry(key=key, path=path, meta=meta)


def _size_problem(path: Path, meta: dict[str, Any]) -> str | None:
    recorded: dict[str, dict[str, Any]] = meta.get("files") or {}
    for fname, (shape, dtype) in _expected_arrays(meta).items():
        try:
            size = (path / fname).stat().st_size
        except FileNotFoundError:
            return f"{fname} is missing"
        except OSError as e:
            return f"{fname} cannot be read ({e.strerror})"
        data = int(np.prod(shape)) * dtype.itemsize
        rec = recorded.get(fname)
        if rec is not None:
            if size != rec.get("bytes"):
                return f"{fname} has {size:,} bytes, {rec.get('bytes')} were written (truncated or replaced)"
            if rec.get("header", 0) + data != size:
                return f"{fname} does not hold {shape[0]:,} rows as meta.json's n_tokens says (edited?)"
        elif not (64 <= size - data <= 4096 and (size - data) % 64 == 0):
            return f"{fname} has {size:,} bytes, not {shape[0]:,} rows of {dtype} × {shape[1:] or 1}"
    if not (path / "vocab.json").is_file():
        return "vocab.json is missing"
    for fname, rec in recorded.items():
        if fname.endswith(".json"):
            try:
                if (path / fname).stat().st_size != rec.get("bytes"):
                    return f"{fname} changed size since it was written"
            except OSError:
                return f"{fname} is missing"
    return None


def open_problem(entry: StoreEntry) -> str | None:
    """Checks made when an entry is opened: headers of every array and vocab.json's fields."""
    for fname, (shape, dtype) in _expected_arrays(entry.meta).items():
        try:
            got_shape, got_dtype, header = _npy_header(entry.path / fname)
        except FileNotFoundError:
            return f"{fname} is missing"
        except (OSError, ValueError, EOFError, SyntaxError) as e:
            return f"{fname} has a damaged header ({e})"
        if got_shape != shape or got_dtype != dtype:
            return f"{fname} holds {got_dtype}{got_shape}, meta.json says {dtype}{shape}"
        rec = (entry.meta.get("files") or {}).get(fname)
        if rec is not None and rec.get("header") != header:
            return f"{fname}'s header was rewritten"
    try:
        vocab = json.loads((entry.path / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"vocab.json is unreadable ({e})"
    if not isinstance(vocab, dict):
        return "vocab.json is not an object"
    ids, raw, text = vocab.get("ids"), vocab.get("raw"), vocab.get("text")
    if not (isinstance(ids, list) and isinstance(raw, list) and isinstance(text, list) and len(ids) == len(raw) == len(text)):
        return "vocab.json lacks matching ids/raw/text lists"
    if not all(isinstance(i, int) for i in ids) or not all(isinstance(s, str) for s in raw + text):
        return "vocab.json's ids are not integers or its strings are not strings"
    if not isinstance(vocab.get("space_marker"), str):
        return "vocab.json has no space_marker"
    return None


def checksum_problem(entry: StoreEntry) -> str | None:
    """The on-demand check: the sampled hash of every array and the hash of every JSON file
    against meta.json; a hook whose sampled rows are all zero (no forward pass ran)."""
    recorded: dict[str, dict[str, Any]] = entry.meta.get("files") or {}
    for fname in _expected_arrays(entry.meta):
        try:
            arr = load_npy(entry.path / fname)
            digest = sample_hash(arr)
            zero = fname[:-4] in entry.meta["hooks"] and arr.shape[0] > 0 and not np.any(arr[:: max(1, arr.shape[0] // SAMPLE_ROWS)])
        except (OSError, ValueError, EOFError) as e:
            return f"{fname} is unreadable ({e})"
        if fname in recorded and recorded[fname].get("sample") != digest:
            return f"{fname}'s contents changed since it was written (sampled checksum differs)"
        if zero:
            return f"{fname} is all zeros in the sampled rows (a build that ran no forward pass?)"
    for fname, rec in recorded.items():
        if fname.endswith(".json"):
            try:
                if _file_hash(entry.path / fname) != rec.get("blake2b"):
                    return f"{fname}'s contents changed since it was written"
            except OSError as e:
                return f"{fname} is unreadable ({e.strerror})"
    if entry.meta.get("layout") == "sharded":  # every shard against shards.json (store/shards.py)
        from probing_core.store.shards import sharded_entry_problem

        return sharded_entry_problem(entry.path, entry.meta)
    return None


def _folder_bytes(path: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for f in path.iterdir():
            with contextlib.suppress(OSError):
                total += f.stat().st_size
    return total

