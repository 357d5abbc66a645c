"""One exception tree for the whole product.

`NotEligible` means "skip and record": the input is fine DICOM but not a frontal chest
radiograph. `InputError` means the input itself is bad (unreadable, truncated, not DICOM);
such files are quarantined with the reason. Everything else is a failure of ours.
"""

from __future__ import annotations


class CxrBatchError(Exception):
    """Base class of every error cxrbatch raises on purpose."""


class ConfigError(CxrBatchError):
    """The configuration is invalid or names something that does not exist."""


class InputError(CxrBatchError):
    """An input file cannot be used: not DICOM, truncated, undecodable. Quarantine it."""


class NotEligible(CxrBatchError):
    """A readable instance that this product does not process (other modality, lateral...)."""


class ModelError(CxrBatchError):
    """A model or model bundle is missing, corrupt or inconsistent."""


class OutputError(CxrBatchError):
    """An output object could not be built or written."""


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
