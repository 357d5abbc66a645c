"""Many studies in a results database, fast, for the web app's benchmark and paging tests:
N studies, each with a current processed outcome, one image, five classifier findings and
a screening score, spread over triage categories and 30 days. The rows are what
`repository.record_study` writes, inserted in bulk (SQLAlchemy Core, one transaction).

    python -m bench.web_data URL N [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys

LABELS = ("Mass", "Nodule", "Pneumonia", "Edema", "Fibrosis")
CHUNK = 20_000  # studies inserted per statement


def populate(url: str, count: int, seed: int = 0, synthetic: bool = True) -> None:
    from sqlalchemy import insert

    from cxrbatch.db import models
    from cxrbatch.db.session import make_engine, upgrade

    upgrade(url)
    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    engine = make_engine(url)
    ref = {"name": "bench-m50", "version": "1", "sha256": "0" * 64,
           "synthetic_training_data": synthetic, "mask_mode": "M-50"}  # fmt: skip
    with engine.begin() as connection:
        start = int(connection.exec_driver_sql("SELECT coalesce(max(id), 0) FROM studies").scalar())
        studies, outcomes, images, findings = [], [], [], []
        for n in range(count):
            sid = start + n + 1
            probs = {label: rng.random() ** 2 for label in LABELS}
            no_finding = 1.0 - max(probs.values())
            screening = max(0.0, min(1.0, no_finding + rng.uniform(-0.1, 0.1)))
            triage = rng.choice(
                ["abnormal", "likely-normal", "likely-normal", "needs-review", None]
            )
            created = now - dt.timedelta(minutes=rng.randrange(30 * 24 * 60))
            studies.append({
                "id": sid, "study_instance_uid": f"1.2.826.0.1.3680043.10.9999.{seed}.{sid}",
                "accession_number": f"BENCH{sid:08d}", "patient_id": f"P{sid % 50000:06d}",
                "patient_name": f"BENCH^PATIENT{sid % 977}",
                "study_date": (created - dt.timedelta(days=1)).date(), "modality": "CR",
                "first_seen_at": created, "updated_at": created,
            })  # fmt: skip
            outcomes.append({
                "id": sid, "study_id": sid, "is_current": True, "status": "processed",
                "reason": None, "triage": triage, "no_finding_score": no_finding,
                "screening_no_finding_score": screening, "segmentation_only": False,
                "synthetic_model": synthetic, "input_fingerprint": f"{sid:064d}",
                "models": [ref], "outputs": {}, "timings": {"segment": 1.0, "classify": 0.2},
                "created_at": created,
                **models.worklist_keys(
                    triage, screening, no_finding, (created - dt.timedelta(days=1)).date()
                ),
            })  # fmt: skip
            images.append({
                "id": sid, "outcome_id": sid, "sop_instance_uid": f"1.2.3.{sid}.1",
                "series_instance_uid": f"1.2.3.{sid}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
                "modality": "CR", "view_position": "PA", "status": "processed",
                "no_finding_score": no_finding, "screening_no_finding_score": screening,
                "triage": triage,
            })  # fmt: skip
            findings.extend(
                {"image_id": sid, "role": "classifier", "label": label, "probability": p}
                for label, p in probs.items()
            )
            if len(studies) == CHUNK or n == count - 1:  # bounded memory at 1,000,000
                connection.execute(insert(models.Study), studies)
                connection.execute(insert(models.Outcome), outcomes)
                connection.execute(insert(models.Image), images)
                connection.execute(insert(models.Finding), findings)
                studies, outcomes, images, findings = [], [], [], []
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("count", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    populate(args.url, args.count, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
