"""Workers: claim a study -> pipeline.run -> record the outcome; graceful shutdown.

`StudyProcessor` processes one study and records it. `QueueWorker` is the loop around it
that `cxrbatch watch`, `worker` and `process` all run: claim a job from the SQL queue,
keep its lease alive with heartbeats, record the outcome and close the job in one
transaction, stop claiming when the disk runs low, and on SIGTERM finish the studies in
hand within a grace period or give them back to the queue. A worker runs
`processing.study_threads` such loops on threads sharing its models: one study's decoding
and writing overlap another's networks.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import highdicom as hd
import torch
from pydicom import dcmread

from cxrbatch import logs, pipeline
from cxrbatch.allocator import keep_freed_memory
from cxrbatch.config import Settings
from cxrbatch.db import DatabaseError, Session, Sessions, deliveries, instances, jobs, repository
from cxrbatch.dicom import export, rejection
from cxrbatch.dicom.discover import read_header
from cxrbatch.domain import (
    InstanceHeader,
    JobStatus,
    ModelRef,
    OutcomeStatus,
    RejectedFile,
    StudyInput,
    StudyResult,
    StudyRunStatus,
    Withdrawal,
)
from cxrbatch.errors import CxrBatchError, OutputError, RecordingError, one_line
from cxrbatch.models.device import limit_cpu_threads
from cxrbatch.paths import StorageRoots, resolve_stored, uid_path_component
from cxrbatch.quarantine import record_rejected_at
from cxrbatch.site import Site
from cxrbatch.worker_entry import EXIT_CANNOT_START

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyReport:
    """What processing one study reports back (small enough to cross processes)."""

    study_instance_uid: str
    status: StudyRunStatus
    reason: str | None = None
    image_reasons: tuple[str, ...] = ()
    quarantined: int = 0
    images: int = 0
    synthetic_model: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    worker_pid: int = 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_gpu_bytes() -> int:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_initialized() else 0


@dataclass(frozen=True)
class Unchanged:
    """A study whose current outcome stands: same input, models and settings, outputs in
    place. Nothing is recorded for it; a job is closed against that outcome."""

    study_instance_uid: str
    outcome_id: int
    status: OutcomeStatus


@dataclass(frozen=True)
class Recorded:
    """What recording a study's outcome wrote, in the caller's transaction."""

    outcome_id: int
    status: OutcomeStatus
    quarantined: int


class StudyProcessor:
    """Models loaded once and the site's database; runs studies and records their outcomes.

    `run` processes one study and records nothing; `record` writes its outcome in the
    caller's session; the caller owns the transaction (the queue worker records and
    closes the job in one).
    """

    def __init__(
        self,
        site: Site,
        models: pipeline.Models | None = None,
        in_flight: int = 1,
    ) -> None:
        """`in_flight`: studies the caller will process at once on threads (load_models)."""
        self.site = site
        self.settings = site.settings
        if site.settings.processing.keep_freed_memory:  # every processing process passes here
            keep_freed_memory()
        self.database = site.database()
        self.sessions: Sessions = self.database.sessions
        self.models = (
            models if models is not None else pipeline.load_models(site.settings, in_flight)
        )
        self.synthetic = any(m.synthetic_training_data for m in self.models.refs)
        # This process's identity: recorded on each outcome, and a queue worker's lease owner.
        self.worker = jobs.new_owner()

    def close(self) -> None:
        self.database.close()

    def fingerprint(self, study: StudyInput) -> str:
        return pipeline.input_fingerprint(study, self.models, self.settings)

    def run(
        self,
        study: StudyInput,
        force: bool = False,
        fingerprint: str | None = None,
        staging: Path | None = None,
    ) -> StudyResult | Unchanged:
        """Process one study (its own failures become a failed result; nothing is
        recorded). `fingerprint`: its input fingerprint when the caller computed it
        already (computed once per study); `staging`: where to write the outputs for the
        caller to publish (`export.staging_dir`), instead of the study's folder."""
        uid = study.study_instance_uid
        fingerprint = fingerprint or self.fingerprint(study)
        with self.sessions() as session:
            current = repository.current_outcome(session, uid)
            # Unchanged input, same models, outputs in place: nothing to do. Failed studies
            # are always retried (the cause may have been transient: a full disk, a kill).
            if (
                not force
                and current is not None
                and current.status != OutcomeStatus.FAILED.value
                and current.input_fingerprint == fingerprint
                and _outputs_exist(current.outputs, self.site.roots)
            ):
                return Unchanged(uid, current.id, OutcomeStatus(current.status))
        try:
            result = pipeline.run(
                study, self.models, self.settings, self.site.out_dir, fingerprint, staging
            )
        except CxrBatchError as exc:  # e.g. an output that cannot be written (disk full)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else one_line(exc)
            log.error("study %s failed: %s", uid, reason)
            log.debug("study %s failed", uid, exc_info=True)
            result = failed_result(uid, reason, fingerprint, self.models.refs)
        except Exception as exc:  # one study must never stop the batch
            log.error("study %s failed: internal error: %s", uid, one_line(exc))
            log.debug("study %s failed", uid, exc_info=True)
            result = failed_result(
                uid, f"internal error: {one_line(exc)}", fingerprint, self.models.refs
            )
        return replace(result, processed_by=self.worker)

    def record(self, session: Session, ran: StudyResult | Unchanged) -> Recorded:
        """Record what `run` gave in the caller's session (the caller commits)."""
        if isinstance(ran, Unchanged):
            return Recorded(ran.outcome_id, ran.status, 0)
        return record_result(session, self.site, ran)

    def report(self, ran: StudyResult | Unchanged, recorded: Recorded | None) -> StudyReport:
        """The study's report, once its outcome is recorded (`recorded` None: the job was
        taken over while it ran, nothing was recorded), and its log line."""
        uid = ran.study_instance_uid
        if recorded is None:
            log.warning("study %s: the job was taken over while it ran; not recorded", uid)
            return StudyReport(uid, StudyRunStatus.LOST, synthetic_model=self.synthetic)
        if isinstance(ran, Unchanged):
            log.info("study %s unchanged since its last outcome; skipped", uid)
            return StudyReport(uid, StudyRunStatus.UNCHANGED, synthetic_model=self.synthetic)
        result = ran
        total = sum(result.timings.values())
        log.info(
            "study %s %s in %.2fs (%d image(s) processed, %d skipped, %d failed)",
            uid,
            result.status.value,
            total,
            len(result.images),
            len(result.skipped),
            len(result.failures),
            extra={
                "fields": {
                    "event": "study_outcome",
                    "study_instance_uid": uid,
                    "status": result.status.value,
                    "reason": result.reason,
                    "images_processed": len(result.images),
                    "images_skipped": len(result.skipped),
                    "images_failed": len(result.failures),
                    "triage": result.triage.value if result.triage else None,
                    "seconds": round(total, 3),
                    "timings": {k: round(v, 3) for k, v in result.timings.items()},
                }
            },
        )
        reasons = [s.reason for s in result.skipped] + [f.reason for f in result.failures]
        if result.status is OutcomeStatus.FAILED and not result.failures and result.reason:
            reasons.append(result.reason)  # a failure of the study as a whole
        return StudyReport(
            study_instance_uid=uid,
            status=StudyRunStatus(result.status.value),
            reason=result.reason,
            image_reasons=tuple(reasons),
            quarantined=recorded.quarantined,
            images=len(result.images),
            synthetic_model=self.synthetic,
            timings=dict(result.timings),
            peak_rss_bytes=peak_rss_bytes(),
            peak_gpu_bytes=peak_gpu_bytes(),
            worker_pid=os.getpid(),
        )


