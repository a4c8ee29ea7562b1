"""``attention``: head scores of one layer for a prompt, optionally a standalone offline CircuitsVis page."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from probing_core.analyses import attention
from probing_core.cli._common import (
    add_common_args,
    int_range,
    nonempty,
    nonneg_int,
    open_model,
    out_file_arg,
    print_json,
    print_table,
)
from probing_core.errors import InputError


def _run(args: argparse.Namespace) -> int:
    model = open_model(args, quiet=args.json)
    res = attention.attention_patterns(model, args.prompt, layer=args.layer, max_len=args.max_len)
    scores = attention.head_scores(res.pattern[None], res.tokens, selected_token=args.token)
    rows = [{k: v for k, v in r.items() if k != "layer"} for r in scores.rows()]
    out_html = None
    if args.html:
        out_html = Path(args.html)
        try:
            out_html.write_text(attention.circuitsvis_html(
                res.tokens, res.pattern, title=f"{model.spec.label()} · layer {args.layer}"), encoding="utf-8")
        except OSError as e:
            raise InputError(f"cannot write {out_html}: {e.strerror}; pick another --html path.") from e
    if args.json and res.notice:
        print(f"note: {res.notice}", file=sys.stderr)
    if args.json:
        print_json({"model": model.describe(), "layer": args.layer, "tokens": res.tokens, "truncated": res.truncated,
                    "notice": res.notice, "head_scores": rows, "pattern": res.pattern if args.pattern else None,
                    "html": str(out_html) if out_html else None})
        return 0
    print(f"tokens ({len(res.tokens)}): {res.tokens}")
    if res.notice:
        print(f"note: {res.notice}")
    print(f"\nlayer {args.layer} head scores (averaged over query positions ≥ 1):")
    print_table(rows, list(rows[0]))
    if out_html:
        print(f"\nwrote {out_html} ({out_html.stat().st_size / 1e6:.1f} MB; opens offline, JavaScript inlined)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="attention head scores for one layer; --html writes a CircuitsVis page")
    add_common_args(p, dataset=False)
    p.add_argument("--prompt", required=True, type=nonempty, help="the prompt text (BOS is prepended)")
    p.add_argument("--layer", type=nonneg_int, required=True, help="layer index (0-based)")
    p.add_argument("--max-len", type=int_range(2, 1_000_000), default=attention.DEFAULT_MAX_LEN, help="truncate longer prompts (tokens, with BOS)")
    p.add_argument("--token", type=nonneg_int, default=None, help="also score attention to this token position")
    p.add_argument("--html", default=None, type=out_file_arg, metavar="FILE", help="write a standalone CircuitsVis HTML page (works offline)")
    p.add_argument("--pattern", action="store_true", help="with --json: include the [head, query, key] pattern")
    p.set_defaults(func=_run)
