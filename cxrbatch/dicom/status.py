"""DIMSE status codes, one table for the receiver and the senders.

The categories and descriptions are pynetdicom's (its storage service class table, PS3.4
Annex B.2.3, which includes the general statuses of PS3.7 Annex C); this module adds what
cxrbatch means by the codes it answers itself, and formats any code the same way:
"0xA700 Refused: Out of Resources (Failure; PS3.4 B.2.3)".
"""

from __future__ import annotations

from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # the receiver could not keep the instance: the sender retries
CANNOT_UNDERSTAND = 0xC000  # an unusable data set: quarantined
CONFLICT = 0xC001  # in the 0xCxxx "cannot understand" range: same UID, other content
NOT_REQUESTED = 0xC002  # a retrieval's instance of another study or series: quarantined

# What cxrbatch's receiver means by the codes it answers (pynetdicom's text is generic).
OURS: dict[int, str] = {
    OUT_OF_RESOURCES: "Refused: Out of Resources (disk or database failed; retry later)",
    CANNOT_UNDERSTAND: "Cannot Understand (unusable data set; quarantined)",
    CONFLICT: "Cannot Understand (SOP Instance UID received before with other content)",
    NOT_REQUESTED: "Cannot Understand (not the study or series requested; quarantined)",
}


def category(code: int) -> str:
    """Success, Warning, Failure, Cancel or Pending (PS3.7 C.1.3)."""
    return str(code_to_category(code))


def stored(code: int) -> bool:
    """A C-STORE status that means the object was stored (success or a storage warning:
    coercion, elements discarded, data set does not match the SOP class)."""
    return category(code) in {"Success", "Warning"}


def describe(code: int, ours: bool = False) -> str:
    """`0xA700 Refused: Out of Resources (Failure; PS3.4 B.2.3)` for any status code;
    `ours`: a code cxrbatch's receiver answered, with what it means by it."""
    if code in GENERAL_STATUS:
        reference = "PS3.7 C"
        text = GENERAL_STATUS[code][1]
    else:
        reference = "PS3.4 B.2.3"
        text = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]
    text = (OURS.get(code) if ours else None) or text or category(code)
    return f"0x{code:04X} {text} ({category(code)}; {reference})"
