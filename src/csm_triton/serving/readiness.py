"""Whether a tritonserver just started became ready, or why it never will: what
TritonServer.start (process.py) waits on.

Ready is three things in turn: the log says the endpoint Triton starts last has
started (endpoints start after the startup loads; until then a 200 could come from
someone else's server on a clashing port), `/v2/health/ready` answers, then each model
that must load is ready. A server that exits, or whose log reports an endpoint that
failed to start, fails at once; one not ready by the deadline fails with its log's tail.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Sequence

__all__ = ["TritonStartError", "last_endpoint", "wait_until_ready"]

_ENDPOINT_FAILURE = re.compile(r"failed to start (HTTP|GRPC|Metrics) service[^\n]*")


class TritonStartError(RuntimeError):
    """The server did not become ready; the message ends with the tail of its log."""


def last_endpoint(extra_args: Sequence[str]) -> str:
    """The log line of the endpoint Triton starts last (gRPC, HTTP, then metrics)."""
    metrics_off = any(flag in ("--allow-metrics=false", "--allow-metrics=0") for flag in extra_args)
    return "Started HTTPService" if metrics_off else "Started Metrics Service"


def _readiness_client(http_url: str):
    """A tritonclient HTTP client for readiness polls (short timeouts: a port that
    does not answer yet is "not ready", not an error)."""
    import tritonclient.http as http  # the serving layer's client; imported when a server starts

    return http.InferenceServerClient(http_url, connection_timeout=1.0, network_timeout=1.0)


def _ready(check) -> bool:
    from tritonclient.utils import InferenceServerException

    try:
        return bool(check())
    except (InferenceServerException, OSError):
        return False


def wait_until_ready(
    process: subprocess.Popen,
    http_url: str,
    models: Sequence[str],
    *,
    started: float,
    timeout: float,
    endpoint: str,
    new_log: Callable[[], str],
    log_excerpt: Callable[[], str],
) -> None:
    """Polls every 0.1 s until the server at `http_url` and `models` are ready, at most
    `timeout` seconds after `started` (time.monotonic()); raises TritonStartError.
    endpoint: last_endpoint(); new_log(): what this start wrote to the server's log so
    far; log_excerpt(): the tail of the log, for the error."""
    deadline = started + timeout
    client = _readiness_client(http_url)
    pending = list(models)
    try:
        while True:
            code = process.poll()
            if code is not None:
                raise TritonStartError(f"tritonserver exited with code {code} while starting{log_excerpt()}")
            log = new_log()
            failure = _ENDPOINT_FAILURE.search(log)
            if failure:
                raise TritonStartError(f"tritonserver {failure.group(0)}{log_excerpt()}")
            if endpoint in log and _ready(client.is_server_ready):
                pending = [m for m in pending if not _ready(lambda m=m: client.is_model_ready(m))]
                if not pending:
                    return
            if time.monotonic() > deadline:
                waiting = f"models {pending} not ready" if pending else "/v2/health/ready not 200"
                raise TritonStartError(f"tritonserver not ready after {timeout:.0f} s ({waiting}){log_excerpt()}")
            time.sleep(0.1)
    finally:
        client.close()
