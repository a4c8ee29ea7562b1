"""Store hardening (issue 15), on real entries of the tiny model and real files:

1. the index never unpickles (a real ``__reduce__`` payload written into cache.db);
2. a build that ran no forward pass is never stored (parameters checked, completeness proved);
3. one damaged entry is set aside as broken and never stops the others;
4. temp folders are cleaned up by the builder's fcntl lock, not by PID.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import diskcache
import numpy as np
import pytest

from probing_core.cli import main
from probing_core.errors import InputError, StoreError
from probing_core.store.activations import build_cache, open_entry
from probing_core.store.entries import ActivationStore, BrokenEntry, StoreEntry, builder_is_gone
from probing_core.store.index_disk import JSONOnlyDisk, StoreIndexError
from probing_core.store.integrity import sample_hash, seal_entry

REPO = Path(__file__).resolve().parents[2]
HOOKS = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]


class _CreatesFile:
    """Unpickling this creates ``path`` (``open(path, "w")``): proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _poison_row(db: Path, key: str, payload: bytes) -> None:
    """Rewrite the index row of ``key`` (inserting it if missing) as a pickled value (mode 4)."""
    db_key = JSONOnlyDisk(str(db.parent)).put(key)[0]
    con = sqlite3.connect(str(db))
    with con:
        n = con.execute("UPDATE Cache SET mode = 4, value = ?, filename = NULL WHERE key = ? AND raw = 1",
                        (sqlite3.Binary(payload), db_key)).rowcount
        if not n:
            con.execute("INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag, size, "
                        "mode, filename, value) VALUES (?, 1, 0, NULL, 0, 0, NULL, 0, 4, NULL, ?)",
                        (db_key, sqlite3.Binary(payload)))
    con.close()


@pytest.fixture(scope="module")
def template(tiny_model, pydoc_dataset, tmp_path_factory):
    """A store with two real entries (the 'victim' and the 'other'), copied fresh into each test."""
    root = tmp_path_factory.mktemp("template") / "activations"
    store = ActivationStore(root)
    victim, _ = build_cache(tiny_model, pydoc_dataset, HOOKS, store=store, max_len=32, max_tokens=400)
    other, _ = build_cache(tiny_model, pydoc_dataset, HOOKS, store=store, max_len=32, max_tokens=300)
    store.close()
    return root, victim.key, other.key


@pytest.fixture()
def two_entries(template, tmp_path):
    root, victim, other = template
    dst = tmp_path / "cache" / "activations"  # the CLI's --cache-dir is dst.parent
    shutil.copytree(root, dst)
    return dst, victim, other


# ---- 1. the index never unpickles -----------------------------------------------------------
def test_pickled_index_row_is_live_under_plain_jsondisk(two_entries, tmp_path):
    """The payload is real: diskcache's own JSONDisk runs it (the defect this store avoids)."""
    root, victim, _ = two_entries
    marker = tmp_path / "pwned-jsondisk"
    _poison_row(root / "index" / "cache.db", victim, pickle.dumps(_CreatesFile(marker)))
    cache = diskcache.Cache(str(root / "index"), disk=diskcache.JSONDisk)
    with pytest.raises(Exception):
        cache.get(victim)  # unpickled (file created), then JSON decoding of a file object fails
    cache.close()
    assert marker.exists()


def test_index_row_with_pickle_payload_is_never_unpickled(two_entries, tmp_path, capsys):
    root, victim, other = two_entries
    marker = tmp_path / "pwned"
    store = ActivationStore(root)  # opened before the row is poisoned: the reader must refuse it
    _poison_row(root / "index" / "cache.db", victim, pickle.dumps(_CreatesFile(marker)))
    keys = {e.key for e in store.entries()}
    assert not marker.exists()
    assert keys == {victim, other}  # both entries still work
    assert store.index_problem and "cache.db" in store.index_problem
    acts = open_entry(store, victim)
    assert acts.hook("hook_embed").shape == (400, 32)
    store.close()

    # A store opened on a poisoned index drops the row unread, and `cache ls` says so on stderr.
    _poison_row(root / "index" / "cache.db", other, pickle.dumps(_CreatesFile(marker)))
    code = main(["cache", "ls", "--json", "--cache-dir", str(root.parent)])
    out, err = capsys.readouterr()
    assert code == 0 and not marker.exists()
    assert {r["key"] for r in json.loads(out)} == {victim, other}
    assert "cache.db" in err and "Traceback" not in err
    con = sqlite3.connect(str(root / "index" / "cache.db"))
    assert con.execute("SELECT COUNT(*) FROM Cache WHERE mode != 1").fetchone()[0] == 0
    con.close()


