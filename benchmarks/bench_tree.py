"""Held-out accuracy by depth and inference speed of the shipped tree-search checkpoint.

    python benchmarks/bench_tree.py                 # 2,000 natural trees + 1,500 with uniform depth 1…15
    python benchmarks/bench_tree.py --quick         # 200 + 150; seconds
    python benchmarks/bench_tree.py --bridge        # also decode through load_model(ModelSpec("tree"))

Natural trees: each node attaches to a random node with a free child slot, the goal is a random
leaf (path depths mostly 2–7). Uniform-depth trees: a root→goal chain of the drawn depth, other
nodes attached elsewhere. Greedy decoding of the whole path, exact match.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probing_core.tree import model as tree_model, task as tree_task  # noqa: E402


def _table(name: str, res: tree_model.TreeEvalResult) -> None:
    print(f"\n{name}: exact-path accuracy {res.accuracy:.4f} on {res.correct.size} trees "
          f"({res.seconds:.2f} s, {1000 * res.seconds / res.correct.size:.2f} ms/tree)")
    print("depth  n      accuracy")
    for d, c, a in zip(res.depths, res.count_by_depth, res.accuracy_by_depth):
        print(f"{int(d):>5}  {int(c):<5}  {a:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="natural held-out trees")
    ap.add_argument("--n-uniform", type=int, default=1500, help="uniform-depth held-out trees")
    ap.add_argument("--seed", type=int, default=20_000, help="held-out seed (training used other streams)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bridge", action="store_true", help="also time the compatibility-mode bridge")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.n, args.n_uniform = 200, 150
    if not tree_model.checkpoint_available():
        print("no shipped checkpoint; train one with `python -m probing_core train-tree`.", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    model = tree_model.load_native_model()
    load_s = time.perf_counter() - t0
    conf = tree_model.read_checkpoint_config()
    n_nodes = int(conf["task"]["n_nodes"])
    natural = tree_task.make_dataset(args.n, args.seed, n_nodes=n_nodes)
    uniform = tree_task.make_dataset(args.n_uniform, args.seed + 1, n_nodes=n_nodes,
                              depths=list(range(1, n_nodes)), natural_fraction=0.0)
    print(f"checkpoint: {json.dumps(conf['bridge_config'])}")
    print(f"load (plain NativeModel): {load_s:.2f} s; threads {args.threads}")

    res_nat = tree_model.evaluate(model, natural)
    res_uni = tree_model.evaluate(model, uniform)
    _table("natural trees", res_nat)
    _table("uniform depth 1…15", res_uni)

    x = tree_task.prompt_tensor(natural[:256])
    with torch.inference_mode():
        model(x)
        t = time.perf_counter()
        for _ in range(5):
            model(x)
        fwd = (time.perf_counter() - t) / 5
    print(f"\nforward of 256 prompts × {x.shape[1]} tokens: {1000 * fwd:.1f} ms")

    out = {"natural": res_nat.to_json(), "uniform_depth": res_uni.to_json(), "forward_256_ms": round(1000 * fwd, 1)}
    if args.bridge:
        from probing_core.models import ModelSpec, load_model

        t = time.perf_counter()
        loaded = load_model(ModelSpec("tree", device="cpu"))
        bl = time.perf_counter() - t
        res_b = tree_model.evaluate(loaded, natural[:500])
        same = bool((res_b.correct == res_nat.correct[:500]).all())
        print(f"\nbridge (compatibility mode): load {bl:.2f} s; 500 trees decoded in {res_b.seconds:.2f} s; "
              f"accuracy {res_b.accuracy:.4f}; per-tree correctness identical to the plain model: {same}")
        out["bridge"] = {"load_s": round(bl, 2), "accuracy_500": res_b.accuracy, "identical": same}
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
