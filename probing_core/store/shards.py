"""Sharded entries: an entry's rows as shards (row ranges), read back as one array per hook.

Layout of a sharded entry ``entries/<key>/`` (its meta.json says ``"layout": "sharded"``)::

    meta.json, vocab.json, token_ids.npy, seq.npy, pos.npy, next_ids.npy, doc_index.npy
                                       as in a one-file entry (the token table of every row)
    shards.json                        the manifest: rows and tokens of every shard, and per file
                                       its size, header length and sampled checksum
    shards/<row0>-<row1>/<hook>.npy    [tokens of rows row0..row1-1, width] of every hook
    shards/<row0>-<row1>/shard.json    that shard's own record, written before the folder's rename

A hook reads as a :class:`ShardedArray`: one ``[n_tokens, width]`` view over the shards'
memory-maps. Indexing gathers rows from the shards; :meth:`ShardedArray.iter_chunks` hands a
streaming fit one shard at a time with no copy. A one-shard entry reads as the plain memmap.

Building (:func:`build_sharded`, whatever engine computes the ranges):

* The documents' rows are split into ranges of whole batches (:func:`plan_ranges`), so each
  range runs the same batches a one-process build runs and gives the same bytes.
* Shards go into ``entries/.partial-<key>/``, which outlives a killed job. A shard is written to
  ``shards/.tmp-…`` and renamed to ``shards/<row0>-<row1>/`` once its files and record are
  written: a shard folder without the ``.tmp-`` prefix is complete.
* The build holds the key's store lock for its whole life: two builds of one key (any engines,
  any processes) extract once. The next build of a key computes only the ranges missing from
  ``.partial-<key>/``; every shard is verified against its record (size, header, sampled
  checksum — :func:`probing_core.store.integrity.sample_hash`), then shards.json and meta.json
  are written and the folder is renamed into place.

The store key is :func:`probing_core.store.activations.cache_key`, the same for every engine;
``meta["engine"]`` says which one filled the entry (``cache ls`` shows it).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probing_core import __version__
from probing_core.data.datasets import Dataset, TokenBatch, tokenize_dataset
from probing_core.errors import InputError, ProbeError, StoreError
from probing_core.models import LoadedModel
from probing_core.store.activations import (
    BuildParams,
    Progress,
    extract_to_folder,
    open_entry,
    write_token_table,
)
from probing_core.store.entries import ActivationStore, StoreEntry
from probing_core.store.integrity import (
    hook_filename,
    load_npy,
    sample_hash,
    seal_entry,
)

__all__ = [
    "LAYOUT",
    "MANIFEST",
    "RangeDone",
    "RangeJob",
    "ShardedArray",
    "ShardedBuild",
    "build_sharded",
    "check_fits_in_memory",
    "compare_entries",
    "compute_shard",
    "default_rows_per_shard",
    "extract_range",
    "finished_shards",
    "local_runner",
    "open_hook",
    "partial_dir",
    "plan_ranges",
    "write_shard",
]

LAYOUT = "sharded"
MANIFEST = "shards.json"
SHARDS_DIR = "shards"
SHARD_RECORD = "shard.json"
#: Tokens per shard when the caller does not choose (about 1.2 GB per hook-set of 4 × d=576 fp32 hooks).
DEFAULT_SHARD_TOKENS = 131_072

Range = tuple[int, int]


# ---- plan -------------------------------------------------------------------------------------
def default_rows_per_shard(lengths: np.ndarray, batch_size: int, target_tokens: int = DEFAULT_SHARD_TOKENS) -> int:
    """Rows per shard: a whole number of batches holding about ``target_tokens`` tokens."""
    mean_len = float(np.mean(lengths)) if len(lengths) else 1.0
    batches = max(1, round(target_tokens / max(mean_len * batch_size, 1.0)))
    return batches * batch_size


def plan_ranges(n_seq: int, rows_per_shard: int) -> list[Range]:
    """Consecutive row ranges ``[(0, r), (r, 2r), …]`` covering ``n_seq`` rows."""
    if rows_per_shard < 1:
        raise InputError(f"rows per shard must be positive, got {rows_per_shard}.")
    return [(a, min(n_seq, a + rows_per_shard)) for a in range(0, n_seq, rows_per_shard)]


def shard_name(r: Range) -> str:
    return f"{r[0]:010d}-{r[1]:010d}"


def partial_dir(store: ActivationStore, key: str) -> Path:
    """Where the shards of an unfinished build of ``key`` live (kept across killed jobs)."""
    return store.partial_path(key)


def token_offsets(lengths: np.ndarray) -> np.ndarray:
    """``[n_seq + 1]`` int64: token index where each row starts (rows are stored row-major)."""
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])


def sub_batch(batch: TokenBatch, r: Range) -> TokenBatch:
    a, b = r
    # copies: a worker's batch may be read-only shared memory, and these rows are small
    return replace(batch, tokens=np.array(batch.tokens[a:b]), lengths=np.array(batch.lengths[a:b]),
                   doc_index=np.array(batch.doc_index[a:b]))


# ---- writing one shard -----------------------------------------------------------------------
def extract_range(
    model: LoadedModel, batch: TokenBatch, hooks: Sequence[str], r: Range, folder: Path, *,
    dtype: str, batch_size: int, on_forward: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Rows ``r`` of ``batch`` through :func:`extract_to_folder` (the one-process build's own
    function) into ``folder``; only the hook files are kept.

    Args:
        on_forward: called after every forward pass (a batch of ``batch_size`` rows).
    Returns:
        extract_to_folder's metadata (rows_written, nonfinite, seconds, …) plus ``forward_passes``.
    """
    passes = [0]

    def tick(_frac: float, _msg: str) -> None:
        passes[0] += 1
        if on_forward is not None:
            on_forward()

    meta = extract_to_folder(model, sub_batch(batch, r), hooks, folder, dtype=dtype, batch_size=batch_size, progress=tick)
    keep = {hook_filename(h) for h in hooks}
    for f in folder.iterdir():
        if f.name not in keep:
            f.unlink()
    meta["forward_passes"] = passes[0]
    return meta


