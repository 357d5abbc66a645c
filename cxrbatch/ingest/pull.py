"""Pull mode (`cxrbatch pull`): the night's chest studies fetched from a PACS, into the same
spool and queue as every other way in.

    find     study-root C-FIND (STUDY level: StudyDate in the window, ModalitiesInStudy one
             query per modality), or QIDO-RS for a DICOMweb source
    compare  per study, its series of the chosen modalities (SERIES level) and their
             instances (IMAGE level): a series whose every SOP Instance UID is already in
             the `instances` table is not fetched again, whichever way it came in
    fetch    each series with something missing: C-MOVE to cxrbatch's own receiver (the
             running `watch --listen`, or one this command runs for the pull), C-GET on the
             query association's peer, or WADO-RS instance by instance
    take     every instance goes through `Spool.take` (dedupe, conflicts, quarantine, the
             instance row, the study queued), as the C-STORE receiver does

A pull interrupted at any point resumes by running it again: what arrived is in the
spool and recorded, so the comparison leaves it out; a series fetched again in part
brings duplicates, which the spool drops.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from cxrbatch.config import PullSource, Settings, password_from
from cxrbatch.db import Sessions, instances
from cxrbatch.dicom import status as dimse_status
from cxrbatch.errors import CxrBatchError, one_line
from cxrbatch.ingest.scp import DicomReceiver
from cxrbatch.ingest.spool import Spool, Taken
from cxrbatch.site import Site

log = logging.getLogger(__name__)


class PullError(CxrBatchError):
    """The source could not be queried or asked to send (one line says why)."""


@dataclass(frozen=True)
class Window:
    """The StudyDate range queried: `start` to `end` (inclusive), or from `start` on."""

    start: dt.date
    end: dt.date | None = None

    @classmethod
    def parse(cls, since: str | None, date: str | None, default_hours: float) -> Window:
        if since and date:
            raise PullError("give --since or --date, not both")
        if date:
            try:
                day = dt.datetime.strptime(date, "%Y%m%d").date()
            except ValueError as exc:
                raise PullError(f"--date {date!r} is not YYYYMMDD") from exc
            return cls(day, day)
        hours = default_hours
        if since:
            unit = {"h": 1.0, "d": 24.0}.get(since[-1:].lower())
            try:
                if unit is None:
                    raise ValueError(since)
                hours = float(since[:-1]) * unit
            except ValueError as exc:
                raise PullError(f"--since {since!r} is not a duration such as 24h or 2d") from exc
        start = (dt.datetime.now() - dt.timedelta(hours=hours)).date()
        return cls(start)

    @property
    def dicom(self) -> str:
        end = self.end.strftime("%Y%m%d") if self.end else ""
        if self.end == self.start:
            return end
        return f"{self.start.strftime('%Y%m%d')}-{end}"


@dataclass(frozen=True)
class Series:
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    sop_instance_uids: tuple[str, ...]


@dataclass
class PullReport:
    studies: int = 0  # found in the window with a series of the modalities
    already_here: int = 0  # every instance of them already received
    fetched: int = 0  # studies with something fetched
    received: int = 0  # instances taken in as new (or corrected)
    duplicates: int = 0
    rejected: int = 0  # quarantined: unreadable, conflicts
    failures: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failures


Progress = Callable[[int, int, str], None]  # done, total, what


class Puller:
    """One pull from one source into the site's spool."""

    def __init__(self, site: Site, sessions: Sessions, source: PullSource) -> None:
        self.site = site
        self.settings: Settings = site.settings
        self.sessions = sessions
        self.source = source
        self.spool = Spool.for_site(site, sessions, "move")
        # The C-STORE handling of the receiver (C-GET sub-operations land here too).
        self.receiver = DicomReceiver(self.settings.dicom, self.spool, site.incoming_dir)
        self.calling = source.calling_ae_title or self.settings.dicom.ae_title

    # -- the pull --------------------------------------------------------------------------

    def run(
        self, window: Window, modalities: tuple[str, ...], progress: Progress | None = None
    ) -> PullReport:
        report = PullReport()
        self.site.incoming_dir.mkdir(parents=True, exist_ok=True)
        studies = self._find_studies(window, modalities)
        report.studies = len(studies)
        with self._retrieving():
            for done, study_uid in enumerate(studies, start=1):
                if progress:
                    progress(done - 1, len(studies), study_uid)
                try:
                    self._pull_study(study_uid, modalities, report)
                except PullError as exc:
                    report.failures.append(f"study {study_uid}: {exc}")
                    log.warning("pull of study %s failed: %s", study_uid, exc)
            if progress:
                progress(len(studies), len(studies), "")
        return report

    def _pull_study(self, study_uid: str, modalities: tuple[str, ...], report: PullReport) -> None:
        missing = [s for s in self._find_series(study_uid, modalities) if self._missing(s)]
        if not missing:
            report.already_here += 1
            return
        report.fetched += 1
        for series in missing:
            counted = self._fetch(series)
            for taken, count in counted.items():
                if taken in (Taken.RECEIVED, Taken.CORRECTED):
                    report.received += count
                elif taken is Taken.DUPLICATE:
                    report.duplicates += count
                else:
                    report.rejected += count
            still = self._missing(series)
            if still:
                raise PullError(
                    f"series {series.series_instance_uid}: {len(still)} of "
                    f"{len(series.sop_instance_uids)} instances did not arrive"
                )

    def _missing(self, series: Series) -> list[str]:
        with self.sessions() as session:
            return [
                uid
                for uid in series.sop_instance_uids
                if instances.known(session, uid, self.site.roots) is None
            ]

    # -- queries ---------------------------------------------------------------------------

    def _find_studies(self, window: Window, modalities: tuple[str, ...]) -> list[str]:
        found: dict[str, None] = {}
        for modality in modalities:
            if self.source.kind == "dicomweb":
                rows = self._qido.search_for_studies(
                    search_filters={"StudyDate": window.dicom, "ModalitiesInStudy": modality},
                    fields=["StudyInstanceUID"],
                )
                found.update(dict.fromkeys(_qido_value(r, "0020000D") for r in rows))
            else:
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.StudyDate = window.dicom
                query.ModalitiesInStudy = modality
                query.StudyInstanceUID = ""
                found.update(dict.fromkeys(str(r.StudyInstanceUID) for r in self._c_find(query)))
        return [uid for uid in found if uid]

    def _find_series(self, study_uid: str, modalities: tuple[str, ...]) -> list[Series]:
        """The study's series of `modalities` (filtered here: multi-valued Modality matching
        is not portable), each with its SOP Instance UIDs."""
        listed: list[Series] = []
        if self.source.kind == "dicomweb":
            for row in self._qido.search_for_series(study_uid, fields=["Modality"]):
                series_uid = _qido_value(row, "0020000E")
                modality = _qido_value(row, "00080060").upper()
                if modality not in modalities:
                    continue
                sops = self._qido.search_for_instances(study_uid, series_uid)
                uids = tuple(_qido_value(s, "00080018") for s in sops)
                listed.append(Series(study_uid, series_uid, modality, uids))
            return listed
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.Modality = ""
        for row in self._c_find(query):
            modality = str(row.get("Modality", "")).upper()
            if modality not in modalities:
                continue
            image = Dataset()
            image.QueryRetrieveLevel = "IMAGE"
            image.StudyInstanceUID = study_uid
            image.SeriesInstanceUID = row.SeriesInstanceUID
            image.SOPInstanceUID = ""
            sops = tuple(str(r.SOPInstanceUID) for r in self._c_find(image))
            listed.append(Series(study_uid, str(row.SeriesInstanceUID), modality, sops))
        return listed

    def _c_find(self, query: Dataset) -> list[Dataset]:
        with self._association(StudyRootQueryRetrieveInformationModelFind) as assoc:
            answers = []
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                code = int(status.Status) if "Status" in status else None
                if code is None:
                    raise PullError(f"C-FIND: {self._where} sent no answer (aborted or timed out)")
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    answers.append(identifier)
                elif code not in (0x0000, 0xFF00, 0xFF01):
                    raise PullError(
                        f"C-FIND refused by {self._where}: {dimse_status.describe(code)}"
                    )
            return answers

    # -- retrieval -------------------------------------------------------------------------

    def _fetch(self, series: Series) -> dict[Taken, int]:
        log.info(
            "fetching series %s of study %s (%d instances)",
            series.series_instance_uid,
            series.study_instance_uid,
            len(series.sop_instance_uids),
        )
        if self.source.kind == "dicomweb":
            return self._wado(series)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = series.study_instance_uid
        identifier.SeriesInstanceUID = series.series_instance_uid
        if self.source.retrieve == "c-get":
            return self._c_get(identifier)
        return self._c_move(identifier)

    def _c_move(self, identifier: Dataset) -> dict[Taken, int]:
        """The sub-operations arrive at a receiver (ours, or the running daemon's): what it
        took is counted from the instances table."""
        destination = self.source.move_destination or self.settings.dicom.ae_title
        before = self._tally()
        with self._association(StudyRootQueryRetrieveInformationModelMove) as assoc:
            final = None
            for status, _ in assoc.send_c_move(
                identifier, destination, StudyRootQueryRetrieveInformationModelMove
            ):
                final = int(status.Status) if "Status" in status else None
            self._check_retrieve("C-MOVE", final)
        after = self._tally()
        received, duplicates, rejected = (max(0, a - b) for a, b in zip(after, before, strict=True))
        return {Taken.RECEIVED: received, Taken.DUPLICATE: duplicates, Taken.REJECTED: rejected}

    def _c_get(self, identifier: Dataset) -> dict[Taken, int]:
        counted: Counter[Taken] = Counter()

        def store(event: evt.Event) -> int:
            taken = self.receiver.take_event(event)
            if taken is not None:
                counted[taken] += 1
            return self.receiver.answer(taken)

        storage = sorted(set(self.settings.selection.sop_class_uids))
        roles = [build_role(sop_class, scp_role=True) for sop_class in storage]
        with self._association(
            StudyRootQueryRetrieveInformationModelGet, storage, roles, [(evt.EVT_C_STORE, store)]
        ) as assoc:
            final = None
            for status, _ in assoc.send_c_get(
                identifier, StudyRootQueryRetrieveInformationModelGet
            ):
                final = int(status.Status) if "Status" in status else None
            self._check_retrieve("C-GET", final)
        return dict(counted)

    def _check_retrieve(self, what: str, final: int | None) -> None:
        if final is None:
            raise PullError(f"{what}: {self._where} sent no final answer (aborted or timed out)")
        if final not in (0x0000, 0xB000):  # success; warning: some sub-operations failed
            raise PullError(f"{what} refused by {self._where}: {dimse_status.describe(final)}")
        if final == 0xB000:
            log.warning("%s from %s: some sub-operations failed", what, self._where)

    def _wado(self, series: Series) -> dict[Taken, int]:
        counted: Counter[Taken] = Counter()
        for sop_uid in self._missing(series):
            try:
                ds = self._qido.retrieve_instance(
                    series.study_instance_uid, series.series_instance_uid, sop_uid
                )
            except Exception as exc:  # requests' errors: HTTP status, connection
                raise PullError(f"WADO-RS of instance {sop_uid}: {one_line(exc)}") from exc
            taken = self.receiver.take_data(functools.partial(_part10, ds))
            if taken is None:
                raise PullError(f"instance {sop_uid} could not be taken in (see the log)")
            counted[taken] += 1
        return dict(counted)

    # -- peers -----------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        if self.source.kind == "dicomweb":
            return self.source.url
        return f"{self.source.ae_title}@{self.source.host}:{self.source.port}"

    @contextmanager
    def _association(
        self,
        model: str,
        storage: list[str] | None = None,
        roles: list[Any] | None = None,
        handlers: list[Any] | None = None,
    ) -> Iterator[Any]:
        ae = AE(ae_title=self.calling)
        timeout = self.source.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.add_requested_context(model)
        for sop_class in storage or ():
            ae.add_requested_context(sop_class)
        assoc = ae.associate(
            self.source.host,
            self.source.port,
            ae_title=self.source.ae_title,
            ext_neg=roles or None,
            evt_handlers=handlers or None,
        )
        if not assoc.is_established:
            what = "rejected" if assoc.is_rejected else "not established (no answer, or aborted)"
            raise PullError(f"association with {self._where} {what}")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    @functools.cached_property
    def _qido(self) -> Any:
        """One DICOMweb client (and HTTP session) for the pull."""
        from dicomweb_client.api import DICOMwebClient
        from requests import Session

        session = Session()
        if self.source.username:
            session.auth = (self.source.username, password_from(self.source.password_env))
        return DICOMwebClient(self.source.url, session=session, timeout=self.source.timeout_seconds)

    def _tally(self) -> tuple[int, int, int]:
        with self.sessions() as session:
            return instances.tally(session)

    @contextmanager
    def _retrieving(self) -> Iterator[None]:
        """For C-MOVE: cxrbatch's receiver must be listening at dicom.port. One already
        answering (the running `watch --listen`) is used; otherwise this pull runs one."""
        if self.source.kind != "dimse" or self.source.retrieve != "c-move":
            yield
            return
        if self._receiver_answers():
            log.info(
                "C-MOVE to the receiver already listening on port %d", self.settings.dicom.port
            )
            yield
            return
        self.receiver.start()
        try:
            yield
        finally:
            self.receiver.stop()

    def _receiver_answers(self) -> bool:
        address = self.settings.dicom.bind_address
        host = "127.0.0.1" if address in ("0.0.0.0", "") else address
        try:
            with socket.create_connection((host, self.settings.dicom.port), timeout=2):
                pass
        except OSError:
            return False
        ae = AE(ae_title=self.calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate(host, self.settings.dicom.port, ae_title=self.settings.dicom.ae_title)
        if not assoc.is_established:
            raise PullError(
                f"port {self.settings.dicom.port} is taken by something that is not cxrbatch's "
                f"receiver {self.settings.dicom.ae_title}: C-MOVE has nowhere to send"
            )
        assoc.release()
        return True


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _qido_value(row: dict[str, Any], tag: str) -> str:
    values = row.get(tag, {}).get("Value") or [""]
    return str(values[0])


def source_named(settings: Settings, name: str | None) -> PullSource:
    sources = settings.pull.sources
    if not sources:
        raise PullError("no [[pull.sources]] in the configuration")
    if name is None:
        if len(sources) > 1:
            raise PullError(
                f"give --source: {len(sources)} sources are configured "
                f"({', '.join(s.name for s in sources)})"
            )
        return sources[0]
    for source in sources:
        if source.name == name:
            return source
    raise PullError(f"no pull source {name!r} (configured: {', '.join(s.name for s in sources)})")
