"""``intervene …``: make a direction from a cache entry, steer/ablate along it on a prompt, amnesic probing,
neuron read-out, and the Geometry-of-Truth case — each against K random controls.

Examples::

    python -m probing_core intervene truth --dataset cities --k-controls 20 --json
    python -m probing_core intervene direction --entry KEY --hook blocks.9.hook_resid_post \\
        --label column --label-param column=label --positions last --method mass_mean --out truth
    python -m probing_core intervene prompt --direction truth --prompt "…" --kind steer --c 8 \\
        --answer " True" --wrong " False" --positions last:5 --json
    python -m probing_core intervene amnesic --entry KEY --hook blocks.3.hook_resid_post --label column \\
        --label-param column=label --positions last --k-max 5 --later-hook blocks.6.hook_resid_post
    python -m probing_core intervene readout --layer 5 --neurons 10,20,30
"""
from __future__ import annotations

import argparse

import numpy as np

from probing_core.analyses import amnesic, directions, truth_case
from probing_core.analyses import interventions as iv
from probing_core.analyses.regression import PositionRule, regression_data
from probing_core.cli._common import (
    add_common_args,
    float_range,
    int_range,
    nonempty,
    open_model,
    open_store,
    positive_int,
    print_json,
    print_table,
    seed_int,
    tqdm_progress,
)
from probing_core.cli.probe_regression import parse_label_params
from probing_core.data.datasets import load_dataset
from probing_core.data.labels import LABELS, LabelSpec
from probing_core.data.statements import STATEMENT_SETS, statements_spec
from probing_core.errors import InputError
from probing_core.store.activations import open_entry

k_controls_arg = int_range(1, iv.K_MAX)
coef_arg = float_range(-iv.C_MAX, iv.C_MAX)


def _label_data(args: argparse.Namespace, hooks: list[str]):
    if args.label not in LABELS:
        raise InputError(f"unknown label {args.label!r}; choose one of: {', '.join(LABELS)}.")
    acts = open_entry(open_store(args), args.entry)
    spec = LabelSpec.make(args.label, **parse_label_params(args.label_param, args.label))
    X, y, info = regression_data(acts, hooks, spec, PositionRule.parse(args.positions))
    return acts, X, y, info


def _truth(args: argparse.Namespace) -> int:
    model = open_model(args, quiet=args.json)
    ds = load_dataset(statements_spec(args.dataset))
    update, close = tqdm_progress("truth case")
    try:
        res = truth_case.truth_case(model, ds, n_statements=args.n_statements, n_heldout=args.heldout, coefs=args.coefs,
                                    k_controls=args.k_controls, seed=args.seed, progress=update,
                                    answers=tuple(a.rstrip() for a in args.answers.split("|")))
    finally:
        close()
    saved = directions.save_direction(res.direction, args.save_direction) if args.save_direction else []
    summ = res.summary()
    if args.json:
        print_json({"model": model.describe(), **summ, "curve": res.curve.rows(), "positions": res.positions,
                    "few_shot": [list(e) for e in res.examples], "sweep": res.sweep.rows(), "saved": [str(p) for p in saved]})
        return 0
    print_table(res.curve.rows(), ["layer", "logistic", "mass_mean", "control"])
    print(f"\nbest: {summ['best_hook']} — logistic {summ['best_logistic_accuracy']:.3f}, mass-mean "
          f"{summ['mass_mean_accuracy_at_best']:.3f}, shuffled-label control {summ['control_accuracy_at_best']:.3f}, "
          f"chance {summ['chance']:.3f}")
    print(f"baseline P(True) − P(False): true statements {summ['baseline_p_true_minus_p_false']['true']:+.4f}, "
          f"false {summ['baseline_p_true_minus_p_false']['false']:+.4f}")
    rows = [{"case": k, **v} for k, v in summ["steering"].items()]
    print_table(rows, ["case", "delta", "random_min", "random_max", "percentile", "z", "inside_band"])
    for p in saved:
        print(f"wrote {p}")
    return 0


