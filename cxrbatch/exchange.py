"""One exchange with a peer under one total deadline, whatever the protocol.

A timeout given to a socket, to requests or to pynetdicom bounds each read, not the
exchange: a peer that trickles one byte (or one C-FIND "pending") every half second keeps
an exchange alive for days. Here a `Deadline` bounds the whole of it:

    deadline(seconds, what)   a context in which every exchange of this thread must end
                              by then; nested deadlines (a request inside a pull run) take
                              the earliest
    sockets                   `adopt(sock)` gives a socket whose every send and receive
                              waits at most until the current deadline (MLLP; the HTTP
                              connections below are made of such sockets, TLS included)
    HTTP                      `http_session()`: requests, never following a redirect (a
                              3xx answer is a failed exchange with its reason; credentials
                              never reach another origin), every connection deadline-bound
    DIMSE                     `association_deadline(assoc, ...)`: pynetdicom's association
                              is aborted when the deadline passes (its reactor runs in its
                              own thread; a peer that keeps answering "pending" is cut off)

Written here because none of the kept libraries has a total deadline: requests and
urllib3 time each read (requests' docs say so), pynetdicom each message.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from cxrbatch.errors import PeerError, one_line, printable


class DeadlineExceeded(PeerError, TimeoutError):
    """An exchange did not end within its total deadline."""


class Redirected(PeerError):
    """A peer answered with a redirect, which a delivery or a pull never follows."""


class Deadline:
    """The moment an exchange must have ended by (monotonic clock)."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; DeadlineExceeded when none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(self.message)
        return left

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end

    @property
    def message(self) -> str:
        return f"{self.what}: not complete within its total deadline of {self.seconds:g} s"


_active = threading.local()


def _stack() -> list[Deadline]:
    if not hasattr(_active, "deadlines"):
        _active.deadlines = []
    return _active.deadlines  # type: ignore[no-any-return]


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[Deadline]:
    """Every exchange of this thread in the block ends within `seconds` (and within any
    enclosing deadline)."""
    bound = Deadline(seconds, what)
    stack = _stack()
    stack.append(bound)
    try:
        yield bound
    finally:
        stack.remove(bound)


def current() -> Deadline | None:
    """The earliest deadline in force on this thread, or None."""
    stack = _stack()
    return min(stack, key=lambda d: d.end) if stack else None


def left() -> float | None:
    """Seconds left under the current deadline (None: no deadline); DeadlineExceeded when
    it has passed."""
    bound = current()
    return None if bound is None else bound.left()


def expired() -> Deadline | None:
    """The deadline in force if it has passed (to name it in an error), else None."""
    bound = current()
    return bound if bound is not None and bound.expired else None


# -- sockets ---------------------------------------------------------------------------------


class _Bounded:
    """Mixed into a socket class: each I/O call waits at most until the current deadline
    (and never longer than the socket's own timeout)."""

    _own_timeout: float | None

    def _arm(self) -> None:
        remaining = left()
        if remaining is None:
            return
        own = self._own_timeout
        socket.socket.settimeout(self, remaining if own is None else min(own, remaining))  # type: ignore[arg-type]

    def settimeout(self, value: float | None) -> None:
        self._own_timeout = value
        socket.socket.settimeout(self, value)  # type: ignore[arg-type]

    def recv(self, *args: Any) -> Any:
        self._arm()
        return super().recv(*args)  # type: ignore[misc]

    def recv_into(self, *args: Any) -> Any:
        self._arm()
        return super().recv_into(*args)  # type: ignore[misc]

    def send(self, *args: Any) -> Any:
        self._arm()
        return super().send(*args)  # type: ignore[misc]

    def sendall(self, *args: Any) -> Any:
        self._arm()
        return super().sendall(*args)  # type: ignore[misc]


class BoundedSocket(_Bounded, socket.socket):
    pass


class BoundedSSLSocket(_Bounded, ssl.SSLSocket):
    def read(self, *args: Any) -> Any:
        self._arm()
        return super().read(*args)

    def write(self, *args: Any) -> Any:
        self._arm()
        return super().write(*args)


def adopt(sock: socket.socket) -> BoundedSocket:
    """The same connection as a deadline-bound socket (`sock` is detached)."""
    timeout = sock.gettimeout()
    bounded = BoundedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    bounded.settimeout(timeout)
    return bounded


