"""Network addresses: whether a listening address is reachable only from this host (the
DICOM receiver and the web app refuse other addresses without an allow-list or
authentication)."""

from __future__ import annotations

import ipaddress


def is_loopback(address: str) -> bool:
    """True for localhost and loopback IPs; a host name is taken as reachable from
    elsewhere (for all we know it resolves to a public address)."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip()).is_loopback
    except ValueError:
        return False
