"""One site context: what a cxrbatch installation is, resolved once per command (cli.py).

    settings       the validated Settings (defaults < --config < environment < flags)
    out_dir        the output root: OUT/<StudyInstanceUID>/..., and by default the SQLite
                   database, the spool, the quarantine and the receiver's incoming folder
    database_url   the configured URL, or OUT/cxrbatch.sqlite

It is plain data, so that it crosses into worker processes as it is (spawn); each process
opens its own engine from it (`Site.database`), since engines and sessions cannot cross.
Everything that used to thread `(settings, out_dir, url)` takes a Site instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from cxrbatch.config import Settings
from cxrbatch.db.session import Database
from cxrbatch.paths import (
    StorageRoots,
    database_url,
    incoming_dir,
    quarantine_dir,
    spool_dir,
)


@dataclass(frozen=True)
class Site:
    settings: Settings
    out_dir: Path
    database_url: str

    @classmethod
    def at(cls, settings: Settings, out_dir: Path) -> Site:
        """The site whose outputs live under `out_dir` (made absolute: the paths recorded
        and the processes started must not depend on a working directory)."""
        out = Path(out_dir).absolute()
        return cls(settings, out, database_url(settings, out))

    @property
    def quarantine_dir(self) -> Path:
        return quarantine_dir(self.settings, self.out_dir)

    @property
    def spool_dir(self) -> Path:
        return spool_dir(self.settings, self.out_dir)

    @property
    def incoming_dir(self) -> Path:
        return incoming_dir(self.out_dir)

    @property
    def roots(self) -> StorageRoots:
        """The folders the database's paths are relative to (paths.StorageRoots)."""
        return StorageRoots(self.out_dir, self.spool_dir, self.quarantine_dir)

    def with_settings(self, settings: Settings) -> Site:
        """The same site with other settings (e.g. one study in flight per worker)."""
        return replace(self, settings=settings)

    def database(self, *, readonly: bool = False, existing: bool = False) -> Database:
        """An engine and its sessions on the site's database, for this process (close it,
        or use it as a context manager). `existing`: the database must exist with this
        code's schema (`db.session.open_existing`); `readonly`: nothing can be written."""
        return Database(self.database_url, readonly=readonly, existing=existing)
