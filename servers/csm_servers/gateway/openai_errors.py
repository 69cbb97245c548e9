"""Errors in OpenAI's shape for the /v1 routes: `{"error": {"message", "type", "param",
"code"}}` with its status, and the route class that answers every error of its route so.

Separate from openai_api.py (the routes themselves) because this is the one place that
turns the client's errors, FastAPI's validation errors and a Triton refusal naming a
tensor into OpenAI's status, type, code and `param` (the body's field).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from csm_clients.errors import CsmClientError, FieldError, InvalidRequest, PermissionDenied, ServerUnavailable
from csm_servers.gateway.keys import MissingApiKey
from csm_servers.gateway.speech_context import check_json_values

__all__ = ["SPEECH_FIELDS", "VOICE_FIELDS", "OpenAIError", "OpenAIRoute", "refused_param"]

# A Triton refusal names the tensor it is about in quotes (`input 'TEXT' is empty`,
# `'CONTEXT_AUDIO' was given without 'CONTEXT_TEXT'`); the caller wrote the body's field.
# Tensor names are upper case, voice ids never are (constants.VOICE_ID_PATTERN).
_TENSOR_NAME = re.compile(r"'([A-Z][A-Z0-9_]*)(?:\[\d+\]| \(turn \d+\))?'")
SPEECH_FIELDS = {
    "TEXT": "input",
    "SPEAKER": "speaker",
    "VOICE_ID": "voice",
    "TEMPERATURE": "temperature",
    "TOP_K": "top_k",
    "SEED": "seed",
    "MAX_AUDIO_SECONDS": "max_audio_seconds",
    **dict.fromkeys(
        ("CONTEXT_TEXT", "CONTEXT_AUDIO", "CONTEXT_AUDIO_LENGTHS", "CONTEXT_SAMPLE_RATE", "CONTEXT_SPEAKER"), "context"
    ),
    "CONTEXT_VOICE_ID": "context",
}
VOICE_FIELDS = {
    "VOICE_ID": "name",
    "REFERENCE_TEXT": "transcript",
    "REFERENCE_AUDIO": "audio_sample",
    "REFERENCE_SAMPLE_RATE": "audio_sample",
}
# The refusals that name no tensor: (words in the message, the field), per route.
_SPEECH_WORDS = {"unknown voice": "voice", "context turns": "context"}
_VOICE_WORDS = {"unknown voice": "voice_id", "reference clip": "audio_sample"}


def refused_param(message: str, *, voices: bool = False) -> str | None:
    """The body's field a refusal's message is about, on the speech routes or (`voices`)
    the voice routes: an unknown voice's, else the first tensor it names that the route
    has a field for, else the field of the words of a refusal that names no tensor; None
    if none."""
    fields, words = (VOICE_FIELDS, _VOICE_WORDS) if voices else (SPEECH_FIELDS, _SPEECH_WORDS)
    if "unknown voice" in message:
        return words["unknown voice"]
    named = (fields[found] for found in _TENSOR_NAME.findall(message) if found in fields)
    return next(named, None) or next((field for marker, field in words.items() if marker in message), None)


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def _from_client_error(error: CsmClientError, voices: bool) -> OpenAIError:
    message = str(error)
    if isinstance(error, MissingApiKey):
        return OpenAIError(401, message, code="invalid_api_key")
    if isinstance(error, PermissionDenied):
        return OpenAIError(403, message, code="permission_denied", kind="permission_error")
    if isinstance(error, FieldError):
        return OpenAIError(400, message, param=error.param)
    if isinstance(error, InvalidRequest):
        status = 413 if type(error).__name__ == "UploadTooLarge" else 400
        return OpenAIError(status, message, param=refused_param(message, voices=voices))
    if isinstance(error, ServerUnavailable):
        return OpenAIError(503, message, code="service_unavailable", kind="server_error")
    return OpenAIError(502, message, code="upstream_error", kind="server_error")


def _from_validation(error: RequestValidationError) -> OpenAIError:
    problems = error.errors()
    first = problems[0] if problems else {}
    where = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = where[0] if where and not where[0].isdigit() else None
    if param == "context" and len(where) > 1 and where[1].isdigit():  # OpenAI's style: context[1].speaker
        field = next((part for part in where[2:] if not part.isdigit()), None)
        param = f"context[{where[1]}]" + (f".{field}" if field else "")
    message = (
        "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', ()) if p != 'body')}: {item.get('msg')}" for item in problems
        )
        or "invalid request body"
    )
    return OpenAIError(400, message, param=param)


class OpenAIRoute(APIRoute):
    """Answers every error of its route in OpenAI's shape (the app's handlers answer
    `{"detail"}` for the original routes)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        voices = "voices" in self.path
        # The JSON speech routes: their values counted before FastAPI parses them.
        json_body = self.path.endswith(("/audio/speech", "/audio/speech/captioned"))

        async def route(request: Request) -> Response:
            try:
                if json_body and request.method == "POST":
                    # The body is read (whole, within the guard's limit) and kept: the
                    # handler below parses the same bytes.
                    try:
                        check_json_values(await request.body(), "the request body")
                    except FieldError as error:
                        raise OpenAIError(400, str(error)) from None
                    except ClientDisconnect:  # gone, or refused by the guard (413/408): it has answered
                        return Response(status_code=400)
                return await handler(request)
            except OpenAIError as error:
                return error.response()
            except RequestValidationError as error:
                return _from_validation(error).response()
            except CsmClientError as error:
                return _from_client_error(error, voices).response()

        return route
