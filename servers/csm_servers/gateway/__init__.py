"""The original system's REST API on :7860, in front of Triton (called over gRPC).

    python -m csm_servers.gateway [--triton-url localhost:8001] [--host 127.0.0.1] [--port 7860]

Routes: GET / (a page), GET /health, GET /voices, POST /clone-voice, POST /upload-voice,
DELETE /voices/{voice_name}, GET /docs. Voice writes carry the gateway's own
$CSM_ADMIN_TOKEN to Triton, so they need a credential of the gateway's own: one of the
API keys in $CSM_GATEWAY_API_KEYS as `Authorization: Bearer <key>` (keys.py); without
keys configured they are refused. It listens on 127.0.0.1 unless --host says otherwise.
"""

from csm_servers.gateway.app import create_app

__all__ = ["create_app"]
