"""What can go wrong, as exceptions a caller can act on.

Triton reports a bad request as INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) with a
message naming the input and the rule; the client passes that message on unchanged,
so limits stay defined by the server alone. A refused voice write is INVALID_ARG too,
told apart by the server's documented "permission denied: " prefix.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tritonclient.utils import InferenceServerException

__all__ = [
    "CsmClientError",
    "FieldError",
    "InvalidRequest",
    "MissingExtra",
    "PermissionDenied",
    "ServerError",
    "ServerUnavailable",
    "from_triton",
    "import_extra",
    "missing_extra",
]

_INVALID_ARG = {"400", "StatusCode.INVALID_ARGUMENT"}
_UNAVAILABLE = {"503", "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"}
PERMISSION_DENIED_PREFIX = "permission denied: "
# A python model's unexpected failure reads "<model>: internal error (...)". Stream
# errors arrive without a status code (gRPC stream responses carry only a message),
# so for them this marker is the only way to tell a server fault from a bad input.
_INTERNAL_ERROR_MARKER = ": internal error ("
# ... and a model that is down for the moment (a dead stub being recovered) reads
# "<model>: unavailable (...)": retrying later helps.
_UNAVAILABLE_MARKER = ": unavailable ("


class CsmClientError(Exception):
    """Base of every error this package raises; `str()` is the server's message."""


class InvalidRequest(CsmClientError):
    """The request was refused as given (HTTP 400 / INVALID_ARGUMENT): fix it, don't retry."""


class FieldError(InvalidRequest):
    """A refusal of one field of a request's body; `param` is its name in OpenAI's style
    (`context[2].audio`): the gateway answers it in `param`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class PermissionDenied(CsmClientError):
    """A voice write without the deployment's admin token, or with a wrong one."""


class MissingExtra(CsmClientError, ImportError):
    """A feature's optional dependency is not installed; the message names the extra
    that installs it (`pip install 'csm-tts-client[speed]'`)."""


def missing_extra(module: str, extra: str, feature: str) -> MissingExtra:
    """The error for `feature` without `module`, which csm-tts-client's `extra` installs."""
    return MissingExtra(
        f"{feature} needs the '{module}' package, which is not installed: pip install 'csm-tts-client[{extra}]'"
    )


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """`module` imported, or MissingExtra saying which extra of csm-tts-client has it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise missing_extra(module, extra, feature) from error


class ServerError(CsmClientError):
    """The server failed or could not be asked; `status` is Triton's code, if any."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


class ServerUnavailable(ServerError):
    """Triton is not reachable or not ready: retrying later may help."""


def _classify(message: str, status: str | None) -> CsmClientError:
    if PERMISSION_DENIED_PREFIX in message:
        return PermissionDenied(message)
    if status in _UNAVAILABLE or _UNAVAILABLE_MARKER in message:
        return ServerUnavailable(message, status)
    if status in _INVALID_ARG or (status is None and _INTERNAL_ERROR_MARKER not in message):
        return InvalidRequest(message)
    return ServerError(message, status)


def from_triton(error: InferenceServerException | OSError, url: str = "") -> CsmClientError:
    """The exception to raise for a tritonclient (or connection) error."""
    if isinstance(error, OSError):
        return ServerUnavailable(f"cannot reach Triton at {url}: {error}")
    status = error.status()
    return _classify(error.message() or str(error), None if status is None else str(status))


def from_stream_message(message: str, status: str | None = None) -> CsmClientError:
    """The exception for an error that arrived inside a stream (no gRPC status there)."""
    return _classify(message, status)
