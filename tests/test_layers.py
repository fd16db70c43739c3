"""The layers point one way (docs/architecture.md): each package imports only those below it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# each layer, and the packages it must never import
FORBIDDEN = {
    "luxima_backup": {"tasks", "flows", "deployments", "app", "devkit", "tests", "bench"},
    "tasks": {"flows", "deployments", "app", "devkit", "tests", "bench"},
    "flows": {"deployments", "app", "devkit", "tests", "bench"},
    "deployments": {"app", "devkit", "tests", "bench"},
    "app": {"tests", "bench"},  # (its demo command reaches devkit, which stands aside)
    "devkit": {"app", "tests", "bench"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports, lazily inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_every_package_imports_only_the_layers_below_it() -> None:
    wrong = []
    checked = 0
    for layer, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            checked += 1
            for package in sorted(imported_packages(path) & forbidden):
                wrong.append(f"{path.relative_to(ROOT)} imports {package}")
    assert checked > 60  # the packages were found
    assert wrong == []


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from flows.db_backup import db_backup\n    import deployments.alerts\n")
    assert imported_packages(module) == {"flows", "deployments"}
