"""The frozen dataclasses passed between pipeline stages.

Each stage is a function from one of these to the next; none of them holds a pydicom
Dataset, so they are cheap to pass between processes. Names follow DICOM keywords.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np


class OutcomeStatus(enum.StrEnum):
    """What happened to a study (or to one image of it)."""

    PROCESSED = "processed"  # at least one image segmented (and classified when configured)
    INELIGIBLE = "ineligible"  # readable DICOM, but nothing in it is a frontal chest radiograph
    FAILED = "failed"  # eligible input, but an error of ours or of the input stopped it


# The five abnormalities of the study the product reproduces (a bundle may declare others).
FINDING_LABELS: tuple[str, ...] = ("Mass", "Nodule", "Pneumonia", "Edema", "Fibrosis")


class StudyRunStatus(enum.StrEnum):
    """What one run did with a study (`StudyReport.status`; the `process` summary counts
    them): an OutcomeStatus recorded, or one of the two ways nothing was recorded."""

    PROCESSED = OutcomeStatus.PROCESSED.value
    INELIGIBLE = OutcomeStatus.INELIGIBLE.value
    FAILED = OutcomeStatus.FAILED.value
    UNCHANGED = "unchanged"  # same input, models and settings as its current outcome: skipped
    LOST = "lost"  # its job's lease was taken over while it ran: not recorded by this run


class JobStatus(enum.StrEnum):
    """The state of a study's job in the SQL queue (`jobs.status`)."""

    QUEUED = "queued"  # waiting for its study to be stable (run_after) and for a worker
    RUNNING = "running"  # claimed; the worker holds a lease that its heartbeats renew
    DONE = "done"  # processed; the outcome is recorded
    INELIGIBLE = "ineligible"  # nothing in the study to process; recorded
    FAILED = "failed"  # the last attempt failed; retried at run_after (exponential backoff)
    DEAD = "dead"  # failed max_attempts times; kept with its last error until `jobs retry`


class DeliveryStatus(enum.StrEnum):
    """The state of sending one outcome's objects to one destination (`deliveries.status`)."""

    PENDING = "pending"  # waiting for a sender (at run_after: a retry's backoff)
    SENDING = "sending"  # claimed by a sender holding a lease
    SENT = "sent"  # every object acknowledged by the destination
    FAILED = "failed"  # the last attempt failed; retried at run_after
    DEAD = "dead"  # failed max_attempts times; kept until `cxrbatch send --retry-dead`
    SUPERSEDED = "superseded"  # a newer outcome of the study replaced it before it was sent


class DeliveryRunStatus(enum.StrEnum):
    """How one sender attempt ended (what `cxrbatch send` counts): the status it set, or
    lost when another sender had taken the delivery over (its lease expired)."""

    SENT = DeliveryStatus.SENT.value
    FAILED = DeliveryStatus.FAILED.value
    DEAD = DeliveryStatus.DEAD.value
    LOST = "lost"


class Triage(enum.StrEnum):
    """A study's (or image's) screening category, least to most urgent."""

    LIKELY_NORMAL = "likely-normal"  # the screening model's No Finding score >= its threshold
    NEEDS_REVIEW = "needs-review"  # no trustworthy answer: the lung masks failed QC
    ABNORMAL = "abnormal"  # the screening model's No Finding score < its threshold


@dataclass(frozen=True)
class InstanceHeader:
    """What discovery learned about one DICOM file from its header."""

    path: Path
    sha256: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    body_part_examined: str | None
    view_position: str | None
    transfer_syntax_uid: str
    instance_number: int | None = None
    # Study identity for people querying results (never logged: kept out of the repr).
    accession_number: str | None = field(default=None, repr=False)
    patient_id: str | None = field(default=None, repr=False)
    patient_name: str | None = field(default=None, repr=False)
    study_date: dt.date | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RejectedFile:
    """A file that is not usable input. `quarantine` says whether it is bad input.

    Raises
    ------
    ValueError: no reason (a rejection is always recorded with one).
    """

    path: Path
    reason: str
    sha256: str | None = None
    quarantine: bool = True
    study_instance_uid: str | None = None
    sop_instance_uid: str | None = None

    def __post_init__(self) -> None:
        _reason_given(self.reason, f"rejected file {self.path.name}")