def bounded_ssl_context(ca_file: str = "") -> ssl.SSLContext:
    """A client TLS context (the system's CAs, or `ca_file`) whose sockets are bounded."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        context.load_verify_locations(ca_file)
    context.sslsocket_class = BoundedSSLSocket
    return context


# -- HTTP ------------------------------------------------------------------------------------


class _Connection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return adopt(super()._new_conn())


class _TlsConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return adopt(super()._new_conn())


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TlsPool(HTTPSConnectionPool):
    ConnectionCls = _TlsConnection


class _Adapter(HTTPAdapter):
    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}
        self.poolmanager.key_fn_by_scheme = dict(self.poolmanager.key_fn_by_scheme)

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        # requests' timeout bounds the connect and each read; both shrink to what is left.
        remaining = left()
        if remaining is not None:
            timeout = kwargs.get("timeout")
            if isinstance(timeout, tuple):
                connect, read = timeout
            else:
                connect = read = timeout
            kwargs["timeout"] = (
                _min(connect, remaining),
                _min(read, remaining),
            )
        return super().send(request, *args, **kwargs)


def _min(value: float | None, remaining: float) -> float:
    return remaining if value is None else min(float(value), remaining)


class BoundedSession(requests.Session):
    """requests' Session that follows no redirect (the 3xx answer comes back and
    `refuse_redirects` turns it into `Redirected`) and whose connections are bounded by
    the current deadline."""

    def __init__(self, ca_file: str = "") -> None:
        super().__init__()
        adapter = _Adapter(bounded_ssl_context(ca_file))
        self.mount("http://", adapter)
        self.mount("https://", adapter)
        self.hooks["response"].append(refuse_redirects)
        self.trust_env = False  # no proxies or .netrc credentials from the environment

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        return None  # never followed


def refuse_redirects(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    if 300 <= response.status_code < 400:
        where = response.headers.get("Location", "")
        response.close()
        raise Redirected(
            f"{response.request.method} {response.url} answered HTTP {response.status_code} "
            f"redirecting to {printable(where, 200) or '(no Location)'}: redirects are not "
            "followed (the configured URL must be the endpoint itself)"
        )


def http_session(
    username: str = "", password: str | None = None, ca_file: str = ""
) -> BoundedSession:
    """A session for one peer: basic auth when `username`, TLS verified (system CAs or
    `ca_file`), no redirects, bounded by the current deadline."""
    session = BoundedSession(ca_file)
    if username:
        session.auth = (username, password or "")
    return session


def http_failure(exc: BaseException, what: str) -> str:
    """One line saying why an HTTP exchange failed (the deadline, a redirect, the peer's
    status and answer, or the connection), without the peer's control characters."""
    bound = expired()
    if bound is not None and isinstance(exc, (requests.Timeout, requests.ConnectionError)):
        return bound.message
    if isinstance(exc, (Redirected, DeadlineExceeded)):
        return str(exc)
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        answer = exc.response
        return f"{what}: HTTP {answer.status_code} {answer.reason}: {printable(answer.text[:300])}"
    if isinstance(exc, requests.Timeout):
        return f"{what}: no answer in time ({one_line(exc)[:200]})"
    if isinstance(exc, requests.ConnectionError):
        return f"{what}: connection failed ({one_line(exc)[:200]})"
    return f"{what}: {one_line(exc)[:300]}"


# -- DIMSE ----------------------------------------------------------------------------------


@contextlib.contextmanager
def association_deadline(assoc: Any) -> Iterator[None]:
    """Abort `assoc` (pynetdicom) when the current deadline passes; the caller sees the
    association aborted (an empty status) and `expired()` names the deadline."""
    remaining = left()
    if remaining is None:
        yield
        return
    timer = threading.Timer(max(0.0, remaining), _abort, args=(assoc,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _abort(assoc: Any) -> None:
    with contextlib.suppress(Exception):
        if assoc.is_established:
            assoc.abort()
        # A thread waiting for the peer's next DIMSE message (a C-FIND or C-MOVE response)
        # waits out its per-message timeout after a local abort; pynetdicom wakes it with
        # (None, None) when the peer aborts (fsm AA-2..AA-4): the same, for ours.
        assoc.dimse.msg_queue.put((None, None))


def seconds_left(default: float) -> float:
    """`default` capped by the current deadline (a per-message timeout for a library that
    only has those)."""
    remaining = left()
    return default if remaining is None else max(0.001, min(default, remaining))


__all__ = [
    "BoundedSession",
    "Deadline",
    "DeadlineExceeded",
    "Redirected",
    "adopt",
    "association_deadline",
    "current",
    "deadline",
    "expired",
    "http_failure",
    "http_session",
    "left",
    "seconds_left",
]
