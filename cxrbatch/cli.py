"""The `cxrbatch` command.

    cxrbatch process INPUT --out OUT [--config FILE] [--db URL] [--force] [--workers N]
                     [--study-threads T]
    cxrbatch watch INPUT --out OUT [--config FILE] [--db URL] [--workers N]
    cxrbatch worker --out OUT --db URL [--config FILE] [--workers N]
    cxrbatch campaign MANIFEST --out OUT [--db URL] [--config FILE] [--address HEAD:PORT]
                      [--actors N] [--cpus-per-actor C] [--gpus-per-actor G]
    cxrbatch results [--out OUT | --db URL] [--format table|csv|json] [--wide] [filters]
    cxrbatch worklist [--out OUT | --db URL] [--format table|csv|json] [--wide]
    cxrbatch status [--out OUT | --db URL]
    cxrbatch send [--out OUT | --db URL] [--config FILE] [--retry-dead]
    cxrbatch jobs retry [STUDY_UID ...] [--out OUT | --db URL]
    cxrbatch db upgrade [--out OUT | --db URL]
    cxrbatch cleanup --out OUT [--db URL] [--dry-run]
    cxrbatch pull --out OUT [--since 24h | --date YYYYMMDD] [--modality CR,DX] [--source NAME]
    cxrbatch export-deid --to DIR --out OUT [--since T] [--triage T] [--mapping FILE]
    cxrbatch phantoms OUT [--studies N] [--size PX] [--truth DIR]
    cxrbatch demo-data DIR

Exit codes (every command):
    0  it ran; for `process` every study was processed, ineligible or unchanged (bad input
       files are quarantined and counted, not an error)
    1  it ran, but `process` failed one or more studies (or lost them to another worker), or
       `send` left a delivery failed, dead or lost, or a `campaign` left studies failed,
       dead or unfinished or did not find files its manifest lists: a nightly job should
       alert
    2  it could not run (bad configuration, missing input folder, output inside the input,
       database away or older than the code, model that cannot be loaded), one line saying why
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import functools
import importlib.util
import io
import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cxrbatch import logs
from cxrbatch.cliapp import GuardedApp
from cxrbatch.config import Settings, load_settings
from cxrbatch.db import DatabaseError, Sessions
from cxrbatch.domain import DeliveryRunStatus, OutcomeStatus, StudyRunStatus, Triage
from cxrbatch.errors import CxrBatchError
from cxrbatch.site import Site
from cxrbatch_training.cli import app as training_app


def _operator_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.ClickException, KeyboardInterrupt):
            raise
        except CxrBatchError as exc:
            raise _fail(str(exc)) from exc
        except DatabaseError as exc:
            raise _fail(_database_error(exc)) from exc
        except ModuleNotFoundError as exc:
            log.debug("missing module", exc_info=True)
            raise _fail(
                f"a module this configuration needs is not installed: {exc.name} "
                "(for a database URL: its driver, e.g. psycopg for postgresql://)"
            ) from exc
        except OSError as exc:
            log.debug("operating system error", exc_info=True)
            raise _fail(f"{type(exc).__name__}: {exc}") from exc

    return run


EXIT_SOME_FAILED = 1

app = GuardedApp(_operator_errors)
db_app = GuardedApp(_operator_errors, help="Results database schema (alembic).")
app.add_typer(db_app, name="db")
jobs_app = GuardedApp(_operator_errors, help="The daemon's job queue.")
app.add_typer(jobs_app, name="jobs")
bundle_app = GuardedApp(_operator_errors, help="Classifier bundles: bring trained weights in.")
app.add_typer(bundle_app, name="bundle")
# Markup off: what is printed carries header values, paths, reasons and exception texts,
# and a value such as "[/y]" must print as itself (styles are given with style=).
console = Console(stderr=True, markup=False)
out_console = Console(markup=False)
log = logging.getLogger("cxrbatch.cli")
T = TypeVar("T")

ConfigOption = Annotated[Path | None, typer.Option("--config", help="Site config (TOML).")]
DbOption = Annotated[
    str | None, typer.Option("--db", help="SQLAlchemy URL of the results database.")
]
OutOption = Annotated[
    Path | None, typer.Option("--out", help="Output folder (its SQLite DB, OUT/cxrbatch.sqlite).")
]


def _print_version(value: bool) -> None:
    if value:
        from cxrbatch import __version__

        out_console.print(f"cxrbatch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Chest X-ray batch processor: MedSAM lung masks, masked classifiers, DICOM SEG + SR +
    JSON, SQL results. Outputs are NOT FOR DIAGNOSTIC USE."""


