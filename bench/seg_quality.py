"""Measure lung segmentation on the two evaluation sets of bench/seg_sets.py: the real film
RG1 (pydicom-data) with its traced reference and nine transformed copies, and hard
phantoms. Any configured segmenter and checkpoint (LiteMedSAM, a fine-tuned LiteMedSAM
from `python -m training finetune`, MedSAM ViT-B) can be measured.

    python -m bench.seg_quality --phantoms 48 [--seed 0] [--size 1024] [--device cpu]
        [--backend litemedsam|medsam-vitb] [--checkpoint PATH] [--no-refine] [--report F]

Prints Dice per lung (mean and min) per set, side swaps and seconds per image, one line
per film with --verbose, and writes a JSON report (--report).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

from bench.seg_sets import Case, dice, hard_phantom_cases, rg1_cases
from cxrbatch import logs
from cxrbatch.config import SegmentationSettings
from cxrbatch.models.prompts import segment_lungs
from cxrbatch.models.segmenter import BoxSegmenter, load_segmenter


def measure(
    segmenter: BoxSegmenter, cases: Iterable[Case], refine: bool, verbose: bool
) -> dict[str, object]:
    films: list[dict[str, object]] = []
    seconds = 0.0
    for case in cases:
        start = time.perf_counter()
        seg = segment_lungs(segmenter, case.image, refine=refine)
        seconds += time.perf_counter() - start
        right, left = dice(seg.right_lung, case.right_lung), dice(seg.left_lung, case.left_lung)
        swapped = dice(seg.right_lung, case.left_lung) > right
        films.append({"name": case.name, "right": right, "left": left, "side_swap": swapped})
        if verbose:
            print(f"  {case.name:12s} right {right:.3f} left {left:.3f} swap {swapped}")
    summary: dict[str, object] = {"films": len(films)}
    for side in ("right", "left"):
        values = [float(f[side]) for f in films]  # type: ignore[arg-type]
        summary[side] = {"mean": statistics.mean(values), "min": min(values)}
    summary["side_swaps"] = sum(bool(f["side_swap"]) for f in films)
    summary["seconds_per_image"] = seconds / max(1, len(films))
    summary["per_film"] = films
    return summary


def _line(name: str, s: dict[str, object]) -> str:
    r, lt = s["right"], s["left"]
    assert isinstance(r, dict) and isinstance(lt, dict)
    return (
        f"{name:>22}: {s['films']} films, Dice right mean {r['mean']:.3f} (min {r['min']:.3f}), "
        f"left mean {lt['mean']:.3f} (min {lt['min']:.3f}), side swaps {s['side_swaps']}, "
        f"{s['seconds_per_image']:.2f} s/image"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phantoms", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="hard-phantom seed (0 = tuning set)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--checkpoint", default="", help="fine-tuned or ViT-B weights")
    parser.add_argument("--no-refine", action="store_true")
    parser.add_argument("--skip-rg1", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    logs.quiet_third_party()
    checkpoint = {"litemedsam": "litemedsam_checkpoint", "medsam-vitb": "medsam_checkpoint"}
    settings = SegmentationSettings.model_validate(
        {"backend": args.backend, "device": args.device, checkpoint[args.backend]: args.checkpoint}
    )
    segmenter = load_segmenter(settings)
    refine = not args.no_refine
    report: dict[str, object] = {"model": segmenter.model.as_dict(), "refine": refine}
    sets: list[tuple[str, Iterable[Case]]] = []
    if not args.skip_rg1:
        sets.append(("rg1", rg1_cases()))
    if args.phantoms:
        label = f"hard phantoms seed {args.seed}"
        sets.append((label, hard_phantom_cases(args.phantoms, args.size, args.seed)))
    for name, cases in sets:
        if args.verbose:
            print(name)
        report[name] = summary = measure(segmenter, cases, refine, args.verbose)
        print(_line(name, summary), flush=True)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
