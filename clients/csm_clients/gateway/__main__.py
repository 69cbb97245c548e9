"""python -m csm_clients.gateway: serve the REST gateway with uvicorn.

Listens on 127.0.0.1 unless --host says otherwise (a container passes --host 0.0.0.0).
Voice uploads and deletions need one of the gateway's API keys ($CSM_GATEWAY_API_KEYS,
comma-separated, or --api-key-file / $CSM_GATEWAY_API_KEY_FILE); without any they are
refused. The admin token they carry to Triton: $CSM_ADMIN_TOKEN, else the file
$CSM_ADMIN_TOKEN_FILE names, else make serve's development token.
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from csm_clients.client import admin_token_from_environment
from csm_clients.gateway.app import DEFAULT_MAX_UPLOAD_MB, create_app
from csm_clients.gateway.keys import API_KEY_FILE_ENV, API_KEYS_ENV, ApiKeys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csm_clients.gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-url", default=os.environ.get("CSM_TRITON_URL", "localhost:8001"),
                        help="Triton's gRPC host:port (default $CSM_TRITON_URL or localhost:8001)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: everyone)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB)
    parser.add_argument("--api-key-file", default=os.environ.get(API_KEY_FILE_ENV),
                        help=f"file of API keys for voice writes, one a line (default ${API_KEY_FILE_ENV}; "
                             f"added to ${API_KEYS_ENV})")
    args = parser.parse_args(argv)
    try:
        keys = ApiKeys.from_settings(os.environ.get(API_KEYS_ENV), args.api_key_file)
    except OSError as error:
        parser.error(f"cannot read the API key file: {error}")
    print(f"csm gateway on http://{args.host}:{args.port}, Triton at {args.triton_url}; {keys.describe()}",
          file=sys.stderr, flush=True)
    app = create_app(args.triton_url, admin_token=admin_token_from_environment(), api_keys=keys,
                     max_upload_bytes=int(args.max_upload_mb * 2**20))
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