class Format(enum.StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"


class StatusFormat(enum.StrEnum):
    TABLE = "table"
    JSON = "json"


def _settings(config: Path | None, db: str | None, **flags: Any) -> Settings:
    """The site's settings: defaults < --config file < CXRBATCH_* environment < flags."""
    if db:
        flags["database"] = {"url": db}
    settings = load_settings(config, flags=flags)
    logs.configure(settings.logging.level, settings.logging.format)
    return settings


def _site(config: Path | None, db: str | None, out: Path | None, **flags: Any) -> Site:
    """The one site context of this command (settings, output root, database URL)."""
    settings = _settings(config, db, **flags)
    if out is None and not settings.database.url:
        raise _fail("give --out OUT or --db URL")
    return Site.at(settings, out if out is not None else Path("."))


def _progress(what: str, *, transient: bool = False) -> Progress:
    """The progress bar of a long command (on stderr; kept when done unless `transient`)."""
    return Progress(
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )


def _fail(message: str) -> typer.Exit:
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
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
    study_threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="Studies in flight per worker process (default: processing.study_threads).",
        ),
    ] = None,
) -> None:
    """Process every study in INPUT_DIR: SEG + SR + JSON per study, one DB row per study.

    The studies are queued and run by the same queue workers as `watch`, until the queue
    is idle (what an interrupted run left queued is finished too). Exit code 1 when one
    or more studies failed (their reasons are in the summary)."""
    from cxrbatch.batch import run_batch

    try:
        processing = {"study_threads": study_threads} if study_threads else {}
        site = _site(config, db, out, processing=processing)
        settings = site.settings
        if not input_dir.exists():
            raise _fail(f"input folder not found: {input_dir}")
        with _progress("studies") as progress:
            task = progress.add_task("studies", total=None)

            def advance(_result: object, index: int, total: int) -> None:
                progress.update(task, completed=index, total=total)

            summary = run_batch(input_dir, site, force=force, workers=workers, on_study=advance)
    except CxrBatchError as exc:
        raise _fail(str(exc)) from exc
    except DatabaseError as exc:
        raise _fail(_database_error(exc)) from exc
    except OSError as exc:
        raise _fail(f"cannot use the output folder: {exc}") from exc
    table = Table(
        title=f"cxrbatch: {sum(summary.studies.values())} studies in {summary.seconds:.1f}s"
    )
    table.add_column("outcome")
    table.add_column("count", justify="right")
    for status in StudyRunStatus:
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
            "A model trained on SYNTHETIC data produced these scores: not clinically meaningful.",
            style="bold yellow",
        )
    out_console.print(f"outputs: {out.resolve()}  (NOT FOR DIAGNOSTIC USE)")
    if settings.send.destinations:
        _print_sent(_send_due(site, retry_dead=False))
    failed = summary.studies.get(StudyRunStatus.FAILED, 0) + summary.studies.get(
        StudyRunStatus.LOST, 0
    )
    if failed:
        console.print(f"{failed} stud{'y' if failed == 1 else 'ies'} failed", style="bold red")
        raise typer.Exit(code=EXIT_SOME_FAILED)


def _send_due(site: Site, retry_dead: bool) -> dict[str, int]:
    """One sender pass over the due deliveries; how many ended in each status."""
    from cxrbatch.db import deliveries
    from cxrbatch.send.sender import Sender

    def work(sessions: Sessions) -> dict[str, int]:
        revived = deliveries.retry_dead(sessions) if retry_dead else 0
        ended = dict(Sender(site.settings, sessions, site.roots).send_due())
        return {"revived": revived, **ended} if revived else ended

    return _with_database(site, work, readonly=False)


def _print_sent(ended: dict[str, int]) -> None:
    if not ended:
        out_console.print("deliveries: nothing due")
        return
    out_console.print(
        "deliveries: " + ", ".join(f"{count} {status}" for status, count in sorted(ended.items()))
    )
    if ended.get(DeliveryRunStatus.FAILED) or ended.get(DeliveryRunStatus.DEAD):
        out_console.print("some deliveries failed: see `cxrbatch status`", style="bold yellow")


@app.command()
def send(
    out: OutOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
    retry_dead: Annotated[
        bool, typer.Option("--retry-dead", help="First give dead deliveries fresh attempts.")
    ] = False,
) -> None:
    """Send the due deliveries (SEG, SR, key images) to the configured destinations once.

    Exit code 1 when a delivery failed (it stays queued with its backoff, or dead)."""
    if out is None:
        # The database keeps the files' paths relative to the output folder.
        raise _fail("give --out OUT: the files to send are found under the output folder")
    site = _site(config, db, out)
    if not site.settings.send.destinations:
        raise _fail("no [[send.destinations]] in the configuration")
    ended = _send_due(site, retry_dead)
    _print_sent(ended)
    if any(
        ended.get(s)
        for s in (DeliveryRunStatus.FAILED, DeliveryRunStatus.DEAD, DeliveryRunStatus.LOST)
    ):
        raise typer.Exit(code=EXIT_SOME_FAILED)


def _serve(site: Site, workers: int, input_dir: Path | None) -> None:
    from cxrbatch.daemon import Service

    try:
        if input_dir is not None and not input_dir.is_dir():
            raise _fail(f"input folder not found: {input_dir}")
        service = Service(site, workers, input_dir)
    except OSError as exc:
        raise _fail(f"cannot use the output folder: {exc}") from exc
    service.install_signal_handlers()
    service.run()
    if service.exit_code:
        raise typer.Exit(code=service.exit_code)


WorkersOption = Annotated[
    int, typer.Option(min=1, help="Worker processes, each with its own models.")
]


@app.command()
def watch(
    input_dir: Annotated[
        Path | None,
        typer.Argument(help="The PACS export folder to watch (optional with --listen)."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Output folder: OUT/<StudyInstanceUID>/...")
    ] = Path("out"),
    config: ConfigOption = None,
    db: DbOption = None,
    workers: WorkersOption = 1,
    listen: Annotated[
        int | None,
        typer.Option(help="Also receive studies by DICOM C-STORE on this port ([dicom] config)."),
    ] = None,
) -> None:
    """Watch INPUT_DIR and/or receive studies by DICOM C-STORE, and process every study that
    arrives, until SIGTERM."""
    settings = _settings(config, db)
    if listen is not None:
        dicom = settings.dicom.model_copy(update={"listen": True, "port": listen})
        settings = settings.model_copy(update={"dicom": dicom})
    if input_dir is None and not settings.dicom.listen:
        raise _fail("give an export folder to watch, or --listen PORT (or dicom.listen = true)")
    _serve(Site.at(settings, out), workers, input_dir)


@app.command()
def worker(
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (shared storage), as for `watch`.")
    ],
    config: ConfigOption = None,
    db: DbOption = None,
    workers: WorkersOption = 1,
) -> None:
    """Run workers only, on the queue of --db (extra hosts beside a `watch`)."""
    _serve(_site(config, db, out), workers, None)


