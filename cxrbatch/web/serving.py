"""Serving the web app with uvicorn, one way for `cxrbatch serve` and `watch`'s thread.

the socket is bound first: a port in use is one line (ConfigError, exit 2), before
anything says the app is up
uvicorn's proxy headers are off: the client address is the peer's, so the address a
trusted reverse proxy connects from is what `web.trusted_proxies` is checked against
(uvicorn's default rewrites it from X-Forwarded-For, and a proxy that adds that header
would lock every trusted-header user out)
"""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from cxrbatch.errors import ConfigError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; ConfigError with one line when it cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"web app: cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ConfigError(f"web app: cannot listen on {host}:{port}: {reason}") from exc
    sock.set_inheritable(True)
    return sock


def server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,  # our logging (logs.configure): no patient data at INFO
            access_log=True,
            proxy_headers=False,
        )
    )
