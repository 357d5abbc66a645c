"""Who is asking: local users (HTTP Basic, argon2 hashes) or a trusted reverse proxy's
header. `cxrbatch serve` refuses to listen beyond loopback without one of them.

An anonymous request (only possible on loopback with no authentication configured) sees
the worklist and the study pages without patient data: no names, IDs or accession
numbers. Every view of a study page and every export is audited with the user's name
("anonymous" on loopback).
"""

from __future__ import annotations

from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from cxrbatch.config import WebSettings
from cxrbatch.errors import ConfigError
from cxrbatch.network import is_loopback

_HASHER = PasswordHasher()


def hash_password(password: str) -> str:
    """An argon2id hash for [[web.users]] (`cxrbatch web-password`)."""
    return _HASHER.hash(password)


@dataclass(frozen=True)
class User:
    name: str
    authenticated: bool  # False: anonymous on loopback (no patient data shown)


ANONYMOUS = User("anonymous", authenticated=False)


def check_binding(settings: WebSettings, host: str) -> None:
    """Beyond loopback only with authentication configured."""
    if not is_loopback(host) and not settings.authentication:
        raise ConfigError(
            f"cxrbatch serve on {host} is reachable from other hosts and no authentication "
            "is configured: add [[web.users]] (cxrbatch web-password) or "
            "web.trusted_proxy_header, or bind 127.0.0.1"
        )


class Authenticator:
    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self.users = {u.name: u.password_hash for u in settings.users}
        self.proxies = {p.strip() for p in settings.trusted_proxies}

    @property
    def required(self) -> bool:
        return self.settings.authentication

    def user(
        self, credentials: tuple[str, str] | None, client: str | None, proxied: str | None
    ) -> User | None:
        """The request's user; ANONYMOUS when no authentication is configured; None when it
        is configured and the request does not satisfy it. `credentials`: the HTTP Basic
        name and password (fastapi.security.HTTPBasic parses the header)."""
        if not self.required:
            return ANONYMOUS
        if self.settings.trusted_proxy_header and proxied and client in self.proxies:
            return User(proxied.strip()[:64], authenticated=True)
        if credentials is not None and self.users:
            name, password = credentials
            stored = self.users.get(name)
            if stored is None:
                _verify(_DUMMY, password)  # the same time for an unknown name
                return None
            if _verify(stored, password):
                return User(name, authenticated=True)
        return None


def _verify(stored: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


_DUMMY = _HASHER.hash("not a password of anyone")