@app.command()
def campaign(
    manifest: Annotated[
        Path,
        typer.Argument(
            help="A folder of DICOM files, or a file listing their paths (one per line, or "
            "a CSV with a 'path' column). The files are read in place, never moved."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder (shared by every node).")],
    config: ConfigOption = None,
    db: DbOption = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="The Ray cluster's head (HOST:PORT, or 'auto' for the one this host "
            "belongs to); default: a Ray instance on this host only."
        ),
    ] = None,
    actors: Annotated[
        int | None, typer.Option(min=1, help="Queue workers (default: CPUs / cpus-per-actor).")
    ] = None,
    cpus_per_actor: Annotated[float, typer.Option(min=0.5, help="CPUs per worker.")] = 1.0,
    gpus_per_actor: Annotated[float, typer.Option(min=0.0, help="GPUs per worker.")] = 0.0,
) -> None:
    """Re-process an archive on a Ray cluster (pip install 'cxrbatch[ray]'): the files are
    taken in by Ray tasks and the studies processed by Ray actors through the same queue
    as `watch`. Run it again to resume: nothing already recorded is done twice."""
    from cxrbatch.campaign import run_campaign

    site = _site(config, db, out)
    try:
        with _progress("studies") as progress:
            task = progress.add_task("studies", total=None)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            summary = run_campaign(
                site, manifest, address=address, actors=actors, cpus_per_actor=cpus_per_actor,
                gpus_per_actor=gpus_per_actor, on_progress=advance,
            )  # fmt: skip
    except CxrBatchError as exc:
        raise _fail(str(exc)) from exc
    except DatabaseError as exc:
        raise _fail(_database_error(exc)) from exc
    table = Table(title=f"cxrbatch campaign: {summary.files} files in {summary.seconds:.1f}s")
    table.add_column("what")
    table.add_column("count", justify="right")
    for answer, count in sorted(summary.taken.items()):
        table.add_row(f"files {answer}", str(count))
    for status, count in summary.jobs.items():
        table.add_row(f"studies {status}", str(count))
    table.add_row("worker actors (lost)", f"{summary.actors} ({summary.actors_lost})")
    out_console.print(table)
    missing = summary.taken.get("missing", 0)
    if missing:
        console.print(
            f"{missing} file(s) the manifest lists were not found (their paths are logged "
            "at logging.level = DEBUG); run the campaign again once they are in place"
        )
    unfinished = sum(summary.jobs.get(s, 0) for s in ("failed", "dead", "queued", "running"))
    if unfinished or missing:
        raise typer.Exit(code=1)


def _with_database(site: Site, work: Callable[[Sessions], T], *, readonly: bool = True) -> T:
    """Run `work` against the site's existing results database. It is never created or
    migrated here: a missing one or a schema other than this code's is a one-line error
    (`open_existing`). `readonly`: the query commands open it so that they cannot write
    (configuration and database errors: `_operator_errors`)."""
    with site.database(readonly=readonly, existing=True) as database:
        return work(database.sessions)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """Command-line times are local unless they carry an offset; the database is UTC."""
    if value is None:
        return None
    return (value if value.tzinfo else value.astimezone()).astimezone(dt.UTC)


def _flat(row: dict[str, object]) -> dict[str, object]:
    """A row for a table or CSV: each label's probability as its own column p_<label>,
    and its call (positive/negative against the bundle's threshold) as call_<label>."""
    flat = {k: v for k, v in row.items() if k not in ("probabilities", "calls")}
    probabilities = row.get("probabilities")
    if isinstance(probabilities, dict):
        flat.update({f"p_{label}": p for label, p in probabilities.items()})
    calls = row.get("calls")
    if isinstance(calls, dict):
        flat.update({f"call_{label}": c for label, c in calls.items()})
    return flat


def _print_rows(
    rows: list[dict[str, object]],
    fmt: str,
    title: str,
    columns: list[str],
    wide: bool = True,
) -> None:
    """JSON as recorded; CSV and the wide table flattened (`_flat`), with a column
    p_<label> for each label any row has, after `columns`; the narrow table (`wide`
    False) has the columns a person scans, and fits 80 columns (`_print_narrow`)."""
    if fmt == "table" and not wide:
        _print_narrow(rows, title)
        return
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    flat = [_flat(row) for row in rows]
    labels = [key for key in dict.fromkeys(k for row in flat for k in row) if key.startswith("p_")]
    if fmt == "csv":
        fieldnames = list(dict.fromkeys([*columns, *(k for row in flat for k in row)]))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(flat)
        sys.stdout.write(buffer.getvalue())
        return
    table = Table(title=title)
    shown = [c for c in columns if c != "reason"] + labels + [c for c in columns if c == "reason"]
    for column in shown:
        table.add_column(column)
    for row in flat:
        table.add_row(*(_table_cell(row, column) for column in shown))
    out_console.print(table)


def _print_narrow(rows: list[dict[str, object]], title: str) -> None:
    """One line per study at 80 columns, in the command's order: the study's number in
    this database (stable, no patient data), accession, study date, result (the triage, or
    the status where nothing was screened), the most probable finding with its call, and
    the No Finding score. The rest (rank, UIDs, every probability, models, reasons) is
    behind --wide, CSV and JSON."""
    table = Table(
        title=title,
        caption="NF: No Finding score (1 - max p; the screening model's where it ran)",
        box=None,
        padding=(0, 1),
        show_edge=False,
    )
    table.add_column("study", justify="right", no_wrap=True)
    table.add_column("accession", no_wrap=True, overflow="ellipsis", max_width=16)
    table.add_column("date", no_wrap=True, min_width=10)
    table.add_column("result", no_wrap=True, min_width=8)
    table.add_column("top finding", no_wrap=True, overflow="ellipsis")
    table.add_column("NF", justify="right", no_wrap=True, min_width=5)
    for row in rows:
        table.add_row(
            f"#{row.get('study_number')}", _cell(row.get("accession_number")),
            _cell(row.get("study_date")), _result(row), _top_finding(row),
            _cell(_no_finding(row)),
        )  # fmt: skip
    out_console.print(table)


def _result(row: dict[str, object]) -> str:
    """The triage; for a study nothing screened, its status (with "seg only" where only
    the lungs were segmented)."""
    if row.get("triage"):
        return str(row["triage"])
    if row.get("status") == "processed" and row.get("segmentation_only"):
        return "seg only"
    return str(row.get("status") or "-")


