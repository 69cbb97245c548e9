"""The original system's REST API on :7860, in front of Triton (called over gRPC).

    python -m csm_clients.gateway [--triton-url localhost:8001] [--host 0.0.0.0] [--port 7860]

Routes: GET / (a page), GET /health, GET /voices, POST /clone-voice, POST /upload-voice,
DELETE /voices/{voice_name}, GET /docs. Voice writes carry the gateway's own
$CSM_ADMIN_TOKEN to Triton, so anyone who can reach the gateway can store and delete
voices: run it where only trusted users can.
"""

from csm_clients.gateway.app import create_app

__all__ = ["create_app"]
