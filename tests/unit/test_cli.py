"""The CLI's foundation commands, run in-process on the tiny model with a real store."""
from __future__ import annotations

import json

import numpy as np

from probing_core.cli import main


def run_json(capsys, *argv: str):
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip().startswith(("{", "[")) else out)


def test_models_and_datasets_list(capsys):
    code, models = run_json(capsys, "models", "--json")
    assert code == 0 and {"embedded", "tiny"} <= {m["id"] for m in models}
    code, datasets = run_json(capsys, "datasets", "--json")
    assert code == 0 and "pydoc" in {d["id"] for d in datasets}


def test_cache_build_ls_export_rm(capsys, tmp_path):
    d = str(tmp_path)
    code, built = run_json(capsys, "cache", "build", "--model", "tiny", "--max-tokens", "700", "--hooks", "embed", "blocks.1.hook_resid_post", "--cache-dir", d, "--json")
    assert code == 0 and built["built"] and built["n_tokens"] == 700
    assert built["hooks"] == ["hook_embed", "blocks.1.hook_resid_post"] and built["bytes"] > 700 * 32 * 4 * 2
    code, again = run_json(capsys, "cache", "build", "--model", "tiny", "--max-tokens", "700", "--hooks", "embed", "--cache-dir", d, "--json")
    assert code == 0 and not again["built"] and again["key"] == built["key"]
    code, listed = run_json(capsys, "cache", "ls", "--cache-dir", d, "--json")
    assert [e["key"] for e in listed] == [built["key"]]
    out = tmp_path / "x.npy"
    assert main(["cache", "export", built["key"], "--hook", "hook_embed", "--out", str(out), "--cache-dir", d]) == 0
    assert np.load(out).shape == (700, 32) and out.with_suffix(".tokens.tsv").exists()
    capsys.readouterr()
    assert main(["cache", "rm", built["key"], "--cache-dir", d]) == 0
    assert capsys.readouterr().out.strip() == f"deleted {built['key']}"
    code, listed = run_json(capsys, "cache", "ls", "--cache-dir", d, "--json")
    assert listed == []


def test_cli_errors_are_one_line_with_exit_2(capsys, tmp_path):
    d = str(tmp_path)
    assert main(["cache", "build", "--model", "tiny", "--hooks", "blocks.9.hook_resid_post", "--cache-dir", d]) == 2
    assert "do not exist" in capsys.readouterr().err
    assert main(["cache", "build", "--model", "tiny", "--max-tokens", "0", "--cache-dir", d]) == 2
    assert "positive" in capsys.readouterr().err
    assert main(["cache", "build", "--model", "tiny", "--dataset", str(tmp_path / "missing.txt"), "--cache-dir", d]) == 2
    assert "neither" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert main(["cache", "build", "--model", "tiny", "--dataset", str(empty), "--cache-dir", d]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["cache", "export", "0123456789abcdef", "--hook", "hook_embed", "--out", str(tmp_path / "y.npy"), "--cache-dir", d]) == 2
    assert "no cache entry" in capsys.readouterr().err
    assert main(["cache", "build", "--model", "not-a-model-xyz", "--cache-dir", d]) == 2
    err = capsys.readouterr().err
    assert "internet" in err or "could not load" in err


def test_probe_layers_control_matches_the_page_default(capsys, tmp_path):
    """`probe layers` fits its control task on as many rows as the real task, as the page does; the flag
    --control-every-row gives the every-row control (more held-out control rows, same real-task accuracies)."""
    d = str(tmp_path / "c")
    common = ["probe", "layers", "--model", "tiny", "--max-tokens", "1500", "--hooks", "embed", "blocks.1.hook_resid_post",
              "--label", "token-offset:-1", "--top-k-classes", "6", "--cache-dir", d, "--json"]
    code, task = run_json(capsys, *common)
    assert code == 0
    code, every = run_json(capsys, *common, "--control-every-row")
    assert code == 0
    t, e = task["result"], every["result"]
    assert t["test_accuracy"] == e["test_accuracy"]
    assert t["control_n_test"] < e["control_n_test"]
    assert any("as many as the real task" in n for n in t["notes"])
    assert not any("as many as the real task" in n for n in e["notes"])
