"""Command-line interface. Each module in this package that defines ``register(subparsers)``
adds top-level commands; each that defines ``register_probe(subparsers)`` adds a
``probe <kind>`` command. Handlers are ``func(args) -> int`` set with ``set_defaults``.

Errors the user can fix (:class:`ProbingError`, a bad argument, a read-only or full disk) are
printed as one line and exit with 2, never a traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import pkgutil
import sqlite3
import sys
from collections.abc import Sequence

from probing_core.cli._common import OneLineParser
from probing_core.errors import ProbingError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a bad argument (one line already printed) or --help
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ProbingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A read-only or full disk met outside the store's own checks (model conversion, output files).
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{where} ({e.strerror}); free disk space or set PROBING_CACHE_DIR to a "
              "writable folder.", file=sys.stderr)
        return 2
    except sqlite3.OperationalError as e:
        if "full" not in str(e) and "readonly" not in str(e):
            raise
        print(f"error: the store index cannot be written ({e}); free disk space or set PROBING_CACHE_DIR to a "
              "writable folder.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept.", file=sys.stderr)
        return 130
