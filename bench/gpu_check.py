"""GPU path check: the same studies on CPU and on CUDA, results compared, stages timed.

    python -m bench.gpu_check --studies 16 --size 2048 [--real FILE.dcm] [--report out.json]
                              [--devices cpu cuda] [--profile FILE]

Builds the harness's random-weight bundles (ResNet50 M-15 classifier, DenseNet121 M-50
screening, 512 px) so the classifier stage costs what a real one would; their scores mean nothing.
Prints per-stage seconds per study on each device, mask Dice and probability differences
between CPU and GPU. `--profile FILE` writes cProfile statistics of the last device's run
(the host-side cost of each function: what bounds a GPU run) and prints the top entries.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import make_bundles
from cxrbatch import logs, pipeline
from cxrbatch.config import load_settings
from cxrbatch.dicom.discover import discover
from cxrbatch_training.synthetic import write_studies


def run_all(
    device: str, folder: Path, out: Path, bundles: dict[str, str], profile: Path | None = None
):
    settings = load_settings(
        None, segmentation={"device": device}, classifier={"device": device, **bundles}
    )
    models = pipeline.load_models(settings)
    studies, _ = discover(folder)
    pipeline.run(studies[0], models, settings, out / "warmup")  # load kernels, caches
    if device == "cuda":
        torch.cuda.synchronize()
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    results = [pipeline.run(s, models, settings, out) for s in studies]
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if profiler is not None and profile is not None:
        profiler.disable()
        with profile.open("w") as handle:
            stats = pstats.Stats(profiler, stream=handle)
            stats.sort_stats("tottime").print_stats(60)
            stats.sort_stats("cumtime").print_stats(60)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return results, wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--real", type=Path, default=None)
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the last device")
    args = parser.parse_args()
    logs.quiet_third_party()
    report: dict[str, object] = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_studies(root / "in", args.studies, seed=3, size=(args.size, args.size))
        if args.real:
            (root / "in" / "real").mkdir()
            (root / "in" / "real" / "IM0001").write_bytes(args.real.read_bytes())
        bundles = make_bundles(root / "bundles")
        runs = {}
        for device in args.devices:
            profile = args.profile if device == args.devices[-1] else None
            results, wall = run_all(device, root / "in", root / f"out-{device}", bundles, profile)
            runs[device] = {r.study_instance_uid: r for r in results}
            stages = {
                k: statistics.mean(r.timings.get(k, 0.0) for r in results)
                for k in ("decode", "segment", "classify", "write")
            }
            report[device] = {
                "studies_per_s": len(results) / wall,
                "wall_s": wall,
                "seconds_per_study_by_stage": stages,
            }
            print(
                f"{device}: {len(results)} studies in {wall:.1f}s = {len(results) / wall:.2f}/s; "
                + ", ".join(f"{k} {v:.3f}s" for k, v in stages.items())
            )
        if len(runs) < 2:
            return
        dices, prob_diffs, nf_diffs = [], [], []
        verdicts_differ = 0  # the quality gate's pass/fail, judged on each device's masks
        classified_differ = 0  # a classifier ran on one device's image and not the other's
        for uid, cpu in runs["cpu"].items():
            gpu = runs["cuda"][uid]
            for a, b in zip(cpu.images, gpu.images, strict=True):
                verdicts_differ += a.segmentation.qc_passed != b.segmentation.qc_passed
                for side in ("right_lung", "left_lung"):
                    ma, mb = getattr(a.segmentation, side), getattr(b.segmentation, side)
                    dices.append(2 * (ma & mb).sum() / max(ma.sum() + mb.sum(), 1))
                for fa, fb in ((a.findings, b.findings), (a.screening, b.screening)):
                    if fa is None or fb is None:  # not classified (a failed gate, say)
                        classified_differ += (fa is None) != (fb is None)
                        continue
                    prob_diffs.append(
                        max(
                            abs(fa.probabilities[k] - fb.probabilities[k]) for k in fa.probabilities
                        )
                    )
                    nf_diffs.append(abs(fa.no_finding_score - fb.no_finding_score))
        report["cpu_vs_gpu"] = {
            "mask_dice_min": float(np.min(dices)),
            "mask_dice_mean": float(np.mean(dices)),
            "prob_abs_diff_max": float(np.max(prob_diffs)),
            "no_finding_abs_diff_max": float(np.max(nf_diffs)),
            "qc_verdicts_differ": verdicts_differ,
            "classified_on_one_device_only": classified_differ,
        }
        print("cpu vs gpu:", json.dumps(report["cpu_vs_gpu"]))
        if args.real:
            real = [
                r
                for r in runs["cuda"].values()
                if not r.study_instance_uid.startswith("1.2.826.0.1.3680043.10.1411")
            ]
            for r in real:
                seg = r.images[0].segmentation
                print(
                    "real on gpu:", {s: round(seg.area_fraction(s), 4) for s in ("right", "left")}
                )
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
