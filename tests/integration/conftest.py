"""One real tritonserver for the integration tests, serving every model of a
repository built from the tiny checkpoint exactly as `make serve` builds it (cpu
profile). Models added to `model_repository/` are served here without changes."""

from __future__ import annotations

import shutil
import urllib.request

import pytest

from csm_triton.serving.process import TritonServer

BROKEN_MODEL = "broken_codec"
ADMIN_TOKEN = "integration-test-token"


@pytest.fixture(scope="session")
def model_repository(tiny_checkpoint, tmp_path_factory):
    from export.build_repository import build_repository

    return build_repository(str(tiny_checkpoint), "cpu", tmp_path_factory.mktemp("repo") / "model_repository")


@pytest.fixture(scope="session")
def served_models(model_repository):
    return sorted(p.name for p in model_repository.iterdir() if (p / "config.pbtxt").is_file())


@pytest.fixture(scope="session")
def served_repository(model_repository, tmp_path_factory):
    # A copy, so tests may add models (a broken one) without touching the built one.
    served = tmp_path_factory.mktemp("served") / "repository"
    shutil.copytree(model_repository, served)
    return served


@pytest.fixture(scope="session")
def triton_server(served_repository, served_models, tmp_path_factory):
    server = TritonServer(
        served_repository,
        load_models=served_models,
        strict_readiness=False,  # a failed load on purpose must not make the server "unready"
        ready_models=served_models,
        log_path=tmp_path_factory.mktemp("logs") / "tritonserver.log",
        environment={"CSM_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    with server:
        yield server


@pytest.fixture(scope="session")
def http_client(triton_server):
    import tritonclient.http as http

    client = http.InferenceServerClient(triton_server.http_url, concurrency=8)
    yield client
    client.close()


@pytest.fixture(scope="session")
def grpc_client(triton_server):
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(triton_server.grpc_url)
    yield client
    client.close()


@pytest.fixture()
def broken_model(served_repository):
    """A codec model whose ONNX file is missing, placed beside the served ones."""
    target = served_repository / BROKEN_MODEL
    (target / "1").mkdir(parents=True, exist_ok=True)
    text = (served_repository / "mimi_decoder" / "config.pbtxt").read_text()
    (target / "config.pbtxt").write_text(text.replace('name: "mimi_decoder"', f'name: "{BROKEN_MODEL}"'))
    yield BROKEN_MODEL
    shutil.rmtree(target, ignore_errors=True)


def slots_in_use(triton_server) -> float:
    """csm_kv_slots_in_use as the server exports it now (its metrics endpoint)."""
    with urllib.request.urlopen(f"http://{triton_server.metrics_url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("csm_kv_slots_in_use"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("csm_kv_slots_in_use is not exported")