@contextmanager
def recording(study_instance_uid: str) -> Iterator[None]:
    """A database error while recording a study's outcome is a RecordingError naming the
    study and the cause (the batch or the worker stops: it cannot record what it does)."""
    try:
        yield
    except DatabaseError as exc:
        log.debug("recording study %s failed", study_instance_uid, exc_info=True)
        raise RecordingError(
            f"the outcome of study {study_instance_uid} cannot be recorded in the results "
            f"database: {one_line(getattr(exc, 'orig', None) or exc)}"
        ) from exc


def record_result(session: Session, site: Site, result: StudyResult) -> Recorded:
    """Record a study's outcome, quarantine the files of its failed images and queue its
    sending, in the caller's transaction (the caller commits). Nothing is written or read
    on disk here: the writers gave the outputs, their identities and any rejection note
    (`with_withdrawal`)."""
    failures = [
        RejectedFile(
            f.instance.path,
            f.reason,
            f.instance.sha256,
            study_instance_uid=result.study_instance_uid,
            sop_instance_uid=f.instance.sop_instance_uid,
        )
        for f in result.failures
    ]
    _, quarantined = record_rejected_at(session, site, failures)
    outcome = repository.record_study(session, result, site.roots)
    made = result.outputs
    # The identities of the outputs, in the order the outcome's document lists them.
    objects = (
        [made.identities[Path(f).name] for f in deliveries.stored_files(outcome.outputs or {})]
        if made is not None
        else []
    )
    # Sending is queued with the outcome, in one transaction: nothing recorded is ever
    # left unsent by a crash.
    deliveries.enqueue(
        session,
        outcome,
        site.settings.send.destinations,
        objects,
        made.withdrawal if made is not None else None,
    )
    return Recorded(outcome.id, result.status, quarantined)