def _seal_shard(tmp: Path, shards_dir: Path, r: Range, tokens: Range, hooks: Sequence[str], extra: dict[str, Any]) -> dict[str, Any]:
    """Record the shard's files (size, header, sampled checksum) in shard.json and rename it into place."""
    n = tokens[1] - tokens[0]
    files: dict[str, dict[str, Any]] = {}
    for h in hooks:
        path = tmp / hook_filename(h)
        arr = load_npy(path)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise StoreError(f"shard rows {r[0]}–{r[1]} wrote {h} with shape {arr.shape}, expected {n} rows; nothing was kept.")
        files[h] = {"bytes": path.stat().st_size, "header": int(arr.offset), "shape": list(arr.shape),
                    "dtype": arr.dtype.name, "sample": sample_hash(arr)}
        del arr
    record = {"rows": list(r), "tokens": list(tokens), "files": files, **extra}
    (tmp / SHARD_RECORD).write_text(json.dumps(record, sort_keys=True))
    final = shards_dir / shard_name(r)
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another writer finished this range first
    return record


def _new_tmp(shards_dir: Path, r: Range) -> Path:
    shards_dir.mkdir(parents=True, exist_ok=True)
    tmp = shards_dir / f".tmp-{shard_name(r)}-{uuid.uuid4().hex[:10]}"
    tmp.mkdir()
    return tmp


