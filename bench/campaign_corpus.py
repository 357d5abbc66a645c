"""Campaign: the peer corpus. Every file of pydicom's own test files and of `pydicom-data`
(DICOMDIRs, odd encodings, non-DICOM files included) goes through `cxrbatch process` as a
real process, and each must be accounted for: a rejected or skipped file with its reason,
or an instance of a study with a current outcome (processed, or ineligible/failed with a
reason). Issue 20's figure: every file accounted for.

    python -m bench.campaign_corpus [--workdir DIR] [--keep]

Prints one JSON line: files, accounted, by status, the files not accounted for (none
expected), the exit code of `process` and its seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def corpus_roots() -> list[tuple[str, Path]]:
    import pydicom
    from pydicom.data import get_testdata_file

    roots = [("pydicom", Path(pydicom.__file__).parent / "data" / "test_files")]
    rg1 = get_testdata_file("RG1_UNCR.dcm")
    if rg1 is None:
        raise SystemExit("pydicom-data is not installed (pip install pydicom-data)")
    roots.append(("pydicom-data", Path(str(rg1)).parent))
    return roots


def gather(into: Path) -> list[Path]:
    """Copy every file of the corpora into `into` (their folder structure kept)."""
    copied = []
    for name, root in corpus_roots():
        for source in sorted(p for p in root.rglob("*") if p.is_file()):
            target = into / name / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied.append(target)
    return copied


def account(files: list[Path], out: Path) -> dict[str, Any]:
    from cxrbatch.dicom.discover import read_header
    from cxrbatch.domain import RejectedFile

    with sqlite3.connect(out / "cxrbatch.sqlite") as db:
        rejected = dict(db.execute("SELECT path, reason FROM rejected_files").fetchall())
        images = {
            (study, sop): (status, reason)
            for study, sop, status, reason in db.execute(
                "SELECT s.study_instance_uid, i.sop_instance_uid, i.status, i.reason "
                "FROM images i JOIN outcomes o ON o.id = i.outcome_id "
                "JOIN studies s ON s.id = o.study_id WHERE o.is_current"
            )
        }
        outcomes = dict(
            db.execute(
                "SELECT s.study_instance_uid, o.status || ': ' || coalesce(o.reason, '') "
                "FROM outcomes o JOIN studies s ON s.id = o.study_id WHERE o.is_current"
            ).fetchall()
        )
    statuses: collections.Counter[str] = collections.Counter()
    missing: list[str] = []
    for path in files:
        if str(path) in rejected:
            reason = rejected[str(path)]
            kind = "skipped" if reason.startswith("skipped") else "rejected"
            if "duplicate of an identical instance" in reason:
                kind = "duplicate"
            statuses[kind] += 1
            continue
        header = read_header(path)
        if isinstance(header, RejectedFile):
            missing.append(f"{path.name}: rejected but not recorded ({header.reason})")
            continue
        key = (header.study_instance_uid, header.sop_instance_uid)
        if key in images:
            status, reason = images[key]
            if status != "processed" and not reason:
                missing.append(f"{path.name}: {status} without a reason")
            statuses[status] += 1
        elif header.study_instance_uid in outcomes:
            status, _, reason = outcomes[header.study_instance_uid].partition(": ")
            if not reason and status != "processed":
                missing.append(f"{path.name}: study {status} without a reason")
            statuses[f"study {status}"] += 1
        else:
            missing.append(f"{path.name}: no row")
    return {
        "files": len(files),
        "accounted": len(files) - len(missing),
        "by_status": dict(sorted(statuses.items())),
        "not_accounted": missing,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cxrbatch-corpus-"))
    try:
        files = gather(work / "in")
        config = work / "cpu.toml"
        config.write_text('[segmentation]\ndevice = "cpu"\n[classifier]\ndevice = "cpu"\n')
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "cxrbatch", "process", str(work / "in"), "--out",
             str(work / "out"), "--config", str(config)],
            capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        if proc.returncode not in (0, 1):  # 1: some studies failed, with their reasons
            sys.stderr.write(proc.stderr[-3000:])
            return 2
        report = account(files, work / "out")
        report |= {"process_exit_code": proc.returncode, "seconds": round(seconds, 1)}
        print(json.dumps(report))
        return 0 if not report["not_accounted"] else 1
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