def _top_finding(row: dict[str, object]) -> str:
    probabilities = row.get("probabilities")
    if not isinstance(probabilities, dict) or not probabilities:
        return "-"
    label, p = max(probabilities.items(), key=lambda item: float(item[1]))
    calls = row.get("calls")
    call = calls.get(label) if isinstance(calls, dict) else None
    mark = " POS" if call == "positive" else " neg" if call == "negative" else ""
    return f"{label} {float(p):.2f}{mark}"


def _no_finding(row: dict[str, object]) -> object:
    screening = row.get("screening_no_finding_score")
    return screening if screening is not None else row.get("no_finding_score")


def _table_cell(row: dict[str, object], column: str) -> str:
    """A table cell; a probability with a call carries it: 0.812 POS, 0.031 neg."""
    text = _cell(row.get(column))
    call = row.get("call_" + column.removeprefix("p_")) if column.startswith("p_") else None
    if call is not None:
        text += " POS" if call == "positive" else " neg"
    return text


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


_IDENTITY_COLUMNS = [
    "study_instance_uid",
    "accession_number",
    "patient_id",
    "study_date",
    "modality",
]
FormatOption = Annotated[Format, typer.Option("--format", help="Output format.")]
WideOption = Annotated[
    bool,
    typer.Option(
        "--wide",
        help="The table with every column (UIDs, each label's probability, models, reasons); "
        "by default it has the columns a person scans and fits 80 columns.",
    ),
]
SinceOption = Annotated[
    dt.datetime | None, typer.Option(help="Outcomes recorded at or after this time.")
]


@app.command()
def results(
    out: OutOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
    fmt: FormatOption = Format.TABLE,
    since: SinceOption = None,
    until: Annotated[
        dt.datetime | None, typer.Option(help="Outcomes recorded before this time.")
    ] = None,
    status: Annotated[OutcomeStatus | None, typer.Option(help="Outcome status.")] = None,
    triage: Annotated[Triage | None, typer.Option(help="Triage category.")] = None,
    label: Annotated[
        str | None,
        typer.Option(
            help="A finding label (Mass, Nodule, Pneumonia, Edema, Fibrosis; any case): "
            "studies with that label's classifier probability >= --min-probability."
        ),
    ] = None,
    min_probability: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="With --label: probability at least this (0.5)."),
    ] = None,
    wide: WideOption = False,
) -> None:
    """List the current outcome of every study (filters combine with AND): study identity,
    status, triage, scores and each label's highest probability."""
    from cxrbatch.db import reads

    if min_probability is not None and label is None:
        raise _fail("--min-probability needs --label (which finding's probability?)")
    where = reads.OutcomeFilter(
        since=_utc(since),
        until=_utc(until),
        status=status.value if status else None,
        triage=triage.value if triage else None,
        label=label,
        min_probability=(0.5 if min_probability is None else min_probability) if label else None,
    )

    def query(sessions: Sessions) -> list[dict[str, object]]:
        with sessions() as session:
            return [reads.outcome_row(o) for o in reads.current_outcomes(session, where)]

    rows = _with_database(_site(config, db, out), query)
    _print_rows(
        rows,
        fmt,
        "current study outcomes (NOT FOR DIAGNOSTIC USE)",
        [*_IDENTITY_COLUMNS, "status", "triage", "no_finding_score", "reason"],
        wide,
    )
    _warn_synthetic(rows)


@app.command()
def worklist(
    out: OutOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
    fmt: FormatOption = Format.TABLE,
    since: SinceOption = None,
    limit: Annotated[int | None, typer.Option(min=1, help="The first N studies only.")] = None,
    wide: WideOption = False,
) -> None:
    """Processed studies in screening order: abnormal and needs-review first, by No Finding
    score."""
    from cxrbatch.db import reads

    def query(sessions: Sessions) -> list[dict[str, object]]:
        with sessions() as session:
            ordered = reads.worklist(session, since=_utc(since), limit=limit)
            return [
                {"rank": rank, **reads.outcome_row(o)} for rank, o in enumerate(ordered, start=1)
            ]

    rows = _with_database(_site(config, db, out), query)
    _print_rows(
        rows,
        fmt,
        "screening worklist (NOT FOR DIAGNOSTIC USE)",
        [
            "rank",
            *_IDENTITY_COLUMNS,
            "triage",
            "screening_no_finding_score",
            "no_finding_score",
            "models",
        ],
        wide,
    )
    _warn_synthetic(rows)


@app.command()
def calibrate(
    labels: Annotated[
        Path,
        typer.Option(
            help="LABELS.csv: accession_number or study_instance_uid, label "
            "(normal/abnormal) and a 1/0 column per finding where known."
        ),
    ],
    bundle: Annotated[Path, typer.Option(help="The bundle the studies were processed with.")],
    new_bundle: Annotated[
        Path, typer.Option("--out-bundle", help="Where to write the calibrated bundle.")
    ],
    out: OutOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
    target_sensitivity: Annotated[
        float, typer.Option(help="Sensitivity for abnormal studies the threshold keeps.")
    ] = 0.99,
    site_name: Annotated[str, typer.Option("--site", help="The site, as recorded.")] = "site",
    version: Annotated[
        str | None, typer.Option(help="The new version (default OLD+SITE.YYYYMMDD).")
    ] = None,
) -> None:
    """Set a bundle's screening threshold (at the target sensitivity) and per-label
    thresholds on this site's own labelled, already processed studies; writes a new
    bundle version with the measured sensitivity and specificity (95% CIs)."""
    from cxrbatch.db.lifecycle import scores_for
    from cxrbatch.lifecycle.calibrate import calibrate as run_calibration
    from cxrbatch.lifecycle.labels import read_labels
    from cxrbatch.models.bundle import BundleSpec
    from cxrbatch.models.preflight import bundle_files

    spec = BundleSpec.model_validate(bundle_files(bundle)[2]["cxrbatch"])
    site_labels = read_labels(labels, spec.labels)

    def query(sessions: Sessions) -> list[Any]:
        with sessions() as session:
            return scores_for(session, site_labels.study_uids, site_labels.accession_numbers)

    outcomes = _with_database(_site(config, db, out), query)
    made = run_calibration(
        bundle,
        site_labels,
        outcomes,
        new_bundle,
        target_sensitivity=target_sensitivity,
        site=site_name,
        version=version,
    )
    section = made.section
    screening = section["screening"]
    out_console.print(
        f"calibrated {made.metadata['name']} {made.metadata['version']} on "
        f"{section['studies']} studies ({section['abnormal']} abnormal, {section['normal']} "
        f"normal): No Finding threshold {screening['no_finding_threshold']:.4f}, "
        f"sensitivity {_rate(screening['sensitivity'])}, "
        f"specificity {_rate(screening['specificity'])}"
    )
    for label, result in section["labels"].items():
        if "kept" in result:
            out_console.print(f"  {label}: {result['kept']}")
        else:
            out_console.print(
                f"  {label}: threshold {result['threshold']:.4f}, sensitivity "
                f"{_rate(result['sensitivity'])}, specificity {_rate(result['specificity'])}"
            )
    out_console.print(f"bundle written to {new_bundle}")