@dataclass(frozen=True)
class StudyInput:
    """All instances of one study found in one batch."""

    study_instance_uid: str
    instances: tuple[InstanceHeader, ...]


def _reason_given(reason: str | None, what: str) -> None:
    if not (reason or "").strip():
        raise ValueError(f"{what}: no reason given")


@dataclass(frozen=True)
class Skipped:
    """An instance of a study that is not processed, with the human-readable reason.

    Raises
    ------
    ValueError: no reason.
    """

    instance: InstanceHeader
    reason: str
    status: OutcomeStatus = OutcomeStatus.INELIGIBLE

    def __post_init__(self) -> None:
        _reason_given(self.reason, f"skipped instance {self.instance.sop_instance_uid}")


@dataclass(frozen=True)
class Selection:
    eligible: tuple[InstanceHeader, ...]
    skipped: tuple[Skipped, ...]


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A display-ready radiograph: uint8, higher = brighter (MONOCHROME2 sense).

    `image_left_is_patient_right` says which patient side lies at column 0; `side_source`
    says how that was decided ("PatientOrientation" or "ViewPosition convention").
    """

    instance: InstanceHeader
    pixels: np.ndarray  # (Rows, Columns) uint8
    image_left_is_patient_right: bool
    side_source: str
    notes: tuple[str, ...] = ()
    # What the segmentation sees: the same film in a window chosen from its data (the
    # 0.5-99.5 percentile range), not the header's, which is chosen for reading and can be
    # far narrower than the data; None: `pixels` (an 8-bit PNG has no other).
    segmentation_pixels: np.ndarray | None = None
    # The window `pixels` were displayed in, (center, width) in Modality LUT units: the
    # header's or the percentile one; None: a VOI LUT, or an 8-bit PNG.
    display_window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        """Raises ValueError unless `pixels` is a 2-D uint8 image and the segmentation
        copy, when given, has its shape."""
        if self.pixels.ndim != 2 or self.pixels.dtype != np.uint8:
            raise ValueError(
                f"decoded image {self.instance.sop_instance_uid}: expected 2-D uint8 pixels, "
                f"found {self.pixels.ndim}-D {self.pixels.dtype}"
            )
        extra = self.segmentation_pixels
        if extra is not None and extra.shape != self.pixels.shape:
            raise ValueError(
                f"decoded image {self.instance.sop_instance_uid}: segmentation pixels "
                f"{extra.shape} differ from the image {self.pixels.shape}"
            )

    @property
    def for_segmentation(self) -> np.ndarray:
        return self.pixels if self.segmentation_pixels is None else self.segmentation_pixels


@dataclass(frozen=True)
class LungQC:
    """The quality verdict on one lung's mask: its plausibility measures (names and
    meanings in cxrbatch/models/qc.py) and the checks it failed, in words."""

    side: str  # the patient's "right" or "left"
    measures: dict[str, float]
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class SegmentationQC:
    """The quality verdict on one image's lung masks: per lung, and for the pair."""

    right: LungQC
    left: LungQC
    pair_measures: dict[str, float] = field(default_factory=dict)
    pair_failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.right.passed and self.left.passed and not self.pair_failures

    @property
    def failures(self) -> tuple[str, ...]:
        lungs = [f"{q.side} lung {f}" for q in (self.right, self.left) for f in q.failures]
        return (*lungs, *self.pair_failures)

    @property
    def reason(self) -> str | None:
        """`segmentation failed QC: <what>`, None when every check passed."""
        return "segmentation failed QC: " + "; ".join(self.failures) if self.failures else None

    def as_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "right": {"measures": self.right.measures, "failures": list(self.right.failures)},
            "left": {"measures": self.left.measures, "failures": list(self.left.failures)},
            "pair": {"measures": self.pair_measures, "failures": list(self.pair_failures)},
        }


