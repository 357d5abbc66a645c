"""Segmentation time per image of this tree against a baseline revision, in one run.

    python -m bench.seg_cost [--baseline 74366c4] [--phantoms 4] [--rounds 3]

The baseline is checked out with `git worktree` into a temporary folder. The same films
(RG1 from pydicom-data and hard phantoms, written once as arrays) are segmented by
`cxrbatch.models.prompts.segment_pixels` of each tree in alternating subprocesses (both
load LiteMedSAM on the CPU and warm up on the first film first), so a slow spell of a
shared machine falls on both. Prints each round's seconds per image and, last,
`cost_ratio: X.XX` (this tree / baseline, the median of the rounds' ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TIMER = """
import json, sys, time
import numpy as np
from cxrbatch.config import SegmentationSettings
from cxrbatch.models.prompts import segment_pixels
from cxrbatch.models.segmenter import load_segmenter
films = np.load(sys.argv[1], allow_pickle=False)
segmenter = load_segmenter(SegmentationSettings(device="cpu"))
names = sorted(films.files)
segment_pixels(segmenter, films[names[0]], True)
start = time.perf_counter()
for name in names:
    segment_pixels(segmenter, films[name], True)
print(json.dumps((time.perf_counter() - start) / len(names)))
"""


def _films(path: Path, phantoms: int) -> None:
    from bench.seg_sets import hard_phantom_cases, rg1_cases

    films = {"rg1": rg1_cases()[0].image.pixels}
    for case in hard_phantom_cases(phantoms, 1024, seed=2):
        films[case.name] = case.image.pixels
    np.savez(path, **films)  # type: ignore[arg-type]


def _seconds(tree: Path, films: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", TIMER, str(films)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", default="74366c4", help="git revision to compare with")
    parser.add_argument("--phantoms", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        films = work / "films.npz"
        _films(films, args.phantoms)
        base = work / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline],
            check=True,
            capture_output=True,
        )
        try:
            ratios = []
            for number in range(1, args.rounds + 1):
                old, new = _seconds(base, films), _seconds(ROOT, films)
                ratios.append(new / old)
                print(f"round {number}: baseline {old:.2f} s/image, this tree {new:.2f} s/image")
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                check=False,
                capture_output=True,
            )
    print(f"cost_ratio: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
