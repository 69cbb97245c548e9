"""The embedded server is closed by default: `csm-triton-server serve` (what `make serve`
runs) listens on 127.0.0.1 only, and Triton's model control (load, unload, index), shared
memory, logging and trace APIs answer only callers with the model-control key. Before,
one unauthenticated POST to /v2/repository/models/<m>/load with a `file:1/model.py`
parameter ran that Python inside the server. Checked against a real `serve` of a
one-model repository."""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from csm_triton import constants as C
from csm_triton.serving import flags
from csm_triton.serving.stubs import server_stubs
from tests.security.serve_process import Serve, add_python_model, clean_environment

pytestmark = pytest.mark.security

KEY = f"test-key-{secrets.token_urlsafe(16)}"
START_TIMEOUT_S = 120
ECHO_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
"""


def write_echo_model(repository: Path) -> None:
    add_python_model(repository, "echo", ECHO_MODEL)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("model-control")
    write_echo_model(root / "repository")
    server = Serve(
        root / "repository",
        root / "serve.log",
        ["--exit-timeout", "3", "--supervise-interval", "0.5"],
        env=clean_environment(**{C.MODEL_CONTROL_KEY_ENV: KEY}),
    )
    server.marker = root / "pwned"
    try:
        server.wait_ready(["echo"], START_TIMEOUT_S)
        yield server
    finally:
        server.close()


def post(
    port: int, path: str, body: dict | None = None, headers: dict | None = None, method: str = "POST"
) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
        answer = connection.getresponse()
        return answer.status, answer.read().decode(errors="replace")
    finally:
        connection.close()


def exploit_body(marker: Path) -> dict:
    """The request of the finding: a model whose model.py comes with the load request."""
    model_py = f"open({str(marker)!r}, 'w').write('code ran inside tritonserver')\n" + ECHO_MODEL
    config = {
        "name": "pwn",
        "backend": "python",
        "max_batch_size": 0,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1]}],
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
    }
    return {
        "parameters": {"config": json.dumps(config), "file:1/model.py": base64.b64encode(model_py.encode()).decode()}
    }


def http_headers(key: str) -> dict[str, str]:
    return flags.model_control_headers(key, "http")


# --- the exploit and the rest of model control, without and with the key -----------------------
def test_loading_a_model_with_its_code_in_the_request_is_refused_without_the_key(served):
    for headers in ({}, http_headers("wrong-key-0123456789abcdef")):
        status, body = post(served.http_port, "/v2/repository/models/pwn/load", exploit_body(served.marker), headers)
        assert status == 403 and "restricted" in body, (status, body)
    time.sleep(2.0)  # a stub would have started and imported model.py by now
    assert not served.marker.exists(), "the model.py of the request ran"
    assert post(served.http_port, "/v2/models/pwn/ready", method="GET")[0] != 200


def test_with_the_key_the_same_request_loads_the_model(served):
    # The control: the request above is the real exploit, stopped only by the key.
    status, body = post(
        served.http_port, "/v2/repository/models/pwn/load", exploit_body(served.marker), http_headers(KEY)
    )
    try:
        assert status == 200, body
        assert served.marker.exists()
    finally:
        post(served.http_port, "/v2/repository/models/pwn/unload", {}, http_headers(KEY))
        served.marker.unlink(missing_ok=True)


def test_unload_and_the_repository_index_are_refused_without_the_key(served):
    status, body = post(served.http_port, "/v2/repository/models/echo/unload", {})
    assert status == 403 and "restricted" in body
    assert post(served.http_port, "/v2/repository/index", {})[0] == 403
    assert post(served.http_port, "/v2/models/echo/ready", method="GET")[0] == 200  # still served


def test_shared_memory_logging_and_trace_settings_are_refused_without_the_key(served):
    assert (
        post(
            served.http_port,
            "/v2/systemsharedmemory/region/stubs/register",
            {"key": "triton_python_backend_shm_region_x", "offset": 0, "byte_size": 64},
        )[0]
        == 403
    )
    assert post(served.http_port, "/v2/logging", {"log_file": "/tmp/overwritten"})[0] == 403
    assert post(served.http_port, "/v2/trace/setting", {"trace_file": "/tmp/overwritten"})[0] == 403


def test_with_the_key_model_control_works_and_inference_needs_none(served):
    client = httpclient.InferenceServerClient(served.http_url)
    try:
        index = {m["name"]: m["state"] for m in client.get_model_repository_index(headers=http_headers(KEY))}
        assert index["echo"] == "READY"
        client.unload_model("echo", headers=http_headers(KEY))
        client.load_model("echo", headers=http_headers(KEY))
        x = httpclient.InferInput("x", [3], "FP32")
        x.set_data_from_numpy(np.arange(3, dtype=np.float32))
        assert client.infer("echo", [x]).as_numpy("y").tolist() == [0, 1, 2]
    finally:
        client.close()


def test_grpc_model_control_is_refused_without_the_key(served):
    client = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.load_model("echo")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("echo")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index()
        client.load_model("echo", headers=flags.model_control_headers(KEY, "grpc"))
        assert client.is_model_ready("echo")
    finally:
        client.close()


def test_the_supervisor_reloads_with_the_key(served):
    pid = served.triton_pid()
    stubs = [p for p, name in server_stubs(pid).items() if name == "echo_0_0"]  # a replaced one may linger
    assert stubs
    for stub in stubs:
        os.kill(stub, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while "model echo recovered" not in served.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "model echo recovered" in served.log(), served.log()[-3000:]


def test_the_healthcheck_needs_no_key(served):
    # Retried as compose and the kubelet retry it: the reload just before may still be settling.
    deadline = time.monotonic() + 30
    while True:
        result = subprocess.run(
            [sys.executable, "-m", "csm_triton.serving", "check", "--url", served.http_url],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_environment(),
        )
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.returncode == 0 and result.stdout.strip() == "ready", result.stdout + result.stderr


def test_the_key_is_never_logged(served):
    log = served.log()
    assert "csm-model-control-key=<hidden>" in log  # the command line is there, redacted
    assert KEY not in log


# --- where it listens ---------------------------------------------------------------------------
def listening(port: int) -> set[str]:
    """The local addresses of LISTEN sockets on this port, from /proc/net/tcp and tcp6."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            if len(raw) == 4:
                addresses.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                address = socket.inet_ntop(socket.AF_INET6, words)
                addresses.add(address.removeprefix("::ffff:"))  # gRPC binds 127.0.0.1 as a mapped address
    return addresses


