"""Command-line interface. Each module in this package that defines ``register(subparsers)``
adds top-level commands; each that defines ``register_probe(subparsers)`` adds a
``probe <kind>`` command. Handlers are ``func(args) -> int`` set with ``set_defaults``.

Errors the user can fix (:class:`ProbingError`) are printed as one line and exit with 2.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Sequence

from probing_core.errors import ProbingError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m probing_core",
        description="Probe transformer activations: cache, regression/sparse/layer probes, logit lens, attention.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    probe = sub.add_parser("probe", help="fit probes on cached activations")
    probe_sub = probe.add_subparsers(dest="probe_kind", metavar="KIND")
    probe.set_defaults(func=lambda a: (probe.print_help(), 2)[1])
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
        if hasattr(module, "register_probe"):
            module.register_probe(probe_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ProbingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept.", file=sys.stderr)
        return 130
