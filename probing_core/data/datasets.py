"""Datasets: the model vocabulary, the offline pydoc corpus, uploaded files, Hugging Face
datasets (online only) and plain text lists; tokenization into fixed-length chunks.

A :class:`Dataset` is a list of documents plus optional per-document label columns, with a
stable fingerprint (a hash of its content, not of its name), so the store key changes exactly
when the text changes.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np

from probing_core.errors import DatasetError, InputError, OfflineError

DatasetKind = Literal["vocab", "pydoc", "upload", "hf", "texts", "statements"]

#: Largest upload the app accepts (the Streamlit server limit in .streamlit/config.toml matches).
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_LABEL_CLASSES_SHOWN = 20
#: Least time between two progress reports of a long step (tokenizing, extraction).
PROGRESS_INTERVAL_S = 0.25


@dataclass(frozen=True)
class DatasetSpec:
    """What to read.

    Attributes:
        kind: vocab | pydoc | upload | hf | texts.
        name: file name (upload), HF dataset name (hf, e.g. ``wikitext:wikitext-2-raw-v1``), free
            label (texts).
        text_column: column holding the text in CSV/JSONL uploads.
        max_docs: keep at most this many documents (None = all).
        split: HF split.
    """

    kind: DatasetKind
    name: str = ""
    text_column: str = "text"
    max_docs: int | None = None
    split: str = "train"

    def label(self) -> str:
        return {
            "vocab": "model vocabulary (every token once)",
            "pydoc": "Python documentation topics (offline corpus)",
            "statements": f"labelled statements: {self.name or 'cities'} (Geometry of Truth)",
        }.get(self.kind, f"{self.kind}: {self.name}")


@dataclass(frozen=True)
class Dataset:
    """Documents plus per-document label columns.

    Attributes:
        spec: how it was made.
        documents: the texts (empty for the vocabulary dataset).
        columns: label columns, each a list aligned with ``documents``.
        fingerprint: 16 hex chars over the content.
    """

    spec: DatasetSpec
    documents: tuple[str, ...]
    columns: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def n_docs(self) -> int:
        return len(self.documents)

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents)


def _fingerprint(kind: str, documents: Sequence[str], columns: dict[str, Sequence[Any]]) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(kind.encode())
    for d in documents:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    for name in sorted(columns):
        h.update(name.encode())
        h.update(json.dumps([str(v) for v in columns[name]]).encode())
    return h.hexdigest()


def make_dataset(spec: DatasetSpec, documents: Sequence[str], columns: dict[str, Sequence[Any]] | None = None) -> Dataset:
    """Build a :class:`Dataset` from texts (used by uploads, templates and mined contexts)."""
    columns = {k: tuple(v) for k, v in (columns or {}).items()}
    docs = tuple(documents)
    if spec.max_docs is not None:
        docs = docs[: spec.max_docs]
        columns = {k: v[: spec.max_docs] for k, v in columns.items()}
    for k, v in columns.items():
        if len(v) != len(docs):
            raise DatasetError(f"label column {k!r} has {len(v)} values for {len(docs)} documents.")
    return Dataset(spec=spec, documents=docs, columns=columns, fingerprint=_fingerprint(spec.kind, docs, columns))


def pydoc_documents() -> list[str]:
    """The standard library's pydoc topics (ships with every CPython), one document per topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - stripped Python builds
        raise DatasetError("this Python has no pydoc_data module; upload a text file instead.") from e
    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def _decode_upload(data: bytes, filename: str) -> str:
    if len(data) == 0:
        raise DatasetError(f"{filename} is empty; upload a file with some text in it.")
    if len(data) > MAX_UPLOAD_BYTES:
        raise DatasetError(
            f"{filename} is {len(data) / 1e6:.1f} MB; the limit is {MAX_UPLOAD_BYTES / 1e6:.0f} MB. Upload a smaller sample."
        )
    if b"\x00" in data[:8192]:
        raise DatasetError(f"{filename} looks like a binary file (it contains NUL bytes); upload UTF-8 text, CSV or JSONL.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{filename} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); save it as UTF-8 and upload again."
        ) from e