def _direction(args: argparse.Namespace) -> int:
    model = open_model(args, quiet=True)
    _, X, y, info = _label_data(args, [args.hook])
    Xh = X[args.hook]
    if args.method == "neurons":
        if not args.neurons:
            raise InputError("--method neurons needs --neurons 1,2,3.")
        d = directions.neuron_direction(args.neurons, model_key=model.key, hook=args.hook, width=Xh.shape[1], X=Xh)
    elif args.method == "mass_mean":
        d = directions.mass_mean_direction(Xh, y, model_key=model.key, hook=args.hook, positive=args.positive,
                                           description=f"mass-mean of {info.description}")
    elif args.method == "ridge":
        d = directions.ridge_direction(Xh, y, model_key=model.key, hook=args.hook, alpha=args.alpha,
                                       description=f"ridge (α = {args.alpha:g}) on {info.description}")
    else:
        d = directions.logistic_direction(Xh, y, model_key=model.key, hook=args.hook, positive=args.positive, C=args.C,
                                          penalty=args.penalty, description=f"{args.penalty} logistic on {info.description}")
    paths = directions.save_direction(d, args.out)
    if args.json:
        print_json({**d.to_json(), "mean_activation": None, "n_rows": info.n_selected, "written": [str(p) for p in paths]})
    else:
        print(f"{d.method} direction at {d.hook} from {info.n_selected} rows (‖v‖ = {d.norm:.4g}, σ along it = "
              f"{d.proj_std}); wrote {paths[0]} and {paths[1]}")
    return 0


def _prompt(args: argparse.Namespace) -> int:
    model = open_model(args, quiet=args.json)
    d = directions.load_direction(args.direction)
    if (args.answer is None) != (args.wrong is None):
        raise InputError("give both --answer and --wrong (the answer pair), or neither.")
    step = iv.Intervention(args.kind, args.positions, args.c, args.value)
    eff = iv.intervene_prompt(model, args.prompt, d, step, answers=(args.answer, args.wrong) if args.answer else None,
                              k=args.top_k, k_controls=args.k_controls, seed=args.seed, n_generate=args.generate)
    if args.json:
        print_json({"model": model.describe(), **eff.to_json()})
        return 0
    print(f"{eff.intervention_label} along {eff.direction}\npositions: {np.flatnonzero(eff.mask).tolist()} of {eff.tokens}")
    both = [{"rank": b["rank"], "before": repr(b["token"]), "p_before": b["prob"], "after": repr(a["token"]), "p_after": a["prob"]}
            for b, a in zip(eff.top_before, eff.top_after)]
    print_table(both, ["rank", "before", "p_before", "after", "p_after"])
    if eff.answers:
        print(f"logit diff {eff.logit_diff_before:+.4f} → {eff.logit_diff_after:+.4f}; "
              f"P(a) − P(b) {eff.prob_diff_before:+.4f} → {eff.prob_diff_after:+.4f}")
    for cmp in eff.controls.values():
        print(cmp.summary())
    if args.generate:
        print(f"continuation before: {eff.continuation_before!r}\ncontinuation after:  {eff.continuation_after!r}")
    return 0


def _amnesic(args: argparse.Namespace) -> int:
    model = open_model(args, quiet=True)
    acts, _, y, info = _label_data(args, [args.hook])
    update, close = tqdm_progress("amnesic probing")
    try:
        res = amnesic.amnesic_probing(model, acts, args.hook, info.rows, y, k_max=args.k_max, later_hook=args.later_hook,
                                      n_loss_rows=args.loss_rows, seed=args.seed, progress=update)
    finally:
        close()
    if args.json:
        print_json({"hook": res.hook, "later_hook": res.later_hook, "chance": res.chance, "rows": res.rows(),
                    "seconds_per_iteration": res.seconds_per_iteration, "seconds_fit_and_pass": res.seconds_fit_and_pass})
        return 0
    print_table(res.rows(), ["k", "probe_acc", "random_acc", "loss", "random_loss", "downstream_acc", "random_downstream_acc"])
    print(f"chance {res.chance:.3f}; {res.seconds_per_iteration:.2f} s per iteration vs {res.seconds_fit_and_pass:.2f} s "
          "for one probe fit + one pass over the stored activations")
    return 0


def _readout(args: argparse.Namespace) -> int:
    model = open_model(args, quiet=True)
    r = iv.neuron_readout(model, args.layer, args.neurons, k=args.top_k)
    if args.json:
        print_json({"layer": r.layer, "rows": [{"neuron": int(n), "promotes": t, "promote_values": tv.tolist(),
                                                "suppresses": b, "suppress_values": bv.tolist()}
                                               for n, t, tv, b, bv in zip(r.neurons, r.top_tokens, r.top_values,
                                                                          r.bottom_tokens, r.bottom_values)]})
    else:
        print_table(r.rows(), ["neuron", "promotes", "suppresses"])
    return 0


def _neuron_list(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of neuron indices") from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one neuron index")
    return out


