"""Host-side work per study (issue 37.3): what bounds a GPU host once the networks are
fast. Decodes real films (RG1 of pydicom-data in its transfer syntaxes) and a large
phantom with the product's decode and with the baseline it replaced (every step on the
whole image in float64, each expression a full-image temporary, the percentile window's
bounds by np.percentile, where the product runs the steps on the table of stored codes
and gathers once: `decode.Coded`), alternating the two each round, and checks the display
and segmentation pixels are equal bit for bit.

    python -m bench.host_side [--rounds 7] [--study] [--against REF [--runs 3]]

Prints one JSON line: per film, the median seconds of each decode and their ratio
(baseline / product), and whether every output was equal. --study (or --writers) adds one
RG1 study through `pipeline.run` on one thread (the product's segmenter, the benchmark's
two 512-px bundles from bench/harness.py), median over the rounds: the whole study, the
networks' calls (the segmenter's encoder; its decoder with the masks' upsampling to the
film, which a GPU host runs on the device; the classifiers; Grad-CAM's passes where a
label reaches its threshold), each writer (SEG, key image, presentation state, SR, the
file writes), the decode, the quality gate, the classifiers' inputs, and the host side:
the study less the networks (selection, decode, prompts, QC, classifier inputs and masks,
writers, result.json), in wall seconds and in this thread's CPU seconds (the work on one
core, without the waits for the disk's fsyncs, which a busy host overlaps with other
studies' work). The database's recording of the outcome is not in it.

--against REF: the same --study benchmark on the tree of git commit REF (a temporary git
worktree, this checkout's Python environment) and on this tree, one process each,
alternating for --runs pairs with the order reversed every other pair, so that a change is
measured against its baseline in one run on one host: per tree the median over the runs of
each figure, and the host side's ratio (baseline / this tree) in wall and CPU seconds.
REF's bench/host_side.py must have --study. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _baseline_u8(values: np.ndarray) -> np.ndarray:
    return np.round(values * 255.0).astype(np.uint8)


def _baseline_decode(header: Any) -> tuple[np.ndarray, np.ndarray]:
    """The decode before the changes (the baseline): every step on the whole image in
    float64, each expression a full-image temporary, the percentiles by np.percentile."""
    from pydicom.pixels import apply_modality_lut

    from cxrbatch.dicom import decode as product

    ds = product.read_dataset(header)
    pixels = ds.pixel_array
    pixels = pixels[0] if pixels.ndim == 3 else pixels
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("not finite")
    bounds = product.percentile_bounds(values)
    notes: list[str] = []
    window: list[tuple[float, float]] = []
    original = product._scaled_to_unit
    # The old expressions, swapped in for this call only.
    product._scaled_to_unit = lambda v, offset, scale, add: np.clip(  # type: ignore[assignment]
        (v - offset) / scale + add, 0.0, 1.0
    )
    try:
        display = product._voi(ds, values, notes, window, bounds)
        windowed_by_header = not notes[-1].startswith("percentile")
        if windowed_by_header:
            low, high = bounds
            from_data = np.clip((values - low) / (high - low), 0.0, 1.0)
        else:
            from_data = display
    finally:
        product._scaled_to_unit = original  # type: ignore[assignment]
    if product._inversion(ds):
        display, from_data = 1.0 - display, 1.0 - from_data
    image = _baseline_u8(display)
    return image, (_baseline_u8(from_data) if windowed_by_header else image)


def _films(work: Path) -> dict[str, Any]:
    from pydicom.data import get_testdata_file

    from cxrbatch.dicom.discover import read_header
    from cxrbatch_training.synthetic import make_phantom, save, to_dataset

    films: dict[str, Any] = {}
    for name in ("RG1_UNCI.dcm", "RG1_J2KR.dcm"):
        path = get_testdata_file(name)
        if path:
            films[name] = read_header(Path(str(path)))
    phantom = work / "phantom.dcm"
    save(to_dataset(make_phantom(7, (3000, 2500)), "host-side"), phantom)
    films["phantom 3000x2500"] = read_header(phantom)
    return films


def _rg1_models(work: Path) -> tuple[Any, Any, Any]:
    """RG1 (uncompressed) as a discovered study, the benchmark's models (the product's
    segmenter, two 512-px classifier bundles from bench/harness.py) and their settings,
    on one thread."""
    import shutil

    import torch
    from pydicom.data import get_testdata_file

    from bench.harness import make_bundles
    from cxrbatch import pipeline
    from cxrbatch.config import load_settings
    from cxrbatch.dicom.discover import discover

    torch.set_num_threads(1)
    bundles = make_bundles(work / "bundles")
    settings = load_settings(
        None, segmentation={"device": "cpu"}, classifier={"device": "cpu", **bundles}
    )
    folder = work / "rg1-study"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(str(get_testdata_file("RG1_UNCI.dcm")), folder / "IM0001")
    (study,), _ = discover(folder)
    return study, pipeline.load_models(settings), settings


def _timed(spent: dict[str, float], cpu: dict[str, float], name: str, function: Any) -> Any:
    """`function`, adding its wall seconds to spent[name] and its thread's CPU seconds to
    cpu[name]."""

    def call(*args: Any, **kwargs: Any) -> Any:
        started, started_cpu = time.perf_counter(), time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - started
            cpu[name] += time.thread_time() - started_cpu

    return call


def study(rounds: int, work: Path) -> dict[str, Any]:
    """One RG1 study through `pipeline.run` (select, decode, segment, QC, classify, write
    the SEG, key image, presentation state, SR and result.json; the database's recording
    is not in it), one thread, the networks and each writer timed on their own; median
    over the rounds (module docstring)."""
    from collections import defaultdict

    from cxrbatch import pipeline
    from cxrbatch.dicom import export
    from cxrbatch.domain import OutcomeStatus
    from cxrbatch.models import qc
    from cxrbatch.models.bundle import ClassifierBundle
    from cxrbatch.models.preprocess import ClassifierInputs

    rg1, models, settings = _rg1_models(work)
    segmenter = models.segmenter
    spent: dict[str, float] = defaultdict(float)
    cpu: dict[str, float] = defaultdict(float)
    # Module attributes and the segmenter's own callables, swapped for timed ones and put
    # back after; the classifiers' network call is ClassifierBundle.trunk.
    module_patches = {
        (pipeline, "build_seg"): "build SEG",
        (pipeline, "build_key_image"): "build key image",
        (pipeline, "build_presentation_state"): "build presentation state",
        (pipeline, "build_sr"): "build SR",
        (export, "write_dicom"): "write files",
        (ClassifierBundle, "trunk"): "network: classifiers",
        # Grad-CAM from the classification pass's activations, where a label reaches its
        # threshold: host-side work since 2026-12-05 (a second network pass before)
        (pipeline, "finding_maps"): "finding maps",
        # host-side steps besides the writers
        (pipeline, "decode"): "decode",
        (qc, "assess"): "quality gate",
        (ClassifierInputs, "tensor"): "classifier inputs",
    }
    instance_patches = {
        "_encode": "network: segmenter encoder",
        # the mask decoder, and the masks' upsampling to the film (on the device on a GPU
        # host; here on the CPU)
        "predict": "network: segmenter decoder + upsampling",
    }
    originals = {key: getattr(*key) for key in module_patches}
    own = {name: vars(segmenter)[name] for name in instance_patches if name in vars(segmenter)}
    per_round: dict[str, list[float]] = defaultdict(list)
    try:
        for (owner, name), label in module_patches.items():
            setattr(owner, name, _timed(spent, cpu, label, originals[(owner, name)]))
        for name, label in instance_patches.items():
            setattr(segmenter, name, _timed(spent, cpu, label, getattr(segmenter, name)))
        for round_ in range(rounds + 1):
            spent.clear()
            cpu.clear()
            started, started_cpu = time.perf_counter(), time.thread_time()
            result = pipeline.run(rg1, models, settings, work / f"study{round_}")
            spent["study"] = time.perf_counter() - started
            cpu["study"] = time.thread_time() - started_cpu
            if result.status is not OutcomeStatus.PROCESSED:
                raise RuntimeError(f"RG1 was not processed: {result.reason}")
            networks = sum(v for k, v in spent.items() if k.startswith("network"))
            spent["host side (study - networks)"] = spent["study"] - networks
            # The same on this thread's CPU clock: the host side's work on one core, without
            # the waits for the disk (the fsyncs) that a busy host overlaps with other work.
            spent["CPU: host side (study - networks)"] = cpu["study"] - sum(
                v for k, v in cpu.items() if k.startswith("network")
            )
            spent["CPU: write files"] = cpu["write files"]
            spent["writers"] = sum(
                v for k, v in spent.items() if k.startswith(("build", "write files"))
            )
            if round_:  # round 0: warm-up
                for label, seconds in spent.items():
                    per_round[label].append(seconds)
    finally:
        for (owner, name), function in originals.items():
            setattr(owner, name, function)
        for name in instance_patches:  # its own callables back, the class's methods again
            if name in own:
                setattr(segmenter, name, own[name])
            else:
                vars(segmenter).pop(name, None)
    return {label: round(statistics.median(v), 4) for label, v in per_round.items()}


HOST_SIDE = "host side (study - networks)"
HOST_SIDE_CPU = "CPU: host side (study - networks)"


def compare(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Per tree ("baseline", "this tree"), the median over its runs of each `study` figure,
    and the host side's ratios (baseline / this tree, above 1: this tree is faster)."""
    medians = {
        tree: {
            label: round(statistics.median(run[label] for run in results), 4)
            for label in results[0]
        }
        for tree, results in runs.items()
    }
    base, this = medians["baseline"], medians["this tree"]

    def ratio(label: str) -> float | None:  # None: a figure the baseline's bench lacks
        return round(base[label] / this[label], 3) if label in base and label in this else None

    return {
        "medians": medians,
        "host_side_ratio": ratio(HOST_SIDE),
        "host_side_cpu_ratio": ratio(HOST_SIDE_CPU),
        "runs": {
            tree: [run.get(HOST_SIDE_CPU, run.get(HOST_SIDE)) for run in results]
            for tree, results in runs.items()
        },
    }