def with_withdrawal(sessions: Sessions, site: Site, result: StudyResult) -> StudyResult:
    """The result with the IOCM rejection note it needs, written beside its outputs (in
    the attempt's staging folder, published with them), when DICOM destinations hold
    objects of the study's earlier outcomes; the result unchanged otherwise.

    Runs before the record transaction (the record step only records). A delivery of an
    earlier outcome acknowledged between this read and the record is not in the note
    (deploy/OPERATIONS.md, "Withdrawn results").

    Raises
    ------
    OutputError: the note cannot be written (the caller fails the study).
    """
    made = result.outputs
    dicom = {d.name for d in site.settings.send.destinations if not d.sends_report}
    if result.status is not OutcomeStatus.PROCESSED or made is None or not dicom:
        return result
    files = made.dicom_files()
    if not files:
        return result
    with sessions() as session:
        held = {
            name: items
            for name, items in deliveries.delivered_objects(
                session, result.study_instance_uid
            ).items()
            if name in dicom
        }
    if not held:
        return result
    withdrawn = list({i["sop_instance"]: i for items in held.values() for i in items}.values())
    # The patient and study attributes the note carries: those of an object just written.
    study = dcmread(files[-1], stop_before_pixels=True)
    note = rejection.build_rejection(
        rejection.evidence(withdrawn, study), result.models, hd.UID(), hd.UID()
    )
    path = export.write_dicom(
        files[-1].parent / f"rejection_{uid_path_component(note.SOPInstanceUID)}.dcm", note
    )
    log.info(
        "study %s: %d earlier object(s) withdrawn by a rejection note to %s",
        result.study_instance_uid,
        len(withdrawn),
        ", ".join(sorted(held)),
    )
    withdrawal = Withdrawal(path, tuple(i["sop_instance"] for i in withdrawn), frozenset(held))
    return replace(result, outputs=replace(made, withdrawal=withdrawal))


def failed_result(
    study_instance_uid: str,
    reason: str,
    fingerprint: str,
    models: tuple[ModelRef, ...],
    processed_by: str | None = None,
) -> StudyResult:
    """The outcome of a study that failed as a whole."""
    return StudyResult(
        study_instance_uid=study_instance_uid,
        status=OutcomeStatus.FAILED,
        reason=reason,
        images=(),
        skipped=(),
        failures=(),
        triage=None,
        no_finding_score=None,
        models=models,
        input_fingerprint=fingerprint,
        processed_by=processed_by,
    )


