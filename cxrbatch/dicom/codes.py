"""Every coded concept cxrbatch writes, in one place.

SNOMED CT codes are used where a standard concept exists; cxrbatch's own concepts use the
private coding scheme designator "99CXRB" (private designators must start with "99").
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99CXRB"

ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # 91723000
LUNG = codes.SCT.Lung  # 39607008
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
CHEST = codes.SCT.Chest  # 816094009

FINDING_CODES: dict[str, Code] = {
    "Mass": codes.SCT.Mass,  # 4147007
    "Nodule": codes.SCT.Nodule,  # 27925004
    "Pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "Edema": codes.SCT.PulmonaryEdema,  # 19242006
    "Fibrosis": codes.SCT.Fibrosis,  # 112674009
}

PROCEDURE_CHEST_RADIOGRAPH = Code("399208008", "SCT", "Plain chest X-ray")
FINDING = codes.DCM.Finding  # 121071
AREA = codes.SCT.Area  # 42798000
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence  # 123110

NO_FINDING_SCORE = Code("NOFINDSCORE", PRIVATE_SCHEME, "No Finding score (1 - max p)")
TRIAGE_CATEGORY = Code("TRIAGE", PRIVATE_SCHEME, "Screening triage category")
TRIAGE_VALUES: dict[str, Code] = {
    "likely-normal": Code("LIKELYNORMAL", PRIVATE_SCHEME, "Likely normal"),
    "abnormal": Code("ABNORMAL", PRIVATE_SCHEME, "Abnormal"),
    "needs-review": Code("NEEDSREVIEW", PRIVATE_SCHEME, "Needs review"),
}
# The segmentation quality gate (cxrbatch/models/qc.py): a TID 1501 group per image with
# the verdict, and the reasons as TEXT in TID 1500's Qualitative Evaluations container.
SEGMENTATION_QC = Code("LUNGSEGQC", PRIVATE_SCHEME, "Lung segmentation quality control")
QC_VALUES: dict[bool, Code] = {
    True: Code("QCPASSED", PRIVATE_SCHEME, "Passed quality control"),
    False: Code("QCFAILED", PRIVATE_SCHEME, "Failed quality control"),
}
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
CLASSIFICATION = Code("CXRCLASS", PRIVATE_SCHEME, "Chest radiograph classification")

UNIT_PROBABILITY = Code("{probability}", "UCUM", "probability")
UNIT_MM2 = Code("mm2", "UCUM", "square millimeter")


def finding_code(label: str) -> Code:
    """The code for a classifier label; labels without a standard code get a private one."""
    code = FINDING_CODES.get(label)
    if code is not None:
        return code
    value = "".join(ch for ch in label.upper() if ch.isalnum())[:16] or "LABEL"
    return Code(value, PRIVATE_SCHEME, label)


# A per-label call (the probability against the bundle's operating threshold).
PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000


def threshold_code(label: str) -> Code:
    """The private concept of one label's operating threshold."""
    value = "THR" + "".join(ch for ch in label.upper() if ch.isalnum())[:13]
    return Code(value, PRIVATE_SCHEME, f"{label} operating threshold")