def parse_upload(data: bytes, filename: str, *, text_column: str = "text", max_docs: int | None = None) -> Dataset:
    """Read an uploaded .txt/.csv/.jsonl into a dataset.

    .txt: one document per paragraph (blank-line separated), or per line if there are no blank lines.
    .csv/.jsonl: ``text_column`` holds the text; every other column becomes a label column.

    Raises:
        DatasetError: empty, binary, non-UTF-8, too large, missing column, unknown extension.
    """
    text = _decode_upload(data, filename)
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    columns: dict[str, list[Any]] = {}
    if ext == "txt":
        parts = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.splitlines()
        docs = [p.strip() for p in parts if p.strip()]
    elif ext in ("csv", "jsonl"):
        rows: list[dict[str, Any]]
        if ext == "csv":
            try:
                rows = list(csv.DictReader(io.StringIO(text)))
            except csv.Error as e:
                raise DatasetError(f"{filename}: CSV could not be parsed: {e}") from e
        else:
            rows = []
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{filename} line {i} is not JSON: {e.msg}.") from e
                if not isinstance(obj, dict):
                    raise DatasetError(f"{filename} line {i} is not a JSON object.")
                rows.append(obj)
        if not rows:
            raise DatasetError(f"{filename} has no rows.")
        if text_column not in rows[0]:
            raise DatasetError(
                f"{filename} has no column {text_column!r}; its columns are {list(rows[0])}. Pick the text column."
            )
        docs, kept = [], []
        for r in rows:
            t = str(r.get(text_column) or "").strip()
            if t:
                docs.append(t)
                kept.append(r)
        for col in rows[0]:
            if col != text_column:
                columns[col] = [r.get(col) for r in kept]
    else:
        raise DatasetError(f"{filename}: unsupported file type {ext!r}; upload .txt, .csv or .jsonl.")
    if not docs:
        raise DatasetError(f"{filename} contains no text.")
    spec = DatasetSpec("upload", filename, text_column=text_column, max_docs=max_docs)
    return make_dataset(spec, docs, columns)


def load_dataset(spec: DatasetSpec, *, upload: bytes | None = None) -> Dataset:
    """Load a dataset by spec.

    Raises:
        DatasetError: bad upload, unknown kind. OfflineError: HF dataset while offline.
    """
    if spec.kind == "vocab":
        return Dataset(spec=spec, documents=(), fingerprint=_fingerprint("vocab", [], {}))
    if spec.kind == "pydoc":
        return make_dataset(spec, pydoc_documents())
    if spec.kind == "upload":
        if upload is None:
            raise DatasetError("no file was uploaded; choose a .txt, .csv or .jsonl file.")
        return parse_upload(upload, spec.name, text_column=spec.text_column, max_docs=spec.max_docs)
    if spec.kind == "hf":
        return _load_hf_dataset(spec)
    if spec.kind == "statements":  # imported here: statements.py builds on this module
        from probing_core.data.statements import load_statements

        return load_statements(spec)
    raise DatasetError(f"unknown dataset kind {spec.kind!r}; use vocab, pydoc, statements, upload or hf.")


