"""The servers in front of Triton, shipped with the server distribution (csm-triton).

- `python -m csm_servers.gateway`: the REST gateway on :7860 (the original system's API,
  its page, the OpenAI-compatible /v1 API and the text-stream WebSocket), calling Triton
  over gRPC with the thin client (csm_clients).
- `python -m csm_servers.gateway.kserve_front`: the KServe v2 HTTP front on :8080, which
  checks each request against the model's config before forwarding it to Triton.

They need FastAPI, uvicorn, httpx, websockets and PyAV (the OpenAI formats); the thin
client distribution (csm-tts-client) needs none of them.
"""
