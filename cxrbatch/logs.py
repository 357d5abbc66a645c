"""Logging set-up: human text or one JSON object per line. No patient data at INFO.

cxrbatch logs UIDs, never names, IDs or birth dates. pydicom's own value-validation
warnings (which can quote element values such as PatientName) are silenced.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import sys
import warnings

import pydicom.config


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            document.update(extra)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


def report_native_crashes() -> None:
    """A crash in native code (a library's segmentation fault) prints every thread's Python
    stack on stderr, into the service's log, instead of leaving no trace. A fault handler
    already on (pytest's, `python -X faulthandler`, PYTHONFAULTHANDLER) is left as it is:
    enabling it again would point it at whatever sys.stderr is now, which inside a test run
    is a capture file that a crashing process never shows."""
    if not faulthandler.is_enabled():
        faulthandler.enable()


def configure(level: str = "INFO", fmt: str = "text") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    quiet_third_party()
    # pynetdicom logs every request's identifier (patient attributes of a query or a
    # retrieve) at INFO: only at DEBUG here.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


def quiet_third_party() -> None:
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # dicomweb-client wraps its requests in `retrying`, which logs each failed attempt with
    # a multi-line traceback at WARNING; cxrbatch logs the failure itself, on one line.
    logging.getLogger("retrying").setLevel(logging.ERROR)
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
    warnings.filterwarnings("ignore", module="pydicom")
    warnings.filterwarnings("ignore", module="highdicom")
