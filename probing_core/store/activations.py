"""Batched activation extraction into the store, and reading entries back.

``build_cache`` is what the Home page's button and ``python -m probing_core cache build`` call.
``CachedActivations`` is what every probe page reads: one hook at a time, memory-mapped, plus
the token table (ids, row, position, next id) needed to make labels and position masks.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probing_core import STORE_FORMAT_VERSION, __version__
from probing_core.data.datasets import (
    PROGRESS_INTERVAL_S,
    Dataset,
    TokenBatch,
    tokenize_dataset,
)
from probing_core.errors import HookError, InputError, StoreError
from probing_core.models import LoadedModel
from probing_core.store.entries import ActivationStore, StoreEntry, hook_filename

#: progress(fraction in [0, 1], message)
Progress = Callable[[float, str], None]

STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


class BuildProgress:
    """One progress callback for a whole build, fed by its steps.

    Tokenizing fills the first :attr:`TOKENIZE_SHARE` of the bar, the forward passes the rest.
    Reports go out at most every ``interval`` seconds (always the first and the last), never move
    backwards, and carry the time left measured from the extraction's rate so far.
    """

    TOKENIZE_SHARE = 0.05

    def __init__(self, progress: Progress, interval: float = PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.progress = progress
        self.interval = interval
        self.clock = clock
        self.shown = 0.0
        self.last = float("-inf")
        self.extract_t0: float | None = None

    def _emit(self, frac: float, msg: str, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        self.shown = max(self.shown, min(1.0, frac))
        self.progress(self.shown, msg)

    def tokenizing(self, frac: float, msg: str) -> None:
        self._emit(self.TOKENIZE_SHARE * frac, msg, force=frac >= 1.0)

    def extracting(self, frac: float, msg: str) -> None:
        now = self.clock()
        if self.extract_t0 is None:
            self.extract_t0 = now
        spent = now - self.extract_t0
        if 0.0 < frac < 1.0 and spent >= 1.0:
            msg += f" · about {format_seconds(spent * (1.0 - frac) / frac)} left"
        self._emit(self.TOKENIZE_SHARE + (1.0 - self.TOKENIZE_SHARE) * frac, msg, force=frac >= 1.0)


def format_seconds(seconds: float) -> str:
    """``42`` → "42 s", ``130`` → "2 min 10 s", ``4000`` → "1 h 7 min"."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s < 600 else f"{round(s / 60)} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def cache_key(
    model: LoadedModel,
    dataset: Dataset,
    hooks: Sequence[str],
    *,
    max_len: int,
    max_tokens: int | None,
    dtype: str,
    prepend_bos: bool = True,
) -> str:
    """Hash of everything that changes the stored bytes (model identity incl. weights,
    dataset content, hooks, max length, token cap, storage dtype, format version)."""
    payload = {
        "model": model.key,
        "dataset": dataset.fingerprint,
        "hooks": sorted(hooks),
        "max_len": int(max_len),
        "max_tokens": None if max_tokens is None else int(max_tokens),
        "dtype": dtype,
        "bos": bool(prepend_bos),
        "format": STORE_FORMAT_VERSION,
    }
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class BuildParams:
    """The settings of a cache build besides model, dataset and hooks (every one is in the key).

    One object for every engine (:func:`build_cache`, the sharded build, the Ray engine), so
    they check the same things and agree on the key.
    """

    max_len: int = 128
    max_tokens: int | None = 20_000
    dtype: str = "float32"
    batch_size: int = 16
    prepend_bos: bool = True

    def checked_hooks(self, model: LoadedModel, hooks: Sequence[str]) -> list[str]:
        """The hooks, de-duplicated, after checking them and every setting against ``model``.

        Raises:
            HookError: no hook, an unknown one, or one that is not per-token.
            InputError: a dtype or count out of range.
        """
        hooks = list(dict.fromkeys(hooks))
        if not hooks:
            raise HookError("pick at least one hook to cache.")
        model.check_hooks(hooks)
        per_token = set(model.all_hook_names())
        if any(h not in per_token for h in hooks):
            raise HookError(f"hook(s) {[h for h in hooks if h not in per_token]} are not per-token activations the store can "
                            "hold (attention patterns are [head, query, key]): see them on the Attention page or with `attention`.")
        if self.dtype not in STORE_DTYPES:
            raise InputError(f"storage dtype {self.dtype!r} is not supported; choose float32 or float16.")
        check_count("max tokens", self.max_tokens, 1, 10**12, allow_none=True)
        check_count(f"tokens per row (max_len; the model's context is {model.n_ctx})", self.max_len, 1, model.n_ctx)
        check_count("batch size", self.batch_size, 1, 1_000_000)
        return hooks

    def match(self, model: LoadedModel, dataset: Dataset) -> dict[str, Any]:
        """The meta.json fields an entry of these settings has (what :meth:`ActivationStore.find` compares)."""
        return {
            "model_key": model.key,
            "dataset_fingerprint": dataset.fingerprint,
            "max_len": int(self.max_len),
            "max_tokens": None if self.max_tokens is None else int(self.max_tokens),
            "dtype": self.dtype,
            "prepend_bos": bool(self.prepend_bos),
            "format_version": STORE_FORMAT_VERSION,
        }

    def key(self, model: LoadedModel, dataset: Dataset, hooks: Sequence[str]) -> str:
        """The store key (:func:`cache_key`)."""
        return cache_key(model, dataset, hooks, max_len=self.max_len, max_tokens=self.max_tokens, dtype=self.dtype,
                         prepend_bos=self.prepend_bos)


