"""The gateway's own credential: API keys for the routes that change something.

The gateway carries the deployment's admin token to Triton, so a voice upload or
deletion through it must prove itself to the gateway first: `Authorization: Bearer
<key>`, one of the keys in $CSM_GATEWAY_API_KEYS (comma-separated) or in a key file
(one per line, `#` comments). No key configured: those routes are refused (403) with a
message saying how to enable them. Speech (/clone-voice, /v1) needs a key when any is
configured (guard.route_policy); GET /voices, /health and the page need none. A key's
id (`key_id`, a hash prefix) owns the voices it stores and names its request bucket.

`ApiKeys.check` is plain Python and `ApiKeys.dependency()` the FastAPI dependency, so
any later route (an OpenAI-compatible API's keys, for one) guards itself the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from csm_clients.errors import PermissionDenied

__all__ = ["API_KEYS_ENV", "API_KEY_FILE_ENV", "ApiKeys", "MissingApiKey", "key_id"]

API_KEYS_ENV = "CSM_GATEWAY_API_KEYS"
API_KEY_FILE_ENV = "CSM_GATEWAY_API_KEY_FILE"
_PREFIX = "permission denied: "


def key_id(key: str | bytes) -> str:
    """A key's public name: what owns its voices on the server and buckets its requests.
    A hash prefix, so neither Triton's store nor a voice listing ever holds the key."""
    data = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(b"csm-gateway-key:" + data).hexdigest()[:16]


class MissingApiKey(PermissionDenied):
    """No key, or a wrong one, on a guarded route: HTTP 401 (with WWW-Authenticate)."""


class ApiKeys:
    """The keys a guarded route accepts (compared in constant time, never logged)."""

    def __init__(self, keys: Iterable[str] = ()):
        self._keys = tuple(key.strip().encode() for key in keys if key and key.strip())
        self._ids = tuple(key_id(key) for key in self._keys)

    @classmethod
    def from_settings(cls, keys: str | None = None, key_file: str | os.PathLike | None = None) -> ApiKeys:
        """`keys`: comma-separated; `key_file`: one key per line (blank lines and lines
        starting with # skipped). A key file that cannot be read is an error (OSError):
        a gateway started with one must not silently run without its keys."""
        found = [key for key in (keys or "").split(",")]
        if key_file:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
            found += [line for line in lines if not line.strip().startswith("#")]
        return cls(found)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ApiKeys:
        environ = os.environ if environ is None else environ
        return cls.from_settings(environ.get(API_KEYS_ENV), environ.get(API_KEY_FILE_ENV) or None)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def describe(self) -> str:
        """For the start-up log: how many keys, never which."""
        if not self._keys:
            return f"voice writes through the gateway are disabled (no {API_KEYS_ENV})"
        return f"voice writes and speech (/clone-voice, /v1) need one of {len(self._keys)} API key(s)"

    def check(self, authorization: str | None, what: str = "this route changes voices") -> str:
        """Passes if `authorization` (the header's value) is `Bearer <one of the keys>`
        and returns that key's id (key_id); else raises PermissionDenied (none
        configured) or MissingApiKey."""
        if not self._keys:
            raise PermissionDenied(
                f"{_PREFIX}{what}, and the gateway accepts no API key: start it with "
                f"{API_KEYS_ENV}=<key>[,<key>...] (or --api-key-file FILE) and send "
                "'Authorization: Bearer <key>'"
            )
        scheme, _, sent = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not sent.strip():
            raise MissingApiKey(
                f"{_PREFIX}{what} and needs the header 'Authorization: Bearer <key>' "
                f"with one of the gateway's API keys ({API_KEYS_ENV})"
            )
        sent_bytes = sent.strip().encode()
        # Every key compared, in constant time: neither timing nor order tells which matched.
        matches = [hmac.compare_digest(sent_bytes, key) for key in self._keys]
        if not sum(matches):
            raise MissingApiKey(f"{_PREFIX}wrong API key in header 'Authorization'")
        return self._ids[matches.index(True)]

    def dependency(self, what: str = "this route changes voices"):
        """A FastAPI dependency that checks the request's Authorization header (and shows
        the route as Bearer-protected on /docs, with its Authorize button)."""

        async def require_api_key(
            request: Request, _shown: HTTPAuthorizationCredentials | None = Depends(_BEARER)
        ) -> None:
            self.check(request.headers.get("authorization"), what)

        return require_api_key


# Only for the OpenAPI description; ApiKeys.check reads the header itself.
_BEARER = HTTPBearer(auto_error=False, scheme_name="gateway API key", description=f"one of the keys in {API_KEYS_ENV}")
