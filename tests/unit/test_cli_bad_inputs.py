"""Every CLI subcommand and option with bad values: exit status 2, one line on stderr, no
traceback, nothing written (issue 15).

The table has one row per (command, option, bad value). To cover a new option, add a ``bad(...)``
line below; ``test_every_option_has_a_bad_value_row`` fails and names any option without one.
Rows run in-process (``probing_core.cli.main``) on the tiny model, and every bad value is refused
before a model is loaded unless it can only be judged against the model (layer ranges, the
model's context, hook names, vocabulary size).

Placeholders filled per test: {D} a fresh cache folder, {OUT} a fresh output folder, {FILE} an
existing file, {DIR} an existing folder, {MISSING} a path in a folder that does not exist, {RO} a
read-only folder (a read-only mount), {FULL} a folder on a full disk, {BUILT}/{KEY} a cache folder
holding a real tiny entry and its key, {EMPTY} an empty text file, {BINARY} a non-UTF-8 file.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from probing_core.cli import build_parser, main

# ---- bad values by kind ---------------------------------------------------------------------
POS_INT = ["0", "-1", "-4", "abc", "2.5", "", "nan", "inf", "1e3", "99999999999999999999999"]
NONNEG_INT = ["-1", "-5", "abc", "1.5", "", "nan", "99999999999999999999999"]
SEED = ["-1", "abc", "", "4294967296", "1.5"]
POS_FLOAT = ["0", "-5", "nan", "inf", "-inf", "abc", "", "1e400"]
FRACTION = ["0", "1", "-0.1", "1.5", "nan", "inf", "abc", ""]
UNIT = ["-0.1", "1.01", "nan", "inf", "abc", ""]
TEXT = ["", "   "]
MAX_LEN = ["0", "1", "-1", "abc", "", "nan", "99999999999999999999999"]
CHOICE = ["nosuch", ""]
DEVICE = ["tpu9", "", "gpu", "cuda:x", "cpu0"]
CACHE_DIR = ["", "{FILE}", "{RO}", "{FULL}"]
DATASET = ["", "{MISSING}/d.txt", "{DIR}", "{EMPTY}", "{BINARY}"]
MODEL = ["", "/no/such/model/folder", "{FILE}"]
HOOKS = ["nosuch", "blocks.9.hook_resid_post", "blocks.0.attn.hook_pattern", "", "../etc"]
BAD_KEYS = ["../../etc", "XYZ", "", "0123456789ABCDEFG"]


@dataclass
class Row:
    id: str
    argv: list[str]
    covers: tuple[str, str]  # (command, option) this row tries
    env: dict[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # placeholders that need a mount (RO, FULL)


ROWS: list[Row] = []

BASE = {
    "models": [],
    "datasets": [],
    "cache build": ["--model", "tiny", "--cache-dir", "{D}", "--max-tokens", "300"],
    "cache ls": ["--cache-dir", "{D}"],
    "cache rm": ["0123456789abcdef", "--cache-dir", "{D}"],
    "cache export": ["{KEY}", "--hook", "hook_embed", "--out", "{OUT}/x.npy", "--cache-dir", "{BUILT}"],
    "cache verify": ["--cache-dir", "{D}"],
    "probe regression": ["--model", "tiny", "--label", "length", "--cache-dir", "{D}", "--max-tokens", "300"],
    "probe sparse": ["--model", "tiny", "--classes", " the", " a", "--layer", "0", "--cache-dir", "{D}", "--max-tokens", "300"],
    "probe layers": ["--model", "tiny", "--cache-dir", "{D}", "--max-tokens", "300"],
    "lens": ["--model", "tiny", "--prompt", "hello"],
    "attention": ["--model", "tiny", "--prompt", "hello", "--layer", "0"],
    "train-tree": ["--steps", "1", "--out", "{OUT}/tree", "--eval-samples", "0", "--no-progress", "--checkpoint-every", "0"],
}


def bad(cmd: str, option: str, values: list[str], *, base: list[str] | None = None, extra: list[str] | None = None,
        env: dict[str, str] | None = None) -> None:
    """Rows for ``cmd`` with ``option VALUE`` appended (a positional when ``option`` has no dashes:
    then ``base`` must hold ``{V}`` where the value goes)."""
    for v in values:
        if option.startswith("-"):
            argv = cmd.split() + (BASE[cmd] if base is None else base) + [option, v] + (extra or [])
        else:
            argv = cmd.split() + [a.replace("{V}", v) for a in (base or [])] + (extra or [])
        needs = tuple(p for p in ("RO", "FULL") if "{" + p + "}" in v)
        ROWS.append(Row(f"{cmd} {option}={v!r}", argv, (cmd, option), dict(env or {}), needs))


def bad_argv(cmd: str, option: str, argv_tail: list[str], label: str) -> None:
    """One row with a hand-written argument list (combinations of options)."""
    ROWS.append(Row(f"{cmd} {label}", cmd.split() + argv_tail, (cmd, option)))


# ---- the table -------------------------------------------------------------------------------
ROWS.append(Row("unknown command", ["nosuch"], ("", "COMMAND")))
for cmd in ("models", "datasets", "cache ls", "cache verify"):
    bad_argv(cmd, "--nosuch", BASE[cmd] + ["--nosuch"], "unknown option")
bad("models", "--json", ["x"], base=["--json"])  # a stray value
bad("datasets", "--json", ["x"], base=["--json"])

for cmd in ("cache build", "probe regression", "probe sparse", "probe layers", "lens", "attention"):
    bad(cmd, "--model", MODEL)
    bad(cmd, "--device", DEVICE + (["cuda"] if cmd == "lens" and not torch.cuda.is_available() else []))
    bad(cmd, "--dtype", CHOICE + ["float64"])
    bad(cmd, "--cache-dir", CACHE_DIR if cmd not in ("lens", "attention") else ["", "{FILE}"])
for cmd in ("cache build", "probe regression", "probe sparse", "probe layers"):
    bad(cmd, "--dataset", DATASET)
    bad(cmd, "--text-column", TEXT)
    bad(cmd, "--max-docs", POS_INT)
    bad(cmd, "--max-tokens", POS_INT)
    bad(cmd, "--max-len", MAX_LEN + ["5000"])
bad("cache build", "--text-column", ["nosuch"], extra=["--dataset", "{CSV}"])

# cache
bad("cache build", "--hooks", HOOKS)
bad("cache build", "--batch-size", POS_INT)
bad("cache build", "--store-dtype", CHOICE + ["float64", "bfloat16"])
for cmd in ("cache ls", "cache rm", "cache verify"):
    bad(cmd, "--cache-dir", CACHE_DIR)
bad("cache rm", "keys", BAD_KEYS, base=["{V}", "--cache-dir", "{D}"])
bad("cache verify", "key", BAD_KEYS + ["0123456789abcdef"], base=["{V}", "--cache-dir", "{D}"])
bad("cache export", "key", BAD_KEYS + ["0123456789abcdef"],
    base=["{V}", "--hook", "hook_embed", "--out", "{OUT}/x.npy", "--cache-dir", "{BUILT}"])
bad("cache export", "--hook", TEXT + ["nosuch", "blocks.1.hook_resid_post"])
bad("cache export", "--out", ["", "{DIR}", "/tmp", "{OUT}/", "{MISSING}/x.npy", "{RO}/x.npy", "{FULL}/x.npy"])
bad("cache export", "--cache-dir", ["", "{FILE}", "{RO}"])
for v in ("abc", "", "nan", "inf", "-inf", "-1", "0"):
    for cmd in ("cache ls", "cache build", "cache verify", "probe regression"):
        ROWS.append(Row(f"{cmd} PROBING_CACHE_LIMIT_GB={v!r}", cmd.split() + BASE[cmd], (cmd, "PROBING_CACHE_LIMIT_GB"),
                        {"PROBING_CACHE_LIMIT_GB": v}))

# probe regression
bad("probe regression", "--label", ["nosuch", ""])
bad("probe regression", "--label-param", ["nosuch=3", "noequals", "=3", ""])
bad("probe regression", "--hooks", HOOKS)
bad("probe regression", "--positions", ["bogus", "match:", "last:3"])
bad("probe regression", "--alpha", POS_FLOAT)
bad("probe regression", "--alphas", POS_FLOAT)
bad_argv("probe regression", "--alphas", BASE["probe regression"] + ["--alphas", "1", "-2", "3"], "--alphas 1 -2 3")
bad_argv("probe regression", "--alpha", BASE["probe regression"] + ["--alpha", "1", "--alphas", "2"], "--alpha with --alphas")
bad("probe regression", "--cv", ["-1", "1", "abc", "", "1001", "2.5"])
bad("probe regression", "--test-fraction", FRACTION)
bad("probe regression", "--seed", SEED)
bad("probe regression", "--store-dtype", CHOICE + ["float64"])

# probe sparse
bad_argv("probe sparse", "--classes", ["--model", "tiny", "--classes", "", " a", "--layer", "0", "--cache-dir", "{D}"], "--classes '' ' a'")
bad_argv("probe sparse", "--classes", ["--model", "tiny", "--classes", " the", "--layer", "0", "--cache-dir", "{D}"], "one class")
bad("probe sparse", "--layer", ["-1", "abc", "", "7", "1.5", "99999999999999999999999"])
bad("probe sparse", "--features", CHOICE + ["resid_pre"])
bad("probe sparse", "--C", POS_FLOAT)
bad("probe sparse", "--Cs", POS_FLOAT)
bad_argv("probe sparse", "--C", BASE["probe sparse"] + ["--C", "1", "--Cs", "2"], "--C with --Cs")
bad("probe sparse", "--show-C", POS_FLOAT)
bad("probe sparse", "--penalty", CHOICE + ["l3"])
bad("probe sparse", "--l1-ratio", UNIT)
bad("probe sparse", "--before", ["-5", "abc", "", "100001"])
bad("probe sparse", "--after", ["-1", "abc", "", "100001"])
bad("probe sparse", "--max-per-class", POS_INT)
bad("probe sparse", "--test-fraction", FRACTION)
bad("probe sparse", "--cv", ["-1", "0", "1", "abc", "1001"])
bad("probe sparse", "--seed", SEED)
bad("probe sparse", "--top", ["-1", "0", "abc", "", "nan"])

# probe layers
bad("probe layers", "--label", ["bogus", "", "token-offset:abc", "column:"])
bad("probe layers", "--positions", ["bogus", "at:x", "every:0", "every:-1", "every:abc"])
bad("probe layers", "--hooks", HOOKS)
bad("probe layers", "--top-k-classes", ["1", "0", "-1", "abc", ""])
bad("probe layers", "--C", POS_FLOAT)
bad("probe layers", "--test-fraction", FRACTION)
bad("probe layers", "--seed", SEED)
bad("probe layers", "--max-samples", POS_INT)
bad("probe layers", "--preset", CHOICE + ["tree-edges"])  # tree-edges needs --model tree
bad("probe layers", "--n-samples", POS_INT)

# lens
bad("lens", "--prompt", TEXT)
bad("lens", "--answer", TEXT)
bad("lens", "--wrong", TEXT + [" x"])  # " x" without --answer
bad("lens", "--top-k", ["0", "-1", "abc", "", "9999", "nan"])

# attention
bad("attention", "--prompt", TEXT)
bad("attention", "--layer", ["-1", "abc", "", "9", "1.5"])
bad("attention", "--max-len", ["0", "1", "-1", "abc", ""])
bad("attention", "--token", ["-1", "abc", "", "99"])
bad("attention", "--html", ["", "{DIR}", "{MISSING}/v.html", "{RO}/v.html"])

# train-tree (never reaches training: the base writes into {OUT} only)
bad("train-tree", "--steps", POS_INT)
bad("train-tree", "--seed", SEED)
bad("train-tree", "--n-nodes", ["1", "17", "0", "-1", "abc", ""])
bad("train-tree", "--out", ["", "{FILE}"])
bad("train-tree", "--device", DEVICE)
bad("train-tree", "--eval-samples", ["-1", "abc", "", "99999999999"])
bad("train-tree", "--eval-seed", SEED)
bad("train-tree", "--batch-size", POS_INT)
bad("train-tree", "--lr", POS_FLOAT)
bad("train-tree", "--n-layers", POS_INT)
bad("train-tree", "--d-model", POS_INT)
bad("train-tree", "--n-heads", POS_INT + ["3"])  # 3 does not divide d_model 128
bad("train-tree", "--d-mlp", POS_INT)
bad("train-tree", "--warmup-steps", NONNEG_INT)
bad("train-tree", "--natural-fraction", UNIT)
bad("train-tree", "--curriculum-start-depth", ["0", "-1", "17", "abc"])
bad("train-tree", "--min-nodes", ["-1", "17", "abc"])
bad_argv("train-tree", "--min-nodes", BASE["train-tree"] + ["--n-nodes", "8", "--min-nodes", "12"], "--min-nodes above --n-nodes")
bad("train-tree", "--threads", ["0", "-1", "abc", "", "5000"])
bad("train-tree", "--max-minutes", POS_FLOAT)
bad("train-tree", "--checkpoint-every", NONNEG_INT)
bad("train-tree", "--init-from", ["{MISSING}", "{FILE}", ""])


# probe embedding / probe transfer (the Regression page's embedding probe, headless)
BASE["probe embedding"] = ["--model", "tiny"]
BASE["probe transfer"] = ["--model", "tiny", "--cache-dir", "{D}", "--max-tokens", "300"]
bad("probe embedding", "--tasks", ["nosuch", ""])
bad("probe transfer", "--positions", ["bogus", "match:"])
bad("probe transfer", "--label", ["nosuch", ""])
bad("probe transfer", "--label-param", ["nosuch=3", "noequals"])
bad("probe transfer", "--hooks", HOOKS[:3])
bad("probe regression", "--split", CHOICE)
bad("probe sparse", "--offset", ["abc", "", "1.5"])

# cache build --engine ray: refused before Ray starts
bad("cache build", "--engine", CHOICE + ["spark"])
bad("cache build", "--address", TEXT, extra=["--engine", "ray"])
bad("cache build", "--workers", POS_INT, extra=["--engine", "ray"])
bad("cache build", "--gpus-per-worker", ["-1", "nan", "inf", "abc", ""], extra=["--engine", "ray"])
bad("cache build", "--ray-write", CHOICE)
bad("cache build", "--rows-per-shard", POS_INT, extra=["--engine", "ray"])

# intervene: the label and answer checks of the subcommands that take free text
INTERVENE_ENTRY = ["--model", "tiny", "--cache-dir", "{BUILT}", "--entry", "{KEY}", "--hook", "hook_embed"]
BASE["intervene direction"] = INTERVENE_ENTRY + ["--label", "length", "--out", "{OUT}/dir"]
BASE["intervene amnesic"] = INTERVENE_ENTRY + ["--label", "length"]
BASE["intervene prompt"] = ["--model", "tiny", "--direction", "{MISSING}/d", "--prompt", "hello"]
BASE["intervene truth"] = ["--model", "tiny", "--cache-dir", "{D}"]
for cmd in ("intervene direction", "intervene amnesic"):
    bad(cmd, "--label", ["nosuch", ""], base=INTERVENE_ENTRY + (["--out", "{OUT}/dir"] if "direction" in cmd else []))
    bad(cmd, "--label-param", ["nosuch=3", "noequals"])
    bad(cmd, "--positions", ["bogus", "match:"])
    bad(cmd, "--entry", BAD_KEYS + ["0123456789abcdef"])
bad("intervene direction", "--positive", TEXT)
bad("intervene amnesic", "--later-hook", ["nosuch", "blocks.9.hook_resid_post", ""])
bad("intervene prompt", "--answer", TEXT)
bad("intervene prompt", "--wrong", TEXT + [" x"])  # " x" without --answer
bad("intervene prompt", "--positions", ["bogus"])
bad("intervene prompt", "--direction", ["{MISSING}/d", "{DIR}", "{FILE}"])
bad("intervene truth", "--save-direction", ["", "{DIR}", "{MISSING}/d"])
bad("intervene truth", "--answers", ["", "no pipe", " True|", "a|b|c"])

# ---- rows the parser's own types give: every value-taking option's type is tried with the
# candidates below, and each one it refuses becomes a row (so a new option is covered as soon
# as it has a validating type; free-text options need a hand-written row above)
CANDIDATES = ["abc", "", "  ", "-1", "0", "nan", "inf", "-inf", "1.5", "1e400", "99999999999999999999999", "tpu9", "nosuch"]


def _refuses(action: argparse.Action, text: str) -> bool:
    try:
        value = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return True
    return action.choices is not None and value not in action.choices


def _leaf_parsers(parser: argparse.ArgumentParser, name: str = "") -> dict[str, argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {name: parser}
    out: dict[str, argparse.ArgumentParser] = {}
    for s in subs:
        for sub_name, sub in s.choices.items():
            out.update(_leaf_parsers(sub, f"{name} {sub_name}".strip()))
    return out


def _value_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, argparse._HelpAction) and (a.nargs != 0 or not a.option_strings)]


LEAVES = _leaf_parsers(build_parser())
AUTO_ROWS: list[Row] = []
for _cmd, _parser in LEAVES.items():
    for _a in _value_actions(_parser):
        if not _a.option_strings:
            continue
        _opt = _a.option_strings[0]
        for _v in CANDIDATES:
            if _refuses(_a, _v):
                AUTO_ROWS.append(Row(f"auto: {_cmd} {_opt}={_v!r}", _cmd.split() + [_opt, _v], (_cmd, _opt)))
_explicit = {(r.id) for r in ROWS}
ROWS += [r for r in AUTO_ROWS if r.id.removeprefix("auto: ") not in _explicit]


# ---- fixtures: the paths the placeholders stand for --------------------------------------------
def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_model, pydoc_dataset):
    base = tmp_path_factory.mktemp("bad-inputs")
    out: dict[str, str] = {}
    f = base / "a-file.txt"
    f.write_text("hello")
    out["FILE"] = str(f)
    (base / "a-dir").mkdir()
    out["DIR"] = str(base / "a-dir")
    out["MISSING"] = str(base / "no-such-folder")
    (base / "empty.txt").write_bytes(b"")
    out["EMPTY"] = str(base / "empty.txt")
    (base / "binary.txt").write_bytes(bytes(range(128, 256)) * 10)
    out["BINARY"] = str(base / "binary.txt")
    (base / "data.csv").write_text("text,label\nhello world,1\nanother line,0\n")
    out["CSV"] = str(base / "data.csv")
    mounts = []
    ro = base / "ro"
    if _mount_tmpfs(ro, "ro,size=64k"):
        mounts.append(ro)
        out["RO"] = str(ro)
    full = base / "full"
    if _mount_tmpfs(full, "size=64k"):
        mounts.append(full)
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        out["FULL"] = str(full)
    # a cache folder holding one real tiny entry, for `cache export`
    from probing_core.store.activations import build_cache
    from probing_core.store.entries import ActivationStore

    built = base / "built"
    store = ActivationStore(built / "activations")
    entry, _ = build_cache(tiny_model, pydoc_dataset, ["hook_embed"], store=store, max_len=32, max_tokens=200)
    store.close()
    out["BUILT"], out["KEY"] = str(built), entry.key
    yield out
    for m in mounts:
        _umount(m)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _fill(arg: str, places: dict[str, str], tmp: Path) -> str:
    for k, v in {**places, "D": str(tmp / "cache"), "OUT": str(tmp / "out")}.items():
        arg = arg.replace("{" + k + "}", v)
    return arg


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_line_exit_2_nothing_written(row: Row, places, tmp_path, capsys, monkeypatch):
    missing = [p for p in row.needs if p not in places]
    if missing:
        pytest.skip(f"cannot mount a {'/'.join(missing)} tmpfs here")
    monkeypatch.delenv("PROBING_CACHE_LIMIT_GB", raising=False)
    for k, v in row.env.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "out").mkdir()
    built = Path(places["BUILT"])
    before_built = _files(built / "activations" / "entries")
    argv = [_fill(a, places, tmp_path) for a in row.argv]
    try:
        code = main(argv)
    except SystemExit as e:  # pragma: no cover - main returns the status itself
        code = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code} for {argv}\nstderr: {err[-1500:]}\nstdout: {out[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr was not one error line: {err[-1500:]!r}"
    assert "Traceback" not in err + out
    # nothing written: no entry or temp folder in the fresh cache, no output file, the built entry untouched
    entries = tmp_path / "cache" / "activations" / "entries"
    assert not (entries.exists() and any(entries.iterdir())), f"wrote into the store: {list(entries.iterdir())}"
    assert _files(tmp_path / "out") == set(), f"wrote output files: {_files(tmp_path / 'out')}"
    assert _files(built / "activations" / "entries") == before_built
    for k in ("RO", "FULL", "DIR"):
        if k in places:
            assert _files(Path(places[k])) <= {"filler"}, f"wrote into {k}"


def test_every_option_has_a_bad_value_row():
    covered = {r.covers for r in ROWS}
    commands = {cmd: [a.option_strings[0] if a.option_strings else a.dest for a in _value_actions(p)]
                for cmd, p in LEAVES.items()}
    missing = [f"{cmd} {opt}" for cmd, opts in commands.items() for opt in opts if (cmd, opt) not in covered]
    missing += [cmd for cmd in commands if not any(c == cmd for c, _ in covered)]
    assert not missing, f"add bad-value rows for: {', '.join(missing)}"


def test_the_table_is_large():
    """The issue's examples are in the table (and far more)."""
    ids = {r.id for r in ROWS}
    for example in ("cache build --device='tpu9'", "cache build --batch-size='0'", "cache build --hooks='blocks.0.attn.hook_pattern'",
                    "probe sparse --show-C='-5'", "cache build --max-docs='-1'", "probe regression --label-param='nosuch=3'",
                    "probe sparse --top='-1'", "probe sparse --before='-5'", "cache export --out='/tmp'",
                    "cache ls PROBING_CACHE_LIMIT_GB='abc'", "cache ls PROBING_CACHE_LIMIT_GB=''"):
        assert example in ids, example
    assert len(ROWS) - len(AUTO_ROWS) > 300
