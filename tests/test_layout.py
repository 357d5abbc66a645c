"""The layout is a map of the architecture: rules the code keeps, checked on its source."""

from __future__ import annotations

import ast
import re
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
    sources = [
        *ROOT.joinpath("cxrbatch").rglob("*.py"),
        *ROOT.joinpath("cxrbatch_training").rglob("*.py"),
    ]
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


def test_one_read_model_serves_the_cli_the_pages_the_api_metrics_and_the_sender() -> None:
    """What people and programs read about outcomes, the queue, deliveries and failures
    comes from cxrbatch/db/reads.py: its users import it, and none of them builds its own
    projection of an outcome from the tables."""
    users = {
        "cxrbatch/cli.py",
        "cxrbatch/web/pages.py",
        "cxrbatch/web/api.py",
        "cxrbatch/web/deps.py",
        "cxrbatch/metrics.py",
        "cxrbatch/send/sender.py",
        "cxrbatch/deid.py",
    }
    for name in users:
        tree = ast.parse((ROOT / name).read_text())
        named = {
            f"{node.module}.{alias.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
            for alias in node.names
        }
        assert "cxrbatch.db.reads" in named | _imported_modules(ROOT / name), name
        tables = {f"cxrbatch.db.models.{t}" for t in ("Outcome", "Study", "Image", "Finding")}
        assert not named & tables, name
    # The projection of an outcome and its study rows is written once (the API and the
    # CLI serialise the view; they do not read the tables' columns themselves).
    projection = re.compile(r"""study_number"?\s*[=:]\s*study\.id\b""")
    projections = [
        str(path.relative_to(ROOT))
        for path in ROOT.joinpath("cxrbatch").rglob("*.py")
        if projection.search(path.read_text())
    ]
    assert projections == ["cxrbatch/db/reads.py"]
