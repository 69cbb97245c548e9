"""python -m csm_servers.gateway: serve the REST gateway with uvicorn.

Listens on 127.0.0.1 unless --host says otherwise (a container passes --host 0.0.0.0).
Voice uploads and deletions need one of the gateway's API keys ($CSM_GATEWAY_API_KEYS,
comma-separated, or --api-key-file / $CSM_GATEWAY_API_KEY_FILE); without any they are
refused. With keys, speech (/clone-voice, /v1) needs one too; without, it is open. The
admin token they carry to Triton: $CSM_ADMIN_TOKEN, else the file
$CSM_ADMIN_TOKEN_FILE names, else make serve's development token.

What one process may spend (each flag's default comes from its environment variable):
body and upload sizes, requests per key at work and queued, audio decodes at once
(guard.GatewayLimits); and uvicorn's own: open connections, headers' size, the time a
client may take to send its headers, keep-alive (`uvicorn_settings`).
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from csm_clients.admin_token import admin_token_from_environment
from csm_servers.gateway.app import create_app
from csm_servers.gateway.guard import GatewayLimits
from csm_servers.gateway.keys import API_KEY_FILE_ENV, API_KEYS_ENV, ApiKeys

# uvicorn's limits (defaults; each has an environment variable and a flag):
LIMIT_CONCURRENCY = 64  # CSM_GATEWAY_LIMIT_CONCURRENCY: connections + tasks; past it, 503
HEADER_TIMEOUT_S = 10.0  # CSM_GATEWAY_HEADER_TIMEOUT_S: a request's headers must arrive within this
MAX_HEADER_BYTES = 16 << 10  # CSM_GATEWAY_MAX_HEADER_BYTES: h11's bound on an incomplete request head
TIMEOUT_KEEP_ALIVE_S = 5  # idle keep-alive connections are closed after this
BACKLOG = 128  # connections the kernel queues before accept (uvicorn's default is 2048)
GRACEFUL_SHUTDOWN_S = 30  # a stopping gateway waits this long for streams in flight
# uvicorn's bound on one WebSocket message (1009 past it, before the route sees it); the
# text stream's own, smaller limit (GatewayLimits.ws_max_message_bytes) is a clear message.
WS_MAX_SIZE = 1 << 20


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's headers: uvicorn has
    none (its keep-alive timer stops at the first byte), so a client dribbling a header
    a byte at a time would hold a connection, one of limit_concurrency, for ever."""

    header_timeout_s = HEADER_TIMEOUT_S
    _deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def handle_events(self) -> None:
        super().handle_events()
        if not self._waiting_for_headers():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers on this connection

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event) -> None:
        # The connection becomes a WebSocket, whose transport this timer must not close.
        self._disarm()
        super().handle_websocket_upgrade(event)

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()


def _environment_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    return float(text) if text else default


def request_head_settings(header_timeout_s: float, max_header_bytes: int = MAX_HEADER_BYTES) -> dict:
    """uvicorn.Config's keyword arguments that bound a request's head (its time and size);
    the gateway's and the KServe front's servers both take them."""
    protocol = type("DeadlineH11Protocol", (HeaderDeadlineProtocol,), {"header_timeout_s": float(header_timeout_s)})
    return {"http": protocol, "h11_max_incomplete_event_size": int(max_header_bytes), "server_header": False}


def uvicorn_settings(
    *, limit_concurrency: int | None = None, header_timeout_s: float | None = None, max_header_bytes: int | None = None
) -> dict:
    """uvicorn.Config's keyword arguments for the gateway's limits (None: the
    environment's value, else the default)."""
    timeout = header_timeout_s or _environment_number("CSM_GATEWAY_HEADER_TIMEOUT_S", HEADER_TIMEOUT_S)
    head_bytes = max_header_bytes or _environment_number("CSM_GATEWAY_MAX_HEADER_BYTES", MAX_HEADER_BYTES)
    return {
        **request_head_settings(timeout, head_bytes),
        "limit_concurrency": int(
            limit_concurrency or _environment_number("CSM_GATEWAY_LIMIT_CONCURRENCY", LIMIT_CONCURRENCY)
        ),
        "timeout_keep_alive": TIMEOUT_KEEP_ALIVE_S,
        "backlog": BACKLOG,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "ws_max_size": WS_MAX_SIZE,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m csm_servers.gateway", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--triton-url",
        default=os.environ.get("CSM_TRITON_URL", "localhost:8001"),
        help="Triton's gRPC host:port (default $CSM_TRITON_URL or localhost:8001)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: everyone)",
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--api-key-file",
        default=os.environ.get(API_KEY_FILE_ENV),
        help=f"file of API keys, one a line (default ${API_KEY_FILE_ENV}; added to ${API_KEYS_ENV})",
    )
    limits = parser.add_argument_group("limits (default: the environment variable named, else the value shown)")
    defaults = GatewayLimits()
    limits.add_argument(
        "--max-upload-mb",
        type=float,
        help=f"one audio upload ($CSM_GATEWAY_MAX_UPLOAD_MB, {defaults.max_upload_bytes / 2**20:g})",
    )
    for name, variable in GatewayLimits.ENVIRONMENT.items():
        if name != "max_upload_bytes":
            limits.add_argument(
                f"--{name.replace('_', '-')}", type=float, dest=name, help=f"${variable}, {getattr(defaults, name):g}"
            )
    limits.add_argument(
        "--limit-concurrency",
        type=int,
        help=f"open connections and tasks ($CSM_GATEWAY_LIMIT_CONCURRENCY, {LIMIT_CONCURRENCY})",
    )
    limits.add_argument(
        "--header-timeout-s",
        type=float,
        help=f"time to send a request's headers ($CSM_GATEWAY_HEADER_TIMEOUT_S, {HEADER_TIMEOUT_S:g})",
    )
    limits.add_argument(
        "--max-header-bytes", type=int, help=f"a request's head ($CSM_GATEWAY_MAX_HEADER_BYTES, {MAX_HEADER_BYTES})"
    )
    args = parser.parse_args(argv)
    try:
        keys = ApiKeys.from_settings(os.environ.get(API_KEYS_ENV), args.api_key_file)
    except OSError as error:
        parser.error(f"cannot read the API key file: {error}")
    try:
        overrides = {name: getattr(args, name) for name in GatewayLimits.ENVIRONMENT if name != "max_upload_bytes"}
        upload = None if args.max_upload_mb is None else int(args.max_upload_mb * 2**20)
        gateway_limits = GatewayLimits.from_environment(max_upload_bytes=upload, **overrides)
        server = uvicorn_settings(
            limit_concurrency=args.limit_concurrency,
            header_timeout_s=args.header_timeout_s,
            max_header_bytes=args.max_header_bytes,
        )
    except ValueError as error:
        parser.error(str(error))
    print(
        f"csm gateway on http://{args.host}:{args.port}, Triton at {args.triton_url}; {keys.describe()}",
        file=sys.stderr,
        flush=True,
    )
    app = create_app(args.triton_url, admin_token=admin_token_from_environment(), api_keys=keys, limits=gateway_limits)
    uvicorn.run(app, host=args.host, port=args.port, **server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