def compute_shard(
    model: LoadedModel, batch: TokenBatch, hooks: Sequence[str], r: Range, shards_dir: Path, *,
    dtype: str, batch_size: int, on_forward: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Extract rows ``r`` and write them as a shard straight into ``shards_dir`` (a worker that
    sees the store's filesystem). A failure leaves only a ``.tmp-`` folder, never a shard."""
    offs = token_offsets(batch.lengths)
    tmp = _new_tmp(shards_dir, r)
    meta = extract_range(model, batch, hooks, r, tmp, dtype=dtype, batch_size=batch_size, on_forward=on_forward)
    extra = {"nonfinite": meta["nonfinite"], "forward_passes": meta["forward_passes"], "seconds": meta["seconds"],
             "forward_seconds": meta["forward_seconds"]}
    return _seal_shard(tmp, shards_dir, r, (int(offs[r[0]]), int(offs[r[1]])), hooks, extra)


def arrays_of_range(
    model: LoadedModel, batch: TokenBatch, hooks: Sequence[str], r: Range, *, dtype: str, batch_size: int,
    on_forward: Callable[[], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Extract rows ``r`` into a private temp folder and return the arrays (a worker that cannot
    see the store: the driver writes them with :func:`write_shard`)."""
    with tempfile.TemporaryDirectory(prefix="probing-range-") as d:
        meta = extract_range(model, batch, hooks, r, Path(d), dtype=dtype, batch_size=batch_size, on_forward=on_forward)
        arrays = {h: load_npy(Path(d) / hook_filename(h), mmap=False) for h in hooks}
    return arrays, meta


def write_shard(shards_dir: Path, r: Range, tokens: Range, arrays: Mapping[str, np.ndarray],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write arrays computed elsewhere as the shard of rows ``r`` (temp name, then rename)."""
    tmp = _new_tmp(shards_dir, r)
    try:
        for h, a in arrays.items():
            np.save(tmp / hook_filename(h), np.ascontiguousarray(a), allow_pickle=False)
        return _seal_shard(tmp, shards_dir, r, tokens, list(arrays), extra or {})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- checking shards -------------------------------------------------------------------------
def shard_problem(folder: Path, record: Mapping[str, Any], hooks: Sequence[str], widths: Mapping[str, int],
                  dtype: str, tokens: Range, *, sampled: bool = True) -> str | None:
    """What is wrong with a shard folder against its record and the plan, or None."""
    if list(record.get("tokens", [])) != list(tokens):
        return f"holds tokens {record.get('tokens')}, the plan says {list(tokens)}"
    files = record.get("files") or {}
    n = tokens[1] - tokens[0]
    for h in hooks:
        rec = files.get(h)
        if not isinstance(rec, dict):
            return f"has no {h}"
        path = folder / hook_filename(h)
        try:
            size = path.stat().st_size
        except OSError:
            return f"{hook_filename(h)} is missing"
        itemsize = np.dtype(dtype).itemsize
        if size != rec.get("bytes") or size != int(rec.get("header", 0)) + n * int(widths[h]) * itemsize:
            return f"{hook_filename(h)} has {size:,} bytes, not {n:,} rows × {widths[h]} {dtype}"
        if sampled:
            try:
                arr = load_npy(path)
            except (OSError, ValueError, EOFError) as e:
                return f"{hook_filename(h)} is unreadable ({e})"
            if arr.shape != (n, int(widths[h])) or arr.dtype != np.dtype(dtype) or sample_hash(arr) != rec.get("sample"):
                return f"{hook_filename(h)}'s contents differ from its record (sampled checksum)"
    return None


def finished_shards(shards_dir: Path, plan: Sequence[Range], offsets: np.ndarray, hooks: Sequence[str],
                    widths: Mapping[str, int], dtype: str) -> dict[Range, dict[str, Any]]:
    """The plan's ranges that have a complete, verified shard. Removes temp folders of dead
    writers and shards that fail verification or are not in the plan (call under the key's lock)."""
    done: dict[Range, dict[str, Any]] = {}
    if not shards_dir.is_dir():
        return done
    wanted = {shard_name(r): r for r in plan}
    for d in shards_dir.iterdir():
        r = wanted.get(d.name)
        record: dict[str, Any] | None = None
        if r is not None:
            with contextlib.suppress(OSError, ValueError):
                record = json.loads((d / SHARD_RECORD).read_text())
        tokens = (int(offsets[r[0]]), int(offsets[r[1]])) if r is not None else (0, 0)
        if r is None or not isinstance(record, dict) or shard_problem(d, record, hooks, widths, dtype, tokens):
            shutil.rmtree(d, ignore_errors=True)
            continue
        done[r] = record
    return done


# ---- reading ---------------------------------------------------------------------------------
class ShardedArray:
    """A read-only ``[n_rows, width]`` array over consecutive row blocks (the shards' memmaps).

    Behaves like the memmap of a one-file entry for what the analyses do with a hook: ``shape``,
    ``dtype``, ``len``, indexing by int / slice / int or bool array (rows gathered into a new
    array), ``np.take`` along rows, ``np.asarray`` (one concatenated copy). A streaming fit uses
    :meth:`iter_chunks` instead and never holds more than one shard.
    """

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts:
            raise StoreError("a sharded hook needs at least one shard.")
        widths = {p.shape[1:] for p in parts}
        if len(widths) != 1 or len({p.dtype for p in parts}) != 1:
            raise StoreError("the shards of one hook differ in width or dtype; delete the entry and build it again.")
        self.parts = list(parts)
        self.offsets = np.concatenate([[0], np.cumsum([p.shape[0] for p in parts])]).astype(np.int64)
        self.shape: tuple[int, ...] = (int(self.offsets[-1]), *widths.pop())
        self.dtype = parts[0].dtype
        self.ndim = len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.parts)})"

    def iter_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, shard memmap)`` for every shard in row order (no copy)."""
        for start, part in zip(self.offsets[:-1], self.parts):
            yield int(start), part

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, dtype=dtype or self.dtype)
        for start, part in self.iter_chunks():
            out[start : start + part.shape[0]] = part
        return out

    def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
        return self.__array__(dtype)

    def take(self, indices: Any, axis: int | None = 0, out: np.ndarray | None = None, mode: str = "raise") -> np.ndarray:
        if axis not in (0, -self.ndim):
            return np.take(np.asarray(self), indices, axis=axis, out=out, mode=mode)
        res = self._rows(np.asarray(indices))
        if out is not None:
            out[...] = res
            return out
        return res

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        if idx.dtype == bool:
            if idx.shape != (self.shape[0],):
                raise IndexError(f"boolean index of shape {idx.shape} for {self.shape[0]} rows")
            idx = np.flatnonzero(idx)
        idx = np.asarray(idx, dtype=np.int64)
        flat = idx.ravel()
        flat = np.where(flat < 0, flat + self.shape[0], flat)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for {self.shape[0]} rows")
        which = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty((flat.size, *self.shape[1:]), dtype=self.dtype)
        for s in np.unique(which):
            m = which == s
            out[m] = self.parts[s][flat[m] - self.offsets[s]]
        return out.reshape(*idx.shape, *self.shape[1:])

    def __getitem__(self, key: Any) -> Any:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"row {key} out of range for {self.shape[0]} rows")
            s = int(np.searchsorted(self.offsets, i, side="right") - 1)
            row = self.parts[s][i - self.offsets[s]]
            return row[rest] if rest else row
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step == 1:
                s = int(np.searchsorted(self.offsets, start, side="right") - 1) if start < self.shape[0] else -1
                if s >= 0 and stop <= self.offsets[s + 1]:  # inside one shard: a view, no copy
                    part = self.parts[s][start - self.offsets[s] : stop - self.offsets[s]]
                    return part[(slice(None), *rest)] if rest else part
            rows = self._rows(np.arange(start, stop, step))
        else:
            rows = self._rows(np.asarray(key))
        return rows[(slice(None), *rest)] if rest else rows


def open_hook(path: Path, meta: Mapping[str, Any], hook: str, *, mmap: bool = True) -> np.ndarray | ShardedArray:
    """One hook of a sharded entry: the plain memmap when the entry has one shard.

    Raises:
        StoreError: manifest or a shard file missing/unreadable (delete and rebuild the entry).
    """
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        parts = [load_npy(path / SHARDS_DIR / s["dir"] / hook_filename(hook), mmap=mmap) for s in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        raise StoreError(f"cache entry {meta.get('key', path.name)}: a shard of {hook} is unreadable ({e}); "
                         f"delete the entry (`cache rm {meta.get('key', path.name)}`) and build it again.") from e
    return parts[0] if len(parts) == 1 else ShardedArray(parts)


def sharded_entry_problem(path: Path, meta: Mapping[str, Any], *, sampled: bool = True) -> str | None:
    """Every shard of a committed sharded entry against shards.json (``cache verify``)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        shards = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    covered = 0
    for s in shards:
        tokens = tuple(s["tokens"])
        if tokens[0] != covered:
            return f"the shards do not cover tokens {covered}–{tokens[0]}"
        problem = shard_problem(path / SHARDS_DIR / s["dir"], s, meta["hooks"], meta["widths"], meta["dtype"], tokens,
                                sampled=sampled)
        if problem:
            return f"shard {s['dir']} {problem}"
        covered = tokens[1]
    if covered != int(meta["n_tokens"]):
        return f"the shards hold {covered:,} tokens, meta.json says {meta['n_tokens']:,}"
    return None