def _outputs_exist(outputs: dict[str, Any], roots: StorageRoots) -> bool:
    paths = deliveries.outcome_files(outputs, roots)
    if outputs.get("json"):
        paths.append(resolve_stored(outputs["json"], roots))
    return all(p.is_file() for p in paths)


# ---- the daemon's worker ----------------------------------------------------------------

JOB_STATUS_OF_OUTCOME = {
    OutcomeStatus.PROCESSED: JobStatus.DONE,
    OutcomeStatus.INELIGIBLE: JobStatus.INELIGIBLE,
    OutcomeStatus.FAILED: JobStatus.FAILED,
}


def received_study(
    session: Session, study_instance_uid: str, roots: StorageRoots | None = None
) -> tuple[StudyInput, list[RejectedFile]]:
    """The study as received so far (instances table), each file's header read again."""
    headers: list[InstanceHeader] = []
    rejected: list[RejectedFile] = []
    for path in instances.study_files(session, study_instance_uid, roots):
        header = read_header(path)
        if isinstance(header, RejectedFile):
            rejected.append(header)
        else:
            headers.append(header)
    return StudyInput(study_instance_uid, tuple(headers)), rejected


def free_disk_mb(paths: list[Path]) -> float:
    """The least free space (MiB) over the file systems holding `paths`."""
    free: list[float] = []
    for path in paths:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free.append(shutil.disk_usage(probe).free / 2**20)
    return min(free)


class _Heartbeat:
    """Renews a claim's lease every heartbeat_seconds while a study is processed."""

    def __init__(self, sessions: Sessions, claimed: jobs.Claim, settings: Settings) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(sessions, claimed, settings), daemon=True
        )

    def _run(self, sessions: Sessions, claimed: jobs.Claim, settings: Settings) -> None:
        interval = settings.queue.heartbeat_seconds
        while not self._stop.wait(interval):
            try:
                if not jobs.heartbeat(sessions, claimed, settings.queue.lease_seconds):
                    log.warning("lease of study %s lost", claimed.study_instance_uid)
                    return
            except Exception as exc:  # the database may be briefly unreachable
                log.warning("heartbeat failed: %s", exc)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class Started:
    """A worker has begun a study (before its networks run): what its parent needs to
    record it as failed if the study then kills the worker every time it is tried.
    Small (below PIPE_BUF), so that a worker killed while telling leaves no half message."""

    study_instance_uid: str
    fingerprint: str
    models: tuple[ModelRef, ...]


# What a worker tells whoever started it, as it goes: `Started`, then the `StudyReport`.
Tell = Callable[["Started | StudyReport"], None]


