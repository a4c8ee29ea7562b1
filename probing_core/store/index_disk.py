"""The store index's diskcache ``Disk``: JSON values inside the row, and nothing ever unpickled.

diskcache's ``JSONDisk.fetch`` first calls ``Disk.fetch``, which unpickles any row whose ``mode``
is 4 (pickle): anyone who can write ``index/cache.db`` could run code on a plain index read
(CVE-2025-69872). :class:`JSONOnlyDisk` never calls pickle.
"""
from __future__ import annotations

import json
import os
import sqlite3
import zlib
from typing import Any

import diskcache

from probing_core.errors import StoreError


class StoreIndexError(StoreError):
    """A row of the index is not one this store wrote (e.g. a pickled value): it is never read."""


class JSONOnlyDisk(diskcache.Disk):
    """A diskcache ``Disk`` for JSON values kept inside the database row, and nothing else.

    diskcache's ``JSONDisk.fetch`` first calls ``Disk.fetch``, which unpickles any row whose
    mode is 4 (pickle); this class never calls ``pickle`` at all. ``store`` writes every value as
    zlib-compressed JSON in the row (mode raw, no value files); ``fetch`` refuses every other
    mode, a row that names a file, and undecodable bytes; ``get`` refuses non-raw (pickled) keys;
    ``remove`` deletes nothing, because this disk never writes files (a file name in a row can
    only be forged).
    """

    def __init__(self, directory: str, compress_level: int = 1, **kwargs: Any) -> None:
        super().__init__(directory)
        self.compress_level = compress_level
        self.db_file = os.path.join(directory, "cache.db")

    def _refuse(self, what: str) -> StoreIndexError:
        return StoreIndexError(
            f"the store index {self.db_file} holds {what}, which this store never writes; it was not read "
            "(someone with write access to the cache folder may have tampered with it). The index only "
            "orders entries for eviction: it is rebuilt from the entry folders."
        )

    def put(self, key: Any) -> tuple[Any, bool]:
        data = zlib.compress(json.dumps(key).encode("utf-8"), self.compress_level)
        return sqlite3.Binary(data), True

    def get(self, key: Any, raw: bool) -> Any:
        if not raw or not isinstance(key, (bytes, memoryview)):
            raise self._refuse("a key that is not JSON (a pickled key)")
        return self._decode(bytes(key))

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> tuple[int, int, None, Any]:
        if read:
            raise StoreError("the store index holds JSON values only, not files.")
        try:
            data = zlib.compress(json.dumps(value).encode("utf-8"), self.compress_level)
        except (TypeError, ValueError) as e:
            raise StoreError(f"the store index holds JSON values only ({e}).") from e
        return 0, diskcache.core.MODE_RAW, None, sqlite3.Binary(data)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode != diskcache.core.MODE_RAW:
            kind = {diskcache.core.MODE_PICKLE: "a pickled value (mode 4)"}.get(mode, f"a value of mode {mode}")
            raise self._refuse(kind)
        if filename is not None or read or not isinstance(value, (bytes, memoryview)):
            raise self._refuse("a value that is not JSON bytes")
        return self._decode(bytes(value))

    def _decode(self, data: bytes) -> Any:
        try:
            return json.loads(zlib.decompress(data).decode("utf-8"))
        except (zlib.error, UnicodeDecodeError, ValueError) as e:
            raise self._refuse(f"undecodable bytes ({e})") from e

    def filename(self, key: Any = diskcache.core.UNKNOWN, value: Any = diskcache.core.UNKNOWN) -> tuple[str, str]:
        raise StoreError("the store index keeps values in its rows, never in files.")

    def remove(self, file_path: str) -> None:
        return None  # never writes files: a file name in a row is forged, so nothing is deleted