def non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # a UDP "connect" sends nothing: it picks the route's source
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_http_grpc_and_metrics_listen_on_loopback_only(served):
    for port in (served.http_port, served.grpc_port, served.metrics_port):
        assert listening(port) == {"127.0.0.1"}, (port, listening(port))
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to try")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        assert sock.connect_ex((address, served.http_port)) != 0, f"reachable on {address}"


# --- the flags, without a server ----------------------------------------------------------------
def run_args(*options: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csm_triton.serving", "args", "--model-repository", "/m", "--no-gpu", *options],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(**env),
    )


def test_the_container_launch_flags_bind_loopback_and_restrict_model_control():
    result = run_args(**{C.MODEL_CONTROL_KEY_ENV: KEY})
    assert result.returncode == 0 and result.stderr == "", result.stderr
    argv = result.stdout.splitlines()
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in argv
    apis = "model-repository,shared-memory,logging,trace"
    assert f"--http-restricted-api={apis}:csm-model-control-key={KEY}" in argv
    assert f"--grpc-restricted-protocol={apis}:csm-model-control-key={KEY}" in argv


def test_without_a_key_each_start_makes_its_own():
    keys = [next(f for f in run_args().stdout.splitlines() if f.startswith("--http-restricted-api")) for _ in range(2)]
    assert keys[0] != keys[1] and len(keys[0].rsplit("=", 1)[1]) >= 40


def test_a_weak_key_is_refused_without_being_repeated():
    result = run_args(**{C.MODEL_CONTROL_KEY_ENV: "hunter2"})
    assert result.returncode == 2 and "CSM_MODEL_CONTROL_KEY must be" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_opening_the_ports_is_deliberate_and_warned_about(how):
    result = run_args("--listen-address", "0.0.0.0") if how == "flag" else run_args(**{C.LISTEN_ADDRESS_ENV: "0.0.0.0"})
    assert result.returncode == 0
    assert {"--http-address=0.0.0.0", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"} <= set(
        result.stdout.splitlines()
    )
    (warning,) = result.stderr.splitlines()
    assert "warning" in warning and "0.0.0.0" in warning


def test_logged_command_lines_hide_every_restricted_api_key():
    argv = flags.server_arguments(
        "/m", gpu=False, model_control_key=KEY, extra=["--http-restricted-api=inference:front-key=front-secret"]
    )
    shown = " ".join(flags.redact(argv))
    assert KEY not in shown and "front-secret" not in shown
    assert "--http-restricted-api=inference:front-key=<hidden>" in shown