def _rate(rate: dict[str, Any]) -> str:
    low, high = rate["ci95"]
    return f"{rate['value']:.3f} (95% CI {low:.3f}-{high:.3f}, {rate['k']}/{rate['n']})"


@app.command()
def compare(
    out: OutOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
    since: SinceOption = None,
    labels: Annotated[
        Path | None, typer.Option(help="LABELS.csv (as for calibrate): AUROC of both models.")
    ] = None,
    fmt: FormatOption = Format.TABLE,
) -> None:
    """How the shadow candidate (classifier.shadow_bundle, shadow_screening_bundle) agrees
    with the live models: triage flips, No Finding and per-label differences, and AUROC
    on the labelled studies."""
    from cxrbatch.db.lifecycle import scores_since
    from cxrbatch.domain import FINDING_LABELS
    from cxrbatch.lifecycle.compare import compare as run_compare
    from cxrbatch.lifecycle.labels import read_labels

    site_labels = read_labels(labels, FINDING_LABELS) if labels else None

    def query(sessions: Sessions) -> list[Any]:
        with sessions() as session:
            return scores_since(session, _utc(since), shadowed_only=True)

    report = run_compare(_with_database(_site(config, db, out), query), site_labels)
    if fmt == Format.JSON:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    if not report["studies"]:
        out_console.print("no outcome has a shadow answer (set classifier.shadow_bundle)")
        return
    triage = report["triage"]
    out_console.print(
        f"{report['studies']} studies; live {', '.join(report['live_models']) or '-'}; "
        f"shadow {', '.join(report['shadow_models'])}"
    )
    out_console.print(
        f"triage: {triage['agree']}/{triage['compared']} agree; flips "
        + (", ".join(f"{k}: {v}" for k, v in triage["flips"].items()) or "none")
    )
    out_console.print(
        f"No Finding mean |difference| {_cell(report['no_finding_mean_abs_difference'])}"
    )
    table = Table(title="shadow vs live (NOT FOR DIAGNOSTIC USE)")
    for column in ("label", "mean |diff|", "labelled n", "positives", "AUROC live", "AUROC shadow"):
        table.add_column(column)
    names = dict.fromkeys([*report["label_mean_abs_difference"], *report["labelled"]])
    for name in names:
        known = report["labelled"].get(name, {})
        table.add_row(
            name,
            _cell(report["label_mean_abs_difference"].get(name)),
            _cell(known.get("n")),
            _cell(known.get("positives")),
            _cell(known.get("auroc_live")),
            _cell(known.get("auroc_shadow")),
        )
    out_console.print(table)


