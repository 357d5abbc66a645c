"""The `cxrbatch` command.

    cxrbatch process INPUT --out OUT [--config FILE] [--db URL] [--force]
    cxrbatch results [--out OUT | --db URL] [--format table|csv|json]
    cxrbatch db upgrade [--out OUT | --db URL]
    cxrbatch phantoms OUT [--studies N] [--size PX] [--truth DIR]
    cxrbatch demo-data DIR

Exit codes: 0 when the batch ran (even if some inputs were bad), 2 when it could not run
(bad configuration, missing input folder, model that cannot be loaded).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from cxrbatch import logs
from cxrbatch.config import Settings, load_settings
from cxrbatch.errors import CxrBatchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Chest X-ray batch processor: MedSAM lung masks, masked classifiers, "
    "DICOM SEG + SR + JSON, SQL results. Outputs are NOT FOR DIAGNOSTIC USE.",
)
db_app = typer.Typer(no_args_is_help=True, help="Results database schema (alembic).")
app.add_typer(db_app, name="db")
console = Console(stderr=True)
out_console = Console()
log = logging.getLogger("cxrbatch.cli")

ConfigOption = Annotated[Path | None, typer.Option("--config", help="Site config (TOML).")]
DbOption = Annotated[
    str | None, typer.Option("--db", help="SQLAlchemy URL of the results database.")
]


def _settings(config: Path | None, db: str | None) -> Settings:
    overrides = {"database": {"url": db}} if db else {}
    settings = load_settings(config, **overrides)
    logs.configure(settings.logging.level, settings.logging.format)
    return settings


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


@app.command()
def process(
    input_dir: Annotated[
        Path, typer.Argument(help="Folder of DICOM files (any depth, any names).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder: OUT/<StudyInstanceUID>/...")],
    config: ConfigOption = None,
    db: DbOption = None,
    force: Annotated[
        bool, typer.Option(help="Reprocess studies whose input is unchanged.")
    ] = False,
    workers: Annotated[
        int, typer.Option(min=1, help="Worker processes, each with its own models.")
    ] = 1,
) -> None:
    """Process every study in INPUT_DIR: SEG + SR + JSON per study, one DB row per study."""
    from cxrbatch.batch import run_batch

    try:
        settings = _settings(config, db)
        if not input_dir.exists():
            raise _fail(f"input folder not found: {input_dir}")
        with Progress(
            TextColumn("[bold]studies"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task("studies", total=None)

            def advance(_result: object, index: int, total: int) -> None:
                progress.update(task, completed=index, total=total)

            summary = run_batch(
                input_dir, out, settings, force=force, workers=workers, on_study=advance
            )
    except CxrBatchError as exc:
        raise _fail(str(exc)) from exc
    except SQLAlchemyError as exc:
        raise _fail(
            f"results database error: {type(exc).__name__}: {exc.args[0] if exc.args else ''}"
        ) from exc
    except OSError as exc:
        raise _fail(f"cannot use the output folder: {exc}") from exc
    table = Table(
        title=f"cxrbatch: {sum(summary.studies.values())} studies in {summary.seconds:.1f}s"
    )
    table.add_column("outcome")
    table.add_column("count", justify="right")
    for status in ("processed", "ineligible", "failed", "unchanged"):
        table.add_row(status, str(summary.studies.get(status, 0)))
    table.add_row("rejected files", str(summary.rejected_files))
    table.add_row("quarantined files", str(summary.quarantined_files))
    out_console.print(table)
    if summary.reasons:
        reasons = Table(title="reasons (images/files not processed)")
        reasons.add_column("reason")
        reasons.add_column("count", justify="right")
        for reason, count in summary.reasons.most_common():
            reasons.add_row(reason, str(count))
        out_console.print(reasons)
    if summary.synthetic_model:
        out_console.print(
            "[bold yellow]A model trained on SYNTHETIC data produced these scores: "
            "not clinically meaningful.[/]"
        )
    out_console.print(f"outputs: {out.resolve()}  (NOT FOR DIAGNOSTIC USE)")


@app.command()
def results(
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder of a batch (its SQLite DB).")
    ] = None,
    db: DbOption = None,
    config: ConfigOption = None,
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
) -> None:
    """List the current outcome of every study."""
    from cxrbatch.batch import database_url
    from cxrbatch.db import repository
    from cxrbatch.db.session import make_engine, session_factory, upgrade

    try:
        settings = _settings(config, db)
        if not settings.database.url and out is None:
            raise _fail("give --out OUT or --db URL")
        url = database_url(settings, out or Path("."))
        upgrade(url)
        engine = make_engine(url)
        with session_factory(engine)() as session:
            rows = [
                {
                    "study_instance_uid": o.study.study_instance_uid,
                    "status": o.status,
                    "triage": o.triage,
                    "no_finding_score": o.no_finding_score,
                    "segmentation_only": o.segmentation_only,
                    "synthetic_model": o.synthetic_model,
                    "reason": o.reason,
                    "created_at": o.created_at.isoformat() if o.created_at else None,
                }
                for o in repository.current_outcomes(session)
            ]
        engine.dispose()
    except CxrBatchError as exc:
        raise _fail(str(exc)) from exc
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=list(rows[0]) if rows else ["study_instance_uid"]
        )
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buffer.getvalue())
    elif fmt == "table":
        table = Table(title="current study outcomes (NOT FOR DIAGNOSTIC USE)")
        for column in ("study_instance_uid", "status", "triage", "no_finding_score", "reason"):
            table.add_column(column)
        for row in rows:
            score = row["no_finding_score"]
            table.add_row(
                str(row["study_instance_uid"]),
                str(row["status"]),
                str(row["triage"] or "-"),
                "-" if score is None else f"{score:.3f}",
                str(row["reason"] or ""),
            )
        out_console.print(table)
    else:
        raise _fail(f"Expected --format table, csv or json, found {fmt!r}.")


@db_app.command("upgrade")
def db_upgrade(
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (its SQLite DB).")
    ] = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """Create or upgrade the results database schema to the newest migration."""
    from cxrbatch.batch import database_url
    from cxrbatch.db.session import current_revision, upgrade

    try:
        settings = _settings(config, db)
        if not settings.database.url and out is None:
            raise _fail("give --out OUT or --db URL")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        url = database_url(settings, out or Path("."))
        upgrade(url)
        out_console.print(f"schema at revision {current_revision(url)}")
    except CxrBatchError as exc:
        raise _fail(str(exc)) from exc


@app.command()
def phantoms(
    out: Annotated[Path, typer.Argument(help="Folder to write synthetic DICOM studies into.")],
    studies: Annotated[int, typer.Option(help="Number of studies.")] = 6,
    size: Annotated[int, typer.Option(help="Image size in pixels (square).")] = 1024,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    truth: Annotated[
        Path | None, typer.Option(help="Folder for the known lung masks (npz).")
    ] = None,
) -> None:
    """Write synthetic chest phantom studies (known lung masks, lesions of each class)."""
    from cxrbatch.synthetic import write_studies

    generated = write_studies(out, studies, seed=seed, size=(size, size), truth_dir=truth)
    out_console.print(f"wrote {len(generated)} synthetic studies to {out}")


DEMO_REAL_FILES = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "MR_small.dcm", "CT_small.dcm", "US1_UNCR.dcm")


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to fill with a demo PACS export.")],
) -> None:
    """A demo input folder: synthetic phantoms plus real radiographs from pydicom-data
    (a chest CR, a tibia CR, MR, CT, US) and a non-DICOM file, as a PACS export might hold."""
    from pydicom.data import get_testdata_file

    from cxrbatch.synthetic import write_studies

    write_studies(out / "synthetic", 6, size=(1024, 1024))
    copied = 0
    for name in DEMO_REAL_FILES:
        try:
            source = get_testdata_file(name)
        except Exception:
            source = None
        if source:
            target = out / "real" / Path(name).stem / "IM0001"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(str(source), target)
            copied += 1
    (out / "README.txt").write_text("A text file in the export folder: not DICOM, quarantined.\n")
    if copied < 2:
        console.print(
            "[yellow]pydicom-data is not installed: only synthetic studies written "
            "(pip install pydicom-data for the real radiographs)[/]"
        )
    out_console.print(f"demo input written to {out} ({copied} real files)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