def _load_hf_dataset(spec: DatasetSpec) -> Dataset:
    try:
        import datasets as hf_datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise DatasetError(
            "Hugging Face datasets need the `datasets` package (pip install datasets) and the internet; "
            "offline, use the Python documentation corpus or upload a file."
        ) from e
    name, _, config = spec.name.partition(":")
    try:
        ds = hf_datasets.load_dataset(name, config or None, split=spec.split, streaming=True)
        docs = []
        for row in ds:
            t = str(row.get(spec.text_column) or "").strip()
            if t:
                docs.append(t)
            if len(docs) >= (spec.max_docs or 2000):
                break
    except Exception as e:  # noqa: BLE001 — the datasets library raises many types
        raise OfflineError(
            f"could not fetch dataset {spec.name!r} ({type(e).__name__}). It needs the internet; offline, "
            "use the Python documentation corpus or upload a file."
        ) from e
    return make_dataset(spec, docs)


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenBatch:
    """Token ids in fixed-length chunks ready for batched forward passes.

    Attributes:
        tokens: [n_seq, max_len] int64, padded with ``pad_id`` after ``lengths``.
        lengths: [n_seq] valid tokens per row.
        doc_index: [n_seq] which document each row came from.
        has_bos: whether position 0 of every row is a BOS token.
        fingerprint: hash of the ids (part of the store key).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    doc_index: np.ndarray
    has_bos: bool
    pad_id: int = 0

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        h.update(np.ascontiguousarray(self.tokens).tobytes())
        h.update(np.ascontiguousarray(self.lengths).tobytes())
        h.update(np.ascontiguousarray(self.doc_index).tobytes())
        return h.hexdigest()


def tokenize_dataset(
    model: Any,
    dataset: Dataset,
    *,
    max_len: int = 128,
    max_tokens: int | None = None,
    prepend_bos: bool = True,
    progress: Callable[[float, str], None] | None = None,
) -> TokenBatch:
    """Tokenize documents into rows of at most ``max_len`` tokens (BOS first when the model has one).

    The vocabulary dataset gives one row per token id, each of length 1 and without BOS, so that
    ``hook_embed`` rows are exactly ``W_E``.

    Args:
        model: a :class:`probing_core.models.LoadedModel`.
        max_tokens: stop after this many tokens in total (None = all).
        progress: ``(fraction, message)``, called at the start, at least every
            :data:`PROGRESS_INTERVAL_S` between documents, and once at the end (fraction 1).

    Raises:
        InputError: max_len or max_tokens ≤ 0, or max_len above the model's context.
        DatasetError: the dataset tokenizes to zero tokens.
    """
    if max_len <= 0:
        raise InputError(f"max length must be positive, got {max_len}.")
    if max_tokens is not None and max_tokens <= 0:
        raise InputError(f"max tokens must be positive, got {max_tokens}.")
    if max_len > model.n_ctx:
        raise InputError(f"max length {max_len} exceeds this model's context of {model.n_ctx} tokens.")
    if dataset.spec.kind == "vocab":
        n = model.d_vocab if max_tokens is None else min(model.d_vocab, max_tokens)
        ids = np.arange(n, dtype=np.int64)[:, None]
        if progress:
            progress(1.0, f"{n:,} vocabulary tokens, one row each")
        return TokenBatch(tokens=ids, lengths=np.ones(n, np.int64), doc_index=np.zeros(n, np.int64), has_bos=False)

    bos = model.tokenizer.bos_id if prepend_bos else None
    body = max_len - (1 if bos is not None else 0)
    if body <= 0:
        raise InputError("max length must be at least 2 when a BOS token is prepended.")
    rows: list[list[int]] = []
    doc_idx: list[int] = []
    total = 0
    n_docs = max(1, dataset.n_docs)
    last_report = 0.0
    for d, text in enumerate(dataset.documents):
        if progress and (d == 0 or time.perf_counter() - last_report >= PROGRESS_INTERVAL_S):
            last_report = time.perf_counter()  # by time, not every k documents: documents differ 1000× in length
            done = max(d / n_docs, total / max_tokens if max_tokens else 0.0)
            progress(min(done, 1.0), f"tokenizing document {d + 1:,}/{n_docs:,}, {total:,} tokens so far")
        ids = model.tokenizer.encode(text)
        for start in range(0, len(ids), body):
            chunk = ids[start : start + body]
            if bos is not None:
                chunk = [int(bos)] + chunk
            if max_tokens is not None and total + len(chunk) > max_tokens:
                chunk = chunk[: max_tokens - total]
            if len(chunk) <= (1 if bos is not None else 0):
                break
            rows.append(chunk)
            doc_idx.append(d)
            total += len(chunk)
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    if not rows:
        raise DatasetError(f"{dataset.spec.label()} tokenizes to zero tokens; pick another dataset or a longer text.")
    if progress:
        progress(1.0, f"tokenized {total:,} tokens in {len(rows):,} rows")
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return TokenBatch(
        tokens=tokens,
        lengths=np.array([len(r) for r in rows], np.int64),
        doc_index=np.array(doc_idx, np.int64),
        has_bos=bos is not None,
    )


def dataset_catalog() -> list[DatasetSpec]:
    """Datasets offered without any upload (offline first)."""
    return [DatasetSpec("pydoc"), DatasetSpec("vocab"), DatasetSpec("statements", "cities"), DatasetSpec("hf", "wikitext:wikitext-2-raw-v1"), DatasetSpec("hf", "HuggingFaceFW/fineweb:sample-10BT")]
