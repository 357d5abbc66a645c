"""The ordered steps for one study.

    select frontal chest radiographs
    for each: decode -> segment lungs (auto box prompts, QC verdict)
              -> classify (bundle's mask mode; a masked bundle skips masks that failed QC)
              -> screening (M-50 bundle's No Finding score and threshold)
              -> finding maps (Grad-CAM) for the classifier's labels at or above threshold
    study-level triage (worst image: abnormal > needs-review > likely-normal) and No Finding score
    write SEG, key image and presentation state per image (the last two optional), one SR,
    the finding maps for the web app and result.json (dicom/result_json.py), atomically

Models are loaded once (`load_models`) and passed in; `run` touches no database.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
from pydicom.dataset import Dataset

from cxrbatch.config import Settings
from cxrbatch.dicom import export
from cxrbatch.dicom.contours import Borders, LungBorders
from cxrbatch.dicom.decode import decode
from cxrbatch.dicom.gsps import build_presentation_state
from cxrbatch.dicom.keyimage import build_key_image
from cxrbatch.dicom.result_json import result_document
from cxrbatch.dicom.seg import build_seg
from cxrbatch.dicom.select import select
from cxrbatch.dicom.sr import SrImage, build_sr
from cxrbatch.domain import (
    DecodedImage,
    FindingMap,
    Findings,
    ImageFailure,
    ImageResult,
    ModelRef,
    OutcomeStatus,
    OutputFiles,
    StudyInput,
    StudyResult,
    Triage,
)
from cxrbatch.errors import InputError, ModelError, one_line
from cxrbatch.files import remove_stale_temporaries
from cxrbatch.models import prompts, qc
from cxrbatch.models.batching import batch_size
from cxrbatch.models.bundle import ClassifierBundle, load_bundle
from cxrbatch.models.device import describe, set_gpu_wait
from cxrbatch.models.heatmaps import finding_maps
from cxrbatch.models.preprocess import ClassifierInputs
from cxrbatch.models.prompts import segment_lungs
from cxrbatch.models.segmenter import BoxSegmenter, load_segmenter
from cxrbatch.paths import uid_path_component

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SEGMENTATION_CODE_SHA256 = hashlib.sha256(
    b"".join(Path(m.__file__).read_bytes() for m in (prompts, qc) if m.__file__)
).hexdigest()


@dataclass(frozen=True, eq=False)
class Models:
    segmenter: BoxSegmenter
    classifier: ClassifierBundle | None
    screening: ClassifierBundle | None
    # Candidates run in the shadow of the two above: recorded, never written or sent.
    shadow: ClassifierBundle | None = None
    shadow_screening: ClassifierBundle | None = None

    @property
    def refs(self) -> tuple[ModelRef, ...]:
        """The live models: what the outputs name and the fingerprint covers."""
        bundles = [b.model for b in (self.classifier, self.screening) if b is not None]
        return (self.segmenter.model, *bundles)

    @property
    def shadow_refs(self) -> tuple[ModelRef, ...]:
        return tuple(b.model for b in (self.shadow, self.shadow_screening) if b is not None)


def load_models(settings: Settings, in_flight: int = 1) -> Models:
    """The configured models, loaded once. `in_flight`: how many studies the caller runs
    at once on threads sharing them; their passes are joined into batches when
    `processing.max_batch` allows (a caller with one study in flight gets no batching, so
    no pass waits for company that cannot come)."""
    cache = settings.processing.graph_cache()
    not_set = set_gpu_wait(settings.processing.gpu_wait)  # before any CUDA work
    if not_set is not None:
        log.warning(
            "processing.gpu_wait = %s not applied: %s", settings.processing.gpu_wait, not_set
        )
    segmenter = load_segmenter(settings.segmentation, cache)
    device, precision = settings.classifier.device, settings.classifier.precision
    optimize = settings.classifier.optimize_cpu

    def bundle(path: str, role: str) -> ClassifierBundle | None:
        if not path:
            return None
        loaded = load_bundle(path, device, precision, optimize, cache, settings.classifier.engine)
        return replace(loaded, model=replace(loaded.model, role=role))

    c = settings.classifier
    classifier, screening = bundle(c.bundle, "classifier"), bundle(c.screening_bundle, "screening")
    shadow = bundle(c.shadow_bundle, "shadow")
    shadow_screening = bundle(c.shadow_screening_bundle, "shadow-screening")
    for role, loaded in (("Screening", screening), ("Shadow screening", shadow_screening)):
        if loaded is None:
            continue
        if loaded.spec.screening is None:
            raise ModelError(
                f"{role} bundle {loaded.path} has no screening.no_finding_threshold "
                "in its metadata (cxrbatch calibrate sets one)."
            )
        if loaded.spec.mask_mode != "M-50":
            log.warning(
                "%s bundle %s uses mask mode %s, not the study's M-50",
                role.lower(),
                loaded.model.name,
                loaded.spec.mask_mode,
            )
    bundles = [classifier, screening, shadow, shadow_screening]
    # Concurrent studies share batches (CUDA by default; cxrbatch/models/batching.py).
    size = batch_size(settings.processing.max_batch, in_flight, segmenter.device)
    if size >= 2:
        segmenter.batch_encoder(size)
        bundles = [b.with_batching(size) if b else None for b in bundles]
    log.info(
        "models on %s: segmenter %s %s, classifiers on %s",
        describe(segmenter.device),
        segmenter.model.name,
        segmenter.model.version,
        ", ".join(sorted({describe(b.device) for b in bundles if b})) or "-",
    )
    return Models(segmenter, *bundles)


def input_fingerprint(study: StudyInput, models: Models, settings: Settings) -> str:
    """Same files + same models + same selection rules = same fingerprint."""
    digest = hashlib.sha256()
    for header in sorted(study.instances, key=lambda h: h.sop_instance_uid):
        digest.update(f"{header.sop_instance_uid}:{header.sha256}\n".encode())
    for ref in models.refs:
        digest.update(f"model:{ref.name}:{ref.sha256}\n".encode())
    # A new bundle version over the same weights (cxrbatch calibrate) decides differently:
    # its thresholds are part of what the outcome depends on.
    for live in (models.classifier, models.screening):
        if live is not None:
            decision = live.spec.model_dump_json(include={"thresholds", "screening"})
            digest.update(f"bundle:{live.model.version}:{decision}\n".encode())
    digest.update(settings.selection.model_dump_json().encode())
    segmentation = {"refine", "threshold", "input_dither"}
    digest.update(settings.segmentation.model_dump_json(include=segmentation).encode())
    # The prompt, clean-up and QC code decide the masks and the verdict as much as the
    # weights do: a new version of them makes a new outcome.
    digest.update(f"segmentation-code:{SEGMENTATION_CODE_SHA256}\n".encode())
    written = {"key_image", "presentation_state", "finding_maps", "seg_encoding"}
    digest.update(settings.output.model_dump_json(include=written).encode())
    return digest.hexdigest()


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def classify(
    bundle: ClassifierBundle | None, inputs: ClassifierInputs, masks_passed_qc: bool = True
) -> Findings | None:
    """Run one bundle on one image with exactly the mask mode the bundle declares. A
    masked bundle (M-15, M-50) is not run on masks that failed QC: None."""
    return _classified(bundle, inputs, masks_passed_qc)[0]


def _classified(
    bundle: ClassifierBundle | None, inputs: ClassifierInputs, masks_passed_qc: bool = True
) -> tuple[Findings | None, torch.Tensor | None]:
    """`classify`, with the activations of the network's last convolutional block on the
    image (what its finding maps are made of), None where it did not run."""
    if bundle is None:
        return None, None
    spec = bundle.spec
    if spec.mask_mode != "original" and not masks_passed_qc:
        return None, None
    network_input = inputs.tensor(
        spec.mask_mode, spec.input_size, spec.mean, spec.std, spec.crop, spec.resize
    )
    probabilities, activations = bundle.evaluate(network_input[None])
    findings = replace(bundle.findings(probabilities[0]), box=inputs.box(spec.crop))
    if not masks_passed_qc and findings.triage is Triage.LIKELY_NORMAL:
        # An unmasked screening model still ran; its "normal" is not trusted either.
        findings = replace(findings, triage=Triage.NEEDS_REVIEW)
    return findings, activations[0]


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    """One image's result with the header its outputs copy from, kept together."""

    result: ImageResult
    dataset: Dataset


