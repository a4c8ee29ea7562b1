"""``models`` and ``datasets``: what can be picked."""
from __future__ import annotations

import argparse

from probing_core.cli._common import add_json_arg, print_json, print_table
from probing_core.data.datasets import dataset_catalog
from probing_core.models import model_catalog


def _models(args: argparse.Namespace) -> int:
    rows = [{"id": e.id, "kind": e.spec.kind, "offline": e.offline, "description": e.description} for e in model_catalog()]
    rows.append({"id": "<folder>", "kind": "local", "offline": True, "description": "any Hugging Face model folder on disk"})
    rows.append({"id": "<hf name>", "kind": "hf", "offline": False, "description": "any TransformerLens-supported hub model (needs the internet)"})
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["id", "kind", "offline", "description"])
    return 0


def _datasets(args: argparse.Namespace) -> int:
    rows = [
        {"id": s.kind if s.kind in ("pydoc", "vocab") else f"hf:{s.name}", "offline": s.kind != "hf", "description": s.label()}
        for s in dataset_catalog()
    ]
    rows.append({"id": "<file.txt|.csv|.jsonl>", "offline": True, "description": "a local file (CSV/JSONL: --text-column, other columns become labels)"})
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["id", "offline", "description"])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model catalog")
    add_json_arg(p)
    p.set_defaults(func=_models)
    p = sub.add_parser("datasets", help="list the datasets")
    add_json_arg(p)
    p.set_defaults(func=_datasets)
