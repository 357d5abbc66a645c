"""The layout is a map of the architecture: rules the code keeps, checked on its source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_sqlalchemy_is_imported_only_in_the_database_package() -> None:
    """One door to the database: every statement, engine and session lives in cxrbatch/db
    (its migrations included); the rest names sessions and errors through cxrbatch.db."""
    door = ROOT / "cxrbatch" / "db"
    sources = [*ROOT.joinpath("cxrbatch").rglob("*.py"), *ROOT.joinpath("training").rglob("*.py")]
    assert len(sources) > 40
    offenders = [
        str(path.relative_to(ROOT))
        for path in sources
        if not path.is_relative_to(door)
        and any(m == "sqlalchemy" or m.startswith("sqlalchemy.") for m in _imported_modules(path))
    ]
    assert offenders == []
    # ...and the door itself does use it (the check reads the imports it means to read).
    assert "sqlalchemy" in {m.split(".")[0] for m in _imported_modules(door / "repository.py")}