def _process_image(
    header_ds: tuple[DecodedImage, Dataset], models: Models, settings: Settings, timer: _Timer
) -> ProcessedImage:
    image, ds = header_ds
    with timer.stage("segment"):
        segmentation = segment_lungs(
            models.segmenter, image, settings.segmentation.refine, settings.segmentation.threshold
        )
    if segmentation.qc is not None and not segmentation.qc.passed:
        log.warning("image %s: %s", image.instance.sop_instance_uid, segmentation.qc.reason)
    with timer.stage("classify"):
        inputs = ClassifierInputs(image.pixels, segmentation.lungs)  # shared by both bundles
        passed = segmentation.qc_passed
        findings, activations = _classified(models.classifier, inputs, passed)
        screening = classify(models.screening, inputs, passed)
    maps: tuple[FindingMap, ...] = ()
    if (
        settings.output.finding_maps
        and findings is not None
        and activations is not None
        and models.classifier is not None
    ):
        with timer.stage("finding_maps"):
            maps = finding_maps(models.classifier, inputs, findings, activations)
    shadow = shadow_screening = None
    if models.shadow is not None or models.shadow_screening is not None:
        with timer.stage("shadow"):  # timed only where a candidate runs
            shadow = classify(models.shadow, inputs, passed)
            shadow_screening = classify(models.shadow_screening, inputs, passed)
    result = ImageResult(
        image.instance, image, segmentation, findings, screening, shadow, shadow_screening, maps
    )
    return ProcessedImage(result, ds)


