"""Helpers of the integration tests. The real tritonserver they share (triton_server,
http_client, grpc_client, ...) is defined in tests/conftest.py, so tests/security uses the
same server in the same session."""

from __future__ import annotations

import contextlib
import json
import urllib.request

from conftest import ADMIN_TOKEN, BROKEN_MODEL


def slots_in_use(triton_server) -> float:
    """csm_kv_slots_in_use as the server exports it now (its metrics endpoint)."""
    with urllib.request.urlopen(f"http://{triton_server.metrics_url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("csm_kv_slots_in_use"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("csm_kv_slots_in_use is not exported")


@contextlib.contextmanager
def segment_budget(triton_server, grpc_client, seconds_per_char: float, min_seconds: float):
    """csm_prepare reloaded with these segment budgets for the block, then as its repository has it."""
    config = grpc_client.get_model_config("csm_prepare", as_json=True)["config"]
    config.setdefault("parameters", {}).update(
        {
            "segment_seconds_per_char": {"string_value": str(seconds_per_char)},
            "segment_min_seconds": {"string_value": str(min_seconds)},
        }
    )
    key = triton_server.grpc_model_control_headers
    grpc_client.load_model("csm_prepare", config=json.dumps(config), headers=key)
    try:
        yield
    finally:
        grpc_client.load_model("csm_prepare", headers=key)