TOKEN_TABLE = ("token_ids", "seq", "pos", "next_ids", "doc_index")


def compare_entries(store_a: ActivationStore, key_a: str, store_b: ActivationStore, key_b: str) -> list[str]:
    """What differs, bit for bit, between two entries: their hook lists or token counts, a
    token-table array, or a hook's values (whatever their layout: one file or shards).

    Returns:
        names of what differs (empty: the same entry, as a Ray build and a local one should be).
    """
    a, b = open_entry(store_a, key_a), open_entry(store_b, key_b)
    if a.hooks != b.hooks or a.n_tokens != b.n_tokens:
        return ["hooks/n_tokens"]
    out = [t for t in TOKEN_TABLE if not np.array_equal(getattr(a, t), getattr(b, t))]
    return out + [h for h in a.hooks if not np.array_equal(np.asarray(a.hook(h)), np.asarray(b.hook(h)))]


def check_fits_in_memory(nbytes: int, what: str, *, fraction: float = 0.8) -> None:
    """Refuse a computation that must hold ``nbytes`` in memory when the machine lacks it.

    Raises:
        ProbeError: more than ``fraction`` of the available memory would be needed.
    """
    import psutil

    avail = int(psutil.virtual_memory().available)
    if nbytes > fraction * avail:
        raise ProbeError(
            f"{what} needs the selected activations in memory: {nbytes / 1e9:.1f} GB, and this machine has "
            f"{avail / 1e9:.1f} GB available. Select fewer tokens or hooks (positions, max tokens), or use the ridge "
            "(regression) probe, which streams an entry shard by shard."
        )


