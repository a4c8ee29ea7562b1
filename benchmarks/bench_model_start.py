"""Model start: the embedded model's warm start (processed weights read from the cache) against a
plain ``transformers`` load of the same saved weights, side by side in one run.

1. In-process, alternating A/B/C rounds (imports already paid): A = ``load_model`` warm (processed-
   weights cache hit), B = plain ``AutoModelForCausalLM.from_pretrained`` + ``AutoTokenizer`` of the
   same folder, C = the uncached warm start this replaced (bridge + TransformerLens's own
   ``enable_compatibility_mode()`` processing every time). Medians and spread (min–max); goal A/B ≤ 2.
2. Where A's time goes (one more warm load, stage by stage).
3. Fresh processes (imports included, what a user waits for): warm ``load_model`` vs the plain load.
4. The cold first start (GGUF → safetensors folder, processing, cache written) in a fresh process
   with an empty cache folder — reported separately (``--skip-cold`` to leave it out).

Usage: flock /tmp/bench.lock python benchmarks/bench_model_start.py [--rounds 5] [--skip-cold]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from probing_core import models as M
from probing_core.models import ModelSpec, load_model


def _fmt(xs: list[float]) -> str:
    return f"median {statistics.median(xs):6.2f} s  (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"


def plain_load(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32)
    model.train(False)
    AutoTokenizer.from_pretrained(str(folder))


def uncached_warm(folder: Path) -> None:
    bridge, _tok = M._bridge_from_hf_folder(str(folder), torch.float32, "cpu", "SmolLM2-135M-Instruct")
    bridge.enable_compatibility_mode()
    bridge.train(False)
    M.weight_fingerprint(bridge)


def stages(folder: Path, root: Path) -> list[tuple[str, float]]:
    """One warm load, step by step, as load_model does it."""
    out = []
    t = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32)
    hf.train(False)
    out.append(("transformers load of the raw weights", time.perf_counter() - t)); t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(folder))
    out.append(("tokenizer", time.perf_counter() - t)); t = time.perf_counter()
    bridge = M._build_bridge(hf, "LlamaForCausalLM", tok, "x")
    out.append(("TransformerLens bridge built around it", time.perf_counter() - t)); t = time.perf_counter()
    ident = f"embedded:{folder.name}"
    key = M.processed_weights_key(ident, "float32", "cpu", M.folder_identity(folder))
    out.append(("cache key (the folder's file names, sizes, times)", time.perf_counter() - t)); t = time.perf_counter()
    bridge.enable_compatibility_mode(no_processing=True)
    out.append(("compatibility mode without processing (hook aliases)", time.perf_counter() - t)); t = time.perf_counter()
    name = __import__("hashlib").blake2b(ident.encode(), digest_size=4).hexdigest()
    path = root / "models" / "processed" / f"{name}-{key}.safetensors"
    state = M._read_processed(path, "cpu", {"key": key, "ident": ident, "format": str(M.PROCESSED_FORMAT_VERSION)})
    assert state is not None, f"no processed-weights file at {path}: run a load first"
    out.append(("read the processed weights (safetensors)", time.perf_counter() - t)); t = time.perf_counter()
    M._install_processed(bridge, state)
    out.append(("hand them to the bridge's components", time.perf_counter() - t)); t = time.perf_counter()
    assert M._read_fingerprint(path.with_suffix(".json"), key, path) is not None
    out.append(("model key's fingerprint, saved beside the file", time.perf_counter() - t)); t = time.perf_counter()
    M.weight_fingerprint(bridge)
    out.append(("(computing that fingerprint instead would cost)", time.perf_counter() - t))
    return out


def fresh_process(code: str, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fresh-rounds", type=int, default=2)
    ap.add_argument("--skip-cold", action="store_true")
    args = ap.parse_args()
    root = M.default_cache_root()
    print(f"torch threads {torch.get_num_threads()}, cache {root}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    first = load_model(ModelSpec("embedded"), cache_root=root)  # converts/processes if this cache is new
    folder = M._convert_embedded(root, None)
    print(f"first load in this process: {first.load_seconds:.1f} s ({'; '.join(first.notes)})")
    plain_load(folder)  # both paths' files in the page cache before timing

    print("\n1. In-process, alternating rounds")
    a, b, c = [], [], []
    for _ in range(args.rounds):
        t = time.perf_counter(); m = load_model(ModelSpec("embedded"), cache_root=root); a.append(time.perf_counter() - t)
        assert m.processed_cache == "hit" and m.key == first.key
        del m
        t = time.perf_counter(); plain_load(folder); b.append(time.perf_counter() - t)
        t = time.perf_counter(); uncached_warm(folder); c.append(time.perf_counter() - t)
    print(f"  A warm start, processed weights cached : {_fmt(a)}")
    print(f"  B plain transformers load (same folder): {_fmt(b)}")
    print(f"  C warm start, processing every time    : {_fmt(c)}")
    ra = [x / y for x, y in zip(a, b)]
    print(f"  (load average now {os.getloadavg()[0]:.1f})")
    print(f"  A/B = {statistics.median(ra):.2f}x (per-round {min(ra):.2f}–{max(ra):.2f}; goal ≤ 2)   "
          f"C/A = {statistics.median([x / y for x, y in zip(c, a)]):.2f}x faster than before")

    print("\n2. Where a warm start's time goes")
    for name, secs in stages(folder, root):
        print(f"  {name:<55s} {secs:6.2f} s")

    print("\n3. Fresh processes (imports included)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PROBING_CACHE_DIR": str(root), "HF_HUB_OFFLINE": "1"}
    warm_code = "from probing_core.models import ModelSpec, load_model; load_model(ModelSpec('embedded'))"
    plain_code = ("import torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
                  f"AutoModelForCausalLM.from_pretrained({str(folder)!r}, attn_implementation='eager', dtype=torch.float32); "
                  f"AutoTokenizer.from_pretrained({str(folder)!r})")
    fa, fb = [], []
    for _ in range(args.fresh_rounds):
        fa.append(fresh_process(warm_code, env))
        fb.append(fresh_process(plain_code, env))
    print(f"  warm load_model : {_fmt(fa)}")
    print(f"  plain load      : {_fmt(fb)}")
    print(f"  ratio {statistics.median(fa) / statistics.median(fb):.2f}x")

    if not args.skip_cold:
        print("\n4. Cold first start (empty cache: GGUF conversion, processing, cache written), fresh process")
        with tempfile.TemporaryDirectory() as d:
            secs = fresh_process(warm_code, {**env, "PROBING_CACHE_DIR": d})
            written = sorted(p.name for p in (Path(d) / "models" / "processed").glob("*.safetensors"))
            print(f"  cold start {secs:.1f} s; processed-weights file written: {bool(written)}")
            secs2 = fresh_process(warm_code, {**env, "PROBING_CACHE_DIR": d})
            print(f"  the next start from that cache {secs2:.1f} s")


if __name__ == "__main__":
    main()
