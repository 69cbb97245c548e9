"""The admin token for voice writes, looked up the one way every tool does.

Separate from the clients (client.py) because it is configuration, not transport: the
CLI, the gateway's entry point (`python -m csm_servers.gateway`) and, through its
standard-library mirror (loadtest/workload.py), the load tests all read it here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ADMIN_TOKEN_ENV", "ADMIN_TOKEN_FILE_ENV", "DEVELOPMENT_TOKEN_FILE", "admin_token_from_environment"]

ADMIN_TOKEN_ENV = "CSM_ADMIN_TOKEN"
ADMIN_TOKEN_FILE_ENV = "CSM_ADMIN_TOKEN_FILE"
# `make serve` without CSM_ADMIN_TOKEN writes a development token here (mode 0600, beside
# the voices in the build's runtime folder); relative to the checkout it runs in.
DEVELOPMENT_TOKEN_FILE = Path("build/runtime/admin-token")


def admin_token_from_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token for voice writes: $CSM_ADMIN_TOKEN; else the first line of the
    file $CSM_ADMIN_TOKEN_FILE names; else make serve's development token
    (build/runtime/admin-token under the current folder) if there is one; else None.

    csm-tts, `python -m csm_servers.gateway` and (through its standard-library mirror,
    loadtest/workload.py) the load tests look the token up this way. A deployment
    never has the development file: only `make serve` writes it."""
    environ = os.environ if environ is None else environ
    if environ.get(ADMIN_TOKEN_ENV):
        return environ[ADMIN_TOKEN_ENV]
    path = Path(environ[ADMIN_TOKEN_FILE_ENV]) if environ.get(ADMIN_TOKEN_FILE_ENV) else DEVELOPMENT_TOKEN_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return (lines[0].strip() if lines else "") or None
