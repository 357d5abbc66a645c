"""Tables of the results database (documented for people who query it in docs/schema.md).

studies        one row per StudyInstanceUID ever seen
outcomes       one row per processing of a study; exactly one has is_current = true
images         one row per instance of the study in that processing (processed or not)
findings       one row per (image, model role, label) probability, with the call it made
rejected_files files that were not usable input, with the reason and quarantine copy
instances      instances received by the daemon (spool), one per SOPInstanceUID
jobs           the work queue of the daemon: one job per study
deliveries     one row per (outcome, destination): sending SEG/SR/key images back
audit_events   the web app's audit trail: who viewed which study, who exported what
retrievals     the series a running `cxrbatch pull` asked a PACS to send (C-MOVE): what
               a receiver may take in from that pull's retrieval
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


NO_DATE = dt.date(1, 1, 1)  # the sort date of a study without a date: after all others


def worklist_keys(
    triage: str | None,
    screening_score: float | None,
    no_finding_score: float | None,
    study_date: dt.date | None,
) -> dict[str, Any]:
    """An outcome's worklist sort keys (its columns screening_rank ... sort_date)."""
    score = screening_score if screening_score is not None else no_finding_score
    return {
        "screening_rank": 0
        if triage in ("abnormal", "needs-review")
        else 1
        if triage is None
        else 2,
        "score_missing": score is None,
        "sort_score": 0.0 if score is None else float(score),
        "sort_date": study_date or NO_DATE,
    }


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    # From the headers at the latest recording (query outputs only, never logged).
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(200))
    study_date: Mapped[dt.date | None] = mapped_column(Date, index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    first_seen_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    outcomes: Mapped[list[Outcome]] = relationship(back_populates="study")


class Outcome(Base):
    __tablename__ = "outcomes"
    __table_args__ = (
        # Never two current outcomes for one study.
        Index(
            "uq_outcomes_current_per_study",
            "study_id",
            unique=True,
            sqlite_where=text("is_current"),
            postgresql_where=text("is_current"),
        ),
        Index("ix_outcomes_study_current", "study_id", "is_current"),
        Index("ix_outcomes_current_status", "is_current", "status"),
        Index("ix_outcomes_created_at", "created_at"),
        # The worklist's orders over current outcomes, one per sort, each read in key
        # order from where the last page ended (keyset pages; migration 0012).
        *(
            Index(
                name, *columns, sqlite_where=text("is_current"), postgresql_where=text("is_current")
            )
            for name, columns in (
                ("ix_outcomes_screening", ("screening_rank", "score_missing", "sort_score", "id")),
                ("ix_outcomes_no_finding", ("score_missing", "sort_score", "id")),
                ("ix_outcomes_recorded", ("created_at", "id")),
                ("ix_outcomes_study_date", ("sort_date", "id")),
                ("ix_outcomes_current_triage", ("status", "triage")),
            )
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    # processed | ineligible | failed (see cxrbatch.domain.OutcomeStatus)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    # likely-normal | abnormal | NULL (no screening bundle)
    triage: Mapped[str | None] = mapped_column(String(16))
    no_finding_score: Mapped[float | None] = mapped_column(Float)
    screening_no_finding_score: Mapped[float | None] = mapped_column(Float)
    segmentation_only: Mapped[bool] = mapped_column(Boolean, default=False)
    synthetic_model: Mapped[bool] = mapped_column(Boolean, default=False)
    input_fingerprint: Mapped[str] = mapped_column(String(64))
    models: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # Candidate models run beside the live ones (classifier.shadow_bundle, ...): their
    # identity, No Finding scores and triage, recorded and never sent. NULL: none ran.
    shadow: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    outputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The worker process that ran it: host:pid:nonce:process space (db.leased.new_owner).
    processed_by: Mapped[str | None] = mapped_column(String(200))
    # The worklist's sort keys, set from the columns above when the row is inserted
    # (`worklist_keys`): screening rank (0 abnormal or needs review, 1 not screened, 2
    # likely normal), whether it has no No Finding score, that score (0 when none), and
    # the study date (0001-01-01 when none), so each order is an index.
    screening_rank: Mapped[int] = mapped_column(Integer, default=1)
    score_missing: Mapped[bool] = mapped_column(Boolean, default=True)
    sort_score: Mapped[float] = mapped_column(Float, default=0.0)
    sort_date: Mapped[dt.date] = mapped_column(Date, default=NO_DATE)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    superseded_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    study: Mapped[Study] = relationship(back_populates="outcomes")
    images: Mapped[list[Image]] = relationship(
        back_populates="outcome", cascade="all, delete-orphan"
    )


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("outcome_id", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    outcome_id: Mapped[int] = mapped_column(ForeignKey("outcomes.id", ondelete="CASCADE"))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    view_position: Mapped[str | None] = mapped_column(String(16))
    # processed | ineligible | failed
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    side_source: Mapped[str | None] = mapped_column(Text)
    right_lung_fraction: Mapped[float | None] = mapped_column(Float)
    left_lung_fraction: Mapped[float | None] = mapped_column(Float)
    no_finding_score: Mapped[float | None] = mapped_column(Float)
    screening_no_finding_score: Mapped[float | None] = mapped_column(Float)
    triage: Mapped[str | None] = mapped_column(String(16))
    seg_path: Mapped[str | None] = mapped_column(Text)
    # The radiograph itself (as stored paths are: relative to the site's roots, or absolute
    # for an input folder of `process`), for the web app's overlays.
    source_path: Mapped[str | None] = mapped_column(Text)

    outcome: Mapped[Outcome] = relationship(back_populates="images")
    findings: Mapped[list[Finding]] = relationship(
        back_populates="image", cascade="all, delete-orphan"
    )


class Finding(Base):
    __tablename__ = "findings"
    __table_args__ = (UniqueConstraint("image_id", "role", "label"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    # classifier | screening | shadow | shadow-screening (cxrbatch.db.repository.ROLES)
    role: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(32))
    probability: Mapped[float] = mapped_column(Float)
    # The bundle's operating threshold for the label and the call (probability >= it);
    # NULL where the bundle has no threshold for the label.
    threshold: Mapped[float | None] = mapped_column(Float)
    positive: Mapped[bool | None] = mapped_column(Boolean)

    image: Mapped[Image] = relationship(back_populates="findings")


class RejectedFile(Base):
    __tablename__ = "rejected_files"
    __table_args__ = (UniqueConstraint("path", "sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(Text)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    quarantine_path: Mapped[str | None] = mapped_column(Text)
    first_seen_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Instance(Base):
    """An instance taken in by `cxrbatch watch` (moved into the spool, or left in place) or
    given to `cxrbatch process` (left in place)."""

    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_study", "study_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    # Where the file is now: in the spool, or the export folder in read-only mode.
    path: Mapped[str] = mapped_column(Text)
    source_path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    # Identical copies (same SOPInstanceUID and SHA-256) received again and dropped.
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # When the retention policy removed the spooled file (the row stays for dedupe).
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    """One study's work in the queue. Status values: cxrbatch.domain.JobStatus."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim", "status", "run_after"),
        # The due rows only, in claim order (migration 0011).
        Index(
            "ix_jobs_due",
            "run_after",
            "id",
            postgresql_where=text("status IN ('queued', 'failed')"),
            sqlite_where=text("status IN ('queued', 'failed')"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    # queued | running | done | ineligible | failed | dead
    status: Mapped[str] = mapped_column(String(16))
    # Attempts since the job was last (re)queued by new input or `jobs retry`.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Not claimed before this time: the study's quiet period, or a retry's backoff.
    run_after: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    # Bumped by every new instance of the study; a run of an older generation re-queues.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    claimed_generation: Mapped[int | None] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    outcome_id: Mapped[int | None] = mapped_column(ForeignKey("outcomes.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Delivery(Base):
    """Sending one outcome's DICOM objects to one destination. Status values:
    cxrbatch.domain.DeliveryStatus."""

    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_claim", "status", "run_after"),
        Index("ix_deliveries_study", "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    outcome_id: Mapped[int | None] = mapped_column(ForeignKey("outcomes.id", ondelete="SET NULL"))
    # The name of a [[send.destinations]] entry and its transport (dimse | stow-rs).
    destination: Mapped[str] = mapped_column(String(64))
    transport: Mapped[str] = mapped_column(String(16))
    # pending | sending | sent | failed | dead | superseded
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_after: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    # Paths of the DICOM files to send (SEG, SR, key images; first the rejection note).
    files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # The DICOM objects delivered, as {"study", "series", "sop_class", "sop_instance"}
    # UIDs: what a later outcome's rejection note withdraws (NULL: a report delivery).
    objects: Mapped[list[Any] | None] = mapped_column(JSON)
    # The SOP Instance UIDs the delivery's IOCM rejection note withdraws (NULL: none).
    withdraws: Mapped[list[Any] | None] = mapped_column(JSON)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Who looked at what in the web app: every study page view and every export. Written
    by the web app (its only write); listed by `cxrbatch audit`."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_at", "at"),
        Index("ix_audit_events_study", "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user: Mapped[str] = mapped_column(String(64))
    # study_viewed | image_viewed | file_downloaded | worklist_exported
    action: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)


class Retrieval(Base):
    """A series a `cxrbatch pull` asked a PACS to send by C-MOVE, open while the retrieval
    runs: the receiver (the daemon's or the pull's own) takes in only instances of an open
    retrieval from a C-MOVE that this pull started; others are quarantined as "not
    requested" and counted here."""

    __tablename__ = "retrievals"
    __table_args__ = (Index("ix_retrievals_originator", "originator"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The AE title the pull's C-MOVE came from (what the standard puts in the C-STOREs'
    # Move Originator AE Title), and the PACS's (the C-STOREs' calling AE title; some
    # PACS, pynetdicom's SCP among them, also put their own in Move Originator).
    originator: Mapped[str] = mapped_column(String(16))
    source_ae_title: Mapped[str] = mapped_column(String(16))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    opened_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # A retrieval left open by a killed pull stops counting after this.
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    # Instances of other studies or series that arrived during it (quarantined).
    refused: Mapped[int] = mapped_column(Integer, default=0)


@event.listens_for(Outcome, "before_insert")
def _set_worklist_keys(_mapper: Any, connection: Any, outcome: Outcome) -> None:
    """Every outcome inserted through the ORM gets its sort keys from its own columns and
    its study's date (the study row exists: the outcome references it)."""
    study_date = connection.scalar(select(Study.study_date).where(Study.id == outcome.study_id))
    keys = worklist_keys(
        outcome.triage, outcome.screening_no_finding_score, outcome.no_finding_score, study_date
    )
    for name, value in keys.items():
        setattr(outcome, name, value)