def write_token_table(model: LoadedModel, batch: TokenBatch, folder: Path) -> None:
    """Write the token table (token_ids, seq, pos, next_ids, doc_index: [n_tokens] int32) and
    vocab.json of ``batch`` into ``folder`` (no forward pass; sharded builds write it once)."""
    n_tokens = batch.n_tokens
    valid = np.arange(batch.tokens.shape[1])[None, :] < batch.lengths[:, None]
    seq_idx, pos_idx = np.nonzero(valid)
    token_ids = batch.tokens[seq_idx, pos_idx]
    next_ids = np.full(n_tokens, -1, np.int64)
    has_next = pos_idx + 1 < batch.lengths[seq_idx]
    next_ids[has_next] = batch.tokens[seq_idx[has_next], pos_idx[has_next] + 1]
    for name, arr in (("token_ids", token_ids), ("seq", seq_idx), ("pos", pos_idx), ("next_ids", next_ids), ("doc_index", batch.doc_index)):
        np.save(folder / f"{name}.npy", arr.astype(np.int32), allow_pickle=False)
    uniq = np.unique(np.concatenate([token_ids, next_ids[next_ids >= 0]])).astype(int).tolist()
    vocab = {
        "ids": uniq,
        "raw": model.tokenizer.token_strings(uniq),
        "text": model.tokenizer.decode_tokens(uniq),
        "space_marker": model.tokenizer.space_marker,
    }
    (folder / "vocab.json").write_text(json.dumps(vocab))


