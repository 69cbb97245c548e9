"""One real tritonserver for the integration tests, serving a repository built from
the tiny checkpoint exactly as `make serve` builds it (cpu profile)."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from csm_triton.embedded import TritonServer
from export.build_repository import build_repository

SERVED_MODELS = ["csm_prepare", "mimi_encoder", "mimi_decoder"]
BROKEN_MODEL = "broken_codec"


@pytest.fixture(scope="session")
def model_repository(tiny_checkpoint, tmp_path_factory):
    out = build_repository(str(tiny_checkpoint), "cpu", tmp_path_factory.mktemp("repo") / "model_repository")
    # A model whose ONNX file is missing: it must fail to load, clearly, and alone.
    broken = out.parent / "extra" / BROKEN_MODEL
    broken.mkdir(parents=True)
    (broken / "1").mkdir()
    shutil.copy(out / "mimi_decoder" / "config.pbtxt", broken / "config.pbtxt")
    text = (broken / "config.pbtxt").read_text().replace('name: "mimi_decoder"', f'name: "{BROKEN_MODEL}"')
    (broken / "config.pbtxt").write_text(text)
    return out


@pytest.fixture(scope="session")
def triton_server(model_repository, tmp_path_factory):
    # A served copy of the repository, so the broken model sits beside the real ones
    # without touching the repository the other tests inspect.
    served = tmp_path_factory.mktemp("served") / "repository"
    shutil.copytree(model_repository, served)
    shutil.copytree(model_repository.parent / "extra" / BROKEN_MODEL, served / BROKEN_MODEL)
    server = TritonServer(
        served,
        load_models=SERVED_MODELS,
        strict_readiness=False,  # a failed load on purpose must not make the server "unready"
        ready_models=SERVED_MODELS,
        log_path=tmp_path_factory.mktemp("logs") / "tritonserver.log",
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


def describe(server) -> str:
    return textwrap.indent(server.log_tail(40), "  ")
