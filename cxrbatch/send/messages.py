"""Reports of an outcome for the RIS and the EHR: an HL7 v2.5 ORU^R01 (hl7apy builds and
validates it) and a FHIR R4 transaction Bundle (fhir.resources validates it).

Both carry the accession number, the triage category, the No Finding score, each
finding's probability (the highest over the study's processed images) with its call, the
models' identity (name, version, weight hash), and the notes the SR and result.json carry:
NOT FOR DIAGNOSTIC USE always, SYNTHETIC where a model was trained on synthetic data,
NEEDS REVIEW where a lung mask failed its quality check. A report that supersedes one this
destination already received is marked corrected (ORU OBR-25/OBX-11 "C"; FHIR status
"corrected", and conditional updates by identifier replace the earlier resources).

The FHIR resources are validated with fhir.resources' R4B models (R4 technical correction
4.3.0; fhir.resources ships no 4.0.1 models for pydantic 2): the DiagnosticReport and
Observation elements used here are the same in R4 and R4B.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
import uuid
from typing import Any

from hl7apy.core import Message

from cxrbatch.domain import Report, ReportedFinding

HL7_VERSION = "2.5"
# Local code system of the observation identifiers (HL7 table 0396: "99zzz" = local).
CODING_SYSTEM = "99CXR"
SERVICE = ("CXRBATCH", "Chest X-ray AI triage (cxrbatch)")
# FHIR identifier systems.
DICOM_UID_SYSTEM = "urn:dicom:uid"
REPORT_SYSTEM = "urn:cxrbatch:outcome"
FINDING_SYSTEM = "urn:cxrbatch:finding"
ACCESSION_TYPE = {
    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
}
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


def model_identity(model: dict[str, Any]) -> str:
    text = f"{model.get('name')} {model.get('version')} sha256:{model.get('sha256')}"
    return text + (" (SYNTHETIC training data)" if model.get("synthetic_training_data") else "")


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _hl7_time(value: dt.datetime) -> str:
    return _utc(value).strftime("%Y%m%d%H%M%S+0000")


def _hl7_text(value: str | None) -> str:
    """Free text in an HL7 field (HL7 2.5 section 2.7): the delimiters escaped (\\F\\,
    \\S\\, \\T\\, \\R\\, \\E\\), line breaks as spaces, and every other control or
    text-reordering character (NUL, the MLLP frame bytes 0x0B and 0x1C, U+202E ...)
    replaced by U+FFFD: nothing in a value can end a segment or an MLLP frame. (The
    hexadecimal escape \\Xhh\\ would keep them, but hl7apy, which builds and validates the
    message, re-escapes every escape sequence but the delimiters' and \\H\\ \\N\\.)"""
    if not value:
        return ""
    escapes = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
    out = []
    for char in value:
        if char in escapes:
            out.append(escapes[char])
        elif char in "\r\n":
            out.append(" ")
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            out.append("\ufffd")
        else:
            out.append(char)
    return "".join(out)


def _values(value: str | None) -> list[str]:
    """A header value's DICOM values (text joined by backslashes, as read): each becomes an
    HL7 repetition."""
    return value.split("\\") if value else []


def _call_flag(finding: ReportedFinding, report: Report) -> str:
    """OBX-8: A (abnormal: the call is positive), N (negative), empty when there is no call
    or the study needs review (never a silent normal)."""
    if finding.positive is None or report.needs_review:
        return ""
    return "A" if finding.positive else "N"


def oru_r01(
    report: Report,
    *,
    control_id: str,
    sending_application: str,
    sending_facility: str = "",
    receiving_application: str = "",
    receiving_facility: str = "",
    now: dt.datetime | None = None,
) -> str:
    """The ORU^R01 message (ER7, segments separated by CR), validated against HL7 2.5."""
    status = "C" if report.corrects_earlier else "F"
    message = Message("ORU_R01", version=HL7_VERSION, validation_level=2)
    msh = message.msh
    msh.msh_3 = _hl7_text(sending_application)
    msh.msh_4 = _hl7_text(sending_facility)
    msh.msh_5 = _hl7_text(receiving_application)
    msh.msh_6 = _hl7_text(receiving_facility)
    msh.msh_7 = _hl7_time(now or dt.datetime.now(dt.UTC))
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id
    msh.msh_11 = "P"
    msh.msh_18 = "UNICODE UTF-8"
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    patient = result.add_group("ORU_R01_PATIENT")
    patient.pid.pid_1 = "1"
    # A DICOM value with several values (a backslash in the header) becomes repetitions.
    for index, value in enumerate(_values(report.patient_id) or [""]):
        field = patient.pid.pid_3 if index == 0 else patient.pid.add_field("PID_3")
        field.value = _hl7_text(value)
    # A DICOM person name's components (family^given^...) are HL7 XPN's, in the same order.
    for index, name in enumerate(_values(report.patient_name) or [""]):
        field = patient.pid.pid_5 if index == 0 else patient.pid.add_field("PID_5")
        field.value = "^".join(_hl7_text(p) for p in name.split("^"))
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.orc.orc_1 = "RE"
    order.orc.orc_3 = _hl7_text(report.accession_number)
    obr = order.obr
    obr.obr_1 = "1"
    obr.obr_3 = _hl7_text(report.accession_number)  # filler order number: the accession
    obr.obr_4 = f"{SERVICE[0]}^{_hl7_text(SERVICE[1])}^{CODING_SYSTEM}"
    if report.study_date is not None:
        obr.obr_7 = report.study_date.strftime("%Y%m%d")
    obr.obr_18 = _hl7_text(report.accession_number)  # placer field 1 (IHE SWF: accession)
    obr.obr_20 = _hl7_text(report.study_instance_uid)  # filler field 1: the study
    obr.obr_22 = _hl7_time(report.created_at)
    obr.obr_24 = "RAD"
    obr.obr_25 = status
    for index, text in enumerate(report.notes, start=1):
        nte = order.add_segment("NTE")
        nte.nte_1 = str(index)
        nte.nte_2 = "L"
        nte.nte_3 = _hl7_text(text)
    rows: list[tuple[str, str, str, str, str]] = []  # value type, id^text, value, range, flag
    if report.triage:
        rows.append(("ST", "TRIAGE^Triage category", report.triage, "", ""))
    if report.no_finding_score is not None:
        rows.append(("NM", "NOFINDING^No Finding score", f"{report.no_finding_score:.4f}", "", ""))
    if report.screening_no_finding_score is not None:
        score = f"{report.screening_no_finding_score:.4f}"
        rows.append(("NM", "SCREENNF^Screening (M-50) No Finding score", score, "", ""))
    for finding in report.findings:
        label = finding.label.upper().replace(" ", "")
        limit = "" if finding.threshold is None else f"<{finding.threshold:.4f}"
        rows.append(
            (
                "NM",
                f"{_hl7_text(label)}^{_hl7_text(finding.label)} probability",
                f"{finding.probability:.4f}",
                limit,
                _call_flag(finding, report),
            )
        )
    for model in report.models:
        rows.append(("ST", "MODEL^Model identity", _hl7_text(model_identity(model)), "", ""))
    if report.needs_review:
        rows.append(("ST", "REVIEW^Needs review", "NEEDS REVIEW", "", ""))
    for index, (kind, code, value, limit, flag) in enumerate(rows, start=1):
        observation = order.add_group("ORU_R01_OBSERVATION")
        obx = observation.obx
        obx.obx_1 = str(index)
        obx.obx_2 = kind
        obx.obx_3 = f"{code}^{CODING_SYSTEM}"
        obx.obx_5 = value
        if kind == "NM":
            obx.obx_6 = "1^probability^UCUM" if "score" not in code else "1^score^UCUM"
        obx.obx_7 = limit
        obx.obx_8 = flag
        obx.obx_11 = status
        obx.obx_14 = _hl7_time(report.created_at)
    if not message.validate():  # raises on the first error at validation level 2
        raise ValueError("the ORU^R01 message did not validate")
    return str(message.to_er7())


# -- FHIR -------------------------------------------------------------------------------------


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _conditional(kind: str, system: str, value: str) -> dict[str, str]:
    """A conditional update: the resource with this identifier is replaced (or created)."""
    return {"method": "PUT", "url": f"{kind}?identifier={system}|{value}"}


def fhir_bundle(report: Report) -> dict[str, Any]:
    """A FHIR transaction Bundle: one Observation per finding (and the No Finding score,
    the triage category) and the DiagnosticReport that lists them. Validated here."""
    from fhir.resources.R4B.bundle import Bundle

    status = "corrected" if report.corrects_earlier else "final"
    issued = _utc(report.created_at).isoformat()
    texts = report.notes
    annotation = [{"text": t} for t in texts]
    device = {"display": "; ".join(model_identity(m) for m in report.models) or "cxrbatch"}
    subject = {"identifier": {"value": report.patient_id}} if report.patient_id else None
    study = {
        "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{report.study_instance_uid}"}
    }
    base = f"{report.study_instance_uid}"
    category = [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "imaging",
                }
            ]
        }
    ]
    observations: list[tuple[str, dict[str, Any], str]] = []

    def observe(code: str, text: str, value: dict[str, Any], extra: dict[str, Any]) -> None:
        identifier = f"{base}/{code}"
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "identifier": [{"system": FINDING_SYSTEM, "value": identifier}],
            "status": status,
            "category": category,
            "code": {"coding": [{"system": FINDING_SYSTEM, "code": code}], "text": text},
            "issued": issued,
            "device": device,
            "derivedFrom": [study],
            "note": annotation,
            **value,
            **extra,
        }
        if subject:
            resource["subject"] = subject
        observations.append((_urn(), resource, identifier))

    if report.triage:
        observe("triage", "Triage category", {"valueString": report.triage}, {})
    if report.no_finding_score is not None:
        observe(
            "no-finding", "No Finding score (1 - max p)", _quantity(report.no_finding_score), {}
        )
    if report.screening_no_finding_score is not None:
        observe(
            "screening-no-finding",
            "Screening (M-50) No Finding score",
            _quantity(report.screening_no_finding_score),
            {},
        )
    for finding in report.findings:
        extra: dict[str, Any] = {}
        flag = _call_flag(finding, report)
        if flag:
            code = "POS" if flag == "A" else "NEG"
            extra["interpretation"] = [
                {"coding": [{"system": INTERPRETATION_SYSTEM, "code": code}]}
            ]
        if finding.threshold is not None:
            extra["referenceRange"] = [
                {"high": {"value": finding.threshold}, "text": "operating threshold"}
            ]
        observe(
            finding.label.lower().replace(" ", "-"),
            f"{finding.label} probability",
            _quantity(finding.probability),
            extra,
        )
    identifiers: list[dict[str, Any]] = [{"system": REPORT_SYSTEM, "value": base}]
    if report.accession_number:
        identifiers.append({"type": ACCESSION_TYPE, "value": report.accession_number})
    diagnostic: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": identifiers,
        "status": status,
        "category": [
            {
                "coding": [
                    {"system": "http://loinc.org", "code": "LP29684-5", "display": "Radiology"}
                ]
            }
        ],
        "code": {
            "coding": [
                {
                    "system": "http://loinc.org",
                    "code": "18748-4",
                    "display": "Diagnostic imaging study",
                }
            ],
            "text": SERVICE[1],
        },
        "issued": issued,
        "performer": [device],
        "imagingStudy": [study],
        "result": [{"reference": url} for url, _, _ in observations],
        "conclusion": " ".join([f"Triage: {report.triage or 'none'}.", *texts]),
    }
    if subject:
        diagnostic["subject"] = subject
    if report.study_date is not None:
        diagnostic["effectiveDateTime"] = report.study_date.isoformat()
    entries = [
        {
            "fullUrl": url,
            "resource": resource,
            "request": _conditional("Observation", FINDING_SYSTEM, identifier),
        }
        for url, resource, identifier in observations
    ]
    entries.append(
        {
            "fullUrl": _urn(),
            "resource": diagnostic,
            "request": _conditional("DiagnosticReport", REPORT_SYSTEM, base),
        }
    )
    document = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    Bundle.model_validate(document)  # raises pydantic's ValidationError when it is not R4
    return document


def _quantity(value: float) -> dict[str, Any]:
    return {
        "valueQuantity": {
            "value": round(float(value), 6),
            "unit": "probability",
            "system": "http://unitsofmeasure.org",
            "code": "1",
        }
    }