def extract_to_folder(
    model: LoadedModel,
    batch: TokenBatch,
    hooks: Sequence[str],
    folder: Path,
    *,
    dtype: str = "float32",
    batch_size: int = 16,
    progress: Progress | None = None,
    within_pass: Progress | None = None,
) -> dict[str, Any]:
    """Run ``batch`` through the model and write each hook's activations of valid tokens.

    Files are written with ``open_memmap`` so memory stays at one batch of activations. The model
    runs only as deep as the deepest hook (:meth:`LoadedModel.stop_layer`).

    Args:
        progress: ``(fraction, message)`` once after every batch (exactly once: the sharded
            engine counts forward passes by it).
        within_pass: ``(fraction, message)`` as each block of a pass finishes, for a bar that
            moves during long passes.

    Returns:
        Metadata (hooks, widths, n_tokens, seconds, tokens/s, non-finite counts).
    """
    if dtype not in STORE_DTYPES:
        raise InputError(f"storage dtype {dtype!r} is not supported; choose float32 or float16.")
    check_count("batch size", batch_size, 1, 1_000_000)
    model.check_hooks(hooks)
    np_dtype = STORE_DTYPES[dtype]
    n_tokens = batch.n_tokens
    n_seq = batch.tokens.shape[0]
    if within_pass is not None:  # seconds for a whole vocabulary's strings: say so before the first pass
        within_pass(0.0, f"writing the token table ({n_tokens:,} tokens)…")
    write_token_table(model, batch, folder)

    widths = {h: model.hook_width(h) for h in hooks}
    if within_pass is not None:
        within_pass(0.0, f"reserving {n_tokens * sum(widths.values()) * np.dtype(np_dtype).itemsize / 1e6:,.0f} MB on disk…")
    outs = {
        h: np.lib.format.open_memmap(folder / hook_filename(h), mode="w+", dtype=np_dtype, shape=(n_tokens, widths[h]))
        for h in hooks
    }
    for h in hooks:
        _reserve_disk(folder / hook_filename(h))
    nonfinite = {h: 0 for h in hooks}
    rows_written = {h: 0 for h in hooks}  # the proof a forward pass filled every row (checked before commit)
    t0 = time.perf_counter()
    forward_s = 0.0
    row = 0
    for start in range(0, n_seq, batch_size):
        stop = min(n_seq, start + batch_size)
        lengths = batch.lengths[start:stop]
        width = int(lengths.max())
        toks = torch.from_numpy(batch.tokens[start:stop, :width])
        tf = time.perf_counter()
        on_block = None
        if within_pass is not None:
            n_run = model.stop_layer(hooks) or model.n_layers

            def on_block(i: int, start: int = start, stop: int = stop, row: int = row, n_run: int = n_run) -> None:
                within_pass((start + (stop - start) * (i + 1) / n_run) / n_seq,
                            f"extracting: layer {i + 1}/{n_run} of rows {start + 1}–{stop}/{n_seq}, {row:,}/{n_tokens:,} tokens done")
        _, acts = model.run_with_cache(toks, hooks, on_block=on_block)
        forward_s += time.perf_counter() - tf
        mask = torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]
        n_valid = int(mask.sum())
        mask_dev = mask.to(model.device)
        for h in hooks:
            a = acts[h][mask_dev].to("cpu", torch.float32).numpy()
            if np_dtype is np.float16:
                a = a.astype(np.float16)
            nonfinite[h] += int(np.size(a) - np.isfinite(a).sum())
            outs[h][row : row + n_valid] = a
            rows_written[h] += len(a)
        row += n_valid
        if progress:
            progress(stop / n_seq, f"extracting: {stop}/{n_seq} rows, {row:,}/{n_tokens:,} tokens")
    for arr in outs.values():
        arr.flush()
    del outs
    seconds = time.perf_counter() - t0
    return {
        "hooks": list(hooks),
        "widths": widths,
        "n_tokens": n_tokens,
        "n_seq": n_seq,
        "seconds": round(seconds, 3),
        "forward_seconds": round(forward_s, 3),
        "tokens_per_second": round(n_tokens / max(seconds, 1e-9), 1),
        "nonfinite": nonfinite,
        "rows_written": rows_written,
        "has_bos": batch.has_bos,
    }


def _reserve_disk(path: Path) -> None:
    """Allocate a memmap file's blocks now, so a full disk raises ENOSPC here instead of a
    SIGBUS (process crash) on a later write into a sparse mapping."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))


def check_count(name: str, value: Any, minimum: int, maximum: int, *, allow_none: bool = False) -> None:
    """Raise InputError unless ``value`` is an int in [minimum, maximum] (or None when allowed).

    Every numeric build parameter is checked here, at the API boundary: a batch size of -4 once
    made ``range`` empty and stored an all-zero entry with no forward pass.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be a whole number, got {value!r}.")
    if value < minimum:
        raise InputError(f"{name} must be {'positive' if minimum == 1 else f'at least {minimum:,}'}, got {value:,}.")
    if value > maximum:
        raise InputError(f"{name} must be at most {maximum:,}, got {value:,}.")


