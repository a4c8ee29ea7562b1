"""The activation store: arrays as ``.npy`` files, a JSON-only diskcache index, per-key locks.

Layout under ``root``::

    entries/<key>/meta.json            everything about the entry (JSON), incl. per-file checksums
    entries/<key>/token_ids.npy        [n_tokens] int32, the valid tokens of every row, row-major
    entries/<key>/seq.npy, pos.npy     [n_tokens] int32, row and position of each token
    entries/<key>/next_ids.npy         [n_tokens] int32, the following token id (-1 at a row end)
    entries/<key>/vocab.json           raw and decoded strings of the ids that occur
    entries/<key>/<hook>.npy           [n_tokens, width] float16/float32 activations
    entries/<key>/broken.json          only on an entry found damaged (why); it is then set aside
    index/                             diskcache with :class:`JSONOnlyDisk`: key → {bytes, last_access}
    locks/<key>.lock                   fcntl lock files

An entry is written into ``entries/.tmp-<key>-<random>`` and renamed into place only when every
file is complete and the entry has proved it (rows written = n_tokens for every hook; sizes and a
sampled hash of every file recorded in meta.json). Locks are ``fcntl.flock`` locks, which the
kernel releases when a process dies; diskcache's own ``Lock`` would stay held after a
``kill -9``. The builder holds such a lock on its temp folder for the build's life, and a temp
folder is cleaned up only when that lock can be taken — never judged by PID, which means
nothing across two PID namespaces sharing the volume.

The index holds JSON only, and the reader refuses every row it did not write itself (mode 4 is
pickle): nothing in the store is ever unpickled. A damaged entry is *broken*: listed as such,
refused by readers with a message saying what to do, and never in the way of the other entries.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import diskcache
import numpy as np

from probing_core.errors import StoreError
from probing_core.store.index_disk import JSONOnlyDisk, StoreIndexError
from probing_core.store.integrity import (
    BROKEN_MARKER,
    TABLE_ARRAYS,
    BrokenEntry,
    StoreEntry,
    checksum_problem,
    hook_filename,
    inspect_folder,
    load_npy,
    open_problem,
    seal_entry,
)

__all__ = [
    "DEFAULT_SIZE_LIMIT",
    "TABLE_ARRAYS",
    "ActivationStore",
    "BrokenEntry",
    "StoreEntry",
    "StoreError",
    "StoreIndexError",
    "builder_is_gone",
    "hook_filename",
    "seal_entry",
]

DEFAULT_SIZE_LIMIT = 20 * 1024**3
_KEY_RE = re.compile(r"^[0-9a-f]{16,64}$")
#: Lock file the builder holds inside its temp folder.
BUILD_LOCK = ".build.lock"
#: Folder name prefix of an unfinished sharded build's shards (``entries/.partial-<key>``).
PARTIAL_PREFIX = ".partial-"
#: A temp folder with no lock file is an older version's (or a builder between mkdir and lock):
#: left alone this long.
_NO_LOCK_GRACE_S = 600.0


class ActivationStore:
    """Content-addressed activation store. Safe to share between threads and processes.

    Args:
        root: folder (created if missing).
        size_limit: total bytes above which least-recently-used entries are evicted.

    Attributes:
        index_problem: None, or what was wrong with the index when it was last found damaged
            (the damaged rows were dropped unread; the rest of the store works).

    Raises:
        StoreError: the folder cannot be created or written.
    """

    def __init__(self, root: Path | str, size_limit: int = DEFAULT_SIZE_LIMIT) -> None:
        self.root = Path(root).expanduser().resolve()
        self.size_limit = int(size_limit)
        self.entries_dir = self.root / "entries"
        self.locks_dir = self.root / "locks"
        self.index_problem: str | None = None
        self._opened: dict[tuple[str, int], bool] = {}
        self._opened_lock = threading.Lock()
        try:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
            self.locks_dir.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}-{threading.get_ident()}"
            try:
                probe.write_bytes(b"ok")
            finally:
                with contextlib.suppress(OSError):
                    probe.unlink()
        except OSError as e:
            raise StoreError(
                f"the cache folder {self.root} is not writable ({e.strerror or e}). Set PROBING_CACHE_DIR "
                "to a folder you can write, or fix its permissions."
            ) from e
        self._index = self._open_index()
        self._drop_foreign_index_rows()
        self._clean_dead_temps()

    def close(self) -> None:
        """Close the index database (e.g. before unmounting the folder)."""
        self._index.close()

    # ---- the index (JSON only; an LRU hint rebuilt from the entry folders when damaged) ---------
    def _open_index(self) -> diskcache.Cache:
        folder = self.root / "index"
        try:
            return diskcache.Cache(str(folder), disk=JSONOnlyDisk)
        except sqlite3.DatabaseError as e:
            # Only a damaged file is set aside; a full, read-only or failing disk is the caller's to fix.
            if getattr(e, "sqlite_errorname", "") not in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise StoreError(f"cannot open the store index in {folder} ({e}); free disk space or set "
                                 "PROBING_CACHE_DIR to a writable folder.") from e
            aside = self.root / f"index.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            with contextlib.suppress(OSError):
                os.replace(folder, aside)
            self.index_problem = (f"the store index {folder / 'cache.db'} was not a readable database ({e}); it was "
                                  f"moved to {aside.name} and rebuilt from the entry folders.")
            try:
                return diskcache.Cache(str(folder), disk=JSONOnlyDisk)
            except sqlite3.DatabaseError as e2:
                raise StoreError(f"cannot create the store index in {folder} ({e2}); delete that folder.") from e2

    def _drop_foreign_index_rows(self) -> int:
        """Delete, unread, every index row this store did not write (pickled, file-backed, non-raw).

        Returns:
            How many rows were dropped (their entries fall back to their creation time for eviction).
        """
        db = self.root / "index" / "cache.db"
        try:
            con = sqlite3.connect(str(db), timeout=10)
            try:
                with con:
                    n = con.execute(
                        "DELETE FROM Cache WHERE raw != 1 OR mode != ? OR filename IS NOT NULL "
                        "OR typeof(value) != 'blob'", (diskcache.core.MODE_RAW,)
                    ).rowcount
            finally:
                con.close()
        except sqlite3.Error:
            return 0  # read-only or busy: the reader still refuses those rows one by one
        if n:
            self.index_problem = (f"the store index {db} held {n} row(s) this store never writes (e.g. pickled "
                                  "values, mode 4); they were dropped unread and the index rebuilt from the entry "
                                  "folders. Someone with write access to the cache folder may have tampered with it.")
        return n

    def _touch(self, key: str, meta: dict[str, Any]) -> None:
        try:
            self._index.set(key, {"last_access": time.time(), "bytes": int(meta.get("bytes", 0) or 0)})
        except (OSError, diskcache.Timeout, sqlite3.Error, StoreError, TypeError, ValueError):
            pass  # the index is an LRU hint; a failed update must never fail a read

    def _last_access(self, key: str, meta: dict[str, Any]) -> float:
        try:
            rec = self._index.get(key)
        except StoreIndexError as e:
            self.index_problem = str(e)
            self._drop_foreign_index_rows()
            rec = None
        except (OSError, diskcache.Timeout, sqlite3.Error, ValueError):
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("last_access"), (int, float)):
            return float(rec["last_access"])
        created = meta.get("created", 0.0)
        return float(created) if isinstance(created, (int, float)) else 0.0

    # ---- locking ------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive per-key lock across threads and processes (released if the process dies)."""
        self._check_key(key)
        path = self.locks_dir / f"{key}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def is_locked(self, key: str) -> bool:
        path = self.locks_dir / f"{key}.lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    # ---- checking entries -----------------------------------------------------------------
    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise StoreError(f"{key!r} is not a store key (16–64 hex characters); list keys with `cache ls`.")

    def path_of(self, key: str) -> Path:
        self._check_key(key)
        return self.entries_dir / key

    def has(self, key: str) -> bool:
        return (self.path_of(key) / "meta.json").exists()

    def inspect(self, key: str) -> StoreEntry | BrokenEntry | None:
        """The entry after the cheap checks (meta.json, every file present with the right size):
        a :class:`StoreEntry`, a :class:`BrokenEntry`, or None if there is no such folder."""
        path = self.path_of(key)
        if not path.is_dir():
            return None
        return inspect_folder(key, path)

    def get(self, key: str) -> StoreEntry | None:
        """The entry's metadata, or None. Marks the entry as recently used.

        Raises:
            StoreError: the entry is broken (the message says to delete it and build it again).
        """
        found = self.inspect(key)
        if isinstance(found, BrokenEntry):
            raise StoreError(found.message())
        if found is not None:
            self._touch(key, found.meta)
        return found

    def require(self, key: str) -> StoreEntry:
        entry = self.get(key)
        if entry is None:
            raise StoreError(f"no cache entry {key}; build it first (Home page or `cache build`).")
        return entry

    def open_checked(self, key: str) -> StoreEntry:
        """:meth:`require` plus the checks made when an entry is opened for reading: every ``.npy``
        header matches meta.json (shape and dtype) and vocab.json has its fields. Results are
        remembered per meta.json version, so reopening costs one stat.

        Raises:
            StoreError: no such entry, or it is broken (it is then marked broken on disk).
        """
        entry = self.require(key)
        stamp = (key, (entry.path / "meta.json").stat().st_mtime_ns)
        with self._opened_lock:
            if self._opened.get(stamp):
                return entry
        problem = open_problem(entry)
        if problem:
            self.mark_broken(key, problem)
            raise StoreError(BrokenEntry(key, entry.path, problem, entry.meta).message())
        with self._opened_lock:
            self._opened[stamp] = True
        return entry

    def verify(self, key: str) -> StoreEntry | BrokenEntry:
        """Every check, the sampled checksums included; a damaged entry is marked broken, and one that
        passes again loses its mark.

        Raises:
            StoreError: no such entry.
        """
        path = self.path_of(key)
        if not path.is_dir():
            raise StoreError(f"no cache entry {key}; list keys with `cache ls`.")
        with contextlib.suppress(OSError):
            (path / BROKEN_MARKER).unlink()
        with self._opened_lock:
            self._opened = {k: v for k, v in self._opened.items() if k[0] != key}
        found = inspect_folder(key, path)
        if isinstance(found, StoreEntry):
            problem = open_problem(found) or checksum_problem(found)
            if problem:
                found = BrokenEntry(key, path, problem, found.meta)
        if isinstance(found, BrokenEntry):
            self.mark_broken(key, found.reason)
        return found

    def mark_broken(self, key: str, reason: str) -> None:
        """Set an entry aside: readers refuse it and listings show it as broken until it is deleted."""
        path = self.path_of(key)
        if not path.is_dir():
            return
        with contextlib.suppress(OSError):
            tmp = path / f".{BROKEN_MARKER}.{uuid.uuid4().hex[:8]}"
            tmp.write_text(json.dumps({"reason": reason, "time": time.time()}))
            os.replace(tmp, path / BROKEN_MARKER)

    def scan(self) -> tuple[list[StoreEntry], list[BrokenEntry]]:
        """(good entries, most recently used first; broken entries) after the cheap checks."""
        good: list[StoreEntry] = []
        broken: list[BrokenEntry] = []
        try:
            folders = sorted(self.entries_dir.iterdir())
        except OSError as e:
            raise StoreError(f"cannot list {self.entries_dir} ({e.strerror or e}); check the cache folder.") from e
        for d in folders:
            if d.name.startswith(".") or not _KEY_RE.match(d.name) or not d.is_dir():
                continue
            found = inspect_folder(d.name, d)
            (good if isinstance(found, StoreEntry) else broken).append(found)  # type: ignore[arg-type]
        good.sort(key=lambda e: self._last_access(e.key, e.meta), reverse=True)
        return good, broken

    def entries(self) -> list[StoreEntry]:
        """All complete, undamaged entries, most recently used first (broken ones: :meth:`broken_entries`)."""
        return self.scan()[0]

    def broken_entries(self) -> list[BrokenEntry]:
        """Entry folders set aside as broken (listed so they can be deleted)."""
        return self.scan()[1]

    # ---- reading ------------------------------------------------------------------------
    def read(self, key: str, hook: str, *, mmap: bool = True) -> np.ndarray:
        """One hook's activations for every token, memory-mapped (the others are not touched).

        Returns:
            [n_tokens, width] float16/float32 (read-only memmap when ``mmap``).
        Raises:
            StoreError: unknown key, hook not in the entry, or a damaged file (the entry is then marked broken).
        """
        entry = self.require(key)
        if hook not in entry.meta["hooks"]:
            raise StoreError(f"entry {key} has no hook {hook!r}; it holds {entry.meta['hooks']}. Build an entry with that hook.")
        if entry.meta.get("layout") == "sharded":  # rows in shards: one view over them (store/shards.py)
            from probing_core.store.shards import open_hook

            return open_hook(entry.path, entry.meta, hook, mmap=mmap)  # type: ignore[return-value]
        return self._load_npy(entry, hook_filename(hook), mmap=mmap)

    def read_array(self, key: str, name: str) -> np.ndarray:
        """A token-table array (token_ids, seq, pos, next_ids, doc_index): [n_tokens] int32."""
        if name not in TABLE_ARRAYS:
            raise StoreError(f"{name!r} is not a token-table array; one of {', '.join(TABLE_ARRAYS)}.")
        return self._load_npy(self.require(key), f"{name}.npy", mmap=False)

    def read_json(self, key: str, name: str) -> Any:
        entry = self.require(key)
        if not re.fullmatch(r"[a-z_]+", name):
            raise StoreError(f"{name!r} is not a JSON file of an entry.")
        try:
            return json.loads((entry.path / f"{name}.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, ValueError) as e:
            self.mark_broken(key, f"{name}.json is unreadable ({e})")
            raise StoreError(BrokenEntry(key, entry.path, f"{name}.json is unreadable ({e})", entry.meta).message()) from e

    def _load_npy(self, entry: StoreEntry, fname: str, *, mmap: bool) -> np.ndarray:
        try:
            return load_npy(entry.path / fname, mmap=mmap)
        except FileNotFoundError as e:
            if not entry.path.is_dir():
                raise StoreError(f"cache entry {entry.key} was deleted while it was being read; pick another entry.") from e
            problem = f"{fname} is missing"
        except (OSError, ValueError, EOFError) as e:
            problem = f"{fname} is unreadable ({e})"
        self.mark_broken(entry.key, problem)
        raise StoreError(BrokenEntry(entry.key, entry.path, problem, entry.meta).message())

    def find(self, match: dict[str, Any], hooks: list[str]) -> StoreEntry | None:
        """An undamaged entry whose meta equals ``match`` on those fields and holds all ``hooks``."""
        for e in self.entries():
            if all(e.meta.get(k) == v for k, v in match.items()) and set(hooks) <= set(e.meta["hooks"]):
                self._touch(e.key, e.meta)
                return e
        return None

    # ---- writing ------------------------------------------------------------------------
    def get_or_build(self, key: str, build: Callable[[Path], dict[str, Any]]) -> tuple[StoreEntry, bool]:
        """Return the entry for ``key``, building it with ``build(tmp_dir) -> meta`` if missing.

        Only one thread or process builds a given key; the others wait on its lock and then read
        the finished entry. A broken entry under the same key is replaced. Before the entry is
        committed it must prove it is complete (see :func:`seal_entry`): ``meta`` must give
        ``hooks``, ``widths``, ``n_tokens``, ``dtype`` and ``rows_written`` (rows written per hook),
        and the folder must hold every file.

        Returns:
            (entry, built_here).
        Raises:
            StoreError: disk full or not writable, or the build is incomplete (nothing is stored).
        """
        found = self.inspect(key)
        if isinstance(found, StoreEntry):
            self._touch(key, found.meta)
            return found, False
        with self.lock(key):
            found = self.inspect(key)
            if isinstance(found, StoreEntry):
                self._touch(key, found.meta)
                return found, False
            if isinstance(found, BrokenEntry):
                self._remove_folder(key)
            tmp = self.entries_dir / f".tmp-{key}-{uuid.uuid4().hex[:12]}"
            lock_fd: int | None = None
            try:
                tmp.mkdir(parents=True)
                lock_fd = _hold_build_lock(tmp)
                meta = build(tmp)
                meta["key"] = key
                seal_entry(tmp, meta)
                _write_json(tmp / "meta.json", meta)
                os.replace(tmp, self.path_of(key))
                with contextlib.suppress(OSError):
                    (self.path_of(key) / BUILD_LOCK).unlink()
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                err = _os_store_error(e, self.root)
                if err is e:
                    raise
                raise err from e
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                if lock_fd is not None:
                    os.close(lock_fd)
            entry = StoreEntry(key=key, path=self.path_of(key), meta=meta)
            self._touch(key, meta)
        self.evict(keep={key})
        return entry, True

    def _remove_folder(self, key: str) -> bool:
        path = self.path_of(key)
        if not path.exists():
            return False
        # Rename first so readers never see a half-deleted entry.
        trash = self.entries_dir / f".trash-{key}-{uuid.uuid4().hex[:12]}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def partial_path(self, key: str) -> Path:
        """Where an unfinished sharded build of ``key`` keeps its finished shards (see store/shards.py)."""
        self._check_key(key)
        return self.entries_dir / f"{PARTIAL_PREFIX}{key}"

    def delete(self, key: str) -> bool:
        """Remove an entry, broken or not, and the shards an unfinished sharded build of the key
        left behind (``.partial-<key>``). Waits for a build of the same key to finish, except when
        only such shards exist and their builder is alive (it holds the key's lock): then it refuses,
        since that build would lose them.

        Returns:
            whether there was anything to remove.
        Raises:
            StoreError: a live build is using the key's unfinished shards; disk errors.
        """
        self._check_key(key)
        partial = self.partial_path(key)
        if partial.exists() and not self.path_of(key).exists() and self.is_locked(key):
            raise StoreError(f"a build of {key} is running now and writing its shards into {partial}; stop that build "
                             "(or let it finish), then delete again.")
        try:
            with self.lock(key):
                existed = self._remove_folder(key)
                if partial.exists():  # no builder now: we hold the key's lock, which every build holds
                    trash = self.entries_dir / f".trash-{key}-{uuid.uuid4().hex[:12]}"
                    os.replace(partial, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                    existed = True
                with contextlib.suppress(OSError, diskcache.Timeout, sqlite3.Error, StoreError):
                    self._index.delete(key)
        except OSError as e:
            err = _os_store_error(e, self.root)
            if err is e:
                raise
            raise err from e
        with contextlib.suppress(OSError):
            (self.locks_dir / f"{key}.lock").unlink()
        return existed

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries())

    def evict(self, keep: set[str] | None = None) -> list[str]:
        """Delete least-recently-used entries until the total is under the size limit."""
        keep = keep or set()
        removed: list[str] = []
        entries = self.entries()
        total = sum(e.bytes for e in entries)
        for e in reversed(entries):  # least recently used first
            if total <= self.size_limit:
                break
            if e.key in keep or self.is_locked(e.key):
                continue
            self.delete(e.key)
            total -= e.bytes
            removed.append(e.key)
        return removed

    def _clean_dead_temps(self) -> None:
        """Remove temp folders whose builder is gone, judged by the builder's own fcntl lock.

        The kernel drops that lock when the builder dies, in whatever PID namespace it ran, so a
        live build is never touched from another container sharing the volume.
        """
        for d in self.entries_dir.glob(".tmp-*"):
            if d.is_dir() and builder_is_gone(d):
                shutil.rmtree(d, ignore_errors=True)
        for d in self.entries_dir.glob(".trash-*"):
            shutil.rmtree(d, ignore_errors=True)



# ---- the builder's lock -----------------------------------------------------------------------
def _hold_build_lock(folder: Path) -> int:
    """Create and lock ``folder/.build.lock``; returns the fd (closing it releases the lock)."""
    fd = os.open(folder / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def builder_is_gone(folder: Path) -> bool:
    """Whether nobody holds the build lock of temp folder ``folder`` (any process, any namespace).

    A folder without a lock file is treated as gone only when older than ten minutes (a builder
    takes its lock right after creating the folder; older versions wrote no lock file).
    """
    try:
        fd = os.open(folder / BUILD_LOCK, os.O_RDWR)
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > _NO_LOCK_GRACE_S
        except OSError:
            return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: a live builder
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)



def size_limit_from_env() -> int:
    """The store size limit in bytes from ``PROBING_CACHE_LIMIT_GB`` (default 20 GB).

    Raises:
        StoreError: the variable is set but is not a finite positive number (empty, ``abc``,
            ``nan``, ``inf``, ``-1``, ``0``).
    """
    raw = os.environ.get("PROBING_CACHE_LIMIT_GB")
    if raw is None:
        return DEFAULT_SIZE_LIMIT
    try:
        gb = float(raw.strip())
    except ValueError:
        gb = math.nan
    if not math.isfinite(gb) or gb <= 0 or gb > 1e9:
        raise StoreError(f"PROBING_CACHE_LIMIT_GB={raw!r} is not a size in GB; set a positive number such as 20, "
                         "or unset it for the default of 20.")
    return int(gb * 1024**3)


def _os_store_error(e: OSError, root: Path) -> Exception:
    """A StoreError saying what to do for the OSErrors a full or read-only disk gives; else ``e``."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"the disk holding {root} is full; delete cache entries or set a smaller max-tokens.")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"cannot write to {root} ({e.strerror}); set PROBING_CACHE_DIR to a writable folder.")
    return e


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
