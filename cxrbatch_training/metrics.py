"""The study's metrics: everything in the paper's tables, and more.

- Per-label AUROC (MONAI's `compute_roc_auc`) and macro AUROC (mean over labels).
- No Finding score = 1 - max over the five probabilities (the paper's definition), and its
  AUROC against the No Finding label.
- Precision, recall and F1 per label at operating thresholds chosen on the validation
  split (the F1-optimal threshold per label), and their macro means.
- Bootstrap 95 % confidence intervals (percentile, resampling images, seeded).
- Screening operating points on the No Finding score: the threshold, chosen on validation,
  that keeps the sensitivity for "any abnormality" at a target (0.98, 0.99), and the share
  of normals that the point would auto-triage as likely normal on the test split.
- Paired tests between mask modes across splits (paired t-test and Wilcoxon signed rank).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from scipy import stats
from sklearn.metrics import precision_recall_curve

SCREENING_SENSITIVITIES = (0.98, 0.99)


def no_finding_score(probabilities: np.ndarray) -> np.ndarray:
    """1 - max p over the findings, per image (the paper's No Finding score)."""
    return np.asarray(1.0 - np.asarray(probabilities).max(axis=1))


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """AUROC of one score; NaN when the truth has a single class."""
    truth = np.asarray(truth).astype(int)
    if truth.min() == truth.max():
        return float("nan")
    value = compute_roc_auc(
        torch.as_tensor(np.asarray(scores, dtype=np.float64)), torch.as_tensor(truth)
    )
    return float(np.asarray(value))


def per_label_auroc(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.array([auroc(probabilities[:, k], labels[:, k]) for k in range(labels.shape[1])])


def macro_auroc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean AUROC over the labels that have both classes present."""
    values = per_label_auroc(probabilities, labels)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def f1_optimal_thresholds(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per label, the threshold that maximises F1 (on validation data)."""
    thresholds = np.full(labels.shape[1], 0.5)
    for k in range(labels.shape[1]):
        if labels[:, k].min() == labels[:, k].max():
            continue
        precision, recall, cuts = precision_recall_curve(labels[:, k], probabilities[:, k])
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        thresholds[k] = float(cuts[int(np.argmax(f1[:-1]))])
    return thresholds


def threshold_metrics(
    probabilities: np.ndarray, labels: np.ndarray, thresholds: np.ndarray
) -> dict[str, np.ndarray]:
    """Precision, recall, F1 per label with p >= threshold as positive."""
    predicted = probabilities >= thresholds[None, :]
    tp = (predicted & (labels == 1)).sum(0)
    fp = (predicted & (labels == 0)).sum(0)
    fn = (~predicted & (labels == 1)).sum(0)
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / np.maximum(tp + fn, 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return {"precision": precision, "recall": recall, "f1": f1}


def bootstrap_ci(
    metric: Callable[..., float],
    arrays: Sequence[np.ndarray],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of metric(*arrays resampled by image)."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        value = metric(*(a[idx] for a in arrays))
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(low), float(high)


@dataclass(frozen=True)
class ScreeningPoint:
    target_sensitivity: float
    threshold: float  # No Finding score >= threshold -> likely normal
    val_sensitivity: float
    test_sensitivity: float
    test_normals_auto_triaged: float  # share of test normals called likely normal


def screening_threshold(nf_scores: np.ndarray, abnormal: np.ndarray, sensitivity: float) -> float:
    """The largest-yield threshold on the No Finding score that keeps `sensitivity`.

    Images with score >= threshold are auto-triaged likely normal; at most
    floor((1 - sensitivity) * n_abnormal) abnormal images may be.
    """
    abnormal_scores = np.sort(np.asarray(nf_scores)[np.asarray(abnormal) == 1])[::-1]
    if len(abnormal_scores) == 0:
        raise ValueError("No abnormal image to set a screening threshold on.")
    allowed = int(np.floor((1.0 - sensitivity) * len(abnormal_scores) + 1e-9))
    if allowed >= len(abnormal_scores):
        return float(abnormal_scores[-1])
    return float(np.nextafter(abnormal_scores[allowed], np.inf))


def sensitivity_at(nf_scores: np.ndarray, abnormal: np.ndarray, threshold: float) -> float:
    abnormal = np.asarray(abnormal) == 1
    if not abnormal.any():
        return float("nan")
    return float((np.asarray(nf_scores)[abnormal] < threshold).mean())


def screening_points(
    val_nf: np.ndarray,
    val_abnormal: np.ndarray,
    test_nf: np.ndarray,
    test_abnormal: np.ndarray,
    sensitivities: Sequence[float] = SCREENING_SENSITIVITIES,
) -> list[ScreeningPoint]:
    points = []
    test_normal = np.asarray(test_abnormal) == 0
    for target in sensitivities:
        t = screening_threshold(val_nf, val_abnormal, target)
        auto = float((np.asarray(test_nf)[test_normal] >= t).mean()) if test_normal.any() else 0.0
        points.append(
            ScreeningPoint(
                target_sensitivity=target,
                threshold=t,
                val_sensitivity=sensitivity_at(val_nf, val_abnormal, t),
                test_sensitivity=sensitivity_at(test_nf, test_abnormal, t),
                test_normals_auto_triaged=auto,
            )
        )
    return points


def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired comparison of one metric across splits: mean difference b - a and p-values."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = {"n": float(len(x)), "mean_difference": float(np.mean(y - x)) if len(x) else np.nan}
    if len(x) >= 2 and np.any(y - x != 0):
        out["t_test_p"] = float(stats.ttest_rel(y, x).pvalue)
        out["wilcoxon_p"] = float(stats.wilcoxon(y, x).pvalue)
    else:
        out["t_test_p"] = out["wilcoxon_p"] = float("nan")
    return out
