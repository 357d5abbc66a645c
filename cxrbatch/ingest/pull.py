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

Deadlines (cxrbatch/exchange.py): each request (a C-FIND with all its answers, one
series' C-MOVE or C-GET, one WADO-RS instance) ends within `timeout_seconds` of its
source, and the whole run within `pull.run_timeout_minutes`; a PACS that answers "pending"
forever or trickles is cut off, the study is reported as not complete with the reason,
and the next run resumes it. At most `pull.max_studies` matches are taken per window.

Only what was asked for is taken in: a C-GET's or WADO-RS instance of another study or
series than the one requested, or a C-MOVE's (the `retrievals` table tells the receiver
what this pull asked for), is quarantined as "not requested", counted, never processed.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import logging
import socket
import time
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

from cxrbatch import exchange
from cxrbatch.config import PullSource, Settings, password_from
from cxrbatch.db import Sessions, instances, retrievals
from cxrbatch.dicom import status as dimse_status
from cxrbatch.domain import InstanceHeader
from cxrbatch.errors import PeerError
from cxrbatch.ingest.scp import DicomReceiver
from cxrbatch.ingest.spool import Expectation, Spool, Taken
from cxrbatch.site import Site

log = logging.getLogger(__name__)


_FIND = StudyRootQueryRetrieveInformationModelFind
_CANCEL_GRACE_SECONDS = 2.0


class PullError(PeerError):
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
    rejected: int = 0  # quarantined: unreadable, conflicts, not requested
    not_requested: int = 0  # of those, instances of a study or series not asked for
    failures: list[str] = field(default_factory=list)
    truncated: str = ""  # why fewer studies were taken than the PACS matched

    @property
    def complete(self) -> bool:
        return not self.failures and not self.truncated

    def count(self, counted: dict[Taken, int]) -> None:
        for taken, number in counted.items():
            if taken in (Taken.RECEIVED, Taken.CORRECTED):
                self.received += number
            elif taken is Taken.DUPLICATE:
                self.duplicates += number
            elif taken in (Taken.REJECTED, Taken.CONFLICT, Taken.NOT_REQUESTED):
                self.rejected += number
        self.not_requested += counted.get(Taken.NOT_REQUESTED, 0)


Progress = Callable[[int, int, str], None]  # done, total, what