TRIAGE_ORDER = (Triage.LIKELY_NORMAL, Triage.NEEDS_REVIEW, Triage.ABNORMAL)


def _study_scores(images: list[ImageResult]) -> tuple[Triage | None, float | None]:
    """Study level = worst image: abnormal if any image is, else needs-review if any image
    is (its masks failed QC), else likely-normal; the lowest No Finding score."""
    triages = [i.triage for i in images if i.triage is not None]
    triage = max(triages, key=TRIAGE_ORDER.index) if triages else None
    scores = [i.findings.no_finding_score for i in images if i.findings]
    return triage, (min(scores) if scores else None)


def _shadow_summary(images: list[ImageResult], models: Models) -> dict[str, object] | None:
    """The shadow models' study-level answer, as the live one is computed (worst image);
    None when no shadow model is configured."""
    if not models.shadow_refs:
        return None
    shadowed = [i.shadowed() for i in images]
    triage, no_finding = _study_scores(shadowed)
    screening = [i.screening.no_finding_score for i in shadowed if i.screening]
    return {
        "models": [m.as_dict() for m in models.shadow_refs],
        "triage": triage.value if triage else None,
        "no_finding_score": no_finding,
        "screening_no_finding_score": min(screening) if screening else None,
    }


def _study_reason(images: list[ImageResult], failures: list[ImageFailure]) -> str | None:
    parts = []
    if failures:
        parts.append(f"{len(failures)} eligible image(s) failed")
    failed_qc = [i.qc_reason for i in images if i.qc_reason]
    if len(failed_qc) == 1 and len(images) == 1:
        parts.append(failed_qc[0])
    elif failed_qc:
        parts.append(f"{len(failed_qc)} of {len(images)} images: {failed_qc[0]}")
    return "; ".join(parts) or None


def run(
    study: StudyInput,
    models: Models,
    settings: Settings,
    out_dir: Path,
    fingerprint: str | None = None,
    staging: Path | None = None,
) -> StudyResult:
    """Process one study and write its outputs; never raises for bad input. `fingerprint`:
    the study's `input_fingerprint` when the caller has computed it already; `staging`:
    write the outputs there instead of the study's folder (`export.staging_dir`), for the
    caller to publish once it knows it still holds the study."""
    timer = _Timer()
    selection = select(study, settings.selection)
    processed: list[ProcessedImage] = []
    failures: list[ImageFailure] = []
    for header in selection.eligible:
        try:
            with timer.stage("decode"):
                decoded = decode(header)
            processed.append(_process_image(decoded, models, settings, timer))
        except InputError as exc:
            why = one_line(exc).removeprefix(f"{type(exc).__name__}: ")
            log.warning("image %s failed: %s", header.sop_instance_uid, why)
            failures.append(ImageFailure(header, why))
    images = [p.result for p in processed]
    if images:
        status, reason = OutcomeStatus.PROCESSED, _study_reason(images, failures)
    elif failures:
        status, reason = OutcomeStatus.FAILED, failures[0].reason
    else:
        status = OutcomeStatus.INELIGIBLE
        reasons = sorted({s.reason for s in selection.skipped})
        reason = "no frontal chest radiograph: " + "; ".join(reasons) if reasons else "no instances"
    triage, no_finding = _study_scores(images)
    shadow = _shadow_summary(images, models)
    result = StudyResult(
        study_instance_uid=study.study_instance_uid,
        status=status,
        reason=reason,
        images=tuple(images),
        skipped=selection.skipped,
        failures=tuple(failures),
        triage=triage,
        no_finding_score=no_finding,
        models=models.refs,
        shadow=shadow,
        timings=timer.seconds,
        input_fingerprint=fingerprint or input_fingerprint(study, models, settings),
    )
    folder = staging or export.study_dir(out_dir, study.study_instance_uid)
    remove_stale_temporaries(folder)
    with timer.stage("write"):
        outputs = write_dicom_outputs(processed, models, folder, settings)
    json_file = folder / "result.json" if settings.output.write_json else None
    outputs = replace(outputs, json_file=json_file)
    result = replace(result, outputs=outputs, timings=dict(timer.seconds))
    if json_file is not None:
        export.write_json(json_file, result_document(result, outputs))
    return result


