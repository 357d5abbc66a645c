"""How a shadow candidate agrees with the live model (`cxrbatch compare`).

Over the current outcomes that carry a shadow answer: the triage of each study by the live
and the shadow screening model (flips counted by direction), the No Finding scores
(mean absolute difference), each label's probability (mean absolute difference), and,
where the site's labels name studies (lifecycle/labels.py), AUROC of both models per
label and for abnormal-vs-normal by the No Finding score.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from cxrbatch.db.lifecycle import StudyScores
from cxrbatch.lifecycle.labels import SiteLabels


def _auroc(scores: list[float], truth: list[bool]) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(set(truth)) < 2:
        return None
    return round(float(roc_auc_score(np.array(truth), np.array(scores))), 4)


def _role(scores: StudyScores, screening: str, classifier: str) -> str | None:
    return next((r for r in (screening, classifier) if r in scores.no_finding), None)


def compare(outcomes: list[StudyScores], labels: SiteLabels | None = None) -> dict[str, Any]:
    shadowed = [o for o in outcomes if o.shadow]
    flips: Counter[str] = Counter()
    agree = 0
    nf_diff: list[float] = []
    label_diff: dict[str, list[float]] = {}
    live_models: set[str] = set()
    shadow_models: set[str] = set()
    truth: dict[str, list[bool]] = {}
    scored: dict[str, dict[str, list[float]]] = {"live": {}, "shadow": {}}
    for o in shadowed:
        shadow = o.shadow or {}
        live_models.update(
            f"{m.get('name')} {m.get('version')}"
            for m in o.models
            if isinstance(m, dict) and m.get("mask_mode") is not None
        )
        shadow_models.update(
            f"{m.get('name')} {m.get('version')}" for m in shadow.get("models", [])
        )
        live_triage, shadow_triage = o.triage, shadow.get("triage")
        if live_triage and shadow_triage:
            if live_triage == shadow_triage:
                agree += 1
            else:
                flips[f"{live_triage} -> {shadow_triage}"] += 1
        live_role = _role(o, "screening", "classifier")
        shadow_role = _role(o, "shadow-screening", "shadow")
        if live_role and shadow_role:
            nf_diff.append(abs(o.no_finding[live_role] - o.no_finding[shadow_role]))
        live_p, shadow_p = o.probabilities.get("classifier", {}), o.probabilities.get("shadow", {})
        for label in live_p.keys() & shadow_p.keys():
            label_diff.setdefault(label, []).append(abs(live_p[label] - shadow_p[label]))
        known = labels.lookup(o.study_instance_uid, o.accession_number) if labels else None
        if known is None or not (live_role and shadow_role):
            continue
        pairs = {"No Finding (abnormal)": known.abnormal, **known.findings}
        for name, value in pairs.items():
            if name == "No Finding (abnormal)":
                live, cand = 1 - o.no_finding[live_role], 1 - o.no_finding[shadow_role]
            elif name in live_p and name in shadow_p:
                live, cand = live_p[name], shadow_p[name]
            else:
                continue
            truth.setdefault(name, []).append(value)
            scored["live"].setdefault(name, []).append(live)
            scored["shadow"].setdefault(name, []).append(cand)
    compared = agree + sum(flips.values())
    return {
        "studies": len(shadowed),
        "live_models": sorted(live_models),
        "shadow_models": sorted(shadow_models),
        "triage": {
            "compared": compared,
            "agree": agree,
            "flips": dict(sorted(flips.items())),
            "agreement": round(agree / compared, 4) if compared else None,
        },
        "no_finding_mean_abs_difference": round(float(np.mean(nf_diff)), 4) if nf_diff else None,
        "label_mean_abs_difference": {
            k: round(float(np.mean(v)), 4) for k, v in sorted(label_diff.items())
        },
        "labelled": {
            name: {
                "n": len(values),
                "positives": int(sum(values)),
                "auroc_live": _auroc(scored["live"][name], values),
                "auroc_shadow": _auroc(scored["shadow"][name], values),
            }
            for name, values in truth.items()
        },
    }
