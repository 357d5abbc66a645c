"""The MedSAM ViT-B backend: segment-anything architecture + a local checkpoint.

Real MedSAM weights are on no package registry, so the backend is exercised with a
randomly initialised ViT-B saved as a checkpoint: loading, preprocessing (1024 x 1024),
box scaling and mask shapes are real; the masks themselves are meaningless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxrbatch.config import SegmentationSettings
from cxrbatch.domain import DecodedImage, InstanceHeader
from cxrbatch.errors import ConfigError, ModelError
from cxrbatch.models.prompts import segment_lungs
from cxrbatch.models.segmenter import MedSAMViTB, load_segmenter
from cxrbatch_training.synthetic import make_phantom


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="medsam_checkpoint"):
        load_segmenter(SegmentationSettings(backend="medsam-vitb"))
    with pytest.raises(ModelError, match="not found"):
        MedSAMViTB(str(tmp_path / "medsam_vit_b.pth"), "cpu")
    wrong = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(3)}, wrong)
    with pytest.raises(ModelError, match="not a SAM ViT-B"):
        MedSAMViTB(str(wrong), "cpu")


def test_random_vitb_checkpoint_runs_end_to_end(tmp_path: Path) -> None:
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    checkpoint = tmp_path / "medsam_vit_b.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), checkpoint)
    segmenter = load_segmenter(
        SegmentationSettings(
            backend="medsam-vitb",
            device="cpu",
            medsam_checkpoint=str(checkpoint),
            optimize_cpu=False,  # the CPU graph mechanism is tested apart; tracing ViT-B: ~25 s
        )
    )
    assert segmenter.model.name == "MedSAM ViT-B" and len(segmenter.model.sha256) == 64
    phantom = make_phantom(2, (300, 240))
    header = InstanceHeader(Path("p"), "", "1", "", "", "", "CR", "CHEST", "PA", "")
    image = DecodedImage(header, np.round(phantom.image * 255).astype(np.uint8), True, "test")
    embedding = segmenter.embed(image.pixels)
    assert embedding.features.shape == (1, 256, 64, 64)
    assert embedding.scale_xy == pytest.approx((1024 / 240, 1024 / 300))
    probs, iou = segmenter.predict(embedding, np.array([[10, 20, 100, 250], [130, 20, 230, 250]]))
    assert probs.shape == (2, 300, 240) and iou.shape == (2,)
    seg = segment_lungs(segmenter, image, refine=False)
    assert seg.right_lung.shape == (300, 240) and seg.right_lung.dtype == bool