@dataclass(frozen=True, eq=False)
class LungSegmentation:
    """Right and left lung of the PATIENT, boolean masks at the image's full resolution,
    with the QC verdict on them (None only where a caller asked for none)."""

    right_lung: np.ndarray
    left_lung: np.ndarray
    prompt_boxes: dict[str, tuple[float, float, float, float]]
    predicted_iou: dict[str, float]
    notes: tuple[str, ...] = ()
    qc: SegmentationQC | None = None

    def __post_init__(self) -> None:
        """Raises ValueError unless both masks are 2-D and of one shape."""
        right, left = np.shape(self.right_lung), np.shape(self.left_lung)
        if len(right) != 2 or right != left:
            raise ValueError(f"lung masks of shapes {right} and {left}: expected one 2-D shape")

    @property
    def qc_passed(self) -> bool:
        return self.qc is None or self.qc.passed

    @property
    def lungs(self) -> np.ndarray:
        return np.asarray(np.logical_or(self.right_lung, self.left_lung))

    def area_fraction(self, side: str) -> float:
        mask = self.right_lung if side == "right" else self.left_lung
        # The same value as mask.mean(), without its float64 pass over the film (1.5 ms).
        return np.count_nonzero(mask) / mask.size if mask.size else float("nan")


# What the configuration runs a model as (the findings rows' roles); None: the segmenter.
MODEL_ROLES = (None, "classifier", "screening", "shadow", "shadow-screening")


@dataclass(frozen=True)
class ModelRef:
    """Identification of one model as recorded with every outcome."""

    name: str
    version: str
    sha256: str
    synthetic_training_data: bool = False
    mask_mode: str | None = None
    # What the configuration runs it as: classifier | screening | shadow | shadow-screening
    # (the findings rows' roles); None for the segmenter.
    role: str | None = None

    def __post_init__(self) -> None:
        """Raises ValueError for a model without a name, version or weight hash, or with
        a role the configuration does not run models as."""
        if not (self.name and self.version and self.sha256):
            raise ValueError(f"model {self.name!r} {self.version!r}: name, version and hash")
        if self.role not in MODEL_ROLES:
            raise ValueError(f"model {self.name}: unknown role {self.role!r}")

    def as_dict(self) -> dict[str, object]:
        document: dict[str, object] = {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "synthetic_training_data": self.synthetic_training_data,
            "mask_mode": self.mask_mode,
        }
        if self.role is not None:
            document["role"] = self.role
        return document

    @classmethod
    def from_dict(cls, document: dict[str, object]) -> ModelRef:
        """The ModelRef `as_dict` described."""
        mask_mode, role = document.get("mask_mode"), document.get("role")
        return cls(
            name=str(document["name"]),
            version=str(document["version"]),
            sha256=str(document["sha256"]),
            synthetic_training_data=bool(document.get("synthetic_training_data", False)),
            mask_mode=None if mask_mode is None else str(mask_mode),
            role=None if role is None else str(role),
        )


@dataclass(frozen=True)
class Findings:
    """Per-label probabilities of one classifier on one image and the derived scores."""

    model: ModelRef
    probabilities: dict[str, float]
    no_finding_score: float  # 1 - max(probabilities)
    triage: Triage | None = None  # only for screening bundles with a threshold
    threshold: float | None = None
    # The bundle's per-label operating thresholds (labels without one get no call).
    thresholds: dict[str, float] = field(default_factory=dict)
    # The part of the image the network was given, (top, left, height, width) in pixels:
    # all of it, or the centred square of a centre-cropping bundle; None: not recorded.
    box: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        """Raises ValueError for a probability or threshold outside 0-1, a No Finding
        score that is not 1 - max(probabilities), or a triage without its threshold."""
        problems = [
            f"{label} {value}"
            for label, value in [*self.probabilities.items(), *self.thresholds.items()]
            if not 0.0 <= value <= 1.0
        ]
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            problems.append(f"screening threshold {self.threshold}")
        if problems:
            raise ValueError(f"findings of {self.model.name}: outside 0-1: {', '.join(problems)}")
        if self.probabilities:
            expected = 1.0 - max(self.probabilities.values())
            if abs(self.no_finding_score - expected) > 1e-6:
                raise ValueError(
                    f"findings of {self.model.name}: No Finding score {self.no_finding_score}"
                    f" is not 1 - max p = {expected}"
                )
        if self.triage is not None and self.threshold is None:
            raise ValueError(f"findings of {self.model.name}: a triage without its threshold")

    @property
    def calls(self) -> dict[str, bool]:
        """Per label with a threshold: positive when its probability reaches it."""
        return {
            label: self.probabilities[label] >= t
            for label, t in self.thresholds.items()
            if label in self.probabilities
        }


