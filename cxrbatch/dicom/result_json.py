"""result.json: the study's outcome as a JSON document, written beside its SEG and SR.

Fields: status and reason, triage and No Finding score, needs_review (a mask failed QC),
segmentation_only, synthetic_model, notes (NOT FOR DIAGNOSTIC USE, SYNTHETIC, NEEDS
REVIEW where they apply), per image the lungs (area, prompt box, predicted IoU), the
segmentation QC verdict with every measure, findings and screening; skipped and failed
instances with reasons; models; timings; output file names.
"""

from __future__ import annotations

import cxrbatch
from cxrbatch.domain import Findings, OutputFiles, StudyResult, outcome_notes


def _findings_dict(findings: Findings | None) -> dict[str, object] | None:
    if findings is None:
        return None
    return {
        "model": findings.model.name,
        "version": findings.model.version,
        "probabilities": {k: round(v, 6) for k, v in findings.probabilities.items()},
        "thresholds": findings.thresholds,
        "calls": {k: "positive" if v else "negative" for k, v in findings.calls.items()},
        "no_finding_score": round(findings.no_finding_score, 6),
        "threshold": findings.threshold,
        "triage": findings.triage.value if findings.triage else None,
    }


def result_document(result: StudyResult, outputs: OutputFiles) -> dict[str, object]:
    synthetic = any(m.synthetic_training_data for m in result.models)
    notes = outcome_notes(synthetic, result.segmentation_only, result.needs_review)
    return {
        "study_instance_uid": result.study_instance_uid,
        "status": result.status.value,
        "reason": result.reason,
        "triage": result.triage.value if result.triage else None,
        "no_finding_score": None
        if result.no_finding_score is None
        else round(result.no_finding_score, 6),
        "segmentation_only": result.segmentation_only,
        "needs_review": result.needs_review,
        "synthetic_model": synthetic,
        "notes": notes,
        "images": [
            {
                "sop_instance_uid": i.instance.sop_instance_uid,
                "series_instance_uid": i.instance.series_instance_uid,
                "view_position": i.instance.view_position,
                "view_known": i.instance.view_position is not None,
                "side_source": i.image.side_source,
                "decode_notes": list(i.image.notes),
                "lungs": {
                    side: {
                        "area_fraction": round(i.segmentation.area_fraction(side), 5),
                        "prompt_box_xyxy": [round(v, 1) for v in i.segmentation.prompt_boxes[side]],
                        "predicted_iou": round(i.segmentation.predicted_iou[side], 4),
                    }
                    for side in ("right", "left")
                },
                "segmentation_notes": list(i.segmentation.notes),
                "segmentation_qc": i.segmentation.qc.as_dict() if i.segmentation.qc else None,
                "triage": i.triage.value if i.triage else None,
                "findings": _findings_dict(i.findings),
                "screening": _findings_dict(i.screening),
                "seg_file": outputs.seg_files[i.instance.sop_instance_uid].name
                if i.instance.sop_instance_uid in outputs.seg_files
                else None,
                "key_image_file": outputs.key_image_files[i.instance.sop_instance_uid].name
                if i.instance.sop_instance_uid in outputs.key_image_files
                else None,
            }
            for i in result.images
        ],
        "skipped": [
            {"sop_instance_uid": s.instance.sop_instance_uid, "reason": s.reason}
            for s in result.skipped
        ],
        "failed": [
            {"sop_instance_uid": f.instance.sop_instance_uid, "reason": f.reason}
            for f in result.failures
        ],
        "models": [m.as_dict() for m in result.models],
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "outputs": {
            "seg": [p.name for p in outputs.seg_files.values()],
            "sr": outputs.sr_file.name if outputs.sr_file else None,
            "key_images": [p.name for p in outputs.key_image_files.values()],
            "presentation_states": [p.name for p in outputs.presentation_state_files.values()],
            "finding_maps": [p.name for p in outputs.finding_map_files.values()],
        },
        "cxrbatch_version": cxrbatch.__version__,
    }
