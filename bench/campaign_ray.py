"""Campaign throughput (issue 34): the same phantom studies through `cxrbatch process`
(W worker processes) and through `cxrbatch campaign` on a local Ray instance (W actors of
one CPU each), alternating which goes first each round; wall seconds of each command.

    python -m bench.campaign_ray [--studies 12] [--workers 2] [--rounds 2] [--size 512]

Prints one JSON line: seconds per round for each, the medians, and campaign / process
(target: within 10 %, a ratio <= 1.10). Both start their own processes and load their
models, as an operator's command does; the campaign also starts Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{command[3]} failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)

    from cxrbatch_training.synthetic import write_studies

    work = Path(tempfile.mkdtemp(prefix="cxrbatch-campaign-bench-"))
    write_studies(work / "in", args.studies, seed=5, size=(args.size, args.size))
    config = work / "site.toml"
    config.write_text('[segmentation]\ndevice = "cpu"\n\n[processing]\nstudy_threads = 1\n')
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cxrbatch = [sys.executable, "-m", "cxrbatch"]
    seconds: dict[str, list[float]] = {"process": [], "campaign": []}
    for round_number in range(args.rounds):
        order = ["process", "campaign"] if round_number % 2 == 0 else ["campaign", "process"]
        for name in order:
            out = work / f"out-{name}-{round_number}"
            if name == "process":
                command = [*cxrbatch, "process", str(work / "in"), "--out", str(out),
                           "--config", str(config), "--workers", str(args.workers)]  # fmt: skip
            else:
                command = [*cxrbatch, "campaign", str(work / "in"), "--out", str(out),
                           "--config", str(config), "--actors", str(args.workers)]  # fmt: skip
            seconds[name].append(_timed(command, env))
    shutil.rmtree(work, ignore_errors=True)
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    report = {
        "studies": args.studies,
        "workers": args.workers,
        "size": args.size,
        "seconds": {k: [round(x, 1) for x in v] for k, v in seconds.items()},
        "median_seconds": {k: round(v, 1) for k, v in medians.items()},
        "campaign_over_process": round(medians["campaign"] / medians["process"], 3),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
