"""Who may change the voice store: the write-authorisation rule, without Triton.

The deployment's token is read from an environment variable (its name is the
model-config parameter `admin_token_env`, default CSM_ADMIN_TOKEN; the python stub
inherits tritonserver's environment). A client proves it knows the token with the
header `x-csm-admin-token`, which Triton forwards into the request parameters
(`--http-header-forward-pattern` / `--grpc-header-forward-pattern` = `x-csm-.*`).

Rules:
- a token is configured: a write needs exactly that token (missing or wrong ->
  PermissionDenied); `allow_anonymous_writes` does not weaken this;
- no token configured: writes are refused, unless the config parameter
  `allow_anonymous_writes` is "true" (local development only; never in a committed
  deployment config).

A client may also send a request parameter of the same name instead of a header
(over HTTP /generate that is the only way); either way it must know the token.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from csm_triton import constants as C
from csm_triton.errors import PermissionDenied

__all__ = ["DEFAULT_ADMIN_TOKEN_ENV", "WritePolicy"]

DEFAULT_ADMIN_TOKEN_ENV = "CSM_ADMIN_TOKEN"


@dataclass(frozen=True, repr=False)
class WritePolicy:
    token: str | None  # None: no token configured
    token_env: str = DEFAULT_ADMIN_TOKEN_ENV
    allow_anonymous_writes: bool = False

    def __repr__(self) -> str:  # never print the token
        configured = "configured" if self.token else "not configured"
        return (
            f"WritePolicy(token from ${self.token_env}: {configured}, "
            f"allow_anonymous_writes={self.allow_anonymous_writes})"
        )

    @classmethod
    def from_settings(
        cls,
        admin_token_env: str | None = None,
        allow_anonymous_writes: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> WritePolicy:
        """From the model config's parameters and the environment."""
        token_env = admin_token_env or DEFAULT_ADMIN_TOKEN_ENV
        token = (os.environ if environ is None else environ).get(token_env) or None
        return cls(token, token_env, bool(allow_anonymous_writes))

    def describe(self) -> str:
        if self.token:
            return f"writes need the admin token (header '{C.ADMIN_TOKEN_HEADER}', token from ${self.token_env})"
        if self.allow_anonymous_writes:
            return "writes are open to anyone (allow_anonymous_writes=true: local development only)"
        return f"writes are disabled (no admin token in ${self.token_env})"

    def check_write(self, parameters: Mapping[str, Any]) -> None:
        """Raises PermissionDenied unless this request may write. `parameters`: the
        request's parameters with lower-cased keys (csm_triton.triton.adapter.request_parameters)."""
        if not self.token:
            if self.allow_anonymous_writes:
                return
            raise PermissionDenied(
                f"writes are disabled on this server: no admin token is configured "
                f"(set ${self.token_env} in tritonserver's environment)"
            )
        sent = parameters.get(C.ADMIN_TOKEN_HEADER)
        if sent is None or sent == "":
            raise PermissionDenied(
                f"this request changes voices and needs the admin token in header '{C.ADMIN_TOKEN_HEADER}'"
            )
        if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), self.token.encode()):
            raise PermissionDenied(f"wrong admin token in header '{C.ADMIN_TOKEN_HEADER}'")
