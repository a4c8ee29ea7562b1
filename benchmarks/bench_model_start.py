"""Model start: the embedded model's warm start (processed weights read from the cache) against a
plain ``transformers`` load of the same saved weights, side by side in one run.

1. In-process rounds, the order rotating each round (imports already paid): A = ``load_model`` warm
   (processed-weights cache hit, the faster bridge construction), B = plain
   ``AutoModelForCausalLM.from_pretrained`` + ``AutoTokenizer`` of the same folder, P = the previous
   warm start (cached weights, TransformerLens's own ``build_bridge_from_module``), C = before the
   cache (TransformerLens's bridge and its ``enable_compatibility_mode()`` processing every time).
   Wall-time medians and spread (min–max), CPU-time medians (steadier on a shared box); goal A/B ≤ 2.
2. Where A's time goes (one more warm load, stage by stage).
3. Fresh processes (imports included, what a user waits for): warm ``load_model`` vs the plain load.
4. The cold first start (GGUF → safetensors folder, processing, cache written) in a fresh process
   with an empty cache folder — reported separately (``--skip-cold`` to leave it out).

Usage: flock /tmp/bench.lock python benchmarks/bench_model_start.py [--rounds 8] [--fresh-rounds 2] [--skip-cold]
"""
from __future__ import annotations

import argparse
import gc
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


def _tl_bridge(folder: Path):
    """The bridge as TransformerLens builds it (build_bridge_from_module), none of our construction shortcuts."""
    from transformer_lens.model_bridge.sources._bridge_builder import (
        build_bridge_from_module,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32)
    hf.train(False)
    tok = AutoTokenizer.from_pretrained(str(folder), add_bos_token=True)
    return build_bridge_from_module(hf, "LlamaForCausalLM", hf_config=hf.config, tokenizer=tok, model_name="SmolLM2-135M-Instruct")


def uncached_warm(folder: Path) -> None:
    """Before the processed-weights cache: TransformerLens's bridge, its own processing every time."""
    bridge = _tl_bridge(folder)
    bridge.enable_compatibility_mode()
    bridge.train(False)
    M.weight_fingerprint(bridge)


def cached_tl_warm(folder: Path, root: Path) -> None:
    """The previous warm start: processed weights from the cache, but TransformerLens's own bridge construction."""
    bridge = _tl_bridge(folder)
    M.enable_compat_cached(bridge, f"embedded:{folder.name}", dtype="float32", device="cpu", cache_root=root,
                           raw_identity=M.folder_identity(folder))
    bridge.train(False)


def stages(folder: Path, root: Path) -> list[tuple[str, float]]:
    """One warm load, step by step, as load_model does it."""
    out = []
    t = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32)
    hf.train(False)
    out.append(("transformers load of the raw weights", time.perf_counter() - t)); t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(folder), add_bos_token=True)
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
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--fresh-rounds", type=int, default=2)
    ap.add_argument("--skip-cold", action="store_true")
    args = ap.parse_args()
    root = M.default_cache_root()
    print(f"torch threads {torch.get_num_threads()}, cache {root}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    first = load_model(ModelSpec("embedded"), cache_root=root)  # converts/processes if this cache is new
    folder = M._convert_embedded(root, None)
    print(f"first load in this process: {first.load_seconds:.1f} s ({'; '.join(first.notes)})")
    plain_load(folder)  # both paths' files in the page cache before timing

    print("\n1. In-process, alternating rounds (the order rotates each round; wall time, and CPU time of this process)")
    runs = {
        "A": ("warm start (processed weights cached, fast bridge)", lambda: load_model(ModelSpec("embedded"), cache_root=root)),
        "B": ("plain transformers load, same folder", lambda: plain_load(folder)),
        "P": ("previous warm start (cached weights, TL's bridge)", lambda: cached_tl_warm(folder, root)),
        "C": ("before the cache (TL's bridge + processing)", lambda: uncached_warm(folder)),
    }
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(args.rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            gc.collect()  # the last run's model (full of reference cycles) is collected here, not inside the next run
            t, c = time.perf_counter(), time.process_time()
            out = runs[k][1]()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
            if k == "A":
                assert out.processed_cache == "hit" and out.key == first.key
            del out
    for k, (label, _) in runs.items():
        print(f"  {k} {label:<52s}: wall {_fmt(wall[k])}; CPU median {statistics.median(cpu[k]):.2f} s")
    print(f"  (load average now {os.getloadavg()[0]:.1f})")
    for name, xs in (("wall", wall), ("CPU", cpu)):
        ra = [x / y for x, y in zip(xs["A"], xs["B"])]
        rp = [x / y for x, y in zip(xs["P"], xs["B"])]
        print(f"  {name:4s}: A/B = {statistics.median(ra):.2f}x (per round {min(ra):.2f}–{max(ra):.2f}; goal ≤ 2); "
              f"previous P/B = {statistics.median(rp):.2f}x; C/A = {statistics.median([x / y for x, y in zip(xs['C'], xs['A'])]):.1f}x")

    print("\n2. Where a warm start's time goes")
    for name, secs in stages(folder, root):
        print(f"  {name:<55s} {secs:6.2f} s")

    if args.fresh_rounds > 0:
        fresh(args, root, folder)
    if not args.skip_cold:
        cold(root)


def fresh(args: argparse.Namespace, root: Path, folder: Path) -> None:
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


def cold(root: Path) -> None:
    print("\n4. Cold first start (empty cache: GGUF conversion, processing, cache written), fresh process")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    warm_code = "from probing_core.models import ModelSpec, load_model; load_model(ModelSpec('embedded'))"
    with tempfile.TemporaryDirectory() as d:
        secs = fresh_process(warm_code, {**env, "PROBING_CACHE_DIR": d})
        written = sorted(p.name for p in (Path(d) / "models" / "processed").glob("*.safetensors"))
        print(f"  cold start {secs:.1f} s; processed-weights file written: {bool(written)}")
        secs2 = fresh_process(warm_code, {**env, "PROBING_CACHE_DIR": d})
        print(f"  the next start from that cache {secs2:.1f} s")


if __name__ == "__main__":
    main()
