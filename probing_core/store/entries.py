"""The activation store: arrays as ``.npy`` files, a JSON-only diskcache index, per-key locks.

Layout under ``root``::

    entries/<key>/meta.json            everything about the entry (JSON)
    entries/<key>/token_ids.npy        [n_tokens] int32, the valid tokens of every row, row-major
    entries/<key>/seq.npy, pos.npy     [n_tokens] int32, row and position of each token
    entries/<key>/next_ids.npy         [n_tokens] int32, the following token id (-1 at a row end)
    entries/<key>/vocab.json           raw and decoded strings of the ids that occur
    entries/<key>/<hook>.npy           [n_tokens, width] float16/float32 activations
    index/                             diskcache with JSONDisk: key → {bytes, last_access, …}
    locks/<key>.lock                   fcntl lock files

An entry is written into ``entries/.tmp-<key>-<pid>-…`` and renamed into place only when every
file is complete, so a crash never leaves a half-written entry that a reader could see. Locks
are ``fcntl.flock`` locks, which the kernel releases when a process dies; diskcache's own
``Lock`` would stay held after a ``kill -9``. Values in the index are JSON: nothing in the
store is ever unpickled.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import diskcache
import numpy as np

from probing_core.errors import StoreError

DEFAULT_SIZE_LIMIT = 20 * 1024**3
_KEY_RE = re.compile(r"^[0-9a-f]{16,64}$")


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
        }


def hook_filename(hook: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.]+", hook):
        raise StoreError(f"hook name {hook!r} has characters a store file name cannot hold.")
    return f"{hook}.npy"


class ActivationStore:
    """Content-addressed activation store. Safe to share between threads and processes.

    Args:
        root: folder (created if missing).
        size_limit: total bytes above which least-recently-used entries are evicted.

    Raises:
        StoreError: the folder cannot be created or written.
    """

    def __init__(self, root: Path | str, size_limit: int = DEFAULT_SIZE_LIMIT) -> None:
        self.root = Path(root).expanduser().resolve()
        self.size_limit = int(size_limit)
        self.entries_dir = self.root / "entries"
        self.locks_dir = self.root / "locks"
        try:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
            self.locks_dir.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}-{threading.get_ident()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise StoreError(
                f"the cache folder {self.root} is not writable ({e.strerror or e}). Set PROBING_CACHE_DIR "
                "to a folder you can write, or fix its permissions."
            ) from e
        self._index = diskcache.Cache(str(self.root / "index"), disk=diskcache.JSONDisk)
        self._clean_dead_temps()

    def close(self) -> None:
        """Close the index database (e.g. before unmounting the folder)."""
        self._index.close()

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

    # ---- reading ------------------------------------------------------------------------
    @staticmethod
    def _check_key(key: str) -> None:
        if not _KEY_RE.match(key):
            raise StoreError(f"{key!r} is not a store key (16–64 hex characters); list keys with `cache ls`.")

    def path_of(self, key: str) -> Path:
        self._check_key(key)
        return self.entries_dir / key

    def has(self, key: str) -> bool:
        return (self.path_of(key) / "meta.json").exists()

    def get(self, key: str) -> StoreEntry | None:
        """The entry's metadata, or None. Marks the entry as recently used."""
        path = self.path_of(key)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"entry {key} is unreadable ({e}); delete it with `cache rm {key}`.") from e
        self._touch(key, meta)
        return StoreEntry(key=key, path=path, meta=meta)

    def require(self, key: str) -> StoreEntry:
        entry = self.get(key)
        if entry is None:
            raise StoreError(f"no cache entry {key}; build it first (Home page or `cache build`).")
        return entry

    def entries(self) -> list[StoreEntry]:
        """All complete entries, most recently used first."""
        out = []
        for d in self.entries_dir.iterdir():
            if d.name.startswith(".") or not (d / "meta.json").exists():
                continue
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            out.append(StoreEntry(key=d.name, path=d, meta=meta))
        out.sort(key=lambda e: self._last_access(e.key, e.meta), reverse=True)
        return out

    def read(self, key: str, hook: str, *, mmap: bool = True) -> np.ndarray:
        """One hook's activations for every token, memory-mapped (the others are not touched).

        Returns:
            [n_tokens, width] float16/float32 (read-only memmap when ``mmap``).
        Raises:
            StoreError: unknown key or hook not in the entry.
        """
        entry = self.require(key)
        if hook not in entry.meta["hooks"]:
            raise StoreError(f"entry {key} has no hook {hook!r}; it holds {entry.meta['hooks']}. Build an entry with that hook.")
        return np.load(entry.path / hook_filename(hook), mmap_mode="r" if mmap else None, allow_pickle=False)

    def read_array(self, key: str, name: str) -> np.ndarray:
        """A token-table array (token_ids, seq, pos, next_ids)."""
        entry = self.require(key)
        return np.load(entry.path / f"{name}.npy", allow_pickle=False)

    def read_json(self, key: str, name: str) -> Any:
        entry = self.require(key)
        return json.loads((entry.path / f"{name}.json").read_text())

    def find(self, match: dict[str, Any], hooks: list[str]) -> StoreEntry | None:
        """An entry whose meta equals ``match`` on those fields and holds all ``hooks``."""
        for e in self.entries():
            if all(e.meta.get(k) == v for k, v in match.items()) and set(hooks) <= set(e.meta["hooks"]):
                self._touch(e.key, e.meta)
                return e
        return None

    # ---- writing ------------------------------------------------------------------------
    def get_or_build(self, key: str, build: Callable[[Path], dict[str, Any]]) -> tuple[StoreEntry, bool]:
        """Return the entry for ``key``, building it with ``build(tmp_dir) -> meta`` if missing.

        Only one thread or process builds a given key; the others wait on its lock and then read
        the finished entry.

        Returns:
            (entry, built_here).
        Raises:
            StoreError: disk full or not writable (the partial files are removed).
        """
        entry = self.get(key)
        if entry is not None:
            return entry, False
        with self.lock(key):
            entry = self.get(key)
            if entry is not None:
                return entry, False
            tmp = self.entries_dir / f".tmp-{key}-{os.getpid()}-{threading.get_ident()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
                meta = build(tmp)
                meta["key"] = key
                meta["bytes"] = sum(f.stat().st_size for f in tmp.iterdir())
                _write_json(tmp / "meta.json", meta)
                os.replace(tmp, self.path_of(key))
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StoreError(f"the disk holding {self.root} is full; delete cache entries or set a smaller max-tokens.") from e
                if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise StoreError(f"cannot write to {self.root} ({e.strerror}); set PROBING_CACHE_DIR to a writable folder.") from e
                raise
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            entry = StoreEntry(key=key, path=self.path_of(key), meta=meta)
            self._touch(key, meta)
        self.evict(keep={key})
        return entry, True

    def delete(self, key: str) -> bool:
        """Remove an entry (waits for a build of the same key to finish). Returns whether it existed."""
        path = self.path_of(key)
        with self.lock(key):
            existed = path.exists()
            if existed:
                # Rename first so readers never see a half-deleted entry.
                trash = self.entries_dir / f".trash-{key}-{os.getpid()}-{time.monotonic_ns()}"
                os.replace(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
            self._index.pop(key, None)
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

    # ---- index (JSON only) ---------------------------------------------------------------
    def _touch(self, key: str, meta: dict[str, Any]) -> None:
        try:
            self._index.set(key, {"last_access": time.time(), "bytes": int(meta.get("bytes", 0))})
        except (OSError, diskcache.Timeout):
            pass  # the index is an LRU hint; a failed update must never fail a read

    def _last_access(self, key: str, meta: dict[str, Any]) -> float:
        try:
            rec = self._index.get(key)
        except (OSError, diskcache.Timeout, ValueError):
            rec = None
        if isinstance(rec, dict) and "last_access" in rec:
            return float(rec["last_access"])
        return float(meta.get("created", 0.0))

    def _clean_dead_temps(self) -> None:
        """Remove temp folders left by processes that died mid-write."""
        for d in self.entries_dir.glob(".tmp-*"):
            m = re.match(r"\.tmp-[0-9a-f]+-(\d+)-", d.name)
            if m and not _pid_alive(int(m.group(1))):
                shutil.rmtree(d, ignore_errors=True)
        for d in self.entries_dir.glob(".trash-*"):
            shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