def write_dicom_outputs(
    processed: list[ProcessedImage], models: Models, folder: Path, settings: Settings
) -> OutputFiles:
    """One SEG per processed image, one SR for the study and, as `settings.output` says,
    one key image (Secondary Capture) and one presentation state per processed image and
    its finding maps; nothing for ineligible studies (no result.json: the caller's)."""
    if not processed:
        return OutputFiles({}, None, None)
    output = settings.output
    seg_series, key_series, gsps_series = hd.UID(), hd.UID(), hd.UID()
    built: list[tuple[ImageResult, Dataset, Dataset, Dataset | None, Dataset | None]] = []
    borders: list[LungBorders] = []  # each lung's, found once for the SR and the GSPS
    try:
        for number, image in enumerate(processed, 1):
            item, ds = image.result, export.reference_header(image.dataset)
            lungs = item.segmentation
            borders.append((Borders(lungs.right_lung), Borders(lungs.left_lung)))
            seg = build_seg(
                ds, item.segmentation, models.segmenter.model, seg_series, hd.UID(),
                output.seg_encoding,
            )  # fmt: skip
            key = (
                build_key_image(ds, item, models.refs, key_series, hd.UID(), number)
                if output.key_image
                else None
            )
            gsps = (
                build_presentation_state(
                    ds, item, models.refs, gsps_series, hd.UID(), number, borders[-1]
                )
                if output.presentation_state
                else None
            )
            built.append((item, ds, seg, key, gsps))
        sr_items = [
            SrImage(
                ds,
                seg,
                item.segmentation,
                models.segmenter.model,
                item.findings,
                item.screening,
                item.finding_maps,
                lung_borders,
            )
            for (item, ds, seg, _, _), lung_borders in zip(built, borders, strict=True)
        ]
        sr = export.carry_identity(build_sr(sr_items, hd.UID(), hd.UID()), processed[0].dataset)
        # Built from reference headers (one value where the IOD defines one); the patient
        # and study values go back as received once every object is built.
        for image, (_, _, *made) in zip(processed, built, strict=True):
            for output_ds in made:
                if output_ds is not None:
                    export.carry_identity(output_ds, image.dataset)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom copies the patient, study and series modules from the source: a value
        # there that is not valid DICOM (a corrupt time, a missing UID) stops the outputs.
        raise InputError(
            f"the source header has values that cannot be copied into the outputs: {one_line(exc)}"
        ) from exc
    files = OutputFiles({}, None, None)

    def write(name: str, ds: Dataset) -> Path:
        files.identities[name] = export.identity(ds)
        return export.write_dicom(folder / name, ds)

    for item, _, seg, key, gsps in built:
        uid = item.instance.sop_instance_uid
        name = uid_path_component(uid)
        files.seg_files[uid] = write(f"seg_{name}.dcm", seg)
        if key is not None:
            files.key_image_files[uid] = write(f"key_{name}.dcm", key)
        if gsps is not None:
            files.presentation_state_files[uid] = write(f"gsps_{name}.dcm", gsps)
        if item.finding_maps:
            files.finding_map_files[uid] = export.write_maps(
                folder / f"maps_{name}.npz", item.finding_maps
            )
    return replace(files, sr_file=write("sr.dcm", sr))
