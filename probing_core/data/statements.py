"""Labelled statements: one true/false statement per document with a 0/1 ``label`` column.

The built-in sets are the Geometry of Truth datasets of Marks & Tegmark (2023, CC BY 4.0), shipped
unchanged in ``geometry_of_truth/`` with their README and LICENSE. A statement is one document, so
with a row length above the statement's token count each cache row holds exactly one statement
and the position rule "last" selects its final token (the period), where the paper probes.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from probing_core.data.datasets import Dataset, DatasetSpec, make_dataset
from probing_core.errors import DatasetError

#: Folder of the shipped CSV files (with README.md and LICENSE beside them).
STATEMENTS_DIR = Path(__file__).resolve().parent / "geometry_of_truth"

#: Built-in statement sets: name → one-line description.
STATEMENT_SETS: dict[str, str] = {
    "cities": "“The city of X is in Y.” (1,496 statements, half true)",
    "neg_cities": "“The city of X is not in Y.” (1,496, half true)",
    "sp_en_trans": "“The Spanish word 'x' means 'y'.” (354)",
    "neg_sp_en_trans": "“The Spanish word 'x' does not mean 'y'.” (354)",
}


def statements_spec(name: str = "cities", max_docs: int | None = None) -> DatasetSpec:
    """The :class:`DatasetSpec` of a built-in statement set."""
    return DatasetSpec("statements", name, text_column="statement", max_docs=max_docs)


def parse_statements(text: str, filename: str, *, text_column: str = "statement") -> tuple[list[str], dict[str, list[str]]]:
    """Statements and their columns from CSV text with a ``statement`` and a 0/1 ``label`` column.

    Raises:
        DatasetError: no rows, a missing column, or a label that is not 0 or 1.
    """
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise DatasetError(f"{filename} has no rows.")
    for col in (text_column, "label"):
        if col not in rows[0]:
            raise DatasetError(f"{filename} has no column {col!r}; labelled statements need "
                               f"'{text_column}' and a 0/1 'label' column (it has {list(rows[0])}).")
    docs: list[str] = []
    cols: dict[str, list[str]] = {c: [] for c in rows[0] if c != text_column}
    for i, r in enumerate(rows, start=2):
        s = (r.get(text_column) or "").strip()
        if not s:
            continue
        lab = (r.get("label") or "").strip()
        if lab not in ("0", "1"):
            raise DatasetError(f"{filename} line {i}: label {lab!r} is not 0 or 1.")
        docs.append(s)
        for c in cols:
            cols[c].append(r.get(c) or "")
    if not docs:
        raise DatasetError(f"{filename} contains no statements.")
    return docs, cols


def load_statements(spec: DatasetSpec) -> Dataset:
    """Load a built-in statement set named by ``spec.name`` (see :data:`STATEMENT_SETS`).

    Returns:
        A :class:`Dataset` with one statement per document and the CSV's other columns
        (``label`` first of them) as label columns.

    Raises:
        DatasetError: an unknown set name.
    """
    name = spec.name or "cities"
    if name not in STATEMENT_SETS:
        raise DatasetError(f"unknown statement set {name!r}; choose one of {', '.join(STATEMENT_SETS)}.")
    path = STATEMENTS_DIR / f"{name}.csv"
    docs, cols = parse_statements(path.read_text(encoding="utf-8"), path.name)
    return make_dataset(spec, docs, cols)
