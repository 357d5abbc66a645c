"""Measure lung segmentation and its quality gate on the evaluation sets of
bench/seg_sets.py: the real film RG1 (pydicom-data) with its traced reference and nine
transformed copies; hard phantoms; films whose lung cannot be found (a whited-out
hemithorax, a lung cut off the film); and hard phantoms prompted with deliberately bad
boxes. Any configured segmenter and checkpoint (LiteMedSAM, a fine-tuned LiteMedSAM from
`cxrbatch training finetune`, MedSAM ViT-B) can be measured.

    python -m bench.seg_quality --phantoms 48 [--lost 16] [--bad-prompts 16] [--seed 0]
        [--portable] [--portable-phantoms 28] [--size 1024] [--device cpu]
        [--backend litemedsam|medsam-vitb] [--checkpoint PATH] [--no-refine] [--skip-rg1]
        [--verbose] [--report F] [--pictures DIR]

--portable adds the portable families of issue 32 (bench/seg_sets.py: RG1 magnified,
rotated, bases or apices cropped, narrow header windows, effusions, consolidation,
mirrored with the orientation left wrong; films that are no frontal chest), with a table
per family; --portable-phantoms N the same families from N hard phantoms. --pictures
writes each film with the reference (thin) and the masks (thick) drawn, and its verdict.

Prints, per set, Dice per lung (mean and min), side swaps, the share of films the QC gate
flags, and seconds per image; then the gate's two rates over every film: flagged among
those it must flag (a lung's Dice < 0.75, or a lung that is not on the film) and flagged
among good films (both lungs' Dice >= 0.90), the good films split by their lower zones
(each lung's Dice over the reference's lower third, `seg_sets.lower_zone_dice`: flagged
though both are >= 0.85, passed though one is below). --report writes every film's Dice,
lower-zone Dice, verdict and QC measures as JSON (what the thresholds in
cxrbatch/models/qc.py were chosen on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

from bench.seg_sets import (
    Case,
    dice,
    hard_phantom_cases,
    lower_zone_dice,
    lung_lost_cases,
    not_chest_cases,
    portable_cases,
    portable_phantom_cases,
    rg1_cases,
)
from cxrbatch import logs
from cxrbatch.config import SegmentationSettings
from cxrbatch.domain import DecodedImage, LungSegmentation
from cxrbatch.models.prompts import Thorax, lung_boxes, segment_pixels, working_copy
from cxrbatch.models.segmenter import BoxSegmenter, load_segmenter

MUST_FLAG_BELOW, GOOD_FROM = 0.75, 0.90
# Issue 32's stricter targets for the portable families: every film with a lung below
# 0.80 flagged, and every film either good (both >= 0.90) or flagged.
PORTABLE_MUST_FLAG_BELOW = 0.80
# A good film (both lungs' Dice >= GOOD_FROM) whose lower zones are also right: both
# lungs' lower-third Dice (seg_sets.lower_zone_dice) at least this. Whole-lung Dice >= 0.90
# forgives a costophrenic angle cut away or a spill below the dome; a flag on a good film
# whose lower zones are poor is the gate seeing what the Dice does not.
LOWER_GOOD_FROM = 0.85
Box = tuple[float, float, float, float]


def _bad(box: Box, body: Box, how: str) -> Box:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    bh = body[3] - body[1]
    if how == "shifted down":  # into the abdomen
        return (x0, y0 + 0.45 * bh, x1, y1 + 0.45 * bh)
    if how == "upper third":  # the apex only
        return (x0, y0, x1, y0 + h / 3)
    if how == "shifted medially":  # over the mediastinum and heart
        shift = 0.6 * w if x0 < (body[0] + body[2]) / 2 else -0.6 * w
        return (x0 + shift, y0, x1 + shift, y1)
    if how == "whole body":  # one box over the whole patient
        return body
    raise ValueError(how)


BAD_PROMPTS = ("shifted down", "upper third", "shifted medially", "whole body")


def bad_prompts(pixels: object, index: int) -> Thorax:
    """The automatic prompts of a film with one lung's box spoiled (BAD_PROMPTS, in turn)."""
    found = lung_boxes(working_copy(pixels))  # type: ignore[arg-type]
    side = ("image_left", "image_right")[index % 2]
    how = BAD_PROMPTS[(index // 2) % len(BAD_PROMPTS)]
    boxes = dict(found.boxes)
    boxes[side] = _bad(boxes[side], found.body, how)
    return Thorax(found.body, found.midline, boxes)


def measure(
    segmenter: BoxSegmenter,
    cases: Iterable[Case],
    refine: bool,
    verbose: bool,
    spoil: bool = False,
    must_flag_below: float = MUST_FLAG_BELOW,
    pictures: Path | None = None,
) -> dict[str, object]:
    films: list[dict[str, object]] = []
    seconds = 0.0
    for index, case in enumerate(cases):
        image = case.image
        thorax = bad_prompts(image.pixels, index) if spoil else None
        start = time.perf_counter()
        seg = segment_film(segmenter, image, refine, thorax)
        seconds += time.perf_counter() - start
        right, left = dice(seg.right_lung, case.right_lung), dice(seg.left_lung, case.left_lung)
        swapped = dice(seg.right_lung, case.left_lung) > right
        lost = not case.right_lung.any() or not case.left_lung.any()
        assert seg.qc is not None
        film = {
            "name": case.name,
            "family": case.family,
            "right": right,
            "left": left,
            "lower": min(
                lower_zone_dice(seg.right_lung, case.right_lung),
                lower_zone_dice(seg.left_lung, case.left_lung),
            ),
            "side_swap": swapped,
            "sides_wrong": case.sides_wrong,
            "cut_off": case.cut_off,
            "must_flag": lost
            or case.sides_wrong
            or case.cut_off
            or min(right, left) < must_flag_below,
            "good": not lost
            and not case.sides_wrong
            and not case.cut_off
            and min(right, left) >= GOOD_FROM,
            "qc": seg.qc.as_dict(),
        }
        if pictures is not None:
            _picture(pictures, case, seg, film)
        films.append(film)
        if verbose:
            verdict = "pass" if seg.qc.passed else seg.qc.reason
            print(f"  {case.name:18s} right {right:.3f} left {left:.3f} swap {swapped}  {verdict}")
    summary: dict[str, object] = {"films": len(films)}
    for side in ("right", "left"):
        values = [float(f[side]) for f in films]  # type: ignore[arg-type]
        summary[side] = {"mean": statistics.mean(values), "min": min(values)}
    summary["side_swaps"] = sum(bool(f["side_swap"]) for f in films)
    summary["flagged"] = sum(not _passed(f) for f in films)
    summary["seconds_per_image"] = seconds / max(1, len(films))
    summary["per_film"] = films
    return summary


def segment_film(
    segmenter: BoxSegmenter, image: DecodedImage, refine: bool, thorax: Thorax | None = None
) -> LungSegmentation:
    """The lungs of one decoded film, as the pipeline segments them."""
    return segment_pixels(
        segmenter,
        image.for_segmentation,
        image.image_left_is_patient_right,
        refine,
        thorax=thorax,
    )


def _picture(folder: Path, case: Case, seg: LungSegmentation, film: dict[str, object]) -> None:
    """The film with the reference (thin) and the masks (thick) drawn, and the verdict."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    canvas = cv2.cvtColor(case.image.pixels, cv2.COLOR_GRAY2BGR)
    scale = 900 / max(canvas.shape[:2])
    canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    for mask, colour, width in (
        (case.right_lung, (0, 165, 255), 1), (case.left_lung, (255, 200, 0), 1),
        (seg.right_lung, (0, 140, 255), 3), (seg.left_lung, (255, 120, 0), 3),
    ):  # fmt: skip
        small = cv2.resize(mask.astype(np.uint8), canvas.shape[1::-1], interpolation=0)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, colour, width)
    for box in seg.prompt_boxes.values():
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), (0, 255, 0), 1)
    verdict = film["qc"]
    assert isinstance(verdict, dict)
    text = [f"{case.name}  right {film['right']:.3f}  left {film['left']:.3f}"]
    text.append("QC pass" if verdict["passed"] else f"QC: {verdict['reason']}")
    for row, line in enumerate(text):
        for chunk in range(0, len(line), 95):
            y = 18 + 16 * (row * 3 + chunk // 95)
            cv2.putText(canvas, line[chunk : chunk + 95], (4, y), cv2.FONT_HERSHEY_SIMPLEX,
                        0.42, (0, 255, 0), 1)  # fmt: skip
    cv2.imwrite(str(folder / f"{case.name}.png"), canvas)


def families(films: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    """Per family: films, Dice right/left mean and min, flagged, must-flag flagged, good
    flagged, and the films neither good nor flagged."""
    table: dict[str, dict[str, object]] = {}
    for family in dict.fromkeys(str(f["family"]) for f in films):
        group = [f for f in films if f["family"] == family]
        lows = [min(float(f["right"]), float(f["left"])) for f in group]  # type: ignore[arg-type]
        table[family] = {
            "films": len(group),
            "right_mean": statistics.mean(float(f["right"]) for f in group),  # type: ignore[arg-type]
            "left_mean": statistics.mean(float(f["left"]) for f in group),  # type: ignore[arg-type]
            "min": min(lows),
            "flagged": sum(not _passed(f) for f in group),
            "must_flag": sum(bool(f["must_flag"]) for f in group),
            "must_flag_missed": [f["name"] for f in group if f["must_flag"] and _passed(f)],
            "neither": [f["name"] for f in group if not f["good"] and _passed(f)],
            "good_flagged": [f["name"] for f in group if f["good"] and not _passed(f)],
        }
    return table


def _passed(film: dict[str, object]) -> bool:
    verdict = film["qc"]
    assert isinstance(verdict, dict)
    return bool(verdict["passed"])


def qc_rates(films: list[dict[str, object]]) -> dict[str, object]:
    """Flagged among the films the gate must flag, and among the good films."""
    must = [f for f in films if f["must_flag"]]
    good = [f for f in films if f["good"]]
    return {
        "must_flag": len(must),
        "must_flag_flagged": sum(not _passed(f) for f in must),
        "missed": [f["name"] for f in must if _passed(f)],
        "good": len(good),
        "good_flagged": sum(not _passed(f) for f in good),
        "good_flagged_names": [f["name"] for f in good if not _passed(f)],
        # The good films split by their lower zones (LOWER_GOOD_FROM): flags on films
        # sound to the bases, and passes of films whose lower zone is poor.
        "good_flagged_sound_bases": [
            f["name"]
            for f in good
            if not _passed(f) and float(f["lower"]) >= LOWER_GOOD_FROM  # type: ignore[arg-type]
        ],
        "good_passed_poor_bases": [
            f["name"]
            for f in good
            if _passed(f) and float(f["lower"]) < LOWER_GOOD_FROM  # type: ignore[arg-type]
        ],
    }


def _bases(rates: dict[str, object]) -> str:
    sound, poor = rates["good_flagged_sound_bases"], rates["good_passed_poor_bases"]
    assert isinstance(sound, list) and isinstance(poor, list)
    return (
        f"of the good films, flagged with both lower zones' Dice >= {LOWER_GOOD_FROM}: "
        f"{len(sound)} ({', '.join(sound) or 'none'}); passed with a lower zone below it: "
        f"{len(poor)} ({', '.join(poor) or 'none'})"
    )


def _line(name: str, s: dict[str, object]) -> str:
    r, lt = s["right"], s["left"]
    assert isinstance(r, dict) and isinstance(lt, dict)
    return (
        f"{name:>22}: {s['films']} films, Dice right mean {r['mean']:.3f} (min {r['min']:.3f}), "
        f"left mean {lt['mean']:.3f} (min {lt['min']:.3f}), side swaps {s['side_swaps']}, "
        f"QC flagged {s['flagged']}, {s['seconds_per_image']:.2f} s/image"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phantoms", type=int, default=48)
    parser.add_argument("--lost", type=int, default=16, help="films with a lung not to be found")
    parser.add_argument("--bad-prompts", type=int, default=16, help="hard phantoms, bad boxes")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (0 = tuning set)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--checkpoint", default="", help="fine-tuned or ViT-B weights")
    parser.add_argument("--no-refine", action="store_true")
    parser.add_argument("--skip-rg1", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--portable", action="store_true", help="RG1's portable families")
    parser.add_argument("--portable-phantoms", type=int, default=0)
    parser.add_argument("--pictures", type=Path, default=None)
    args = parser.parse_args()
    logs.quiet_third_party()
    checkpoint = {"litemedsam": "litemedsam_checkpoint", "medsam-vitb": "medsam_checkpoint"}
    settings = SegmentationSettings.model_validate(
        {"backend": args.backend, "device": args.device, checkpoint[args.backend]: args.checkpoint}
    )
    segmenter = load_segmenter(settings)
    refine = not args.no_refine
    report: dict[str, object] = {"model": segmenter.model.as_dict(), "refine": refine}
    sets: list[tuple[str, Iterable[Case], bool]] = []
    if not args.skip_rg1:
        sets.append(("rg1", rg1_cases(), False))
    seed, size = args.seed, args.size
    if args.phantoms:
        sets.append(
            (f"hard phantoms seed {seed}", hard_phantom_cases(args.phantoms, size, seed), False)
        )
    if args.lost:
        sets.append((f"lung lost seed {seed}", lung_lost_cases(args.lost, size, seed), False))
    if args.bad_prompts:
        # Other films than the hard-phantom set's: the seed after it.
        spoiled = hard_phantom_cases(args.bad_prompts, size, seed + 1000)
        sets.append((f"bad prompts seed {seed}", spoiled, True))
    portable: list[tuple[str, Iterable[Case]]] = []
    if args.portable:
        portable += [("rg1 portable", portable_cases()), ("not a frontal chest", not_chest_cases())]
    if args.portable_phantoms:
        phantoms = portable_phantom_cases(args.portable_phantoms, size, seed)
        portable.append((f"portable phantoms seed {seed}", phantoms))
    films: list[dict[str, object]] = []
    for name, cases, spoil in sets:
        if args.verbose:
            print(name)
        report[name] = summary = measure(
            segmenter, cases, refine, args.verbose, spoil, pictures=args.pictures
        )
        films.extend(summary["per_film"])  # type: ignore[arg-type]
        print(_line(name, summary), flush=True)
    portable_films: list[dict[str, object]] = []
    for name, cases in portable:
        if args.verbose:
            print(name)
        report[name] = summary = measure(
            segmenter, cases, refine, args.verbose, False, PORTABLE_MUST_FLAG_BELOW,
            args.pictures,
        )  # fmt: skip
        portable_films.extend(summary["per_film"])  # type: ignore[arg-type]
        print(_line(name, summary), flush=True)
    if portable_films:
        report["families"] = table = families(portable_films)
        for family, row in table.items():
            print(
                f"{family:>28}: {row['films']:2d} films, Dice right {row['right_mean']:.3f} "
                f"left {row['left_mean']:.3f} min {row['min']:.3f}, flagged {row['flagged']}, "
                f"must flag {row['must_flag']} (missed {len(row['must_flag_missed'])}), "  # type: ignore[arg-type]
                f"neither good nor flagged {len(row['neither'])}, "  # type: ignore[arg-type]
                f"good flagged {len(row['good_flagged'])}"  # type: ignore[arg-type]
            )
        unflagged = [
            min(float(f["right"]), float(f["left"]))  # type: ignore[arg-type]
            for f in portable_films
            if _passed(f)
        ]
        report["portable_qc"] = rates = qc_rates(portable_films)
        neither = [f["name"] for f in portable_films if not f["good"] and _passed(f)]
        print(
            f"portable: unflagged min Dice {min(unflagged) if unflagged else float('nan'):.3f}; "
            f"neither good nor flagged: {', '.join(map(str, neither)) or 'none'}; "
            f"must flag {rates['must_flag_flagged']} of {rates['must_flag']} "
            f"(missed: {', '.join(map(str, rates['missed'])) or 'none'}); good flagged "
            f"{rates['good_flagged']} of {rates['good']}; {_bases(rates)}"
        )
    report["qc"] = rates = qc_rates(films)
    missed, false_flags = rates["missed"], rates["good_flagged_names"]
    assert isinstance(missed, list) and isinstance(false_flags, list)
    print(
        f"QC: flagged {rates['must_flag_flagged']} of {rates['must_flag']} films with a lung "
        f"Dice < {MUST_FLAG_BELOW} or lost (missed: {', '.join(missed) or 'none'}); "
        f"flagged {rates['good_flagged']} of {rates['good']} films with both Dice >= "
        f"{GOOD_FROM} ({', '.join(false_flags) or 'none'}); {_bases(rates)}"
    )
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