@app.command()
def reprocess(
    out: OutOption = None,
    db: DbOption = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="The NEW site config (its bundles).")
    ] = None,
    since: SinceOption = None,
    until: Annotated[
        dt.datetime | None, typer.Option(help="Studies received before this time.")
    ] = None,
    max_queued: Annotated[
        int, typer.Option(min=1, help="Keep at most this many jobs waiting or running.")
    ] = 20,
    stall_minutes: Annotated[
        float, typer.Option(min=0.0, help="Stop when the queue has not moved this long.")
    ] = 10.0,
) -> None:
    """Re-queue received studies whose current outcome was not made by the configured
    bundle versions (a backfill for a new model): throttled, resumable. The daemon,
    running on the same new configuration, processes them; new outcomes supersede old."""
    from cxrbatch.lifecycle.reprocess import backfill

    site = _site(config, db, out)
    # Database errors are one line by _operator_errors, as for every command.
    with _progress("re-queueing", transient=True) as bar:
        task = bar.add_task("backfill", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        made = backfill(
            site,
            _utc(since),
            _utc(until),
            max_queued=max_queued,
            stall_seconds=stall_minutes * 60,
            progress=advance,
        )
    out_console.print(f"{made.queued} of {made.candidates} studies re-queued")


@app.command()
def status(
    out: OutOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
    fmt: Annotated[
        StatusFormat, typer.Option("--format", help="Output format.")
    ] = StatusFormat.TABLE,
) -> None:
    """Queue depth by job status, throughput, recent failures, dead jobs and deliveries
    (the operations page's figures, most recent first)."""
    from cxrbatch.db import reads

    def query(sessions: Sessions) -> dict[str, Any]:
        with sessions() as session:
            figures = reads.operations(session, dt.datetime.now(dt.UTC))
            return {
                "jobs": figures.jobs,
                "finished_last_hour": figures.finished_last_hour,
                "finished_last_24h": figures.finished_last_24h,
                "finished_per_hour": figures.finished_per_hour,
                "failed_studies": [
                    {"study_instance_uid": o.study.study_instance_uid, "reason": o.reason}
                    for o in figures.failures
                ],
                "dead_jobs": [
                    {
                        "study_instance_uid": j.study_instance_uid,
                        "attempts": j.attempts,
                        "last_error": j.last_error,
                    }
                    for j in figures.dead_jobs
                ],
                "deliveries": figures.deliveries,
                "undelivered": [
                    {
                        "study_instance_uid": d.study_instance_uid,
                        "destination": d.destination,
                        "status": d.status,
                        "attempts": d.attempts,
                        "last_error": d.last_error,
                    }
                    for d in figures.undelivered
                ],
                "quarantine_by_reason": figures.quarantine_by_reason,
            }

    report = _with_database(_site(config, db, out), query)
    if fmt == "json":
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    table = Table(title="queue")
    table.add_column("jobs")
    table.add_column("count", justify="right")
    for name, count in report["jobs"].items():
        table.add_row(name, str(count))
    table.add_row("studies recorded in the last hour", str(report["finished_last_hour"]))
    table.add_row("studies recorded in the last 24 h", str(report["finished_last_24h"]))
    out_console.print(table)
    if report["deliveries"]:
        sent = Table(title="deliveries")
        sent.add_column("destination")
        statuses = list(next(iter(report["deliveries"].values())))
        for name in statuses:
            sent.add_column(name, justify="right")
        for destination, by_status in report["deliveries"].items():
            sent.add_row(destination, *(str(by_status[name]) for name in statuses))
        out_console.print(sent)
    for key, title in (
        ("failed_studies", "failed studies"),
        ("dead_jobs", "dead jobs"),
        ("undelivered", "failed and dead deliveries"),
    ):
        items = report[key]
        if items:
            detail = Table(title=title)
            for column in items[0]:
                detail.add_column(column)
            for item in items:
                detail.add_row(*(_cell(v) for v in item.values()))
            out_console.print(detail)


@app.command()
def cleanup(
    out: Annotated[Path, typer.Option("--out", help="Output folder of the site (as for `watch`).")],
    db: DbOption = None,
    config: ConfigOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")
    ] = False,
    fmt: Annotated[
        StatusFormat, typer.Option("--format", help="Output format.")
    ] = StatusFormat.TABLE,
) -> None:
    """Apply the retention policy ([retention]) once: old spooled instances of finished
    studies, old quarantine copies, outputs only superseded outcomes name. Never what a
    current outcome or an unsent delivery needs. Exit code 1 when a file could not be
    deleted."""
    from cxrbatch.retention import cleanup as run_cleanup

    report = run_cleanup(_site(config, db, out), dry_run=dry_run)
    if fmt == "json":
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        table = Table(title="retention" + (" (dry run: nothing deleted)" if dry_run else ""))
        table.add_column("files")
        table.add_column("count", justify="right")
        table.add_row("spooled instances", str(report.spool_files))
        table.add_row("quarantine copies", str(report.quarantine_files))
        table.add_row("superseded outputs", str(report.superseded_files))
        table.add_row("MiB freed", f"{report.bytes_freed / 2**20:.1f}")
        out_console.print(table)
        for error in report.errors:
            console.print(f"not deleted: {error}", style="yellow")
    if report.errors:
        raise typer.Exit(code=EXIT_SOME_FAILED)


@app.command()
def serve(
    out: Annotated[Path, typer.Option("--out", help="Output folder of the site.")],
    db: DbOption = None,
    config: ConfigOption = None,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default web.host, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port (default web.port, 8080).")
    ] = None,
) -> None:
    """The results web app: worklist, study pages with lung overlays, operations, /metrics.
    Reads the results database; writes only its audit trail. Beyond loopback it needs
    authentication ([[web.users]] or web.trusted_proxy_header)."""
    from cxrbatch.web import serving
    from cxrbatch.web.app import create_app
    from cxrbatch.web.auth import check_binding

    web: dict[str, Any] = {}
    if host is not None:
        web["host"] = host
    if port is not None:
        web["port"] = port
    site = _site(config, db, out, web=web)
    check_binding(site.settings.web, site.settings.web.host)
    application = create_app(site)
    sock = serving.bind(site.settings.web.host, site.settings.web.port)
    out_console.print(
        f"cxrbatch web app on http://{site.settings.web.host}:{site.settings.web.port}/ "
        "(NOT FOR DIAGNOSTIC USE)"
    )
    serving.server(application, site.settings.web.host, site.settings.web.port).run(sockets=[sock])


@app.command("web-password")
def web_password(
    name: Annotated[str, typer.Argument(help="The user's name.")],
) -> None:
    """Print a [[web.users]] entry with an argon2 hash of a password read from the terminal."""
    from cxrbatch.web.auth import hash_password

    if ":" in name:  # HTTP Basic sends "name:password": the first ':' ends the name
        raise _fail("a user name for HTTP Basic cannot contain ':'")
    password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    # Plain output: no console wrapping at any width, so the entry pastes as printed.
    sys.stdout.write(
        "[[web.users]]\n"
        f"name = {_toml_string(name)}\n"
        f"password_hash = {_toml_string(hash_password(password))}\n"
    )


def _toml_string(text: str) -> str:
    """A TOML basic string of `text` (quotes, backslashes and control characters escaped;
    an unpaired surrogate, which TOML cannot hold, becomes U+FFFD)."""
    out = []
    for char in text:
        code = ord(char)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


@app.command()
def audit(
    out: OutOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
    fmt: FormatOption = Format.TABLE,
    since: SinceOption = None,
    user: Annotated[str | None, typer.Option(help="Only this web user's events.")] = None,
    study: Annotated[str | None, typer.Option(help="Only events of this StudyInstanceUID.")] = None,
) -> None:
    """The web app's audit trail: who viewed which study or exported which list, and when."""
    from cxrbatch.db import audit

    def query(sessions: Sessions) -> list[dict[str, object]]:
        with sessions() as session:
            return [
                {
                    "at": e.at.isoformat(),
                    "user": e.user,
                    "action": e.action,
                    "study_instance_uid": e.study_instance_uid,
                    "detail": e.detail,
                }
                for e in audit.audit_events(session, _utc(since), user, study)
            ]

    events = _with_database(_site(config, db, out), query)
    _print_rows(
        events, fmt, "web app audit trail",
        ["at", "user", "action", "study_instance_uid", "detail"],
    )  # fmt: skip


