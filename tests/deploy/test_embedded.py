"""The embedded tritonserver: set-up, flags, and a real server with the onnxruntime shim.

One server (module scope) serves an ONNX model through the Python-based onnxruntime
backend (once by `platform`, once by `backend`) and a python model; two short-lived
servers cover a model that fails to load. Every server is stopped by its context
manager, also when a test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.serving.flags import DEFAULT_ARGS_FILE, read_args_file, server_arguments
from csm_triton.serving.install import default_home, perf_analyzer_command, prepare
from csm_triton.serving.process import TritonServer
from csm_triton.serving.readiness import TritonStartError

pytestmark = pytest.mark.integration

ONNX_CONFIG = """
name: "{name}"
{engine}
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ -1 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 50000 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

PYTHON_MODEL = """
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "a").as_numpy()
            params = json.dumps(json.loads(request.parameters() or "{}"), sort_keys=True)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("b", (a + 1).astype(np.int32)),
                pb_utils.Tensor("params", np.array([params.encode()], dtype=np.object_)),
            ]))
        return responses
"""

PYTHON_CONFIG = """
name: "add_one"
backend: "python"
max_batch_size: 0
input [ { name: "a" data_type: TYPE_INT32 dims: [ -1 ] } ]
output [ { name: "b" data_type: TYPE_INT32 dims: [ -1 ] }, { name: "params" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def write_onnx_model(repository: Path, name: str, factor: float, *, engine: str, with_file: bool = True) -> None:
    """y = x * factor on float32 [batch, 4]; the config says dims [-1], the model fixes 4."""
    import onnx
    from onnx import TensorProto, helper

    version = repository / name / "1"
    version.mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(ONNX_CONFIG.format(name=name, engine=engine))
    if not with_file:
        return
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "factor"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("factor", TensorProto.FLOAT, [], [factor])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime >= 1.10
    onnx.checker.check_model(model)
    onnx.save(model, version / "model.onnx")


def write_python_model(repository: Path) -> None:
    (repository / "add_one" / "1").mkdir(parents=True)
    (repository / "add_one" / "1" / "model.py").write_text(PYTHON_MODEL)
    (repository / "add_one" / "config.pbtxt").write_text(PYTHON_CONFIG)


@pytest.fixture(scope="module")
def install():
    return prepare(default_home())


@pytest.fixture(scope="module")
def server(install, tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    write_onnx_model(repository, "double", 2.0, engine='platform: "onnxruntime_onnx"')
    write_onnx_model(repository, "triple", 3.0, engine='backend: "onnxruntime"')
    write_python_model(repository)
    with TritonServer(
        repository,
        install=install,
        model_control="explicit",
        load_models=["double", "triple", "add_one"],
        log_path=tmp_path_factory.mktemp("logs") / "server.log",
        startup_timeout=60,
    ) as running:
        yield running
    assert running.returncode == 0, running.log_tail()


@pytest.fixture
def http_client(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url, concurrency=8)
    yield client
    client.close()  # an idle keep-alive connection holds Triton's shutdown for exit_timeout


@pytest.fixture
def grpc_client(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def _http_input(array: np.ndarray, name: str = "x"):
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def _grpc_input(array: np.ndarray, name: str = "x"):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


# --- set-up and flags -------------------------------------------------------------------
def test_prepare_is_idempotent(tmp_path):
    home = tmp_path / "home"
    first = prepare(home, perf_analyzer=False)
    files = sorted(p for p in home.rglob("*") if p.is_file() and p.name != "install.json")
    stamps = {p: p.stat().st_mtime_ns for p in files}
    started = time.monotonic()
    second = prepare(home, perf_analyzer=False)
    assert time.monotonic() - started < 2.0
    assert first == second
    assert {p: p.stat().st_mtime_ns for p in files} == stamps, "a re-run must not rewrite anything"
    backends = first.backend_directory
    assert sorted(p.name for p in (backends / "python").iterdir()) == [
        "libtriton_python.so",
        "triton_python_backend_stub",
        "triton_python_backend_utils.py",
    ]
    assert os.access(backends / "python" / "triton_python_backend_stub", os.X_OK)
    assert sorted(p.name for p in (backends / "onnxruntime").iterdir()) == ["model.py"]


def test_prepare_provides_a_running_perf_analyzer(install):
    assert prepare(install.home) == install  # cached: no download, no re-extraction
    argv0, env = perf_analyzer_command(install.home)
    result = subprocess.run([argv0, "--version"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "2.51.0" in result.stdout + result.stderr
    # perf_analyzer 2.51 does not know --help: it prints its usage and exits 99.
    usage = subprocess.run([argv0, "--help"], env=env, capture_output=True, text=True, timeout=30)
    assert "Usage" in usage.stdout + usage.stderr
    for link in ("libb64.so.0d", "libcudart.so.12"):
        assert (install.home / "lib" / link).resolve().is_file()


def test_server_arguments_read_the_shared_args_file(tmp_path):
    shared = read_args_file(DEFAULT_ARGS_FILE)
    assert f"--http-header-forward-pattern={C.HEADER_FORWARD_PATTERN}" in shared
    assert f"--grpc-header-forward-pattern={C.HEADER_FORWARD_PATTERN}" in shared
    flags = server_arguments(
        tmp_path,
        http_port=1,
        grpc_port=2,
        metrics_port=3,
        backend_directory=tmp_path / "b",
        model_control="explicit",
        load_models=["m1", "m2"],
        strict_readiness=False,
        gpu=False,
        extra=["--x=y"],
    )
    assert all(flag in flags for flag in shared)
    for flag in (
        f"--model-repository={tmp_path.resolve()}",
        "--http-port=1",
        "--grpc-port=2",
        "--metrics-port=3",
        f"--backend-directory={(tmp_path / 'b').resolve()}",
        "--model-control-mode=explicit",
        "--load-model=m1",
        "--load-model=m2",
        "--strict-readiness=false",
        "--exit-on-error=false",
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
    ):
        assert flag in flags
    assert flags[-1] == "--x=y"
    on_gpu = server_arguments(tmp_path, model_control="none", gpu=True)
    assert "--allow-gpu-metrics=false" not in on_gpu and "--pinned-memory-pool-byte-size=0" not in on_gpu
    assert "--exit-on-error=true" in on_gpu and not any(f.startswith("--load-model") for f in on_gpu)
    assert "--load-model=*" in server_arguments(tmp_path, model_control="explicit", gpu=False)


def test_args_file_refuses_deployment_flags_and_foreign_header_patterns(tmp_path):
    bad = tmp_path / "bad.args"
    bad.write_text("--http-port=9000\n")
    with pytest.raises(ValueError, match="--http-port"):
        read_args_file(bad)
    bad.write_text("--http-header-forward-pattern=.*\n--grpc-header-forward-pattern=x-csm-.*\n")
    with pytest.raises(ValueError, match="http-header-forward-pattern"):
        read_args_file(bad)


# --- a real server ----------------------------------------------------------------------
def test_onnx_and_python_models_over_http_and_grpc(server, http_client, grpc_client):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)  # small integers: x * 2 and x * 3 are exact
    assert np.array_equal(http_client.infer("double", [_http_input(x)]).as_numpy("y"), x * 2)
    assert np.array_equal(grpc_client.infer("double", [_grpc_input(x)]).as_numpy("y"), x * 2)
    assert np.array_equal(grpc_client.infer("triple", [_grpc_input(x)]).as_numpy("y"), x * 3)
    a = np.array([1, 2, 3], dtype=np.int32)
    assert np.array_equal(http_client.infer("add_one", [_http_input(a, "a")]).as_numpy("b"), a + 1)
    assert np.array_equal(grpc_client.infer("add_one", [_grpc_input(a, "a")]).as_numpy("b"), a + 1)
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=5) as response:
        assert 'nv_inference_count{model="double"' in response.read().decode()


def test_x_csm_headers_reach_the_model(http_client, grpc_client):
    a = np.array([0], dtype=np.int32)
    result = http_client.infer("add_one", [_http_input(a, "a")], headers={"x-csm-probe": "http", "x-other": "no"})
    params = json.loads(result.as_numpy("params")[0])
    assert params.get("x-csm-probe") == "http" and "x-other" not in params
    result = grpc_client.infer("add_one", [_grpc_input(a, "a")], headers={"x-csm-probe": "grpc"})
    assert json.loads(result.as_numpy("params")[0]).get("x-csm-probe") == "grpc"


def _counts(client, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def test_dynamic_batching_runs_concurrent_requests_together(http_client):
    inferences_before, executions_before = _counts(http_client, "double")
    inputs = [np.full((1, 4), i, dtype=np.float32) for i in range(8)]
    pending = [http_client.async_infer("double", [_http_input(x)]) for x in inputs]
    results = [p.get_result(timeout=30).as_numpy("y") for p in pending]
    for x, y in zip(inputs, results):
        assert np.array_equal(y, x * 2)
    inferences_after, executions_after = _counts(http_client, "double")
    assert inferences_after - inferences_before == 8
    assert executions_after - executions_before < 8, "the shim must run a dynamic batch as one execution"


def test_bad_inputs_are_invalid_arg_and_the_next_request_works(http_client, grpc_client):
    from tritonclient.utils import InferenceServerException

    wrong_type = np.zeros((1, 4), dtype=np.int32)
    with pytest.raises(InferenceServerException) as http_error:
        http_client.infer("double", [_http_input(wrong_type)])
    assert http_error.value.status() == "400" and "'x'" in http_error.value.message()
    with pytest.raises(InferenceServerException) as grpc_error:
        grpc_client.infer("double", [_grpc_input(wrong_type)])
    assert grpc_error.value.status() == "StatusCode.INVALID_ARGUMENT" and "'x'" in grpc_error.value.message()
    # [1, 3] passes the config (dims [-1]) and is refused by the shim (the model fixes 4).
    with pytest.raises(InferenceServerException) as shim_error:
        grpc_client.infer("double", [_grpc_input(np.zeros((1, 3), dtype=np.float32))])
    assert shim_error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x'" in shim_error.value.message() and "internal" not in shim_error.value.message()
    x = np.ones((1, 4), dtype=np.float32)
    assert np.array_equal(grpc_client.infer("double", [_grpc_input(x)]).as_numpy("y"), x * 2)
    assert http_client.is_server_ready() and http_client.is_model_ready("double")


def test_perf_analyzer_measures_the_onnx_model(server, install):
    argv0, env = perf_analyzer_command(install.home)
    command = [
        argv0,
        "-m",
        "double",
        "-u",
        server.grpc_url,
        "-i",
        "grpc",
        "--shape",
        "x:4",
        "--concurrency-range",
        "1",
        "--measurement-interval",
        "500",
        "--max-trials",
        "4",
        "--stability-percentage",
        "100",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Throughput" in result.stdout


# --- models that fail to load -----------------------------------------------------------
def test_missing_model_onnx_fails_alone_and_names_the_file(install, tmp_path):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    repository = tmp_path / "repository"
    write_onnx_model(repository, "double", 2.0, engine='platform: "onnxruntime_onnx"')
    write_onnx_model(repository, "broken", 2.0, engine='platform: "onnxruntime_onnx"', with_file=False)
    missing = repository / "broken" / "1" / "model.onnx"
    with TritonServer(
        repository,
        install=install,
        model_control="explicit",
        load_models=["double", "broken"],
        strict_readiness=False,
        ready_models=["double"],
        log_path=tmp_path / "server.log",
        startup_timeout=60,
    ) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            assert client.is_model_ready("double") and not client.is_model_ready("broken")
            index = {
                entry["name"]: entry
                for entry in client.get_model_repository_index(headers=server.model_control_headers)
            }
            assert index["broken"]["state"] == "UNAVAILABLE" and str(missing) in index["broken"]["reason"]
            with pytest.raises(InferenceServerException, match="restricted"):  # the test server is closed too
                client.load_model("broken")
            with pytest.raises(InferenceServerException, match="model.onnx"):
                client.load_model("broken", headers=server.model_control_headers)
            x = np.ones((1, 4), dtype=np.float32)
            assert np.array_equal(client.infer("double", [_http_input(x)]).as_numpy("y"), x * 2)
        finally:
            client.close()
    assert server.returncode == 0 and server.process is None
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


def test_failed_start_raises_with_the_log_and_leaves_nothing_running(install, tmp_path):
    repository = tmp_path / "repository"
    write_onnx_model(repository, "broken", 2.0, engine='backend: "onnxruntime"', with_file=False)
    server = TritonServer(repository, install=install, model_control="none", log_path=tmp_path / "server.log")
    with pytest.raises(TritonStartError, match="model.onnx") as error:
        with server:
            pytest.fail("a server whose only model cannot load must not become ready")
    assert "exited with code" in str(error.value)
    assert server.process is None and server.returncode not in (None, 0)
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))