# ---- the build ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RangeJob:
    """What an engine must compute: ``ranges`` of ``batch``'s rows, each written as a shard into
    ``shards_dir`` (by the worker, or by the engine's driver from returned arrays)."""

    batch: TokenBatch
    hooks: tuple[str, ...]
    ranges: tuple[Range, ...]
    shards_dir: Path
    offsets: np.ndarray
    dtype: str
    batch_size: int
    n_ranges_total: int


@dataclass(frozen=True)
class RangeDone:
    """One finished range, as reported by an engine."""

    range: Range
    forward_passes: int
    worker: str = ""


#: An engine: computes the job's ranges, writing each shard, and yields as each finishes.
RangeRunner = Callable[[RangeJob], Iterator[RangeDone]]


@dataclass(frozen=True)
class ShardedBuild:
    """Result of :func:`build_sharded`.

    Attributes:
        entry: the committed entry; built: whether this call committed it.
        ranges_total / ranges_computed / ranges_reused: of the plan, computed now, found finished.
        forward_passes: forward passes run by this call (summed over workers).
        seconds: wall time of this call.
    """

    entry: StoreEntry
    built: bool
    engine: str
    ranges_total: int = 0
    ranges_computed: int = 0
    ranges_reused: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    workers: dict[str, int] = field(default_factory=dict)


def local_runner(model: LoadedModel) -> RangeRunner:
    """The in-process engine: computes each range with this process's model, in order."""

    def run(job: RangeJob) -> Iterator[RangeDone]:
        for r in job.ranges:
            rec = compute_shard(model, job.batch, job.hooks, r, job.shards_dir, dtype=job.dtype, batch_size=job.batch_size)
            yield RangeDone(r, int(rec["forward_passes"]), f"local-{os.getpid()}")

    return run