@app.command()
def pull(
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (its spool and database), as for `watch`.")
    ],
    config: ConfigOption = None,
    db: DbOption = None,
    since: Annotated[
        str | None, typer.Option(help="Studies of the last 24h, 2d, ... (by StudyDate).")
    ] = None,
    date: Annotated[str | None, typer.Option(help="Studies of one day, YYYYMMDD.")] = None,
    modality: Annotated[
        str | None, typer.Option(help="Modalities, comma-separated (default pull.modalities).")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="The [[pull.sources]] name (needed when several).")
    ] = None,
) -> None:
    """Fetch the window's chest studies from a PACS (C-FIND + C-MOVE or C-GET, or QIDO-RS +
    WADO-RS) into the spool and queue, for `watch` or `worker` to process; studies already
    received are not fetched again.

    Exit code 1 when a study could not be fetched whole (run it again: it resumes), when
    the window matched more than pull.max_studies studies, or when the PACS sent
    instances not asked for (quarantined)."""
    from cxrbatch.db.session import ensure_local_sqlite, upgrade
    from cxrbatch.ingest.pull import Puller, Window, source_named

    site = _site(config, db, out)
    settings = site.settings
    chosen = source_named(settings, source)
    window = Window.parse(since, date, settings.pull.since_hours)
    modalities = tuple(
        m.strip().upper() for m in (modality.split(",") if modality else settings.pull.modalities)
    )
    site.out_dir.mkdir(parents=True, exist_ok=True)
    ensure_local_sqlite(site.database_url)
    upgrade(site.database_url, roots=site.roots)
    with site.database() as database, _progress("studies") as progress:
        task = progress.add_task("studies", total=None)

        def advance(done: int, total: int, _what: str) -> None:
            progress.update(task, completed=done, total=total)

        report = Puller(site, database.sessions, chosen).run(window, modalities, advance)
    out_console.print(
        f"pull from {chosen.name} ({window.dicom or 'any date'}, {', '.join(modalities)}): "
        f"{report.studies} studies found, {report.already_here} already here, "
        f"{report.fetched} fetched: {report.received} instances received, "
        f"{report.duplicates} duplicates, {report.rejected} quarantined"
        + (f" ({report.not_requested} not requested)" if report.not_requested else "")
    )
    if report.truncated:
        out_console.print(f"not complete: {report.truncated}", style="bold yellow")
    for failure in report.failures:
        out_console.print(f"not complete: {failure}", style="bold yellow")
    if report.not_requested:
        out_console.print(
            f"the PACS sent {report.not_requested} instance(s) of studies or series not asked "
            "for: refused and quarantined (reason 'not requested'); check its retrieve set-up",
            style="bold yellow",
        )
    if not report.complete or report.not_requested:
        raise typer.Exit(code=EXIT_SOME_FAILED)


@app.command("export-deid")
def export_deid(
    to: Annotated[Path, typer.Option("--to", "--export", help="The export folder (new or empty).")],
    out: OutOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
    since: SinceOption = None,
    triage: Annotated[Triage | None, typer.Option(help="Only studies of this triage.")] = None,
    mapping: Annotated[
        Path | None,
        typer.Option(help="Also write the original -> pseudonym table here (outside the export)."),
    ] = None,
) -> None:
    """A de-identified copy (DICOM PS3.15 Basic Profile) of the current processed studies'
    images, SEG and SR, with labels.csv (the training curation format) and outcomes.csv."""
    from cxrbatch import deid

    if out is None:
        raise _fail("give --out OUT: the files to export are found under the output folder")
    site = _site(config, db, out)

    def work(sessions: Sessions) -> deid.Exported:
        return deid.export(
            sessions,
            site.roots,
            site.settings.deid,
            to,
            since=_utc(since),
            triage=triage.value if triage else None,
            mapping=mapping,
        )

    done = _with_database(site, work)
    out_console.print(
        f"exported {done.studies} studies: {done.images} images and {done.objects} SEG/SR "
        f"objects, de-identified, to {to}" + (f" (the mapping table: {mapping})" if mapping else "")
    )
    for reason in done.left_out:
        out_console.print(f"left out: {reason}", style="yellow")


