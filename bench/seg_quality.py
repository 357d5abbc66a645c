"""Measure the automatic lung prompting: Dice on synthetic phantoms with known masks
(per side, first pass vs refined), and plausibility on the real chest CR from pydicom-data.

    python bench/seg_quality.py --phantoms 24 [--size 1024] [--device cpu]

Prints a table and writes a JSON report (--report).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from cxrbatch import logs
from cxrbatch.config import SegmentationSettings
from cxrbatch.dicom.decode import decode
from cxrbatch.dicom.discover import read_header
from cxrbatch.domain import DecodedImage, InstanceHeader
from cxrbatch.models.prompts import segment_lungs
from cxrbatch.models.segmenter import load_segmenter
from cxrbatch.synthetic import VARIANTS, make_phantom


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


def phantom_image(index: int, size: int) -> tuple[DecodedImage, np.ndarray, np.ndarray]:
    flipped = bool(VARIANTS[index % len(VARIANTS)].get("flipped", False))
    phantom = make_phantom(10_000 + index, (size, size), flipped=flipped)
    header = InstanceHeader(
        Path(f"phantom{index}"), "", str(index), "", "", "", "CR", "CHEST", "PA", ""
    )
    image = DecodedImage(
        header,
        np.round(phantom.image * 255).astype(np.uint8),
        image_left_is_patient_right=not flipped,
        side_source="PatientOrientation",
    )
    return image, phantom.right_lung, phantom.left_lung


def default_real_files() -> list[Path]:
    """The RG1 chest CR (uncompressed and lossy JPEG 2000) installed by pydicom-data."""
    try:
        import data_store  # the import name of the pydicom-data package
    except ImportError:
        print("pydicom-data not installed: real radiograph check skipped")
        return []
    folder = Path(data_store.__file__).parent / "data"
    return [folder / "RG1_UNCR.dcm", folder / "RG1_J2KI.dcm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phantoms", type=int, default=24)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument(
        "--real",
        type=Path,
        nargs="*",
        default=None,
        help="real frontal chest radiographs (default: pydicom-data's RG1)",
    )
    args = parser.parse_args()
    logs.quiet_third_party()
    settings = SegmentationSettings(
        backend=args.backend, device=args.device, medsam_checkpoint=args.checkpoint
    )
    segmenter = load_segmenter(settings)
    report: dict[str, object] = {"backend": segmenter.model.name, "device": str(segmenter.device)}
    for refine in (False, True):
        scores: dict[str, list[float]] = {"right": [], "left": []}
        swapped = 0
        start = time.perf_counter()
        for i in range(args.phantoms):
            image, right, left = phantom_image(i, args.size)
            seg = segment_lungs(segmenter, image, refine=refine)
            scores["right"].append(dice(seg.right_lung, right))
            scores["left"].append(dice(seg.left_lung, left))
            swapped += dice(seg.right_lung, left) > dice(seg.right_lung, right)
        seconds = (time.perf_counter() - start) / args.phantoms
        key = "refined" if refine else "first_pass"
        report[key] = {
            side: {"mean": statistics.mean(v), "min": min(v), "median": statistics.median(v)}
            for side, v in scores.items()
        } | {"side_swaps": swapped, "seconds_per_image": seconds}
        print(
            f"{key:>10}: Dice right mean {statistics.mean(scores['right']):.3f} "
            f"(min {min(scores['right']):.3f}), left mean {statistics.mean(scores['left']):.3f} "
            f"(min {min(scores['left']):.3f}), side swaps {swapped}/{args.phantoms}, "
            f"{seconds:.2f} s/image"
        )
    real = {}
    for path in args.real or default_real_files():
        header = read_header(path)
        assert isinstance(header, InstanceHeader), header
        image, _ = decode(header)
        seg = segment_lungs(segmenter, image, refine=True)
        cols = image.pixels.shape[1]
        cx = {
            s: float(np.nonzero(m)[1].mean()) / cols if m.any() else None
            for s, m in (("right", seg.right_lung), ("left", seg.left_lung))
        }
        real[path.name] = {
            "area_fraction": {s: seg.area_fraction(s) for s in ("right", "left")},
            "centroid_x_fraction": cx,
            "two_lungs": bool(seg.right_lung.any() and seg.left_lung.any()),
            "right_on_image_left": cx["right"] is not None and cx["right"] < 0.5,
            "rl_overlap_pixels": int((seg.right_lung & seg.left_lung).sum()),
        }
        print(f"{path.name}: {json.dumps(real[path.name])}")
    report["real"] = real
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
