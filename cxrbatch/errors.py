"""One exception tree for the whole product.

An instance that is fine DICOM but not a frontal chest radiograph is not an error: selection
records it as ineligible with its reason. `InputError` means the input itself is bad
(unreadable, truncated, not DICOM); such files are quarantined with the reason. Everything
else is a failure of ours.
"""

from __future__ import annotations

import unicodedata


class CxrBatchError(Exception):
    """Base class of every error cxrbatch raises on purpose."""


class PeerError(CxrBatchError):
    """An exchange with another system failed. The message may quote that system's answer:
    it is kept on one line of printable text (`printable`), so a peer cannot forge log
    lines or hide text with control characters."""

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(printable(message), *args)


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


# Characters shown as escapes: C0/C1 controls (CR, LF, NUL, the MLLP frame bytes ...) and the
# format characters that reorder or hide text (bidirectional overrides and isolates, zero
# width marks).
_SHOWN_AS_ESCAPES = {"Cc", "Cf", "Zl", "Zp"}


def printable(text: str, limit: int | None = None) -> str:
    """`text` on one line with every control or text-reordering character written as an
    escape (`\\r`, `\\x00`, `\\u202e`); at most `limit` characters."""
    out = []
    for char in text:
        if unicodedata.category(char) in _SHOWN_AS_ESCAPES and char != "\t":
            code = ord(char)
            named = {"\r": "\\r", "\n": "\\n"}.get(char)
            out.append(named or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"))
        else:
            out.append(" " if char == "\t" else char)
    line = "".join(out)
    if limit is not None and len(line) > limit:
        return line[: limit - 3] + "..."
    return line