@jobs_app.command("retry")
def jobs_retry(
    study_instance_uids: Annotated[
        list[str] | None, typer.Argument(help="Studies to retry; none = every dead job.")
    ] = None,
    out: OutOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """Queue dead jobs again with fresh attempts."""
    from cxrbatch.db import jobs

    count = _with_database(
        _site(config, db, out),
        lambda sessions: jobs.retry_dead(sessions, study_instance_uids or None),
        readonly=False,
    )
    out_console.print(f"{count} dead job(s) queued again")


def _warn_synthetic(rows: list[dict[str, object]]) -> None:
    if any(row.get("synthetic_model") for row in rows):
        console.print(
            "Scores marked synthetic_model come from a model trained on "
            "SYNTHETIC data: not clinically meaningful.",
            style="bold yellow",
        )


def _database_error(exc: DatabaseError) -> str:
    """One line: drivers' messages run over several (psycopg: 'connection failed: ...\n
    Is the server running...'), and SQLAlchemy appends the statement and a link."""
    text = str(exc.args[0]) if exc.args else ""
    return f"results database error: {type(exc).__name__}: {' '.join(text.split())}"


@db_app.command("upgrade")
def db_upgrade(
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (its SQLite DB).")
    ] = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """Create or upgrade the results database schema to the newest migration."""
    from cxrbatch.db.session import current_revision, upgrade

    site = _site(config, db, out)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    # Without --out the output root is unknown: recorded paths are then left as they are.
    upgrade(site.database_url, roots=site.roots if out is not None else None)
    out_console.print(f"schema at revision {current_revision(site.database_url)}")


BundleOutOption = Annotated[Path, typer.Option("--out", help="Bundle folder to write.")]
VersionOption = Annotated[str, typer.Option("--version", help="The bundle's version.")]


@bundle_app.command("import-torchxrayvision")
def bundle_import_torchxrayvision(
    name: Annotated[
        str,
        typer.Argument(
            help="TorchXRayVision weights name: densenet121-res224-nih, "
            "densenet121-res224-all, resnet50-res512-all, ..."
        ),
    ],
    weights_dir: Annotated[
        Path,
        typer.Option(help="Folder holding the downloaded release file (nothing is downloaded)."),
    ],
    out: BundleOutOption,
    version: VersionOption = "1",
) -> None:
    """Write a classifier bundle (Mass, Nodule, Pneumonia, Edema, Fibrosis) from a
    TorchXRayVision checkpoint, read by torchxrayvision itself, with that model's
    preprocessing and its published operating thresholds."""
    from cxrbatch.models.importers import import_torchxrayvision

    import_torchxrayvision(name, weights_dir, out, version=version)
    out_console.print(f"bundle written to {out}")


@bundle_app.command("import-torchvision")
def bundle_import_torchvision(
    architecture: Annotated[str, typer.Option(help="resnet50 or densenet121.")],
    state_dict: Annotated[Path, typer.Option(help="A plain state dict (torch.save of one).")],
    labels: Annotated[str, typer.Option(help="The network's outputs in order, comma-separated.")],
    out: BundleOutOption,
    name: Annotated[str, typer.Option(help="The bundle's model name.")],
    version: VersionOption = "1",
    input_size: Annotated[int, typer.Option(help="Network input size (square).")] = 224,
    in_channels: Annotated[int, typer.Option(help="1 or 3 input channels.")] = 3,
    mean: Annotated[
        str | None, typer.Option(help="Per-channel mean on the [0, 1] scale, comma-separated.")
    ] = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std, comma-separated.")] = None,
    mask_mode: Annotated[str, typer.Option(help="original, M-15 or M-50.")] = "original",
    threshold: Annotated[
        list[str] | None, typer.Option(help="A label's operating threshold: LABEL=P (repeat).")
    ] = None,
    description: Annotated[str, typer.Option(help="What the network is and was trained on.")] = "",
    synthetic: Annotated[
        bool, typer.Option(help="Trained on synthetic data (said in every output).")
    ] = False,
) -> None:
    """Write a classifier bundle for a torchvision ResNet50/DenseNet121 state dict."""
    from cxrbatch.models.importers import import_torchvision

    def floats(text: str | None) -> list[float] | None:
        return [float(v) for v in text.split(",")] if text else None

    thresholds: dict[str, float] = {}
    for item in threshold or []:
        label, sep, value = item.partition("=")
        if not sep:
            raise _fail(f"--threshold takes LABEL=P, found {item!r}")
        thresholds[label.strip()] = float(value)
    if architecture not in ("resnet50", "densenet121") or in_channels not in (1, 3):
        raise _fail("--architecture is resnet50 or densenet121; --in-channels is 1 or 3")
    if mask_mode not in ("original", "M-15", "M-50"):
        raise _fail("--mask-mode is original, M-15 or M-50")
    try:
        import_torchvision(
            architecture,  # type: ignore[arg-type]
            state_dict,
            [v.strip() for v in labels.split(",") if v.strip()],
            out,
            name=name,
            version=version,
            input_size=input_size,
            in_channels=in_channels,  # type: ignore[arg-type]
            mean=floats(mean),
            std=floats(std),
            mask_mode=mask_mode,  # type: ignore[arg-type]
            thresholds=thresholds,
            description=description,
            synthetic=synthetic,
        )
    except ValueError as exc:  # the bundle spec's own checks (pydantic)
        raise _fail(f"invalid bundle: {' '.join(str(exc).split())}") from exc
    out_console.print(f"bundle written to {out}")


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
    from cxrbatch_training.synthetic import write_studies

    generated = write_studies(out, studies, seed=seed, size=(size, size), truth_dir=truth)
    out_console.print(f"wrote {len(generated)} synthetic studies to {out}")


DEMO_REAL_FILES = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "MR_small.dcm", "CT_small.dcm", "US1_UNCR.dcm")


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to fill with a demo PACS export.")],
    bundle: Annotated[
        Path | None,
        typer.Option(
            help="Also train (about a minute on a CPU; reused once built) a small M-50 "
            "classifier bundle on SYNTHETIC phantoms into this folder, with BUNDLE/demo.toml "
            "to pass to --config."
        ),
    ] = None,
) -> None:
    """A demo input folder: synthetic phantoms plus real radiographs from pydicom-data
    (a chest CR, a tibia CR, MR, CT, US) and a non-DICOM file, as a PACS export might hold."""
    from pydicom.data import get_testdata_file

    from cxrbatch_training.synthetic import write_studies

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
            "pydicom-data is not installed: only synthetic studies written "
            "(pip install pydicom-data for the real radiographs)",
            style="yellow",
        )
    out_console.print(f"demo input written to {out} ({copied} real files)")
    if bundle is not None:
        if importlib.util.find_spec("monai") is None:
            raise _fail(
                "training the demo bundle needs MONAI, which is not installed: "
                "pip install 'cxrbatch[demo]' (the demo input above is written)"
            )
        from cxrbatch_training.demo import build_demo_bundle, write_demo_config

        console.print(f"training the demo classifier on synthetic phantoms into {bundle} ...")
        build_demo_bundle(bundle, progress=console.is_terminal, say=console.print)
        config = write_demo_config(bundle)
        out_console.print(
            f"demo bundle (SYNTHETIC training data) in {bundle}; use --config {config}"
        )


# The training commands (cxrbatch_training/cli.py): one CLI framework for both.
app.add_typer(training_app, name="training")


def main() -> None:
    logs.report_native_crashes()
    app()


if __name__ == "__main__":
    main()