def build_cache(
    model: LoadedModel,
    dataset: Dataset,
    hooks: Sequence[str],
    *,
    store: ActivationStore,
    max_len: int = 128,
    max_tokens: int | None = 20_000,
    dtype: str = "float32",
    batch_size: int = 16,
    prepend_bos: bool = True,
    progress: Progress | None = None,
) -> tuple[StoreEntry, bool]:
    """Extract ``hooks`` for ``dataset`` into the store unless an entry already holds them.

    An existing entry for the same model, dataset and settings that holds a superset of the hooks
    is reused. Two callers asking for the same key at once cause one extraction.

    Args:
        hooks: concrete hook names (see :meth:`LoadedModel.hook_names`).
        max_tokens: cap on the number of tokens (None = the whole dataset).
    Returns:
        (entry, built_now).
    Raises:
        HookError, InputError, DatasetError, StoreError with messages saying the fix.
    """
    params = BuildParams(max_len, max_tokens, dtype, batch_size, prepend_bos)
    hooks = params.checked_hooks(model, hooks)
    match = params.match(model, dataset)
    existing = store.find(match, hooks)
    if existing is not None:
        return existing, False
    key = params.key(model, dataset, hooks)

    def build(folder: Path) -> dict[str, Any]:
        report = BuildProgress(progress) if progress else None
        batch = tokenize_dataset(model, dataset, max_len=max_len, max_tokens=max_tokens, prepend_bos=prepend_bos,
                                 progress=report.tokenizing if report else None)
        meta = extract_to_folder(model, batch, hooks, folder, dtype=dtype, batch_size=batch_size,
                                 progress=report.extracting if report else None,
                                 within_pass=report.extracting if report else None)
        meta.update(match)
        meta.update(
            {
                "model_label": model.spec.label(),
                "model_spec": model.spec.to_json(),
                "dataset_label": dataset.spec.label(),
                "dataset_kind": dataset.spec.kind,
                "dataset_columns": sorted(dataset.columns),
                "batch_fingerprint": batch.fingerprint,
                "created": time.time(),
                "probing_core_version": __version__,
                "torch_version": torch.__version__,
            }
        )
        if dataset.columns:
            cols = {k: [None if v is None else str(v) for v in vals] for k, vals in dataset.columns.items()}
            (folder / "columns.json").write_text(json.dumps(cols))
        return meta

    return store.get_or_build(key, build)