def _load_plan(part: Path, batch: TokenBatch, hooks: list[str], dtype: str, batch_size: int,
               rows_per_shard: int | None) -> list[Range]:
    """The row ranges of this key's build: those of an unfinished earlier attempt when it planned
    the same rows, hooks and batches (its shards are then reusable), else a fresh plan (and a
    fresh partial folder)."""
    plan_file = part / "plan.json"
    now = {"batch_fingerprint": batch.fingerprint, "hooks": hooks, "dtype": dtype, "batch_size": batch_size}
    old: Any = None
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(plan_file.read_text())
    if not (isinstance(old, dict) and all(old.get(k) == v for k, v in now.items()) and isinstance(old.get("rows_per_shard"), int)):
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        rps = rows_per_shard or default_rows_per_shard(batch.lengths, batch_size)
        rps = -(-int(rps) // batch_size) * batch_size  # whole batches: the same batches as a local build
        old = {**now, "rows_per_shard": rps, "n_seq": int(batch.tokens.shape[0])}
        plan_file.write_text(json.dumps(old))
    return plan_ranges(int(batch.tokens.shape[0]), int(old["rows_per_shard"]))


def build_sharded(
    model: LoadedModel,
    dataset: Dataset,
    hooks: Sequence[str],
    *,
    store: ActivationStore,
    run: RangeRunner,
    engine: str,
    params: BuildParams | None = None,
    rows_per_shard: int | None = None,
    progress: Progress | None = None,
    engine_meta: Mapping[str, Any] | None = None,
) -> ShardedBuild:
    """Build (or resume) a sharded entry, ranges computed by ``run``; same key as :func:`build_cache`.

    Args:
        run: the engine (:func:`local_runner`, :func:`probing_core.store.ray_engine.ray_runner`).
        engine: its name, recorded in meta.json ("local-shards", "ray").
        params: max length, token cap, dtype, batch size, BOS: as for :func:`build_cache` (same key;
            default :class:`BuildParams`'s).
        rows_per_shard: rows (documents' chunks) per shard, rounded up to whole batches
            (default: about 131k tokens). A resumed build keeps the plan of the first attempt.
        engine_meta: extra facts recorded in meta.json (workers, address, …).
    Returns:
        ShardedBuild.
    Raises:
        StoreError: the engine failed — the finished shards are kept and the message says how
            to resume; or a shard failed verification before commit.
        HookError, InputError, DatasetError: bad arguments.
    """
    t0 = time.perf_counter()
    params = params or BuildParams()
    hooks = params.checked_hooks(model, hooks)
    dtype, batch_size = params.dtype, params.batch_size
    match = params.match(model, dataset)
    existing = store.find(match, hooks)
    if existing is not None:
        return ShardedBuild(existing, False, existing.meta.get("engine", "local"))
    key = params.key(model, dataset, hooks)
    with store.lock(key):
        found = store.inspect(key)
        if isinstance(found, StoreEntry):
            return ShardedBuild(store.require(key), False, found.meta.get("engine", "local"))
        if found is not None:  # a broken entry under this key: replaced
            store._remove_folder(key)
        if progress:
            progress(0.0, "tokenizing…")
        batch = tokenize_dataset(model, dataset, max_len=params.max_len, max_tokens=params.max_tokens,
                                 prepend_bos=params.prepend_bos)
        part = partial_dir(store, key)
        widths = {h: model.hook_width(h) for h in hooks}
        plan = _load_plan(part, batch, hooks, dtype, batch_size, rows_per_shard)
        offsets = token_offsets(batch.lengths)
        shards_dir = part / SHARDS_DIR
        done = finished_shards(shards_dir, plan, offsets, hooks, widths, dtype)
        missing = tuple(r for r in plan if r not in done)
        job = RangeJob(batch, tuple(hooks), missing, shards_dir, offsets, dtype, batch_size, len(plan))
        passes, workers, n_done = 0, {}, len(done)
        if progress:
            progress(n_done / len(plan), f"{engine}: {n_done}/{len(plan)} shards already finished")
        events = run(job)
        try:
            for ev in events:
                passes += ev.forward_passes
                workers[ev.worker] = workers.get(ev.worker, 0) + 1
                n_done += 1
                if progress:
                    progress(n_done / len(plan), f"{engine}: {n_done}/{len(plan)} shards, rows {ev.range[0]}–{ev.range[1]} done")
        except StoreError:
            raise
        except Exception as e:  # an engine failure: keep the finished shards, say how to resume
            kept = len(finished_shards(shards_dir, plan, offsets, hooks, widths, dtype))
            raise StoreError(
                f"the {engine} build stopped: {_first_line(e).rstrip('.')}. {kept} of {len(plan)} shards are finished and kept in "
                f"{part}; run the same build again to compute only the {len(plan) - kept} missing ones (nothing was "
                "committed)."
            ) from e
        finally:
            # An engine's own clean-up (Ray: its actor pool) runs now, not when the generator is
            # collected: a progress callback that raises (a Streamlit rerun) must not leave it running.
            close = getattr(events, "close", None)
            if close is not None:
                close()
        entry = _commit(store, key, model, dataset, batch, hooks, widths, dtype, match, part, plan, offsets, engine,
                        dict(engine_meta or {}), time.perf_counter() - t0)
    store.evict(keep={key})
    return ShardedBuild(entry, True, engine, len(plan), len(missing), len(plan) - len(missing), passes,
                        round(time.perf_counter() - t0, 3), workers)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:400]


