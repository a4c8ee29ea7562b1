"""The package's layout is its data flow: each stage imports only the stages before it.

docs/architecture.md draws the same order. A new module that imports "upward" (e.g. the store
reaching into an analysis) or any Streamlit import in the core fails here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "probing_core"

#: Stage of each top-level name in probing_core, in data-flow order (lower may not import higher).
RANK = {
    "": 0, "errors": 0, "threads": 0,
    "data": 1,
    "tree": 2,
    "models": 3,
    "store": 4,
    "solvers": 5,
    "analyses": 6,
    "plots": 7,
    "cli": 8, "__main__": 9,
}


def _modules() -> list[Path]:
    return sorted(p for p in CORE.rglob("*.py") if "checkpoints" not in p.parts)


def _stage(path: Path) -> str:
    parts = path.relative_to(CORE).with_suffix("").parts
    return "" if parts == ("__init__",) else parts[0]


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_every_folder_and_module_has_a_rank():
    stages = {_stage(p) for p in _modules()}
    assert stages <= set(RANK), f"add the new stage(s) {stages - set(RANK)} to RANK and docs/architecture.md"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_imports_flow_one_way_and_never_streamlit(path):
    me = RANK[_stage(path)]
    for mod in _imports(path):
        assert mod.split(".")[0] != "streamlit", f"{path.name} imports streamlit: the core never does"
        if not mod.startswith("probing_core"):
            continue
        parts = mod.split(".")
        target = parts[1] if len(parts) > 1 else ""
        assert RANK[target] <= me, f"{path.relative_to(CORE)} (stage {me}) imports {mod} (stage {RANK[target]})"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_every_module_says_what_it_owns(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.splitlines()[0]) > 20, f"{path.relative_to(CORE)}: first line should say what it owns"


PAGES = sorted((CORE.parent / "pages").glob("*.py"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_stay_thin(page):
    """A page lays out widgets and charts; what it computes lives in the core, what it caches in glue.py."""
    n = len(page.read_text().splitlines())
    assert PAGES and n <= 120, f"{page.name} has {n} lines: move logic into probing_core or glue.py"
