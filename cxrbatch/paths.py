"""Turning untrusted values (UIDs, tag values) into safe path components, and where
cxrbatch keeps its database, quarantine and spool under the output folder."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cxrbatch.config import Settings

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


def is_inside(root: Path, candidate: Path) -> bool:
    """Whether `candidate`, symbolic links resolved, is `root` or below it."""
    root_resolved = root.resolve()
    resolved = candidate.resolve()
    return resolved == root_resolved or root_resolved in resolved.parents


def inside(root: Path, candidate: Path) -> Path:
    """Return `candidate` resolved, raising ValueError if it escapes `root`."""
    if not is_inside(root, candidate):
        raise ValueError(f"Expected a path inside {root.resolve()}, found {candidate.resolve()}.")
    return candidate.resolve()


# ---- where cxrbatch keeps things under the output folder ---------------------------------


def database_url(settings: Settings, out_dir: Path) -> str:
    """The configured SQLAlchemy URL, or the SQLite file OUT/cxrbatch.sqlite."""
    return settings.database.url or f"sqlite:///{(out_dir / 'cxrbatch.sqlite').resolve()}"


def quarantine_dir(settings: Settings, out_dir: Path) -> Path:
    return (
        Path(settings.output.quarantine_dir)
        if settings.output.quarantine_dir
        else (out_dir / "_quarantine")
    )


def spool_dir(settings: Settings, out_dir: Path) -> Path:
    return Path(settings.ingest.spool_dir) if settings.ingest.spool_dir else out_dir / "_spool"


def incoming_dir(out_dir: Path) -> Path:
    """Where the DICOM receiver writes an instance before it is taken into the spool."""
    return out_dir / "_incoming"


def check_outside_input(settings: Settings, input_dir: Path, out_dir: Path) -> None:
    """Refuse an output, spool or quarantine folder inside the input folder: what cxrbatch
    writes there (SEG, SR, its database, spooled copies) would be read back as input and
    quarantined or processed again."""
    from cxrbatch.errors import ConfigError

    for name, folder in (
        ("output folder", out_dir),
        ("spool folder (ingest.spool_dir)", spool_dir(settings, out_dir)),
        ("quarantine folder (output.quarantine_dir)", quarantine_dir(settings, out_dir)),
    ):
        if is_inside(input_dir, folder):
            raise ConfigError(
                f"the {name} {folder.resolve()} is inside the input folder "
                f"{input_dir.resolve()}: its files would be read back as input; choose a "
                "folder outside the input"
            )


# ---- paths as the database keeps them ----------------------------------------------------


@dataclass(frozen=True)
class StorageRoots:
    """The site's folders that paths in the database are relative to, so that a worker on
    another host may mount the shared storage anywhere (`Site.roots`).

    A stored path reads `<root>:<relative path>` (`output:1.2.3/sr.dcm`,
    `spool:1.2.3/4.5.6.dcm`, `quarantine:ab12....bin`) when it lies under a root (the
    deepest one: the spool under the output root is `spool:`), else it is kept absolute
    (an export folder read in place, an input folder of `cxrbatch process`).
    """

    output: Path
    spool: Path
    quarantine: Path

    def _named(self) -> list[tuple[str, Path]]:
        roots = [("output", self.output), ("spool", self.spool), ("quarantine", self.quarantine)]
        named = [(name, Path(os.path.abspath(root))) for name, root in roots]
        return sorted(named, key=lambda item: len(item[1].parts), reverse=True)

    def store(self, path: Path | str) -> str:
        absolute = Path(os.path.abspath(path))
        for name, root in self._named():
            if absolute == root or root in absolute.parents:
                return f"{name}:{absolute.relative_to(root).as_posix()}"
        return str(absolute)

    def resolve(self, stored: str) -> Path:
        return resolve_stored(stored, self)


_STORED = re.compile(r"^(output|spool|quarantine):(.*)$", re.DOTALL)


def store_path(path: Path | str, roots: StorageRoots | None) -> str:
    """`path` as the database keeps it: relative to a root of `roots`, or absolute (always
    absolute without roots)."""
    return roots.store(path) if roots is not None else str(Path(os.path.abspath(path)))


def resolve_stored(stored: str, roots: StorageRoots | None) -> Path:
    """A stored path on this host: `<root>:<relative>` under that root, absolute as it is.

    Raises ValueError for a relative stored path without the roots to resolve it, or one
    that would leave its root."""
    match = _STORED.match(stored)
    if match is None:
        return Path(stored)
    if roots is None:
        raise ValueError(f"Expected the site's storage roots to resolve {stored!r}.")
    root = Path(getattr(roots, match.group(1)))
    candidate = root / match.group(2)
    if not is_inside(root, candidate):
        raise ValueError(f"Expected a path inside {root}, found {stored!r}.")
    return candidate