def test_json_only_disk_refuses_every_foreign_row(tmp_path):
    marker = tmp_path / "pwned"
    disk = JSONOnlyDisk(str(tmp_path))
    payload = pickle.dumps(_CreatesFile(marker))
    for mode, filename, value in [(4, None, payload), (4, "ab/cd/x.val", None), (2, "../../etc/passwd", None),
                                  (3, "x.val", None), (1, None, b"not zlib")]:
        with pytest.raises(StoreIndexError, match="cache.db"):
            disk.fetch(mode, filename, value, False)
    with pytest.raises(StoreIndexError):
        disk.get(payload, False)  # a pickled key
    assert not marker.exists()
    with pytest.raises(StoreError):
        disk.store(object(), False)  # never falls back to pickle
    assert disk.fetch(*disk.store({"a": 1}, False)[1:], False) == {"a": 1}


def test_garbage_index_database_is_rebuilt(two_entries):
    root, victim, other = two_entries
    (root / "index" / "cache.db").write_bytes(b"garbage" * 1000)
    for f in (root / "index").glob("cache.db-*"):
        f.unlink()
    store = ActivationStore(root)
    assert {e.key for e in store.entries()} == {victim, other}
    assert store.index_problem and "rebuilt" in store.index_problem
    store.close()


# ---- 2. a build that ran no forward pass is never stored --------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"batch_size": -4}, {"batch_size": 0}, {"batch_size": 2.5}, {"batch_size": True}, {"batch_size": "16"},
    {"max_len": 0}, {"max_len": -1}, {"max_len": 10**6}, {"max_len": 3.0},
    {"max_tokens": -1}, {"max_tokens": 0}, {"max_tokens": float("nan")}, {"max_tokens": float("inf")},
])
def test_build_parameters_are_checked_at_the_api(tiny_model, pydoc_dataset, store, kwargs):
    with pytest.raises(InputError):
        build_cache(tiny_model, pydoc_dataset, ["hook_embed"], store=store, **{"max_len": 32, "max_tokens": 100, **kwargs})
    assert store.entries() == [] and store.broken_entries() == []
    assert not list(store.entries_dir.iterdir())


def test_incomplete_build_is_never_committed(tiny_model, pydoc_dataset, store):
    """A build whose hooks got fewer rows than tokens (what an empty batch loop gives) is refused."""
    from probing_core.data.datasets import tokenize_dataset
    from probing_core.store.activations import extract_to_folder

    batch = tokenize_dataset(tiny_model, pydoc_dataset, max_len=32, max_tokens=200)

    def build(folder: Path) -> dict:
        meta = extract_to_folder(tiny_model, batch, ["hook_embed"], folder)
        meta["dtype"] = "float32"
        meta["rows_written"]["hook_embed"] = 0  # as if no forward pass had run
        (folder / "vocab.json").write_text(json.dumps({"ids": [], "raw": [], "text": [], "space_marker": ""}))
        return meta

    with pytest.raises(StoreError, match="fewer rows"):
        store.get_or_build("00000000000000aa", build)
    assert not list(store.entries_dir.iterdir())  # neither an entry nor a temp folder


def test_entries_record_sizes_and_sampled_checksums(two_entries):
    root, victim, _ = two_entries
    store = ActivationStore(root)
    entry = store.require(victim)
    files = entry.meta["files"]
    assert set(files) >= {f"{h}.npy" for h in HOOKS} | {"token_ids.npy", "vocab.json"}
    assert entry.meta["rows_written"] == {h: 400 for h in HOOKS}
    for h in HOOKS:
        arr = store.read(victim, h)
        assert files[f"{h}.npy"]["sample"] == sample_hash(arr)
        assert files[f"{h}.npy"]["bytes"] == (entry.path / f"{h}.npy").stat().st_size
    assert isinstance(store.verify(victim), StoreEntry)
    store.close()


def test_seal_refuses_missing_fields(tmp_path):
    with pytest.raises(StoreError):
        seal_entry(tmp_path, {"hooks": ["hook_embed"], "n_tokens": 5, "n_seq": 1, "widths": {"hook_embed": 4}})


# ---- 3. one bad entry never takes the store down ---------------------------------------------
def _truncate(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 100)


def _garbage_header(p: Path) -> None:
    with open(p, "r+b") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())


def _zero_file(p: Path) -> None:
    p.write_bytes(b"\0" * p.stat().st_size)


def _zero_data(p: Path) -> None:
    arr = np.load(p, mmap_mode="r+")
    arr[:] = 0
    arr.flush()


