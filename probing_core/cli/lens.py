"""``lens``: next-token top-k, logit lens at the last position, and (with --answer/--wrong) logit attribution."""
from __future__ import annotations

import argparse

from probing_core.analyses import lens
from probing_core.cli._common import (
    add_common_args,
    int_range,
    nonempty,
    open_model,
    print_json,
    print_table,
)
from probing_core.errors import InputError


def _run(args: argparse.Namespace) -> int:
    if args.wrong is not None and args.answer is None:
        raise InputError("--wrong needs --answer (the correct answer to compare it with).")
    model = open_model(args, quiet=args.json)
    bos = not args.no_bos
    nxt = lens.next_token_topk(model, args.prompt, k=args.top_k, answer=args.answer, prepend_bos=bos)
    ll = lens.logit_lens(model, args.prompt, k=args.top_k, incl_mid=args.incl_mid, prepend_bos=bos)
    last = len(ll.tokens) - 1
    per_layer = [
        {"layer": lab, "top1": ll.top_tokens[i][last][0], "top1_prob": float(ll.top_probs[i, last, 0]),
         "top_k": ll.top_tokens[i][last]}
        for i, lab in enumerate(ll.labels)
    ]
    attr = None
    if args.answer is not None and args.wrong is not None:
        attr = lens.logit_attribution(model, [args.prompt], (args.answer, args.wrong), prepend_bos=bos)
    if args.json:
        out = {"model": model.describe(), "prepend_bos": bos, "next_token": nxt.to_json(),
               "logit_lens_last_position": per_layer}
        if attr is not None:
            out["attribution"] = {
                **attr.check(),
                "answers": list(attr.answers[0]),
                "accumulated": dict(zip(attr.accumulated_labels, attr.accumulated.tolist())),
                "decomposition": dict(zip(attr.decomposition_labels, attr.decomposition.tolist())),
                "head_dla": attr.head_dla.tolist(),
            }
        print_json(out)
        return 0
    print(f"tokens: {nxt.tokens} ({'BOS prepended' if bos else 'no BOS (--no-bos)'})")
    print(f"\ntop-{args.top_k} next tokens (logit centred: raw logit − its mean over the vocabulary):")
    print_table(nxt.rows(), ["rank", "token", "token_id", "logit (centred)", "prob"])
    if nxt.answer is not None:
        print(f"\nanswer {nxt.answer!r}: rank {nxt.answer_rank} (0 = top), prob {nxt.answer_prob:.4g}, "
              f"centred logit {nxt.answer_logit:.4g}")
    print("\nlogit lens at the last position:")
    print_table([{**r, "top1": repr(r["top1"]), "top_k": " | ".join(map(repr, r["top_k"]))} for r in per_layer], ["layer", "top1", "top1_prob", "top_k"])
    if attr is not None:
        c = attr.check()
        print(f"\nlogit difference {args.answer!r} − {args.wrong!r}: model {c['model_logit_diff']:.4f}, "
              f"sum of components {c['decomposition_sum']:.4f} (max error {c['max_abs_error']:.2g})")
        top = sorted(zip(attr.decomposition_labels, attr.decomposition), key=lambda t: -abs(t[1]))[:8]
        print_table([{"component": n, "logit_diff": float(v)} for n, v in top], ["component", "logit_diff"])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lens", help="logit lens / next-token top-k / logit attribution for one prompt")
    add_common_args(p, dataset=False)
    p.add_argument("--prompt", required=True, type=nonempty, help="the prompt text (BOS is prepended unless --no-bos)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token (results depend on it)")
    p.add_argument("--answer", default=None, type=nonempty, help="one-token answer to rank (e.g. ' Paris'); with --wrong: the correct answer")
    p.add_argument("--wrong", default=None, type=nonempty, help="one-token incorrect answer: adds logit difference attribution")
    p.add_argument("--top-k", type=int_range(1, 10_000), default=10, help="tokens listed per layer (default 10)")
    p.add_argument("--incl-mid", action="store_true", help="also read resid_mid of every block")
    p.set_defaults(func=_run)