@dataclass
class CachedActivations:
    """Read access to one store entry (what the probe pages use).

    Attributes:
        store, entry: where it lives.
        token_ids, seq, pos, next_ids: [n_tokens] int32 token table.
    """

    store: ActivationStore
    entry: StoreEntry
    token_ids: np.ndarray = field(init=False)
    seq: np.ndarray = field(init=False)
    pos: np.ndarray = field(init=False)
    next_ids: np.ndarray = field(init=False)
    doc_index: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        key = self.entry.key
        self.token_ids = self.store.read_array(key, "token_ids")
        self.seq = self.store.read_array(key, "seq")
        self.pos = self.store.read_array(key, "pos")
        self.next_ids = self.store.read_array(key, "next_ids")
        self.doc_index = self.store.read_array(key, "doc_index")
        vocab = self.store.read_json(key, "vocab")
        self._raw = dict(zip(vocab["ids"], vocab["raw"]))
        self._text = dict(zip(vocab["ids"], vocab["text"]))
        self.space_marker: str = vocab["space_marker"]

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def hooks(self) -> list[str]:
        return self.entry.hooks

    @property
    def n_tokens(self) -> int:
        return self.entry.n_tokens

    @property
    def meta(self) -> dict[str, Any]:
        return self.entry.meta

    def hook(self, name: str) -> np.ndarray:
        """[n_tokens, width] memmap of one hook."""
        return self.store.read(self.key, name)

    def stack(self, hooks: Sequence[str], rows: np.ndarray | None = None) -> np.ndarray:
        """[n_hooks, n_rows, width] float32 copy of the selected rows of several hooks.

        Raises:
            StoreError: hooks of different widths (e.g. resid and mlp_post) together.
        """
        widths = {self.meta["widths"][h] for h in hooks}
        if len(widths) > 1:
            raise StoreError(f"hooks {list(hooks)} have different widths {sorted(widths)}; select hooks of one kind.")
        n = self.n_tokens if rows is None else len(rows)
        out = np.empty((len(hooks), n, widths.pop()), np.float32)
        for i, h in enumerate(hooks):
            a = self.hook(h)
            out[i] = a if rows is None else a[rows]
        return out

    def raw_strings(self, ids: np.ndarray | None = None) -> list[str]:
        """Raw vocabulary strings (with the space marker) of ``ids`` (default: every token)."""
        ids = self.token_ids if ids is None else ids
        return [self._raw.get(int(i), "") for i in ids]

    def text_strings(self, ids: np.ndarray | None = None) -> list[str]:
        """Decoded text of ``ids`` (default: every token)."""
        ids = self.token_ids if ids is None else ids
        return [self._text.get(int(i), "") for i in ids]

    def columns(self) -> dict[str, list[str | None]]:
        """Per-document label columns of an uploaded dataset (empty if none)."""
        path = self.entry.path / "columns.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def bos_mask(self) -> np.ndarray:
        """[n_tokens] bool: True at BOS positions (position 0 of every row when BOS was prepended)."""
        if not self.meta.get("has_bos"):
            return np.zeros(self.n_tokens, bool)
        return self.pos == 0


def open_entry(store: ActivationStore, key: str) -> CachedActivations:
    """Open a store entry for reading. Raises StoreError if it does not exist."""
    return CachedActivations(store, store.open_checked(key))


def export_entry(store: ActivationStore, key: str, hook: str, out: Path) -> list[Path]:
    """Write one hook as a plain ``.npy`` plus the token table as ``<out>.tokens.tsv``.

    Returns:
        The written paths.
    """
    out = Path(out)
    if out.is_dir() or str(out).endswith(os.sep):
        raise InputError(f"{out} is a folder; give a file name such as {out / 'acts.npy'}.")
    if out.suffix != ".npy":
        out = out.with_suffix(".npy")
    if not out.parent.is_dir():
        raise InputError(f"folder {out.parent} does not exist; create it first or pick another output path.")
    acts = open_entry(store, key)
    arr = acts.hook(hook)
    tsv = out.with_suffix(".tokens.tsv")
    tmps = [out.with_name(out.name + f".tmp-{os.getpid()}.npy"), tsv.with_name(tsv.name + f".tmp-{os.getpid()}")]
    try:
        np.save(tmps[0], np.asarray(arr), allow_pickle=False)
        with open(tmps[1], "w", encoding="utf-8") as f:
            f.write("row\tseq\tpos\ttoken_id\ttoken\n")
            for i, (s, p, t, txt) in enumerate(zip(acts.seq, acts.pos, acts.token_ids, acts.text_strings())):
                f.write(f"{i}\t{s}\t{p}\t{t}\t{json.dumps(txt, ensure_ascii=False)}\n")
        os.replace(tmps[0], out)
        os.replace(tmps[1], tsv)
    except OSError as e:
        for t in tmps:
            try:
                t.unlink(missing_ok=True)
            except OSError:
                pass
        raise InputError(f"cannot write {out} ({e.strerror or e}); pick a writable folder with free space.") from e
    return [out, tsv]
