"""Site calibration: a bundle's operating points set on the site's own labelled studies.

A model's operating point moves between populations. `calibrate` takes the site's
outcomes of studies it has already processed with the bundle (found by the bundle's weight
SHA-256 in each outcome's models, live or shadow) and the radiologists' labels
(lifecycle/labels.py), and writes a new version of the bundle (same weights, byte for byte)
with:

- the screening threshold on the No Finding score at the target sensitivity for abnormal
  studies, set conservatively: the largest threshold at which the lower bound of the exact
  (Clopper-Pearson) 95% confidence interval of the sensitivity measured on the site's
  labelled abnormal studies still reaches the target. A threshold at the point estimate
  alone (cxrbatch_training/metrics.py `screening_threshold`) misses the target on new studies about
  half the time; measured on held-out phantoms: 0.82 at a 0.9 target from 12 abnormal
  studies (tests/test_model_lifecycle.py);
- per-label thresholds where the labels name the finding often enough: the F1-optimal
  threshold on the site's studies (the rule the study uses on its validation split);
- a "calibration" section in configs/metadata.json: the site, the date, the studies used,
  and the sensitivity and specificity measured on them with exact (Clopper-Pearson) 95%
  confidence intervals.

It refuses when there are too few labelled abnormal studies for the target to be
supported: when even a threshold that misses none of them leaves the lower confidence bound
below the target (0.025^(1/n) < s), which needs n >= 368 for 0.99, 72 for 0.95, 36 for 0.9
and 17 for 0.8.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import beta

from cxrbatch.db.lifecycle import StudyScores
from cxrbatch.errors import CxrBatchError
from cxrbatch.files import sha256_file
from cxrbatch.lifecycle.labels import SiteLabels
from cxrbatch.models.bundle import BundleSpec, Screening, write_bundle_files
from cxrbatch.models.preflight import bundle_files

MIN_LABEL_CASES = 5  # positives and negatives a label needs for its own threshold


@dataclass(frozen=True)
class Rate:
    """A proportion k/n with its exact (Clopper-Pearson) 95% confidence interval."""

    successes: int
    n: int

    @property
    def value(self) -> float:
        return self.successes / self.n if self.n else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        k, n = self.successes, self.n
        if n == 0:
            return (float("nan"), float("nan"))
        low = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
        high = 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))
        return (low, high)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.ci95
        return {
            "value": round(self.value, 4),
            "ci95": [round(low, 4), round(high, 4)],
            "k": self.successes,
            "n": self.n,
        }


def required_positives(target: float) -> int:
    """Abnormal studies a sensitivity target needs: the least n with 0.025^(1/n) >= target
    (the 95% lower bound when all n are caught)."""
    n = max(1, math.ceil(math.log(0.025) / math.log(target)) - 1)
    while Rate(n, n).ci95[0] < target:
        n += 1
    return n


def allowed_misses(n: int, target: float) -> int:
    """The most abnormal studies of n a threshold may miss with the lower 95% confidence
    bound of its sensitivity still at `target`; -1 when even none is too many."""
    misses = -1
    while misses + 1 <= n and Rate(n - misses - 1, n).ci95[0] >= target:
        misses += 1
    return misses


def screening_threshold(no_finding: np.ndarray, abnormal: np.ndarray, target: float) -> float:
    """The largest No Finding threshold (scores below it are called abnormal) that misses
    at most `allowed_misses` of the abnormal studies."""
    scores = np.sort(no_finding[abnormal])[::-1]
    allowed = allowed_misses(len(scores), target)
    if allowed < 0:
        raise CxrBatchError(f"{len(scores)} abnormal studies cannot support {target}")
    return float(np.nextafter(scores[min(allowed, len(scores) - 1)], np.inf))


def f1_threshold(probabilities: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.metrics import precision_recall_curve

    precision, recall, cuts = precision_recall_curve(truth, probabilities)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(cuts[int(np.argmax(f1[:-1]))])


@dataclass(frozen=True)
class Calibration:
    bundle: Path
    metadata: dict[str, Any]

    @property
    def section(self) -> dict[str, Any]:
        return dict(self.metadata["calibration"])


def calibrate(
    bundle: Path,
    labels: SiteLabels,
    outcomes: list[StudyScores],
    out: Path,
    *,
    target_sensitivity: float,
    site: str,
    version: str | None = None,
) -> Calibration:
    """Write the calibrated bundle at `out` (module docstring); returns it."""
    if not 0.5 <= target_sensitivity < 1.0:
        raise CxrBatchError("--target-sensitivity must be in [0.5, 1)")
    if out.resolve() == bundle.resolve():
        raise CxrBatchError("--out must be a new folder: the calibrated bundle is a new version")
    if out.exists() and any(out.iterdir()):
        raise CxrBatchError(f"{out} exists and is not empty")
    _, model_path, metadata = bundle_files(bundle)
    spec = BundleSpec.model_validate(metadata["cxrbatch"])
    sha = sha256_file(model_path)
    name, old_version = str(metadata.get("name", bundle.name)), str(metadata.get("version", "0"))

    used: list[tuple[bool, float, dict[str, float], dict[str, bool]]] = []
    for scores in outcomes:
        row = labels.lookup(scores.study_instance_uid, scores.accession_number)
        role = scores.role_of(sha, spec.screening is not None)
        if row is None or role is None or role not in scores.no_finding:
            continue
        used.append(
            (row.abnormal, scores.no_finding[role], scores.probabilities[role], row.findings)
        )
    abnormal = np.array([u[0] for u in used], dtype=bool)
    no_finding = np.array([u[1] for u in used], dtype=float)
    positives, negatives = int(abnormal.sum()), int((~abnormal).sum())
    needed = required_positives(target_sensitivity)
    found = (
        f"{len(labels.rows)} labelled studies, {len(used)} of them processed by "
        f"{name} {old_version} (weights {sha[:12]}): {positives} abnormal, {negatives} normal"
    )
    if positives < needed:
        raise CxrBatchError(
            f"too few abnormal studies to support a sensitivity of {target_sensitivity}: "
            f"{found}; at least {needed} abnormal studies are needed (with fewer, the 95% "
            "lower confidence bound of the sensitivity stays below the target even when "
            "none is missed)"
        )
    if negatives == 0:
        raise CxrBatchError(f"no normal study to measure specificity on: {found}")
    threshold = screening_threshold(no_finding, abnormal, target_sensitivity)
    called_abnormal = no_finding < threshold
    sensitivity = Rate(int((called_abnormal & abnormal).sum()), positives)
    specificity = Rate(int((~called_abnormal & ~abnormal).sum()), negatives)

    thresholds = dict(spec.thresholds)
    per_label: dict[str, Any] = {}
    for label in spec.labels:
        known = [(u[2].get(label), u[3][label]) for u in used if label in u[3]]
        probs = np.array([p for p, _ in known if p is not None], dtype=float)
        truth = np.array([t for p, t in known if p is not None], dtype=bool)
        pos, neg = int(truth.sum()), int((~truth).sum())
        if pos < MIN_LABEL_CASES or neg < MIN_LABEL_CASES:
            per_label[label] = {
                "threshold": thresholds.get(label),
                "kept": f"too few labelled cases ({pos} positive, {neg} negative; "
                f"{MIN_LABEL_CASES} of each needed): the bundle's threshold is kept",
            }
            continue
        cut = f1_threshold(probs, truth)
        thresholds[label] = cut
        called = probs >= cut
        per_label[label] = {
            "threshold": cut,
            "sensitivity": Rate(int((called & truth).sum()), pos).as_dict(),
            "specificity": Rate(int((~called & ~truth).sum()), neg).as_dict(),
        }

    today = dt.date.today().isoformat()
    new_version = version or f"{old_version}+{_slug(site)}.{today.replace('-', '')}"
    section = {
        "site": site,
        "date": today,
        "studies": len(used),
        "abnormal": positives,
        "normal": negatives,
        "labelled": len(labels.rows),
        "target_sensitivity": target_sensitivity,
        "screening": {
            "no_finding_threshold": threshold,
            "rule": "lower 95% Clopper-Pearson bound of the sensitivity >= target",
            "sensitivity": sensitivity.as_dict(),
            "specificity": specificity.as_dict(),
        },
        "labels": per_label,
        "from": {"name": name, "version": old_version, "sha256": sha},
    }
    screening = Screening(no_finding_threshold=threshold, target_sensitivity=target_sensitivity)
    new_spec = spec.model_copy(update={"thresholds": thresholds, "screening": screening})
    updated = {
        **metadata,
        "version": new_version,
        "changelog": {
            new_version: f"calibrated at {site} on {today}: {len(used)} studies, "
            f"sensitivity {sensitivity.value:.3f} at target {target_sensitivity}",
            **metadata.get("changelog", {}),
        },
        "cxrbatch": new_spec.model_dump(mode="json"),
        "calibration": section,
    }
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, out, dirs_exist_ok=True)  # the weights unchanged, byte for byte
    write_bundle_files(out, updated)
    return Calibration(out, json.loads((out / "configs" / "metadata.json").read_text()))


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.strip().lower()).strip("-") or "site"