def _study_in(tree: Path, rounds: int) -> dict[str, float]:
    """`--study` on the checkout at `tree`, in a process of its own (its code first on the
    path, this environment's packages)."""
    import os
    import subprocess

    environment = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.host_side", "--rounds", str(rounds), "--study"],
        cwd=tree,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"bench.host_side --study failed in {tree}: {' | '.join(tail)}")
    figures: dict[str, float] = json.loads(lines[-1])["study_s"]
    return figures


def against(ref: str, runs: int, rounds: int) -> dict[str, Any]:
    """`--study` on commit `ref`'s tree and on this tree, alternating (module docstring)."""
    import subprocess

    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="host-side-baseline-") as scratch:
        baseline = Path(scratch) / "tree"
        added = subprocess.run(
            ["git", "-C", str(here), "worktree", "add", "--detach", str(baseline), ref],
            capture_output=True,
            text=True,
            check=False,
        )
        if added.returncode != 0:
            raise SystemExit(f"cannot check out {ref!r} beside this tree: {added.stderr.strip()}")
        try:
            if "--study" not in (baseline / "bench" / "host_side.py").read_text():
                raise SystemExit(f"{ref}'s bench/host_side.py has no --study to compare")
            results: dict[str, list[dict[str, float]]] = {"baseline": [], "this tree": []}
            for pair in range(runs):
                order = [("baseline", baseline), ("this tree", here)]
                for tree, path in order if pair % 2 == 0 else order[::-1]:
                    results[tree].append(_study_in(path, rounds))
        finally:
            subprocess.run(
                ["git", "-C", str(here), "worktree", "remove", "--force", str(baseline)],
                capture_output=True,
                check=False,
            )
    return {"against": ref, "runs": runs, "rounds": rounds, **compare(results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--study", "--writers", action="store_true", dest="study")
    parser.add_argument("--against", metavar="REF", help="a git commit to compare --study with")
    parser.add_argument("--runs", type=int, default=3, help="pairs of runs with --against")
    args = parser.parse_args(argv)
    if args.against:
        sys.stdout.write(json.dumps(against(args.against, args.runs, args.rounds)) + "\n")
        return 0

    from cxrbatch.dicom.decode import decode

    report: dict[str, Any] = {"rounds": args.rounds, "films": {}}
    equal = True
    with tempfile.TemporaryDirectory() as scratch:
        for name, header in _films(Path(scratch)).items():
            product_s: list[float] = []
            baseline_s: list[float] = []
            for round_ in range(args.rounds + 1):  # round 0: warm-up, not counted
                order = ("product", "baseline") if round_ % 2 else ("baseline", "product")
                for which in order:
                    started = time.perf_counter()
                    if which == "product":
                        image = decode(header)[0]
                        pixels = (image.pixels, image.for_segmentation)
                    else:
                        pixels = _baseline_decode(header)
                    seconds = time.perf_counter() - started
                    if round_:
                        (product_s if which == "product" else baseline_s).append(seconds)
                    if which == "product":
                        got = pixels
                    else:
                        expected = pixels
                equal &= all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
            p, b = statistics.median(product_s), statistics.median(baseline_s)
            report["films"][name] = {
                "product_s": round(p, 4),
                "baseline_s": round(b, 4),
                "speedup": round(b / p, 3),
            }
        if args.study:
            report["study_s"] = study(args.rounds, Path(scratch))
    report["outputs_equal"] = equal
    sys.stdout.write(json.dumps(report) + "\n")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
