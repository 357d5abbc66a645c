"""The configured models' files, checked without loading them (no torch import).

The daemon's ingest process runs this before its receiver listens and its watcher takes
files: a missing checkpoint or bundle stops `cxrbatch watch` at once with one line,
instead of acknowledging instances while worker processes fail to start. The loaders
(segmenter.py, bundle.py) resolve their files through the same functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrbatch.config import SegmentationSettings, Settings
from cxrbatch.errors import ConfigError, ModelError


def segmenter_checkpoint(settings: SegmentationSettings) -> Path | None:
    """The configured segmenter checkpoint; None = LiteMedSAM's packaged weights."""
    if settings.backend == "litemedsam":
        if not settings.litemedsam_checkpoint:
            return None
        path = Path(settings.litemedsam_checkpoint)
        if not path.is_file():
            raise ModelError(f"LiteMedSAM checkpoint not found: {path}")
        return path
    if settings.backend == "medsam-vitb":
        if not settings.medsam_checkpoint:
            raise ConfigError(
                "segmentation.backend = 'medsam-vitb' needs segmentation.medsam_checkpoint, the "
                "path to medsam_vit_b.pth (MedSAM weights are not on any package registry)."
            )
        path = Path(settings.medsam_checkpoint)
        if not path.is_file():
            raise ModelError(f"MedSAM ViT-B checkpoint not found: {path}")
        return path
    raise ConfigError(
        f"Expected segmentation.backend 'litemedsam' or 'medsam-vitb', found {settings.backend!r}."
    )


def bundle_files(path: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """A classifier bundle's metadata.json, model.pt and parsed metadata."""
    root = Path(path)
    meta_path = root / "configs" / "metadata.json"
    model_path = root / "models" / "model.pt"
    for required in (meta_path, model_path):
        if not required.is_file():
            raise ModelError(f"Classifier bundle {root} lacks {required.relative_to(root)}.")
    try:
        metadata = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"Invalid bundle metadata in {meta_path}: {exc}") from exc
    if not isinstance(metadata, dict) or "cxrbatch" not in metadata:
        raise ModelError(f"Invalid bundle metadata in {meta_path}: no 'cxrbatch' section")
    return meta_path, model_path, metadata


def check_model_files(settings: Settings) -> None:
    """Every configured model's files exist and look right (ModelError/ConfigError if not)."""
    segmenter_checkpoint(settings.segmentation)
    c = settings.classifier
    for bundle in (c.bundle, c.screening_bundle, c.shadow_bundle, c.shadow_screening_bundle):
        if bundle:
            bundle_files(bundle)
