"""Timings of the logit-lens and attention core on the embedded model (prints figures; no assertions).

    python benchmarks/bench_lens.py [--model embedded]
"""
from __future__ import annotations

import argparse
import time

from probing_core.analyses import attention, lens
from probing_core.models import load_model, spec_from_cli

PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"


def _time(label: str, fn, repeat: int = 2) -> object:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    print(f"{label:<52} {best * 1000:8.0f} ms")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    args = ap.parse_args()
    t = time.perf_counter()
    model = load_model(spec_from_cli(args.model))
    print(f"load {args.model}: {time.perf_counter() - t:.1f} s; prompt {len(model.encode(PROMPT))} tokens")
    _time("next_token_topk k=10", lambda: lens.next_token_topk(model, PROMPT, k=10, answer=" Madrid"))
    _time("logit_lens k=5", lambda: lens.logit_lens(model, PROMPT, k=5))
    _time("logit_lens k=5 incl_mid", lambda: lens.logit_lens(model, PROMPT, k=5, incl_mid=True))
    long = " ".join(["word"] * 250)
    _time("logit_lens k=5, 251 tokens", lambda: lens.logit_lens(model, long, k=5), repeat=1)
    for n in (4, 25):
        ps = lens.sentiment_prompt_set(n)
        _time(f"logit_difference, {len(ps)} template prompts", lambda: lens.logit_difference(model, ps))
        res = _time(f"logit_attribution, {len(ps)} template prompts", lambda: lens.logit_attribution(model, ps), repeat=1)
        print(f"    mean logit diff {res.model_logit_diff:.3f}, component sum {res.decomposition_sum:.3f}, "
              f"max |error| {res.max_abs_error:.2e}")
    _time("attention_patterns one layer, 64 tokens", lambda: attention.attention_patterns(model, long, layer=3, max_len=64))
    allp = _time("attention_patterns all layers, 64 tokens", lambda: attention.attention_patterns(model, long, layer=None, max_len=64))
    _time("head_scores all layers, 64 tokens", lambda: attention.head_scores(allp.pattern, allp.tokens, selected_token=5))
    _time("circuitsvis_html one layer, 64 tokens", lambda: attention.circuitsvis_html(allp.tokens, allp.pattern[3]))


if __name__ == "__main__":
    main()
