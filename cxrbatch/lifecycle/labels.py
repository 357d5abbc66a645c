"""A site's radiologist labels for studies already processed (LABELS.csv).

One row per study, named by `accession_number` or `study_instance_uid` (either column;
at least one filled), with `label` normal or abnormal and, where known, a column per
finding (Mass, Nodule, ...) holding 1/0 (also yes/no, true/false, positive/negative);
an empty cell is unknown::

    accession_number,study_instance_uid,label,Mass,Nodule,Pneumonia,Edema,Fibrosis
    A1001,,abnormal,1,0,,,
    ,1.2.826.0.1.3680043.8.498.1,normal,0,0,0,0,0
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from cxrbatch.errors import CxrBatchError

TRUE = {"1", "yes", "true", "positive", "y"}
FALSE = {"0", "no", "false", "negative", "n"}


@dataclass(frozen=True)
class StudyLabel:
    accession_number: str | None
    study_instance_uid: str | None
    abnormal: bool
    findings: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteLabels:
    rows: tuple[StudyLabel, ...]

    def lookup(self, study_instance_uid: str, accession_number: str | None) -> StudyLabel | None:
        for row in self.rows:
            if row.study_instance_uid and row.study_instance_uid == study_instance_uid:
                return row
        for row in self.rows:
            if accession_number and row.accession_number == accession_number:
                return row
        return None

    @property
    def study_uids(self) -> set[str]:
        return {r.study_instance_uid for r in self.rows if r.study_instance_uid}

    @property
    def accession_numbers(self) -> set[str]:
        return {r.accession_number for r in self.rows if r.accession_number}


def read_labels(path: Path, known_labels: tuple[str, ...]) -> SiteLabels:
    """Parse LABELS.csv; an error names the line and what is wrong with it."""
    if not path.is_file():
        raise CxrBatchError(f"no labels file at {path}")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in reader.fieldnames or []]
        if not {"accession_number", "study_instance_uid"} & set(header) or "label" not in header:
            raise CxrBatchError(
                f"{path}: expected the columns label and accession_number or "
                f"study_instance_uid, found {header}"
            )
        by_case = {h.casefold(): h for h in header}
        finding_columns = {
            label: by_case[label.casefold()]
            for label in known_labels
            if label.casefold() in by_case
        }
        rows = []
        for number, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            accession = row.get("accession_number") or None
            uid = row.get("study_instance_uid") or None
            if not accession and not uid:
                raise CxrBatchError(f"{path} line {number}: no accession_number or UID")
            verdict = row.get("label", "").casefold()
            if verdict not in ("normal", "abnormal"):
                raise CxrBatchError(
                    f"{path} line {number}: label must be normal or abnormal, found {verdict!r}"
                )
            findings = {}
            for label, column in finding_columns.items():
                value = row.get(column, "").casefold()
                if value in TRUE:
                    findings[label] = True
                elif value in FALSE:
                    findings[label] = False
                elif value:
                    raise CxrBatchError(
                        f"{path} line {number}: {column} must be 1/0 or empty, found {value!r}"
                    )
            rows.append(StudyLabel(accession, uid, verdict == "abnormal", findings))
    if not rows:
        raise CxrBatchError(f"{path} holds no labelled study")
    return SiteLabels(tuple(rows))
