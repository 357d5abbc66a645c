"""One exception tree for the whole product.

An instance that is fine DICOM but not a frontal chest radiograph is not an error: selection
records it as ineligible with its reason. `InputError` means the input itself is bad
(unreadable, truncated, not DICOM); such files are quarantined with the reason. Everything
else is a failure of ours.
"""

from __future__ import annotations


class CxrBatchError(Exception):
    """Base class of every error cxrbatch raises on purpose."""


class ConfigError(CxrBatchError):
    """The configuration is invalid or names something that does not exist."""


class InputError(CxrBatchError):
    """An input file cannot be used: not DICOM, truncated, undecodable. Quarantine it."""


class ModelError(CxrBatchError):
    """A model or model bundle is missing, corrupt or inconsistent."""


class OutputError(CxrBatchError):
    """An output object could not be built or written."""


class DatabaseNotReady(CxrBatchError):
    """There is no results database where one was named, or its schema is not the one this
    code expects (older: run `cxrbatch db upgrade`; newer: upgrade cxrbatch)."""


class RecordingError(CxrBatchError):
    """A study's outcome could not be recorded (the results database is full, gone or
    read-only): the batch stops instead of processing studies it cannot record."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters: what is stored as a
    reason (the whole text and the traceback go to the log at debug level)."""
    text = str(exc).strip().splitlines()
    message = text[0].strip() if text else ""
    line = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
