"""Which instances of a study are frontal chest radiographs."""

from __future__ import annotations

from cxrbatch.config import SelectionSettings
from cxrbatch.domain import InstanceHeader, Selection, Skipped, StudyInput

# SOP classes that are our own kind of output or other non-image objects: name them plainly.
_NON_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a Segmentation object",
    "1.2.840.10008.5.1.4.1.1.88.11": "a Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "an Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "a Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "a Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.11.1": "a Grayscale Softcopy Presentation State",
    "1.2.840.10008.5.1.4.1.1.104.1": "an Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.7": "a Secondary Capture image",
}

LATERAL_VIEWS = {"LL", "RL", "LLD", "RLD", "LAT", "LATERAL"}


def _normalise_body_part(value: str) -> str:
    return value.upper().replace(" ", "").replace("_", "").replace("-", "")


def eligibility(header: InstanceHeader, rules: SelectionSettings) -> str | None:
    """None when the instance is a frontal chest radiograph, else the reason it is not."""
    if header.sop_class_uid not in rules.sop_class_uids:
        kind = _NON_IMAGE_CLASSES.get(header.sop_class_uid)
        what = kind or f"SOP class {header.sop_class_uid}"
        return f"not a CR/DX radiograph: {what} (Modality {header.modality or 'missing'})"
    if header.modality not in rules.modalities:
        return f"Expected Modality in {list(rules.modalities)}, found {header.modality or 'none'!r}"
    body_part = header.body_part_examined
    if body_part is None:
        if rules.missing_body_part == "skip":
            return "BodyPartExamined missing and the site rule skips such images"
    else:
        accepted = {_normalise_body_part(b) for b in rules.chest_body_parts}
        if _normalise_body_part(body_part) not in accepted:
            return f"not a chest radiograph: BodyPartExamined {body_part!r}"
    view = header.view_position
    if view is None:
        if rules.missing_view == "skip":
            return "ViewPosition missing and the site rule skips such images"
    elif view in LATERAL_VIEWS:
        return f"lateral view ({view}) is not processed"
    elif view not in rules.frontal_views:
        return f"view {view!r} is not a frontal view {list(rules.frontal_views)}"
    return None


def select(study: StudyInput, rules: SelectionSettings) -> Selection:
    eligible: list[InstanceHeader] = []
    skipped: list[Skipped] = []
    for header in sorted(
        study.instances,
        key=lambda h: (h.series_instance_uid, h.instance_number or 0, h.sop_instance_uid),
    ):
        reason = eligibility(header, rules)
        if reason is None:
            eligible.append(header)
        else:
            skipped.append(Skipped(header, reason))
    return Selection(tuple(eligible), tuple(skipped))
