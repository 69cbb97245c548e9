"""python -m csm_clients.gateway: serve the REST gateway with uvicorn."""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from csm_clients.gateway.app import DEFAULT_MAX_UPLOAD_MB, create_app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csm_clients.gateway", description=__doc__)
    parser.add_argument("--triton-url", default=os.environ.get("CSM_TRITON_URL", "localhost:8001"),
                        help="Triton's gRPC host:port (default $CSM_TRITON_URL or localhost:8001)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB)
    args = parser.parse_args(argv)
    app = create_app(args.triton_url, admin_token=os.environ.get("CSM_ADMIN_TOKEN"),
                     max_upload_bytes=int(args.max_upload_mb * 2**20))
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
