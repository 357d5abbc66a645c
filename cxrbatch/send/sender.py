"""The sender: claims due deliveries and sends them, until stopped or none is due.

`cxrbatch watch` runs it in a thread beside ingest; `cxrbatch process` runs one pass
after its batch; `cxrbatch send` runs one pass on demand (cron, after an outage).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter

from cxrbatch.config import Destination, Settings
from cxrbatch.db import Sessions, deliveries, reads
from cxrbatch.db.leased import new_owner
from cxrbatch.db.models import utcnow
from cxrbatch.domain import DeliveryRunStatus, DeliveryStatus, NotAccepted
from cxrbatch.errors import one_line
from cxrbatch.paths import StorageRoots
from cxrbatch.send import messages
from cxrbatch.send.transports import SendError, fhir_transaction, mllp, send

log = logging.getLogger(__name__)


def _ended(status: DeliveryStatus | None) -> DeliveryRunStatus:
    return DeliveryRunStatus.LOST if status is None else DeliveryRunStatus(status.value)


class Sender:
    def __init__(
        self, settings: Settings, sessions: Sessions, roots: StorageRoots | None = None
    ) -> None:
        """`roots`: the site's storage roots, to find the files of relative stored paths."""
        self.settings = settings
        self.sessions = sessions
        self.roots = roots
        self.destinations = {d.name: d for d in settings.send.destinations}
        self.policy = deliveries.retry_policy(settings.send)
        self.owner = new_owner()

    def send_due(self, stop: threading.Event | None = None) -> Counter[str]:
        """Send every due delivery once; returns how many ended in each status."""
        ended: Counter[str] = Counter()
        started = utcnow()
        lease = self.settings.send.lease_seconds
        while stop is None or not stop.is_set():
            claimed = deliveries.claim(
                self.sessions, self.owner, lease, due_by=started, roots=self.roots
            )
            if claimed is None:
                break
            status = self.deliver(claimed)
            ended[_ended(status)] += 1
        return ended

    def deliver(self, claimed: deliveries.DeliveryClaim) -> DeliveryStatus | None:
        destination = self.destinations.get(claimed.destination)
        error: str | None = None
        not_accepted: list[NotAccepted] = []
        if destination is None:
            error = f"destination {claimed.destination!r} is no longer configured"
        else:
            try:
                if destination.sends_report:
                    self._send_report(destination, claimed)
                else:
                    not_accepted = send(
                        destination, claimed.files, self._calling_ae_title(destination)
                    )
            except SendError as exc:
                error = str(exc)
            except Exception as exc:  # one delivery must never stop the sender
                log.exception("delivery %d failed", claimed.delivery_id)
                error = f"internal error: {one_line(exc)}"
        status = deliveries.finish(self.sessions, claimed, self.policy, error, not_accepted)
        if not_accepted and error is None:
            log.warning(
                "study %s: %s does not accept %d object(s), not sent (%s): leave that kind "
                "out of its `objects`",
                claimed.study_instance_uid,
                claimed.destination,
                len(not_accepted),
                "; ".join(sorted({n.reason for n in not_accepted})),
            )
        fields = {
            "event": "delivery",
            "delivery_id": claimed.delivery_id,
            "study_instance_uid": claimed.study_instance_uid,
            "destination": claimed.destination,
            "objects": 1 if destination and destination.sends_report else len(claimed.files),
            "attempt": claimed.attempts,
            "status": _ended(status),
            "error": error,
        }
        if error is None:
            log.info(
                "study %s: %d object(s) sent to %s",
                claimed.study_instance_uid,
                fields["objects"],
                claimed.destination,
                extra={"fields": fields},
            )
        else:
            log.warning(
                "study %s: delivery to %s %s (attempt %d): %s",
                claimed.study_instance_uid,
                claimed.destination,
                _ended(status),
                claimed.attempts,
                error,
                extra={"fields": fields},
            )
        return status

    def _send_report(self, destination: Destination, claimed: deliveries.DeliveryClaim) -> None:
        """The outcome's report, as HL7 ORU^R01 over MLLP or a FHIR transaction Bundle."""
        try:
            if claimed.outcome_id is None:
                raise LookupError(f"delivery {claimed.delivery_id}: its outcome is gone")
            with self.sessions() as session:
                report = reads.report(
                    session, claimed.outcome_id, claimed.study_instance_uid, claimed.destination
                )
        except LookupError as exc:
            raise SendError(str(exc)) from exc
        if destination.transport == "hl7-mllp":
            # MSH-10: unique per attempt, as the ACK's MSA-2 must echo it.
            control_id = f"CXR{claimed.delivery_id}.{claimed.attempts}.{uuid.uuid4().hex[:8]}"
            message = messages.oru_r01(
                report,
                control_id=control_id,
                sending_application=self._calling_ae_title(destination),
                sending_facility=destination.sending_facility,
                receiving_application=destination.receiving_application,
                receiving_facility=destination.receiving_facility,
            )
            mllp(destination, message, control_id)
        else:
            fhir_transaction(destination, messages.fhir_bundle(report))

    def _calling_ae_title(self, destination: Destination) -> str:
        return destination.calling_ae_title or self.settings.dicom.ae_title

    def run(self, stop: threading.Event) -> None:
        """Send due deliveries until `stop` is set, polling every send.poll_interval_seconds."""
        while not stop.is_set():
            try:
                self.send_due(stop)
            except Exception as exc:  # the database may be briefly unreachable
                log.warning("sender pass failed: %s", exc)
            stop.wait(self.settings.send.poll_interval_seconds)


class SenderThread:
    """The sender in a thread of `cxrbatch watch`; `stop` lets the delivery in hand finish
    (unfinished ones are claimed again after their lease)."""

    def __init__(
        self, settings: Settings, sessions: Sessions, roots: StorageRoots | None = None
    ) -> None:
        self._stop = threading.Event()
        self._sender = Sender(settings, sessions, roots)
        self._thread = threading.Thread(
            target=self._sender.run, args=(self._stop,), name="cxrbatch-sender", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("sender started: %s", ", ".join(self._sender.destinations))

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