class Puller:
    """One pull from one source into the site's spool."""

    def __init__(self, site: Site, sessions: Sessions, source: PullSource) -> None:
        self.site = site
        self.settings: Settings = site.settings
        self.sessions = sessions
        self.source = source
        self.spool = Spool.for_site(site, sessions, "move")
        # The C-STORE handling of the receiver (C-GET sub-operations land here too). When
        # the pull runs it for its own C-MOVEs, it is strict: nothing but what was asked.
        self.receiver = DicomReceiver(
            self.settings.dicom, self.spool, site.incoming_dir, strict=True
        )
        self.calling = source.calling_ae_title or self.settings.dicom.ae_title

    # -- the pull --------------------------------------------------------------------------

    def run(
        self, window: Window, modalities: tuple[str, ...], progress: Progress | None = None
    ) -> PullReport:
        report = PullReport()
        self.site.incoming_dir.mkdir(parents=True, exist_ok=True)
        minutes = self.settings.pull.run_timeout_minutes
        with exchange.deadline(minutes * 60, f"pull from {self.source.name}") as run_deadline:
            studies = self._find_studies(window, modalities, report)
            report.studies = len(studies)
            with self._retrieving():
                for done, study_uid in enumerate(studies, start=1):
                    if progress:
                        progress(done - 1, len(studies), study_uid)
                    if run_deadline.expired:
                        left = len(studies) - done + 1
                        report.failures.append(
                            f"{left} studies not reached: the pull's run deadline of "
                            f"{minutes:g} min passed (pull.run_timeout_minutes); run it again "
                            "to resume"
                        )
                        break
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
            report.count(self._fetch(series))
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

    @contextmanager
    def _request(self, what: str) -> Iterator[None]:
        """One request under the source's total deadline; PullError naming it when the
        deadline passes (or the run's does)."""
        with exchange.deadline(self.source.timeout_seconds, f"{what} at {self._where}"):
            try:
                yield
            except exchange.DeadlineExceeded as exc:
                raise PullError(str(exc)) from exc
            except PullError:
                bound = exchange.expired()
                if bound is not None:
                    raise PullError(bound.message) from None
                raise

    # -- queries ---------------------------------------------------------------------------

    def _find_studies(
        self, window: Window, modalities: tuple[str, ...], report: PullReport
    ) -> list[str]:
        limit = self.settings.pull.max_studies
        found: dict[str, None] = {}
        with self._request("C-FIND of the window's studies"):
            if self.source.kind == "dicomweb":
                for modality in modalities:
                    try:
                        rows = self._qido.search_for_studies(
                            search_filters={
                                "StudyDate": window.dicom,
                                "ModalitiesInStudy": modality,
                            },
                            fields=["StudyInstanceUID"],
                            limit=limit + 1,
                        )
                    except Exception as exc:  # requests' errors, a redirect, the deadline
                        raise PullError(exchange.http_failure(exc, "QIDO-RS")) from exc
                    found.update(dict.fromkeys(_qido_value(r, "0020000D") for r in rows))
            else:
                with self._association(StudyRootQueryRetrieveInformationModelFind) as assoc:
                    for modality in modalities:
                        query = Dataset()
                        query.QueryRetrieveLevel = "STUDY"
                        query.StudyDate = window.dicom
                        query.ModalitiesInStudy = modality
                        query.StudyInstanceUID = ""
                        rows = self._c_find(assoc, query, limit=limit + 1)
                        found.update(dict.fromkeys(str(r.StudyInstanceUID) for r in rows))
                        if len(found) > limit:
                            break  # enough: the other modalities are not asked
        studies = [uid for uid in found if uid]
        if len(studies) > limit:
            report.truncated = (
                f"the PACS matched more than {limit} studies in the window; the first {limit} "
                "were taken (pull.max_studies): pull a narrower window (--date) or raise "
                "pull.max_studies"
            )
            log.warning("pull from %s: %s", self.source.name, report.truncated)
            studies = studies[:limit]
        return studies

    def _find_series(self, study_uid: str, modalities: tuple[str, ...]) -> list[Series]:
        """The study's series of `modalities` (filtered here: multi-valued Modality matching
        is not portable), each with its SOP Instance UIDs; one association for all."""
        listed: list[Series] = []
        with self._request(f"C-FIND of study {study_uid}'s series"):
            if self.source.kind == "dicomweb":
                try:
                    for row in self._qido.search_for_series(study_uid, fields=["Modality"]):
                        series_uid = _qido_value(row, "0020000E")
                        modality = _qido_value(row, "00080060").upper()
                        if modality not in modalities:
                            continue
                        sops = self._qido.search_for_instances(study_uid, series_uid)
                        uids = tuple(_qido_value(s, "00080018") for s in sops)
                        listed.append(Series(study_uid, series_uid, modality, uids))
                except Exception as exc:  # requests' errors, a redirect, the deadline
                    raise PullError(exchange.http_failure(exc, "QIDO-RS")) from exc
                return listed
            with self._association(StudyRootQueryRetrieveInformationModelFind) as assoc:
                query = Dataset()
                query.QueryRetrieveLevel = "SERIES"
                query.StudyInstanceUID = study_uid
                query.SeriesInstanceUID = ""
                query.Modality = ""
                for row in self._c_find(assoc, query):
                    modality = str(row.get("Modality", "")).upper()
                    if modality not in modalities:
                        continue
                    image = Dataset()
                    image.QueryRetrieveLevel = "IMAGE"
                    image.StudyInstanceUID = study_uid
                    image.SeriesInstanceUID = row.SeriesInstanceUID
                    image.SOPInstanceUID = ""
                    sops = tuple(str(r.SOPInstanceUID) for r in self._c_find(assoc, image))
                    listed.append(Series(study_uid, str(row.SeriesInstanceUID), modality, sops))
        return listed

    def _c_find(self, assoc: Any, query: Dataset, limit: int | None = None) -> list[Dataset]:
        """The matches of one C-FIND on `assoc`. Past `limit` matches the query is cancelled
        (C-CANCEL) and the rest are not kept; a PACS still answering after
        `_CANCEL_GRACE_SECONDS` (many honour a cancel late or never) has the association
        aborted."""
        answers: list[Dataset] = []
        self._message_id += 1
        message_id = self._message_id
        cancelled_at: float | None = None
        for status, identifier in assoc.send_c_find(query, _FIND, msg_id=message_id):
            code = int(status.Status) if "Status" in status else None
            if code is None:
                if cancelled_at is not None:
                    break  # aborted by us after the cancel
                raise PullError(f"C-FIND: {self._where} sent no answer (aborted or timed out)")
            if code in (0x0000, 0xFE00):  # the end; or the end of a cancelled query
                break
            if code not in (0xFF00, 0xFF01):
                raise PullError(f"C-FIND refused by {self._where}: {dimse_status.describe(code)}")
            if cancelled_at is not None:
                if time.monotonic() - cancelled_at > _CANCEL_GRACE_SECONDS:
                    assoc.abort()
                    break
                continue
            if identifier is not None:
                answers.append(identifier)
            if limit is not None and len(answers) >= limit:
                assoc.send_c_cancel(message_id, query_model=_FIND)
                cancelled_at = time.monotonic()
        return answers

    _message_id = 0

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
            with self._request(f"C-GET of series {series.series_instance_uid}"):
                return self._c_get(identifier, _requested(series))
        with self._request(f"C-MOVE of series {series.series_instance_uid}"):
            return self._c_move(identifier, series)

    def _c_move(self, identifier: Dataset, series: Series) -> dict[Taken, int]:
        """The sub-operations arrive at a receiver (ours, or the running daemon's), which
        takes only what the open retrieval names: counted from the tables."""
        destination = self.source.move_destination or self.settings.dicom.ae_title
        with self.sessions.begin() as session:
            retrieval = retrievals.open_retrieval(
                session,
                self.calling,
                self.source.ae_title,
                series.study_instance_uid,
                series.series_instance_uid,
                self.source.timeout_seconds,
            )
        before = self._tally()
        try:
            with self._association(StudyRootQueryRetrieveInformationModelMove) as assoc:
                final = None
                for status, _ in assoc.send_c_move(
                    identifier, destination, StudyRootQueryRetrieveInformationModelMove
                ):
                    final = int(status.Status) if "Status" in status else None
                self._check_retrieve("C-MOVE", final)
        finally:
            with self.sessions.begin() as session:
                refused = retrievals.close_retrieval(session, retrieval)
            after = self._tally()
        received, duplicates, rejected = (max(0, a - b) for a, b in zip(after, before, strict=True))
        return {
            Taken.RECEIVED: received,
            Taken.DUPLICATE: duplicates,
            Taken.REJECTED: max(0, rejected - refused),
            Taken.NOT_REQUESTED: refused,
        }

    def _c_get(self, identifier: Dataset, expect: Expectation) -> dict[Taken, int]:
        counted: Counter[Taken] = Counter()

        def store(event: evt.Event) -> int:
            taken = self.receiver.take_event(event, expect)
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
        expect = _requested(series)
        for sop_uid in self._missing(series):
            with self._request(f"WADO-RS of instance {sop_uid}"):
                try:
                    ds = self._qido.retrieve_instance(
                        series.study_instance_uid, series.series_instance_uid, sop_uid
                    )
                except Exception as exc:  # requests' errors, a redirect, the deadline
                    raise PullError(exchange.http_failure(exc, "WADO-RS")) from exc
            taken = self.receiver.take_data(functools.partial(_part10, ds), expect)
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
        """An association with the source, aborted when the current deadline passes."""
        ae = AE(ae_title=self.calling)
        timeout = exchange.seconds_left(self.source.timeout_seconds)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
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
            with exchange.association_deadline(assoc):
                yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    @functools.cached_property
    def _qido(self) -> Any:
        """One DICOMweb client (and HTTP session: no redirects, deadline-bound) for the
        pull."""
        from dicomweb_client.api import DICOMwebClient

        password = password_from(self.source.password_env) if self.source.username else None
        session = exchange.http_session(
            self.source.username, password, self.source.tls_ca_certificates
        )
        client = DICOMwebClient(
            self.source.url, session=session, timeout=self.source.timeout_seconds
        )
        client.set_http_retry_params(retry=False)  # the next run is the retry
        return client

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


def _requested(series: Series) -> Expectation:
    """An instance of the requested series, or the reason it is not."""

    def expect(header: InstanceHeader) -> str | None:
        if (header.study_instance_uid, header.series_instance_uid) == (
            series.study_instance_uid,
            series.series_instance_uid,
        ):
            return None
        return (
            f"not requested: study {header.study_instance_uid} series "
            f"{header.series_instance_uid} arrived for a retrieval of study "
            f"{series.study_instance_uid} series {series.series_instance_uid}"
        )

    return expect


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
