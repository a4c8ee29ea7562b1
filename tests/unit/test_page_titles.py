"""One name per page: the sidebar's navigation entry (app.py) and the page's own st.title say the same thing."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _navigation() -> list[tuple[str, str, str]]:
    tree = ast.parse((REPO / "app.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_PAGES" for t in node.targets):
            return [tuple(ast.literal_eval(e)) for e in node.value.elts]
    raise AssertionError("app.py has no _PAGES list")


def _titles(page: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(page.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "title"
                and getattr(node.func.value, "id", None) == "st" and node.args and isinstance(node.args[0], ast.Constant)):
            out.append(node.args[0].value)
    return out


@pytest.mark.parametrize("path,title,icon", _navigation(), ids=lambda v: str(v))
def test_page_title_matches_its_navigation_entry(path, title, icon):
    titles = _titles(REPO / path)
    assert titles == [f"{icon} {title}"], f"{path}: st.title {titles} but the sidebar says {icon} {title}"


def test_every_page_file_is_in_the_navigation():
    listed = {p for p, _, _ in _navigation()}
    assert {f"pages/{p.name}" for p in (REPO / "pages").glob("*.py")} == listed
