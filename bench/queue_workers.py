"""The daemon's worker with studies in flight: one `QueueWorker` (the loop of `cxrbatch
watch` / `cxrbatch worker`) drains a queue of N studies with processing.study_threads = 1
and then = T, each in a fresh process; prints studies/s and the ratio of the two.

    python -m bench.queue_workers --input DIR [--study-threads 2] [--bundles DIR] [--gpu]

DIR holds the studies, e.g. W/in after `bench/run --studies N --workdir W`, whose two
classifier bundles are in W/bundles (the default when DIR is W/in). Each run spools the
studies read-only into a fresh output folder and SQLite queue (not timed), loads the models
and drains the queue (timed: model loading included, as a worker process starting pays
it). The models run as `cxrbatch` runs them by default (CPU graphs on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import run_child


def drain(input_dir: Path, out: Path, bundles: Path | None, threads: int, device: str) -> dict:
    """In this (fresh) process: spool and queue every file, then time one worker."""
    from cxrbatch import logs
    from cxrbatch.config import load_settings
    from cxrbatch.db.session import make_engine, session_factory, upgrade
    from cxrbatch.dicom.discover import iter_files
    from cxrbatch.ingest.spool import Spool
    from cxrbatch.site import Site
    from cxrbatch.worker import QueueWorker

    logs.configure("WARNING")
    classifier: dict[str, Any] = {"device": device}
    if bundles is not None:
        classifier |= {
            "bundle": str(bundles / "bundle"),
            "screening_bundle": str(bundles / "screening_bundle"),
        }
    settings = load_settings(
        None,
        segmentation={"device": device},
        classifier=classifier,
        ingest={"mode": "read-only", "study_stable_seconds": 0.0},
        queue={"poll_interval_seconds": 0.2, "min_free_disk_mb": 0.0},
        # Both runs trace their CPU graphs: a cache filled by the first would favour the second.
        processing={"study_threads": threads, "cache_cpu_graphs": False},
    )
    out.mkdir(parents=True)
    url = f"sqlite:///{out / 'cxrbatch.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    spool = Spool(
        out / "_spool",
        session_factory(engine),
        out / "_quarantine",
        mode="read-only",
        study_stable_seconds=0.0,
    )
    for path in iter_files(input_dir):
        spool.take(path)
    engine.dispose()
    start = time.perf_counter()
    finished = QueueWorker(Site(settings, out, url)).run(until_idle=True)
    wall = time.perf_counter() - start
    return {
        "study_threads": threads,
        "studies": finished,
        "wall_s": wall,
        "studies_per_s": finished / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--bundles", type=Path, default=None)
    parser.add_argument("--study-threads", type=int, default=2)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one run
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    bundles = args.bundles
    if bundles is None and (args.input.parent / "bundles" / "bundle").is_dir():
        bundles = args.input.parent / "bundles"
    if args.one:
        print("RESULT " + json.dumps(drain(args.input, args.out, bundles, args.one, device)))
        return
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for threads in (1, args.study_threads):
            command = [
                sys.executable,
                "-m",
                "bench.queue_workers",
                "--input",
                str(args.input),
                "--one",
                str(threads),
                "--out",
                str(Path(tmp) / f"out{threads}"),
            ]
            command += ["--bundles", str(bundles)] if bundles else []
            command += ["--gpu"] if args.gpu else []
            runs[threads] = run = run_child(command, f"the run with {threads} in flight")
            print(
                f"study_threads {threads}: {run['studies']} studies in {run['wall_s']:.1f}s "
                f"= {run['studies_per_s']:.2f} studies/s",
                flush=True,
            )
    ratio = runs[args.study_threads]["studies_per_s"] / runs[1]["studies_per_s"]
    print(f"speedup_vs_one_in_flight: {ratio:.2f}")


if __name__ == "__main__":
    main()
