"""Lung masks for a training dataset, made by the pipeline's own segmenter.

The same code as `cxrbatch process` (cxrbatch.models.prompts.segment_pixels: automatic box
prompts, MedSAM, refined second pass) runs over every image of a table; the raw lung mask
(both lungs) is stored at the study's 512 x 512 working resolution as `<stem>.png` in a
cache folder. The M-15 / M-50 masks are derived from it at training time by the same
`cxrbatch.models.masks.study_mask` the daemon uses, so training and inference share one
implementation.

Masks that fail the segmentation quality gate (cxrbatch/models/qc.py) are kept, as the
study trains on every mask, and listed with their reasons in `failed_qc.json`.

Resumable: masks already in the cache are kept (writes are atomic, so a killed run leaves
no half file). The cache records which segmenter made it; a cache made by other weights is
refused rather than mixed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from rich.progress import Progress

from cxrbatch.config import SegmentationSettings
from cxrbatch.dicom.decode import segmentation_view
from cxrbatch.dicom.export import write_json
from cxrbatch.models.masks import WORKING_SIZE, resize_mask
from cxrbatch.models.prompts import segment_pixels
from cxrbatch.models.segmenter import BoxSegmenter, load_segmenter
from cxrbatch_training.data import load_gray, save_mask

log = logging.getLogger(__name__)
MANIFEST = "segmenter.json"


def mask_path(cache: Path, image_index: str) -> Path:
    return cache / f"{Path(image_index).stem}.png"


def _check_manifest(cache: Path, segmenter: BoxSegmenter, refine: bool) -> None:
    manifest = {
        "segmenter": segmenter.model.name,
        "version": segmenter.model.version,
        "sha256": segmenter.model.sha256,
        "refine": refine,
        "working_size": WORKING_SIZE,
        "input": "0.5-99.5 percentile window",
    }
    path = cache / MANIFEST
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != manifest:
            raise ValueError(
                f"Mask cache {cache} was made by {recorded}, not by {manifest}; "
                "use another cache folder."
            )
        return
    write_json(path, manifest)


def generate_masks(
    images: Mapping[str, Path],
    cache: Path,
    settings: SegmentationSettings,
    segmenter: BoxSegmenter | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Segment every image lacking a cached mask; returns failures (image -> reason)."""
    todo = {name: path for name, path in images.items() if not mask_path(cache, name).is_file()}
    cache.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    failed_qc: dict[str, str] = {}
    if not todo:
        return failures
    segmenter = segmenter or load_segmenter(settings)
    _check_manifest(cache, segmenter, settings.refine)
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"lung masks ({len(images) - len(todo)} cached)", total=len(todo))
        for name, path in todo.items():
            try:
                # As the daemon segments a DICOM: the data's own window (decode.py).
                pixels = segmentation_view(load_gray(path))
                segmentation = segment_pixels(
                    segmenter, pixels, True, settings.refine, settings.threshold
                )
                # The study trains on every mask; the QC verdict is kept beside them.
                if segmentation.qc is not None and segmentation.qc.reason:
                    failed_qc[name] = segmentation.qc.reason
                save_mask(resize_mask(segmentation.lungs, WORKING_SIZE), mask_path(cache, name))
            except (ValueError, OSError) as exc:
                failures[name] = str(exc)
                log.warning("no lung mask for %s: %s", name, exc)
            bar.advance(task)
    if failures:
        write_json(cache / "failures.json", failures)
    if failed_qc:
        previous = cache / "failed_qc.json"
        known = json.loads(previous.read_text()) if previous.is_file() else {}
        write_json(previous, {**known, **failed_qc})
        log.warning(
            "%d of %d new lung masks failed segmentation QC (kept; listed in %s)",
            len(failed_qc),
            len(todo),
            previous,
        )
    return failures