class Turns:
    """Which claimed studies a worker's study loops may process now. A study whose last
    attempt died with its worker process (killed, out of memory, a crash in native code)
    runs alone: the studies already in flight here finish first and none starts beside
    it. So a study that kills its worker takes no other study's attempts with it, and a
    study that was only in flight beside such a study is tried again without it."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._running = 0
        self._alone = False

    def wait_while_alone(self, timeout: float) -> bool:
        """Whether a study runs (or waits to run) alone here; if so, wait up to `timeout`
        for it to end, so that the caller claims nothing meanwhile."""
        with self._condition:
            if not self._alone:
                return False
            self._condition.wait(timeout)
            return True

    def take(self, claimed: jobs.Claim) -> bool:
        """Start processing `claimed` (waiting, for a study that runs alone, until the
        others in flight end), or False where another study runs alone here now: the
        caller gives `claimed` back."""
        with self._condition:
            if self._alone:
                return False
            if claimed.lost:
                self._alone = True
                while self._running:
                    self._condition.wait()
            self._running += 1
            return True

    def end(self, claimed: jobs.Claim) -> None:
        with self._condition:
            self._running -= 1
            if claimed.lost:
                self._alone = False
            self._condition.notify_all()


class QueueWorker:
    """One worker: claims jobs until stopped. Models are loaded once, at construction."""

    def __init__(
        self,
        site: Site,
        models: pipeline.Models | None = None,
        *,
        force: bool = False,
        tell: Tell | None = None,
    ) -> None:
        """`force`: run studies whose outcome stands too (`cxrbatch process --force`);
        `tell`: called with each study's `Started` and `StudyReport` (`cxrbatch process`
        gathers them), from the thread that processed it."""
        self.site = site
        self.force = force
        self.tell = tell
        self.settings = settings = site.settings
        self.slots = max(1, settings.processing.study_threads)  # studies in flight
        self.processor = StudyProcessor(site, models, in_flight=self.slots)
        self.sessions = self.processor.sessions
        self.policy = jobs.RetryPolicy.from_settings(settings.queue)
        self.owner = self.processor.worker
        self.stopping = threading.Event()
        self.current: list[jobs.Claim] = []  # the claims in hand
        self._lock = threading.Lock()
        self._turns = Turns()
        self._paused_for_disk = False
        self._low_since = 0.0  # when the free disk went under the watermark (monotonic)
        self._free_mb = 0.0
        self._last_recovery = 0.0
        self.processed = 0

    # -- shutdown ---------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.request_stop(f"signal {signal.Signals(signum).name}")

    def request_stop(self, why: str = "stop requested") -> None:
        """Finish the studies in hand within the drain grace, then give them back and exit."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        grace = self.settings.queue.drain_grace_seconds
        log.info(
            "worker %s stopping (%s): %.0fs grace for the studies in hand", self.owner, why, grace
        )
        timer = threading.Timer(grace, self._abandon)
        timer.daemon = True
        timer.start()

    def _abandon(self) -> None:
        with self._lock:
            in_hand = list(self.current)
        for claimed in in_hand:
            released = jobs.release(self.sessions, claimed)
            log.warning(
                "grace period over: study %s %s for retry",
                claimed.study_instance_uid,
                "released" if released else "could not be released (lease already lost)",
            )
        logging.shutdown()
        os._exit(0)  # the pipeline's writes are atomic; the next run removes temporaries

    # -- the loop ---------------------------------------------------------------------------

    def run(self, *, parent_pid: int | None = None, until_idle: bool = False) -> int:
        """Claim and process jobs until stopped (or, with until_idle, the queue is empty),
        with `processing.study_threads` studies in flight.

        Returns the number of jobs this worker finished.
        """
        try:
            if self.slots == 1:
                self._claim_loop(parent_pid, until_idle)
            else:
                with ThreadPoolExecutor(self.slots, thread_name_prefix="study") as pool:
                    try:
                        loops = [
                            pool.submit(self._claim_loop, parent_pid, until_idle)
                            for _ in range(self.slots)
                        ]
                        for loop in loops:
                            loop.result()
                    except BaseException:
                        # Interrupted here (Ctrl-C in `cxrbatch process`, even while the
                        # loops start) or a loop failed: the other loops finish the studies
                        # in hand and stop, instead of claiming on while the pool waits for
                        # them to end.
                        self.stopping.set()
                        raise
        finally:
            self.processor.close()
        return self.processed

    def _claim_loop(self, parent_pid: int | None, until_idle: bool) -> None:
        try:
            self._claim_until_stopped(parent_pid, until_idle)
        except BaseException:
            # An error the loop cannot handle (e.g. the database gone) ends the worker, as
            # with one loop: the sibling loops finish their studies and stop; the daemon
            # starts a new worker process.
            self.stopping.set()
            raise

    def _claim_until_stopped(self, parent_pid: int | None, until_idle: bool) -> None:
        """One study at a time: claim, process with heartbeats, close; until stopped."""
        interval = self.settings.queue.poll_interval_seconds
        while not self.stopping.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("parent process %d is gone; worker exits", parent_pid)
                self.stopping.set()
                break
            self._recover_if_due()
            if self._disk_low():
                if until_idle:
                    if not self._work_pending():
                        break  # nothing left to write: the batch is done
                    self._stop_batch_if_disk_stays_low()
                self.stopping.wait(interval)
                continue
            if self._turns.wait_while_alone(interval):
                continue  # a study runs alone in this worker: nothing claimed meanwhile
            claimed = jobs.claim(self.sessions, self.owner, self.settings.queue.lease_seconds)
            if claimed is not None and self.stopping.is_set():
                # The stop came while this claim waited for the database: no new study
                # starts after a stop; the job goes back, its attempt uncounted.
                jobs.release(self.sessions, claimed)
                break
            if claimed is None:
                if until_idle and not self._work_pending():
                    break
                self.stopping.wait(interval)
                continue
            with self._lock:
                self.current.append(claimed)
            try:
                with _Heartbeat(self.sessions, claimed, self.settings):
                    turn = self._turns.take(claimed)
                    if turn:
                        try:
                            self.process_claim(claimed)
                        finally:
                            self._turns.end(claimed)
                if not turn:
                    # Another loop claimed, at the same moment, a study that must run
                    # alone: this one goes back to the queue, its attempt uncounted.
                    jobs.release(self.sessions, claimed)
                    continue
                with self._lock:
                    self.processed += 1
            finally:
                with self._lock:
                    self.current.remove(claimed)

    def process_claim(self, claimed: jobs.Claim) -> StudyReport:
        """Run the claimed study into a staging folder of this attempt, then, holding the
        job (owner and attempt, the fencing token, checked under the row's lock), publish
        the outputs, record the outcome and close the job in one transaction: all or
        nothing. A worker whose lease was taken over meanwhile discards its staging
        folder and records nothing: the job belongs to another worker now."""
        uid = claimed.study_instance_uid
        with self.sessions.begin() as session:
            study, missing = received_study(session, uid, self.site.roots)
            record_rejected_at(session, self.site, missing)
        fingerprint = self.processor.fingerprint(study)
        if self.tell is not None:
            self.tell(Started(uid, fingerprint, self.processor.models.refs))
        staging = export.staging_dir(self.site.out_dir, uid, claimed.attempts)
        ran = self.processor.run(study, force=self.force, fingerprint=fingerprint, staging=staging)
        if isinstance(ran, StudyResult):
            ran = self._withdraw_earlier(ran, staging)
        report = self._publish_and_record(claimed, ran, staging)
        if self.tell is not None:
            self.tell(report)
        return report

    def _withdraw_earlier(self, ran: StudyResult, staging: Path) -> StudyResult:
        """`with_withdrawal` for a staged result; a note that cannot be written fails the
        study as a publish would (a full disk)."""
        with recording(ran.study_instance_uid):  # a database error stops the worker
            try:
                return with_withdrawal(self.sessions, self.site, ran)
            except CxrBatchError as exc:
                return self._unwritable(ran, staging, exc)

    def _unwritable(self, ran: StudyResult, staging: Path, exc: CxrBatchError) -> StudyResult:
        """A study whose outputs cannot be written or published (a full disk, a storage
        gone read-only): its staging folder removed, the study failed with the reason."""
        uid = ran.study_instance_uid
        log.error("study %s failed: %s", uid, exc)
        export.discard(staging)
        return failed_result(uid, str(exc), ran.input_fingerprint, ran.models, self.owner)

    def _publish_and_record(
        self, claimed: jobs.Claim, ran: StudyResult | Unchanged, staging: Path
    ) -> StudyReport:
        uid = claimed.study_instance_uid
        with recording(uid), self.sessions() as session:
            if not jobs.holds(session, claimed):
                session.rollback()
                export.discard(staging)
                return self.processor.report(ran, None)
            if isinstance(ran, StudyResult):
                try:
                    ran = replace(ran, outputs=export.publish(ran.outputs, staging))
                except CxrBatchError as exc:
                    ran = self._unwritable(ran, staging, exc)
            recorded = self.processor.record(session, ran)
            status = JOB_STATUS_OF_OUTCOME[recorded.status]
            # An unchanged study is never a failed one (failures are always run again).
            error = ran.reason if isinstance(ran, StudyResult) and ran.reason else None
            closed = jobs.finish(
                session,
                claimed,
                status,
                self.policy,
                error=error if status is JobStatus.FAILED else None,
                outcome_id=recorded.outcome_id,
            )
            if closed is None:  # cannot happen while the row is locked; never record then
                session.rollback()
                return self.processor.report(ran, None)
            session.commit()
        log.info(
            "job of study %s is %s (attempt %d)",
            uid,
            closed.value,
            claimed.attempts,
            extra={
                "fields": {
                    "event": "job_finished",
                    "study_instance_uid": uid,
                    "job_status": closed.value,
                    "attempt": claimed.attempts,
                }
            },
        )
        return self.processor.report(ran, recorded)

    def _recover_if_due(self) -> None:
        with self._lock:  # one of the claim loops does it
            now = time.monotonic()
            due = now - self._last_recovery >= self.settings.queue.heartbeat_seconds
            if due:
                self._last_recovery = now
        if due:
            jobs.recover_stalled(self.sessions, self.policy)

    def _disk_low(self) -> bool:
        watermark = self.settings.queue.min_free_disk_mb
        # Under the lock: the claim loops see one reading at a time, so the pause and the
        # resumption are each logged once per worker, not once per loop.
        with self._lock:
            free = free_disk_mb([self.site.out_dir, self.site.spool_dir])
            low = free < watermark
            if low and not self._paused_for_disk:
                self._low_since = time.monotonic()
                log.warning(
                    "free disk %.0f MiB is under the watermark %.0f MiB: not claiming work",
                    free,
                    watermark,
                )
            elif not low and self._paused_for_disk:
                log.info("free disk %.0f MiB: claiming work again", free)
            self._paused_for_disk = low
            self._free_mb = free
        return low

    def _stop_batch_if_disk_stays_low(self) -> None:
        """A batch run waits `queue.batch_disk_wait_seconds` for the disk, then stops with
        an error (the daemon's loops wait on): its studies not yet run stay queued."""
        queue = self.settings.queue
        with self._lock:
            waited = time.monotonic() - self._low_since
            free = self._free_mb
        if waited >= queue.batch_disk_wait_seconds:
            raise OutputError(
                f"the free disk under the output or spool folder ({free:.0f} MiB) stayed "
                f"under queue.min_free_disk_mb ({queue.min_free_disk_mb:.0f} MiB) for "
                f"{waited:.0f} s: the batch stops; the studies not yet processed stay queued "
                "and the next run on this output folder takes them"
            )

    def _work_pending(self) -> bool:
        with self.sessions() as session:
            return jobs.pending(session)


# Exit status of a worker process that cannot start (a model that cannot be loaded, a
# configuration error): restarting it would fail the same way.


def start_worker(
    site: Site, threads: int, *, force: bool = False, tell: Tell | None = None
) -> QueueWorker:
    """A worker process's set-up (its logging, `threads` CPU threads, its models, SIGTERM
    and SIGINT as a drain): the process exits with EXIT_CANNOT_START when the models
    cannot be loaded (spawned by `watch` / `worker` here, and by `process --workers N`)."""
    logs.report_native_crashes()
    logs.configure(site.settings.logging.level, site.settings.logging.format)
    limit_cpu_threads(threads)
    try:
        worker = QueueWorker(site, force=force, tell=tell)
    except CxrBatchError as exc:
        log.error("worker cannot start: %s", exc)
        raise SystemExit(EXIT_CANNOT_START) from exc
    worker.install_signal_handlers()
    return worker


def worker_process_main(site: Site, threads: int, parent_pid: int | None) -> None:
    """Entry point of a worker process (spawned by `cxrbatch watch` / `cxrbatch worker`)."""
    start_worker(site, threads).run(parent_pid=parent_pid)