def _edit_meta(field: str, value) -> callable:
    def edit(p: Path) -> None:
        meta = json.loads(p.read_text())
        meta[field] = value(meta[field]) if callable(value) else value
        p.write_text(json.dumps(meta))
    return edit


DAMAGE = {
    # name: (file, damage, where it is detected: ls = every listing, open = on opening, verify = cache verify)
    "meta is []": ("meta.json", lambda p: p.write_text("[]"), "ls"),
    "meta not json": ("meta.json", lambda p: p.write_text("{oops"), "ls"),
    "meta missing": ("meta.json", lambda p: p.unlink(), "ls"),
    "truncated npy": ("blocks.0.hook_resid_post.npy", _truncate, "ls"),
    "missing token_ids": ("token_ids.npy", lambda p: p.unlink(), "ls"),
    "edited n_tokens": ("meta.json", _edit_meta("n_tokens", lambda n: n - 1), "ls"),
    "n_tokens a string": ("meta.json", _edit_meta("n_tokens", "many"), "ls"),
    "garbage header": ("hook_embed.npy", _garbage_header, "open"),
    "zeroed file": ("blocks.1.mlp.hook_post.npy", _zero_file, "open"),
    "bad vocab.json": ("vocab.json", lambda p: p.write_text("{not json" + " " * (p.stat().st_size - 9)), "open"),
    "vocab.json wrong shape": ("vocab.json", lambda p: p.write_text(json.dumps({"ids": 3}).ljust(p.stat().st_size)), "open"),
    "zeroed data": ("hook_embed.npy", _zero_data, "verify"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_entry_is_set_aside_and_others_keep_working(name, two_entries, tiny_model, pydoc_dataset, capsys):
    root, victim, other = two_entries
    fname, damage, detected = DAMAGE[name]
    damage(root / "entries" / victim / fname)
    store = ActivationStore(root)

    listed = {e.key for e in store.entries()}
    assert other in listed
    if detected == "ls":
        assert victim not in listed
    else:
        assert victim in listed  # cheap checks pass; opening or verifying finds it
        if detected == "open":
            with pytest.raises(StoreError, match="broken"):
                open_entry(store, victim)
        else:
            open_entry(store, victim)
            res = store.verify(victim)
            assert isinstance(res, BrokenEntry)
    broken = store.broken_entries()
    assert [b.key for b in broken] == [victim] and broken[0].reason
    assert victim not in {e.key for e in store.entries()}

    # readers refuse it with a message saying what to do; the other entry still opens and is reused
    with pytest.raises(StoreError, match=f"cache rm {victim}"):
        open_entry(store, victim)
    assert open_entry(store, other).hook("hook_embed").shape == (300, 32)
    again, built = build_cache(tiny_model, pydoc_dataset, HOOKS, store=store, max_len=32, max_tokens=300)
    assert again.key == other and not built

    # the CLI lists it as broken, verify fails (status 1), rm deletes it
    cache_dir = root.parent
    assert main(["cache", "ls", "--json", "--cache-dir", str(cache_dir)]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[victim]["status"] == "broken" and rows[other]["status"] == "ok"
    assert main(["cache", "verify", "--cache-dir", str(cache_dir)]) == 1
    out = capsys.readouterr().out
    assert f"broken  {victim}" in out and f"ok      {other}" in out
    assert main(["cache", "rm", victim, "--cache-dir", str(cache_dir)]) == 0
    capsys.readouterr()
    assert store.broken_entries() == [] and [e.key for e in store.entries()] == [other]
    store.close()


def test_broken_entry_is_rebuilt_on_request(two_entries, tiny_model, pydoc_dataset):
    root, victim, _ = two_entries
    _zero_file(root / "entries" / victim / "hook_embed.npy")
    store = ActivationStore(root)
    assert isinstance(store.verify(victim), BrokenEntry)
    entry, built = build_cache(tiny_model, pydoc_dataset, HOOKS, store=store, max_len=32, max_tokens=400)
    assert built and entry.key == victim and isinstance(store.verify(victim), StoreEntry)
    assert np.abs(np.asarray(store.read(victim, "hook_embed"))).sum() > 0
    store.close()


# ---- 4. temp folders judged by the builder's lock, not by PID --------------------------------
_HOLDER = """
import sys, time
from pathlib import Path
from probing_core.store.entries import _hold_build_lock
fd = _hold_build_lock(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
"""


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_live_temp_folder_with_a_dead_looking_pid_survives_cleanup(tmp_path):
    """The folder's name carries a PID that is dead here (as a build in another PID namespace
    looks), but its builder holds the lock from another process: cleanup must leave it."""
    store = ActivationStore(tmp_path / "s")
    store.close()
    tmp = store.entries_dir / f".tmp-{'ab' * 8}-{_dead_pid()}-1"
    tmp.mkdir()
    (tmp / "hook_embed.npy").write_bytes(b"partial")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert not builder_is_gone(tmp)
        ActivationStore(tmp_path / "s").close()  # opening a store cleans dead temp folders
        assert (tmp / "hook_embed.npy").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert builder_is_gone(tmp)
    ActivationStore(tmp_path / "s").close()
    assert not tmp.exists()


def test_temp_folder_without_lock_file_is_kept_while_young(tmp_path):
    store = ActivationStore(tmp_path / "s")
    young = store.entries_dir / ".tmp-young"
    old = store.entries_dir / ".tmp-old"
    young.mkdir()
    old.mkdir()
    past = time.time() - 3600
    os.utime(old, (past, past))
    ActivationStore(tmp_path / "s").close()
    assert young.exists() and not old.exists()
    store.close()


_BUILDER = """
import sys, time
from pathlib import Path
from probing_core.store.entries import ActivationStore
store = ActivationStore(sys.argv[1])
go = Path(sys.argv[2])

def build(folder):
    print("building", flush=True)
    time.sleep(600)  # killed before it ends

store.get_or_build("cd" * 8, build)
"""


def test_build_in_another_pid_namespace_is_not_cleaned(tmp_path):
    """A real builder in a separate PID namespace (unshare): its temp folder survives cleanup here."""
    probe = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here (unshare: {probe.stderr.decode().strip()[:120]})")
    root = tmp_path / "s"
    ActivationStore(root).close()
    go = tmp_path / "go"
    child = subprocess.Popen(["unshare", "-p", "-f", "--mount-proc", "--kill-child", sys.executable, "-c", _BUILDER, str(root), str(go)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline().strip() == "building"
        temps = list((root / "entries").glob(".tmp-*"))
        assert len(temps) == 1
        ActivationStore(root).close()
        assert temps[0].exists(), "a live build in another PID namespace was deleted"
    finally:
        child.kill()  # unshare dies, and --kill-child takes the builder with it (as kill -9 would)
        child.wait(timeout=60)
    deadline = time.time() + 30
    while temps and not builder_is_gone(temps[0]) and time.time() < deadline:
        time.sleep(0.1)
    assert temps[0].exists()  # left behind by the killed builder ...
    ActivationStore(root).close()  # ... and cleaned now that its lock is gone
    assert not list((root / "entries").glob(".tmp-*"))


# ---- a disk with room for the files but not for SQLite ---------------------------------------
def test_index_on_a_nearly_full_disk_is_one_line(tmp_path, capsys):
    """SQLite fails (disk I/O / database or disk is full) where the write test still passes:
    one line and exit 2 from the CLI, and the index is not set aside as if it were damaged."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        pages = 0
        try:
            while os.write(fd, b"\0" * 4096):
                pages += 1
        except OSError:
            pass
        finally:
            os.close(fd)
        os.truncate(mnt / "filler", (pages - 3) * 4096)  # room for the write test, not for the index
        code = main(["cache", "ls", "--cache-dir", str(mnt)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "PROBING_CACHE_DIR" in err
        assert not list((mnt / "activations").glob("index.damaged-*"))
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---- header parsing under one lock (CPython 3.11's AST constructor is not thread-safe) ---------
def test_load_npy_equals_np_load_and_is_shared_by_threads(tmp_path):
    """Our reader (header parsed under a lock, data mapped outside it) gives np.load's arrays,
    from many threads at once; object arrays (pickle) are refused."""
    import threading

    from probing_core.store.integrity import load_npy

    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((57, 9), dtype=np.float32), "f16": rng.standard_normal((5, 3)).astype(np.float16),
              "i32": rng.integers(-5, 5, 31).astype(np.int32)}
    for name, a in arrays.items():
        np.save(tmp_path / f"{name}.npy", a)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_npy(tmp_path / "obj.npy")
    errors: list[str] = []

    def reader() -> None:
        for _ in range(200):
            for name, a in arrays.items():
                for mmap in (True, False):
                    got = load_npy(tmp_path / f"{name}.npy", mmap=mmap)
                    if got.dtype != a.dtype or not np.array_equal(got, a):
                        errors.append(f"{name} mmap={mmap}")
    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert isinstance(load_npy(tmp_path / "f32.npy"), np.memmap)