def _commit(store: ActivationStore, key: str, model: LoadedModel, dataset: Dataset, batch: TokenBatch,
            hooks: list[str], widths: dict[str, int], dtype: str, match: dict[str, Any], part: Path,
            plan: list[Range], offsets: np.ndarray, engine: str, engine_meta: dict[str, Any], seconds: float) -> StoreEntry:
    """Verify every range's shard, write the manifest, token table and meta.json; rename into place."""
    shards_dir = part / SHARDS_DIR
    done = finished_shards(shards_dir, plan, offsets, hooks, widths, dtype)
    missing = [r for r in plan if r not in done]
    if missing:
        raise StoreError(f"{len(missing)} of {len(plan)} shards are missing after the run (rows {missing[0][0]}–"
                         f"{missing[0][1]} first); nothing was committed. Run the same build again to compute them.")
    records = [done[r] for r in plan]
    for name in ("meta.json", MANIFEST):
        with contextlib.suppress(FileNotFoundError):
            (part / name).unlink()
    write_token_table(model, batch, part)
    nonfinite = {h: sum(int(rec.get("nonfinite", {}).get(h, 0)) for rec in records) for h in hooks}
    manifest = {"layout": LAYOUT, "hooks": hooks, "widths": widths, "dtype": dtype, "n_tokens": batch.n_tokens,
                "shards": [{"dir": shard_name(r), **rec} for r, rec in zip(plan, records)]}
    (part / MANIFEST).write_text(json.dumps(manifest, sort_keys=True))
    n = batch.n_tokens
    meta: dict[str, Any] = {
        **match,
        "hooks": hooks, "widths": widths, "n_tokens": n, "n_seq": int(batch.tokens.shape[0]), "dtype": dtype,
        "layout": LAYOUT, "engine": engine, "n_shards": len(plan), "engine_info": engine_meta,
        "seconds": round(seconds, 3),
        "forward_seconds": round(sum(float(rec.get("forward_seconds", 0.0)) for rec in records), 3),
        "tokens_per_second": round(n / max(seconds, 1e-9), 1),
        "nonfinite": nonfinite, "has_bos": batch.has_bos,
        "rows_written": {h: sum(int(rec["files"][h]["shape"][0]) for rec in records) for h in hooks},
        "model_label": model.spec.label(), "model_spec": model.spec.to_json(),
        "dataset_label": dataset.spec.label(), "dataset_kind": dataset.spec.kind,
        "dataset_columns": sorted(dataset.columns), "batch_fingerprint": batch.fingerprint,
        "created": time.time(), "probing_core_version": __version__, "torch_version": torch.__version__,
        "key": key,
    }
    if dataset.columns:
        cols = {k: [None if v is None else str(v) for v in vals] for k, vals in dataset.columns.items()}
        (part / "columns.json").write_text(json.dumps(cols))
    (part / "plan.json").unlink(missing_ok=True)
    seal_entry(part, meta)  # the token table, JSON files and rows_written (hook files: the manifest above)
    meta["bytes"] = int(meta.get("bytes", 0)) + sum(int(f["bytes"]) for rec in records for f in rec["files"].values())
    (part / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    final = store.path_of(key)
    os.replace(part, final)
    return store.require(key)