def _entry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--entry", required=True, type=nonempty, help="cache entry key (see `cache ls`)")
    p.add_argument("--hook", required=True, type=nonempty, help="hook name, e.g. blocks.9.hook_resid_post")
    p.add_argument("--label", required=True, help=f"label: {', '.join(LABELS)}")
    p.add_argument("--label-param", action="append", help="label parameter key=value (repeatable), e.g. column=label")
    p.add_argument("--positions", default="all", help="rows to use: all, last or match:TOK,TOK")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("intervene", help="steer/ablate along a probe direction, with random controls")
    s = p.add_subparsers(dest="intervene_kind", metavar="ACTION")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    t = s.add_parser("truth", help="Geometry-of-Truth case: truth probe per layer, mass-mean steering vs random band")
    t.add_argument("--dataset", default="cities", choices=list(STATEMENT_SETS))
    t.add_argument("--n-statements", type=int_range(60, 3000), default=600, help="statements probed (balanced)")
    t.add_argument("--heldout", type=int_range(1, 50), default=6, help="held-out statements per class to steer")
    t.add_argument("--coefs", type=coef_arg, nargs="+", default=list(truth_case.DEFAULT_COEFS), help="c values (σ units)")
    t.add_argument("--save-direction", default=None, help="write the mass-mean direction to STEM.npy + STEM.json")
    t.add_argument("--answers", default=" True| False", help="answer pair 'A|B', one token each (default ' True| False')")

    d = s.add_parser("direction", help="make a direction (mass-mean, ridge, logistic, neurons) from a cache entry")
    _entry_args(d)
    d.add_argument("--method", default="mass_mean", choices=["mass_mean", "ridge", "logistic", "neurons"])
    d.add_argument("--positive", default=None, help="class contrasted with the rest (non-binary labels)")
    d.add_argument("--alpha", type=float_range(0, lo_open=True), default=1.0, help="ridge α")
    d.add_argument("--C", type=float_range(0, lo_open=True), default=1.0, help="logistic C")
    d.add_argument("--penalty", default="l2", choices=["l1", "l2"])
    d.add_argument("--neurons", type=_neuron_list, default=None, help="neuron indices for --method neurons")
    d.add_argument("--out", required=True, type=nonempty, help="output stem: writes STEM.npy and STEM.json")

    q = s.add_parser("prompt", help="one prompt before vs after an intervention, with K random controls")
    q.add_argument("--direction", required=True, type=nonempty, help="STEM (or STEM.npy / STEM.json) of a saved direction")
    q.add_argument("--prompt", required=True, type=nonempty)
    q.add_argument("--kind", default="steer", choices=list(iv.KINDS))
    q.add_argument("--c", type=coef_arg, default=4.0, help="steering strength in σ along the direction")
    q.add_argument("--value", type=float, default=0.0, help="value for --kind neuron_value")
    q.add_argument("--positions", default="all", help="all, last, last:N, match:TOK,TOK or idx:I,J")
    q.add_argument("--answer", default=None, help="answer pair: first token (e.g. ' True')")
    q.add_argument("--wrong", default=None, help="answer pair: second token (e.g. ' False')")
    q.add_argument("--top-k", type=int_range(1, 100), default=10)
    q.add_argument("--generate", type=int_range(0, 64), default=0, help="greedy tokens before/after")

    a = s.add_parser("amnesic", help="INLP: fit probe → project out → repeat; probe score and LM loss vs k")
    _entry_args(a)
    a.add_argument("--k-max", type=int_range(1, 20), default=5)
    a.add_argument("--later-hook", default=None, help="a later hook for the downstream probe")
    a.add_argument("--loss-rows", type=positive_int, default=4, help="cached rows scored for the LM loss")

    r = s.add_parser("readout", help="tokens each MLP neuron's output weights promote/suppress (W_out[n] @ W_U)")
    r.add_argument("--layer", type=int_range(0, 10_000), required=True)
    r.add_argument("--neurons", type=_neuron_list, required=True, help="comma-separated neuron indices")
    r.add_argument("--top-k", type=int_range(1, 100), default=10)

    for sp, fn in ((t, _truth), (d, _direction), (q, _prompt), (a, _amnesic), (r, _readout)):
        add_common_args(sp, dataset=False)
        if sp in (t, q):
            sp.add_argument("--k-controls", type=k_controls_arg, default=20, help="random controls K (1…256)")
        if sp in (t, q, a):
            sp.add_argument("--seed", type=seed_int, default=0, help="seed of the random controls and splits")
        sp.set_defaults(func=fn)
