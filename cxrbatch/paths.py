"""Turning untrusted values (UIDs, tag values) into safe path components."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_UID_CHARS = re.compile(r"[^\d.]")
_VALID_UID = re.compile(r"^\d+(\.\d+)*$")


def uid_path_component(uid: str) -> str:
    """Return a file-name-safe component for a UID, never '.', '..' or empty.

    A well-formed UID (digits and dots, at most 64 characters) is used as it is. Anything
    else is replaced by a digest so that no tag value can steer a path.
    """
    text = str(uid).strip().rstrip("\x00")
    if _VALID_UID.match(text) and len(text) <= 64:
        return text
    cleaned = _UID_CHARS.sub("_", text).strip("._")[:40]
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"invalid_{cleaned}_{digest}" if cleaned else f"invalid_{digest}"


def inside(root: Path, candidate: Path) -> Path:
    """Return `candidate` resolved, raising ValueError if it escapes `root`."""
    root_resolved = root.resolve()
    resolved = candidate.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise ValueError(f"Expected a path inside {root_resolved}, found {resolved}.")
    return resolved