# A finding map's region: where its activation is at least this fraction of its peak.
REGION_LEVEL = 0.5


@dataclass(frozen=True, eq=False)
class FindingMap:
    """Where a classifier's evidence for one label lies on one image: Grad-CAM on the
    masked input the network saw (cxrbatch/models/heatmaps.py), for a label at or above its
    threshold. `activation` is in [0, 1] (1 at its peak, 0 where the mask hid the film)
    over `box` = (top, left, height, width) of the image, at the network's input size."""

    label: str
    probability: float
    threshold: float
    model: ModelRef
    activation: np.ndarray  # float32 (size, size)
    box: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        """Raises ValueError for a map of a label below its threshold (maps are drawn
        for labels at or above it) or an activation that is not a 2-D map."""
        if self.probability < self.threshold:
            raise ValueError(
                f"finding map {self.label}: p {self.probability} is below its threshold "
                f"{self.threshold}"
            )
        if np.ndim(self.activation) != 2:
            raise ValueError(f"finding map {self.label}: activation is not 2-D")

    def on_image(self, shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
        """The activation on an image of `shape` (rows, columns): the film itself
        (`scale` 1) or a copy resized by `scale`; float32, 0 outside the box."""
        import cv2

        top, left, height, width = (round(v * scale) for v in self.box)
        height = max(1, min(height, shape[0] - top))
        width = max(1, min(width, shape[1] - left))
        full = np.zeros(shape, dtype=np.float32)
        full[top : top + height, left : left + width] = cv2.resize(
            self.activation, (width, height), interpolation=cv2.INTER_LINEAR
        )
        return full

    def region(
        self, shape: tuple[int, int], scale: float = 1.0, level: float = REGION_LEVEL
    ) -> np.ndarray:
        """Where the activation reaches `level` of its peak (bool, `shape`)."""
        return self.on_image(shape, scale) >= level


@dataclass(frozen=True, eq=False)
class ImageResult:
    instance: InstanceHeader
    image: DecodedImage
    segmentation: LungSegmentation
    findings: Findings | None  # None: no classifier, or a masked one and the masks failed QC
    screening: Findings | None
    # The shadow candidates' answers on the same masks (recorded, never written or sent).
    shadow: Findings | None = None
    shadow_screening: Findings | None = None
    # The classifier's maps for its labels at or above threshold (output.finding_maps).
    finding_maps: tuple[FindingMap, ...] = ()

    def shadowed(self) -> ImageResult:
        """This image as the shadow models saw it (their findings in the live places)."""
        return replace(self, findings=self.shadow, screening=self.shadow_screening, finding_maps=())

    @property
    def qc_reason(self) -> str | None:
        """`segmentation failed QC: ...` when the masks failed the quality gate."""
        return self.segmentation.qc.reason if self.segmentation.qc else None

    @property
    def triage(self) -> Triage | None:
        """The screening triage; needs-review when the masks failed QC and no screening
        model ran, or when it ran but did not find the image abnormal."""
        screened = self.screening.triage if self.screening else None
        if self.qc_reason is None or screened is Triage.ABNORMAL:
            return screened
        return Triage.NEEDS_REVIEW


@dataclass(frozen=True)
class ImageFailure:
    """An eligible image that failed, and why (ValueError without a reason)."""

    instance: InstanceHeader
    reason: str

    def __post_init__(self) -> None:
        _reason_given(self.reason, f"failed image {self.instance.sop_instance_uid}")


# The per-image groups of an outcome's `outputs` document (source SOP Instance UID ->
# stored path): the DICOM objects sent to destinations, then the web app's own files.
DICOM_IMAGE_OUTPUTS = ("seg", "key_images", "presentation_states")
IMAGE_OUTPUTS = (*DICOM_IMAGE_OUTPUTS, "finding_maps")


@dataclass(frozen=True)
class NotAccepted:
    """An object a destination does not take at all (its SOP class), and why."""

    sop_instance_uid: str
    reason: str


@dataclass(frozen=True)
class Withdrawal:
    """An IOCM rejection note written with a study's outputs (`file`): it withdraws
    `objects` (SOP Instance UIDs) that `destinations` acknowledged for the study's earlier
    outcomes, and is sent to each of them before the new objects."""

    file: Path
    objects: tuple[str, ...]
    destinations: frozenset[str]

    def __post_init__(self) -> None:
        if not self.objects or not self.destinations:
            raise ValueError(f"rejection note {self.file.name}: withdraws nothing, nowhere")


@dataclass(frozen=True)
class OutputFiles:
    """The files written for one study (in its folder, or in a staging folder of one
    attempt until published).

    Parameters
    ----------
    seg_files, key_image_files, presentation_state_files: per source image (its SOP
        Instance UID), its SEG, key image and presentation state.
    sr_file, json_file: the study's SR and result.json (None: not written).
    finding_map_files: per source image, its finding maps for the web study page (not
        DICOM, never sent).
    identities: per DICOM file name, the object's study, series, SOP class and SOP
        instance UIDs (what deliveries record as sent), given by the writer that built it.
    withdrawal: the rejection note written with these outputs, if one is due.

    Raises
    ------
    ValueError: a DICOM file without its identity, or a withdrawal note with nothing
        else written.
    """

    seg_files: dict[str, Path]  # SOPInstanceUID of the source image -> SEG file
    sr_file: Path | None
    json_file: Path | None
    # SOPInstanceUID of the source image -> Secondary Capture key image (output.key_image)
    key_image_files: dict[str, Path] = field(default_factory=dict)
    # -> Grayscale Softcopy Presentation State (output.presentation_state)
    presentation_state_files: dict[str, Path] = field(default_factory=dict)
    # -> the finding maps for the web study page (not DICOM, never sent)
    finding_map_files: dict[str, Path] = field(default_factory=dict)
    identities: dict[str, dict[str, str]] = field(default_factory=dict)
    withdrawal: Withdrawal | None = None

    def __post_init__(self) -> None:
        unknown = [p.name for p in self.dicom_files() if p.name not in self.identities]
        if unknown:
            raise ValueError(f"DICOM outputs without their identity: {', '.join(unknown)}")
        if self.withdrawal is not None and not self.dicom_files():
            raise ValueError("a rejection note without the outputs that replace what it withdraws")

    def dicom_files(self) -> list[Path]:
        """Every DICOM object written for the study (what is sent to destinations; the
        rejection note is sent apart, first)."""
        files = [
            *self.seg_files.values(),
            *self.key_image_files.values(),
            *self.presentation_state_files.values(),
        ]
        return files + ([self.sr_file] if self.sr_file else [])

    def moved_to(self, folder: Path) -> OutputFiles:
        """The same outputs under the same names in `folder` (published from staging)."""

        def each(files: dict[str, Path]) -> dict[str, Path]:
            return {uid: folder / path.name for uid, path in files.items()}

        withdrawal = self.withdrawal
        return OutputFiles(
            each(self.seg_files),
            folder / self.sr_file.name if self.sr_file else None,
            folder / self.json_file.name if self.json_file else None,
            each(self.key_image_files),
            each(self.presentation_state_files),
            each(self.finding_map_files),
            self.identities,
            replace(withdrawal, file=folder / withdrawal.file.name) if withdrawal else None,
        )


@dataclass(frozen=True)
class StudyResult:
    """What processing one study gave, valid once built.

    Parameters
    ----------
    study_instance_uid: the study's UID (not empty).
    status: PROCESSED when at least one image was processed; INELIGIBLE when no image
        was eligible (nothing processed, nothing failed); FAILED when the study failed as a
        whole or every eligible image failed (nothing processed).
    reason: why it is ineligible or failed (required then), or what needs review.
    images, skipped, failures: the images processed, left out by the selection, failed.
    triage, no_finding_score: the study's screening triage and No Finding score (0-1),
        only for a processed study.
    models: the models that ran (name, version, weight hash).

    Raises
    ------
    ValueError: the fields contradict each other (e.g. PROCESSED with no image, FAILED
        without a reason, a triage on an ineligible study, a score outside 0-1).
    """

    study_instance_uid: str
    status: OutcomeStatus
    reason: str | None
    images: tuple[ImageResult, ...]
    skipped: tuple[Skipped, ...]
    failures: tuple[ImageFailure, ...]
    triage: Triage | None
    no_finding_score: float | None
    models: tuple[ModelRef, ...]
    # The shadow models' study-level answer (pipeline._shadow_summary); None: none ran.
    shadow: dict[str, object] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    outputs: OutputFiles | None = None
    input_fingerprint: str = ""
    # The worker that ran it (`cxrbatch.db.leased.new_owner`: host, pid, nonce, process
    # space), recorded on the outcome; None where no worker identity applies.
    processed_by: str | None = None

    def __post_init__(self) -> None:
        problems = []
        status = OutcomeStatus(self.status)  # ValueError for an unknown status
        if not self.study_instance_uid:
            problems.append("no StudyInstanceUID")
        if status is OutcomeStatus.PROCESSED and not self.images:
            problems.append("processed with no image processed")
        if status is not OutcomeStatus.PROCESSED:
            if self.images:
                problems.append(f"{status.value} with {len(self.images)} image(s) processed")
            if not self.reason:
                problems.append(f"{status.value} without a reason")
            if self.triage is not None or self.no_finding_score is not None:
                problems.append(f"{status.value} with a triage or a No Finding score")
        if status is OutcomeStatus.INELIGIBLE and self.failures:
            problems.append("ineligible with failed images (that is failed)")
        if self.no_finding_score is not None and not 0.0 <= self.no_finding_score <= 1.0:
            problems.append(f"No Finding score {self.no_finding_score} outside 0-1")
        if problems:
            raise ValueError(f"study result {self.study_instance_uid}: " + "; ".join(problems))

    @property
    def segmentation_only(self) -> bool:
        """Images were segmented and no classifier bundle was configured (bundles carry
        their mask mode in their ModelRef; the segmenter does not)."""
        return bool(self.images) and all(m.mask_mode is None for m in self.models)

    @property
    def needs_review(self) -> bool:
        return any(i.qc_reason is not None for i in self.images)


DISCLAIMER = "Algorithm output for research and triage support. NOT FOR DIAGNOSTIC USE."
SYNTHETIC_WARNING = (
    "A model used here was trained on SYNTHETIC data: its scores are not clinically meaningful."
)
NEEDS_REVIEW_NOTE = (
    "NEEDS REVIEW: the lung masks of an image failed the segmentation quality check; "
    "masked classifiers were not run on it and its result is not a normal call."
)


def outcome_notes(synthetic: bool, segmentation_only: bool, needs_review: bool) -> list[str]:
    """The notes an outcome carries wherever it is shown (result.json, HL7, FHIR)."""
    notes = [DISCLAIMER]
    if synthetic:
        notes.append(SYNTHETIC_WARNING)
    if segmentation_only:
        notes.append("Segmentation-only outcome: no classifier bundle was configured.")
    if needs_review:
        notes.append(NEEDS_REVIEW_NOTE)
    return notes


@dataclass(frozen=True)
class ReportedFinding:
    """One label of the study: the highest probability over its processed images, with the
    bundle's threshold and call where it has one.

    Raises
    ------
    ValueError: a probability or threshold outside 0-1, or a call without a threshold.
    """

    label: str
    probability: float
    threshold: float | None
    positive: bool | None

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"{self.label}: probability {self.probability} outside 0-1")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"{self.label}: threshold {self.threshold} outside 0-1")
        if self.positive is not None and self.threshold is None:
            raise ValueError(f"{self.label}: a call without a threshold")


@dataclass(frozen=True)
class Report:
    """What the report transports (HL7 v2, FHIR; cxrbatch/send/messages.py) say about one
    recorded outcome: built by `cxrbatch.db.reads.report`, read by the messages."""

    outcome_id: int
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    study_date: dt.date | None
    created_at: dt.datetime
    triage: str | None
    no_finding_score: float | None
    screening_no_finding_score: float | None
    findings: tuple[ReportedFinding, ...]
    models: tuple[dict[str, Any], ...]
    synthetic_model: bool
    segmentation_only: bool
    needs_review: bool
    # An earlier outcome's report reached this destination: this one corrects it.
    corrects_earlier: bool

    @property
    def notes(self) -> list[str]:
        """The notes every report carries, as result.json gives them."""
        return outcome_notes(self.synthetic_model, self.segmentation_only, self.needs_review)
