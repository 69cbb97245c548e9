"""Where the load test may send the admin token (standard library only, as workload.py).

Locust's web UI lets whoever reaches it type any host into its form; the locustfile then
registers and deletes voices there with the admin token. So the token goes only to the
host Locust was started with (--host / $LOCUST_HOST, read when it starts, before any
form is sent), or, when it was started without one, to a loopback host.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["origin", "is_loopback", "token_refusal"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str | None) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a Locust host such as http://localhost:8000 (no scheme:
    http, as workload.TritonHTTP reads it); None if it is not one."""
    if not url or not url.strip():
        return None
    text = url.strip()
    parts = urlsplit(text if "://" in text else f"http://{text}")
    try:
        port = parts.port
    except ValueError:  # a port out of range or not a number
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower().rstrip(".")
    if scheme not in _DEFAULT_PORTS or not host or parts.username is not None or parts.password is not None:
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def is_loopback(url: str | None) -> bool:
    where = origin(url)
    if where is None:
        return False
    if where[1] == "localhost" or where[1].endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(where[1]).is_loopback
    except ValueError:
        return False


def token_refusal(host: str | None, configured: str | None) -> str | None:
    """None when the admin token may be sent to `host`; else why not, for the log.
    `configured`: the host Locust was started with (None: none given)."""
    if origin(host) is None:
        return f"'{host}' is not an http(s) URL with a host"
    if configured and origin(configured) is not None:
        if origin(host) == origin(configured):
            return None
        return (
            f"the host '{host}' is not the one Locust was started with ('{configured}'), and the admin token "
            f"goes only there; start Locust with --host {host} (or LOCUST_HOST) to use stored voices on it"
        )
    if is_loopback(host):
        return None
    return (
        f"Locust was started without --host, so the admin token goes only to a loopback host, not '{host}'; "
        f"start it with --host {host} (or LOCUST_HOST) to use stored voices there"
    )
