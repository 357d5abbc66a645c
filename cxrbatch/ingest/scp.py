"""The DICOM C-STORE receiver (pynetdicom): PACS push studies to cxrbatch.

    association request -> allowed host? calling AE title (pynetdicom's
                           require_calling_aet)? else A-ASSOCIATE-RJ, logged with the
                           calling AE title and the host
    C-STORE of a C-MOVE -> (Move Originator AE Title: a `cxrbatch pull` of this site) the
                           instance must belong to a series that pull asked for (the
                           `retrievals` table), else it is quarantined as "not requested"
                           and answered 0xC002; a receiver a pull runs for itself is
                           strict: every instance must belong to an open retrieval
    C-ECHO              -> success
    C-STORE             -> the encoded data set, with its file meta information, written
                           to OUT/_incoming/ (temporary file, fsync, rename) -> Spool.take
                           (the folder watcher's way in: dedupe, conflicts, quarantine,
                           spool, instance row, study queued) -> status

An instance is acknowledged with Success only once it is in the spool and recorded (or was
already: an identical duplicate). Unusable data sets are quarantined with their reason and
answered 0xC000 (cannot understand); a conflicting one (same SOP Instance UID, other
content) is quarantined and answered 0xC001; a local failure (disk full, database away)
is answered 0xA700 (out of resources), so the sender keeps the instance and retries.
Files a crash left in OUT/_incoming/ were never acknowledged; `recover` takes them in at
start (if the sender sends again, the copy is an identical duplicate and is dropped).

Storage SOP classes: every storage SOP class pynetdicom knows, every transfer syntax it
knows (data sets are stored as received); selection decides later what is processed.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cxrbatch.config import DicomSettings
from cxrbatch.db import retrievals
from cxrbatch.dicom import status
from cxrbatch.domain import InstanceHeader
from cxrbatch.errors import ConfigError, one_line
from cxrbatch.files import atomic_write
from cxrbatch.ingest.spool import Expectation, Spool, Taken
from cxrbatch.network import is_loopback

log = logging.getLogger(__name__)

# The statuses answered (cxrbatch/dicom/status.py describes them, for senders too).
SUCCESS, OUT_OF_RESOURCES = status.SUCCESS, status.OUT_OF_RESOURCES
CANNOT_UNDERSTAND, CONFLICT = status.CANNOT_UNDERSTAND, status.CONFLICT
NOT_REQUESTED = status.NOT_REQUESTED

_STATUS = {
    Taken.RECEIVED: SUCCESS,
    Taken.DUPLICATE: SUCCESS,
    Taken.CORRECTED: SUCCESS,
    Taken.REJECTED: CANNOT_UNDERSTAND,
    Taken.CONFLICT: CONFLICT,
    Taken.NOT_REQUESTED: NOT_REQUESTED,
    Taken.CHANGED: OUT_OF_RESOURCES,
    Taken.GONE: OUT_OF_RESOURCES,
}

# A-ASSOCIATE-RJ for a host not allowed: rejected-permanent (1), by the service user (1),
# "no reason given" (1). (An unknown calling AE title is pynetdicom's own rejection, with
# the diagnostic "calling AE title not recognised".)
_REJECT_PERMANENT, _SERVICE_USER, _NO_REASON = 0x01, 0x01, 0x01


def _networks(hosts: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        return [ipaddress.ip_network(h, strict=False) for h in hosts]
    except ValueError as exc:
        raise ConfigError(f"dicom.allowed_hosts: {exc}") from exc


def _ssl_context(settings: DicomSettings) -> ssl.SSLContext | None:
    if not (settings.tls_certificate or settings.tls_key):
        return None
    if not (settings.tls_certificate and settings.tls_key):
        raise ConfigError("dicom.tls_certificate and dicom.tls_key go together.")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_certificate, settings.tls_key)
        if settings.tls_ca_certificates:
            context.load_verify_locations(settings.tls_ca_certificates)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"dicom TLS files cannot be used: {exc}") from exc
    return context


class DicomReceiver:
    """A Storage and Verification SCP whose every instance goes through `Spool.take`."""

    def __init__(
        self, settings: DicomSettings, spool: Spool, incoming: Path, *, strict: bool = False
    ) -> None:
        """`strict`: the receiver a pull runs for its own C-MOVEs; every instance must
        belong to one of the open retrievals."""
        self.settings = settings
        self.strict = strict
        self.spool = spool
        self.incoming = incoming
        self._networks = _networks(settings.allowed_hosts)
        self._titles = {t.strip() for t in settings.allowed_calling_ae_titles}
        self._ssl = _ssl_context(settings)
        if not is_loopback(settings.bind_address) and not self._networks and not settings.allow_any:
            raise ConfigError(
                f"dicom.bind_address {settings.bind_address} is reachable from other hosts and "
                "dicom.allowed_hosts is empty: list the hosts allowed to send (e.g. "
                "['10.1.2.0/24']), or set dicom.allow_any = true to accept any host"
            )
        self._lock = threading.Lock()  # one take at a time: takes are short, rows consistent
        self._server: Any = None

    def recover(self) -> int:
        """Take in files a crash left in the incoming folder (never acknowledged)."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        recovered = 0
        for path in sorted(self.incoming.iterdir()):
            if path.name.startswith("."):
                path.unlink(missing_ok=True)  # a half-written temporary: never acknowledged
            elif path.is_file() and self.spool.take(path) is Taken.RECEIVED:
                recovered += 1
        if recovered:
            log.warning("recovered %d received instance(s) left by a crash", recovered)
        return recovered

    def start(self) -> None:
        self.recover()
        ae = AE(ae_title=self.settings.ae_title)
        ae.require_called_aet = self.settings.require_called_ae_title
        ae.require_calling_aet = sorted(self._titles)
        ae.maximum_associations = self.settings.max_associations
        ae.network_timeout = self.settings.network_timeout_seconds
        ae.acse_timeout = self.settings.network_timeout_seconds
        ae.dimse_timeout = self.settings.network_timeout_seconds
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        if not self._titles and not self._networks:
            log.warning("the DICOM receiver accepts associations from any AE title and host")
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        address = (self.settings.bind_address, self.settings.port)
        try:
            self._server = ae.start_server(
                address, block=False, evt_handlers=handlers, ssl_context=self._ssl
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address[0]}:{address[1]}: {exc}") from exc
        log.info(
            "DICOM receiver %s listening on %s:%d%s",
            self.settings.ae_title,
            *address,
            " (TLS)" if self._ssl else "",
        )

    def stop(self) -> None:
        """Stop accepting; associations in progress are ended (their last instance is not
        acknowledged unless it was taken, so the sender keeps it)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- handlers (pynetdicom's threads) -----------------------------------------------------

    def _allowed_host(self, address: str) -> bool:
        if not self._networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        requestor = assoc.requestor
        # The request primitive: the requestor's own fields are filled only after this.
        primitive = requestor.primitive
        title = str(primitive.calling_ae_title if primitive else "").strip()
        host = requestor.address
        if not self._allowed_host(host):
            log.warning(
                "association from %s (calling AE title %r) rejected: the host is not in "
                "dicom.allowed_hosts",
                host,
                title,
            )
            # As pynetdicom's own negotiation rejects: A-ASSOCIATE-RJ, then the connection
            # is closed (no negotiation, no abort).
            assoc.acse.send_reject(_REJECT_PERMANENT, _SERVICE_USER, _NO_REASON)
            assoc.is_rejected = True
            assoc.is_established = False
            assoc.kill()
        elif self._titles and title not in self._titles:
            # pynetdicom rejects it next (require_calling_aet); say who it was.
            log.warning(
                "association from %s rejected: calling AE title %r is not in "
                "dicom.allowed_calling_ae_titles",
                host,
                title,
            )

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        originator = str(getattr(event.request, "MoveOriginatorApplicationEntityTitle", "") or "")
        sender = str(event.assoc.requestor.ae_title or "")
        return self.answer(self.take_event(event, self._retrieval_check(sender, originator)))

    def _retrieval_check(self, sender: str, originator: str) -> Expectation | None:
        """For a C-STORE of a pull's C-MOVE (or any, when strict): the instance must be of
        a series that pull asked for."""
        if not originator.strip() and not self.strict:
            return None
        sessions = self.spool.sessions

        def expect(header: InstanceHeader) -> str | None:
            with sessions.begin() as session:
                return retrievals.verdict(
                    session,
                    sender,
                    originator.strip() or None,
                    header.study_instance_uid,
                    header.series_instance_uid,
                    strict=self.strict,
                )

        return expect

    def take_event(self, event: evt.Event, expect: Expectation | None = None) -> Taken | None:
        """Take a C-STORE request's data set in (also a C-GET's sub-operations, on a pull's
        association); None when it could not be taken (a local failure, logged)."""
        return self.take_data(lambda: event.encoded_dataset(include_meta=True), expect)

    def take_data(
        self, encode: Callable[[], bytes], expect: Expectation | None = None
    ) -> Taken | None:
        """Take in one instance, as the Part 10 bytes `encode` gives (a C-STORE's data set,
        an instance fetched by WADO-RS): written to the incoming folder, then `Spool.take`
        (with `expect`: refused and quarantined when not what was asked for)."""
        path = self.incoming / f"{uuid.uuid4().hex}.dcm"
        try:
            data = encode()
            atomic_write(path, lambda handle: handle.write(data))
            with self._lock:
                taken = self.spool.take(path, expect)
        except Exception as exc:  # never let one instance take the receiver down
            log.error("received instance not taken in (answered 0xA700): %s", one_line(exc))
            log.debug("received instance not taken in", exc_info=True)
            path.unlink(missing_ok=True)
            return None
        if taken not in (Taken.RECEIVED, Taken.CORRECTED):
            path.unlink(missing_ok=True)  # duplicate dropped; rejects are in the quarantine
        return taken

    @staticmethod
    def answer(taken: Taken | None) -> int:
        """The C-STORE status for what became of an instance."""
        code = OUT_OF_RESOURCES if taken is None else _STATUS[taken]
        if code != SUCCESS and taken is not None:
            log.info("instance answered %s", status.describe(code, ours=True))
        return code
