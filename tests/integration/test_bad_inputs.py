"""Bad input against a real tritonserver: through the KServe v2 front (kserve_front)
what Triton 2.51 itself mishandles is a 400 and the server lives on; at the models,
codec codes, lengths and sampling extremes are INVALID_ARG naming the input; a long
codec request leaves no gigabytes behind in its stub."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpc
from conftest import kserve_front_process
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from csm_servers.gateway.kserve_front import create_front
from csm_triton import constants as C
from csm_triton.serving.process import TritonServer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# 82 bytes that abort tritonserver 2.51 (std::bad_alloc) when sent to it directly.
HUGE_SHAPE = b'{"inputs":[{"name":"AUDIO","datatype":"FP32","shape":[1099511627776],"data":[0]}]}'


@pytest.fixture(scope="module")
def front(triton_server):
    with TestClient(create_front(triton_server.http_url)) as client:
        yield client


@pytest.fixture(scope="module")
def front_process(triton_server, tmp_path_factory):
    """`python -m csm_servers.gateway.kserve_front` on a free port, as a deployment runs it."""
    with kserve_front_process(triton_server.http_url, log_path=tmp_path_factory.mktemp("front") / "front.log") as url:
        yield url


def tensor(name, array):
    datatype = {np.float32: "FP32", np.int64: "INT64", np.int32: "INT32"}.get(array.dtype.type, "BYTES")
    item = grpc.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def refusal(client, model, inputs) -> str:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, inputs)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
    message = caught.value.message()
    assert "Traceback" not in message and "node" not in message.lower() and "ONNXRuntime" not in message
    return message


# --- the front -------------------------------------------------------------------------------
def test_the_huge_shape_body_is_a_400_from_the_front_and_triton_lives_on(front_process, triton_server):
    answer = httpx.post(f"{front_process}/v2/models/watermark_detect/infer", content=HUGE_SHAPE, timeout=30)
    assert answer.status_code == 400
    assert "input 'AUDIO' of model 'watermark_detect'" in answer.json()["error"] and "limit" in answer.json()["error"]
    assert triton_server.process.poll() is None
    assert httpx.get(f"http://{triton_server.http_url}/v2/health/live", timeout=5).status_code == 200
    # ...and real work still flows through the same front (a public model: internal ones are 404 there).
    audio = {"AUDIO": [0.0] * C.MIN_WATERMARK_DETECT_SAMPLES, "SAMPLE_RATE": C.SAMPLE_RATE}
    answer = httpx.post(f"{front_process}/v2/models/watermark_detect/generate", json=audio, timeout=60)
    assert answer.status_code == 200 and answer.json()["SCORE"] == 0.0  # silence scores 0


def test_with_a_restricted_inference_api_only_the_front_reaches_triton(served_repository, tmp_path):
    """tritonserver --http-restricted-api=inference:NAME=KEY refuses /infer without the key
    before parsing the body; the front sends the key, so going around it gets a 403."""
    with TritonServer(
        served_repository,
        load_models=["watermark_detect"],
        ready_models=["watermark_detect"],
        log_path=tmp_path / "tritonserver.log",
        extra_args=["--http-restricted-api=inference:triton-front-key=k3y"],
    ) as server:
        direct = httpx.post(
            f"http://{server.http_url}/v2/models/watermark_detect/infer", content=HUGE_SHAPE, timeout=30
        )
        assert direct.status_code == 403 and server.process.poll() is None
        app = create_front(server.http_url, triton_headers={"triton-front-key": "k3y"})
        with TestClient(app) as front:
            assert front.post("/v2/models/watermark_detect/infer", content=HUGE_SHAPE).status_code == 400
            audio = {"AUDIO": [0.0] * C.MIN_WATERMARK_DETECT_SAMPLES, "SAMPLE_RATE": C.SAMPLE_RATE}
            answer = front.post("/v2/models/watermark_detect/generate", json=audio)
            assert answer.status_code == 200 and answer.json()["SCORE"] == 0.0  # silence scores 0


def test_a_bytes_input_sent_as_int16_is_a_400_naming_both_types(front):
    body = {"inputs": [{"name": "VOICE_ID", "datatype": "INT16", "shape": [1], "data": [5]}]}
    answer = front.post("/v2/models/voice_delete/infer", json=body)
    assert answer.status_code == 400
    assert answer.json() == {"error": "input 'VOICE_ID' of model 'voice_delete' is BYTES; the request says \"INT16\""}


# Bodies that tritonserver 2.51 answers with a 500 (its JSON parser), each a 4xx here.
TRITON_500S = {
    "voice_delete/infer": [
        {"inputs": [{"name": "VOICE_ID", "datatype": "BYTES", "shape": [1], "data": [5]}]},
        {"inputs": [{"name": "VOICE_ID", "datatype": "BYTES", "shape": [1], "data": "a"}]},
        {"inputs": [{"name": "VOICE_ID", "datatype": "BYTES", "shape": 1, "data": ["a"]}]},
        {"inputs": [{"name": 5, "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
        {"inputs": [{"name": "VOICE_ID", "datatype": 5, "shape": [1], "data": ["a"]}]},
        {"inputs": {"a": 1}},
        {"inputs": [{"name": "VOICE_ID", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "id": 5},
        {"inputs": [{"name": "VOICE_ID", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "parameters": [1]},
        {
            "inputs": [{"name": "VOICE_ID", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
            "parameters": {"priority": "x"},
        },
        {
            "inputs": [{"name": "VOICE_ID", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
            "parameters": {"sequence_id": -1},
        },
        {
            "inputs": [{"name": "VOICE_ID", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
            "outputs": [{"name": "DELETED", "parameters": {"binary_data": "x"}}],
        },
    ],
    "watermark_detect/infer": [
        {"inputs": [{"name": "AUDIO", "datatype": "FP32", "shape": [3], "data": ["x", 1, 2]}]},
        {"inputs": [{"name": "AUDIO", "datatype": "FP32", "shape": [3], "data": [1, 2]}]},
        {"inputs": [{"name": "SAMPLE_RATE", "datatype": "INT32", "shape": [1], "data": [1.5]}]},
        {"inputs": [{"name": "AUDIO", "datatype": "FP32", "shape": [536870912], "data": []}]},  # 2 GB for nothing
    ],
    "voice_delete/generate": [
        {"VOICE_ID": 5},
        {"VOICE_ID": None},
        {"VOICE_ID": "a", "id": 5},
        {"VOICE_ID": "a", "parameters": [1]},
    ],
    "watermark_detect/generate": [{"AUDIO": [[1, 2], [3, 4]], "SAMPLE_RATE": 24000}],
    "csm_tts/infer": [
        {"inputs": [{"name": "SEED", "datatype": "INT64", "shape": [1], "data": [2**63]}]},
        {"inputs": [{"name": "TOP_K", "datatype": "INT32", "shape": [1], "data": [1e20]}]},
    ],
}
RAW_500S = [
    b'{"inputs":[{"name":"AUDIO","datatype":"FP32","shape":[2],"data":[1,2,3]}',  # cut short
    b'{"inputs":[{"name":"AUDIO","datatype":"FP32","shape":[1],"data":[NaN]}]}',
]


def test_bodies_triton_answers_with_a_500_are_a_4xx_with_a_message(front, triton_server):
    cases = [(route, json.dumps(body).encode()) for route, bodies in TRITON_500S.items() for body in bodies]
    cases += [("watermark_detect/infer", raw) for raw in RAW_500S]
    for route, raw in cases:
        answer = front.post(f"/v2/models/{route}", content=raw)
        assert 400 <= answer.status_code < 500 and answer.json()["error"], (route, raw, answer.text)
    assert httpx.get(f"http://{triton_server.http_url}/v2/health/live", timeout=5).status_code == 200


def test_integers_past_the_inputs_type_are_refused_by_the_front_not_wrapped(front, triton_server):
    top_k = {
        "inputs": [
            {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["Hi."]},
            {"name": "TOP_K", "datatype": "INT32", "shape": [1], "data": [2**31]},
        ]
    }
    answer = front.post("/v2/models/csm_tts/infer", json=top_k)
    assert answer.status_code == 400 and "input 'TOP_K'" in answer.json()["error"]
    assert "[-2147483648, 2147483647], got 2147483648" in answer.json()["error"]
    # Sent to Triton directly, 2^31 wraps to -2^31: the model still refuses it by name.
    direct = httpx.post(f"http://{triton_server.http_url}/v2/models/csm_tts/infer", json=top_k, timeout=30)
    assert direct.status_code == 400 and "input 'TOP_K' must be in [1, 2048], got -2147483648" in direct.json()["error"]


# --- sampling extremes at the models -----------------------------------------------------------
@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("TOP_K", np.array([2**31], np.int64).astype(np.int32), "input 'TOP_K' must be in [1, 2048], got -2147483648"),
        ("TOP_K", np.array([-5], np.int32), "input 'TOP_K' must be in [1, 2048], got -5"),
        ("TOP_K", np.array([2049], np.int32), "input 'TOP_K' must be in [1, 2048], got 2049"),
        ("SEED", np.array([-1], np.int64), "input 'SEED' must be >= 0, got -1"),
        ("SEED", np.array([2**63], np.uint64).astype(np.int64), "input 'SEED' must be >= 0, got -9223372036854775808"),
        ("TEMPERATURE", np.array([np.nan], np.float32), "input 'TEMPERATURE' must be in (0, 5]"),
        ("TEMPERATURE", np.array([-1e-45], np.float32), "input 'TEMPERATURE' must be in (0, 5]"),
    ],
)
def test_sampling_extremes_are_invalid_arg_naming_the_input(grpc_client, name, value, expected):
    assert expected in refusal(
        grpc_client, "csm_tts", [tensor("TEXT", np.array([b"Hi."], dtype=object)), tensor(name, value)]
    )
    # csm_lm's own door, streamed: the prompt as csm_prepare makes it.
    prompt = grpc_client.infer("csm_prepare", [tensor("TEXT", np.array([b"Hi."], dtype=object))])
    inputs = [
        tensor("input_ids", prompt.as_numpy("input_ids")),
        tensor("prompt_codes", prompt.as_numpy("prompt_codes")),
        tensor(name, value),
    ]
    answers = []
    grpc_client.start_stream(callback=lambda result, error: answers.append(error or result))
    try:
        grpc_client.async_stream_infer("csm_lm", inputs, enable_empty_final_response=True)
        deadline = time.monotonic() + 30
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        grpc_client.stop_stream()
    assert isinstance(answers[0], InferenceServerException) and expected in answers[0].message()


def test_a_temperature_below_the_floor_samples_at_the_floor(grpc_client):
    def speak(temperature):
        inputs = [
            tensor("TEXT", np.array([b"Cold."], dtype=object)),
            tensor("TEMPERATURE", np.array([temperature], np.float32)),
            tensor("SEED", np.array([3], np.int64)),
            tensor("MAX_AUDIO_SECONDS", np.array([0.4], np.float32)),
        ]
        return grpc_client.infer("csm_tts", inputs).as_numpy("AUDIO")

    tiny = speak(1e-45)  # inside the documented (0, 5]; was INTERNAL (every code drawn was 0)
    assert tiny.size > 0 and np.isfinite(tiny).all()
    assert np.array_equal(tiny, speak(C.MIN_TEMPERATURE))


# --- the codec models, called directly ---------------------------------------------------------
@pytest.mark.parametrize(
    "codes, expected",
    [
        (
            np.full((1, 32, 2), C.CODEBOOK_SIZE, np.int64),
            "input 'audio_codes' holds codes outside [0, 2048) (from 2048",
        ),
        (np.full((1, 32, 2), -1, np.int64), "input 'audio_codes' holds codes outside [0, 2048) (from -1"),
        (np.zeros((1, 32, 0), np.int64), "input 'audio_codes' has 0 frames; at least 1 is needed"),
        (np.zeros((1, 32, C.MAX_CODEC_FRAMES + 1), np.int64), f"the limit is {C.MAX_CODEC_FRAMES} frames (120 s)"),
    ],
)
def test_mimi_decoder_refuses_codes_out_of_range_and_bad_lengths(grpc_client, codes, expected):
    assert expected in refusal(grpc_client, "mimi_decoder", [tensor("audio_codes", codes)])


def test_mimi_encoder_refuses_empty_and_over_long_audio(grpc_client):
    empty = np.zeros((1, 1, 0), np.float32)
    assert "input 'input_values' holds no samples" in refusal(
        grpc_client, "mimi_encoder", [tensor("input_values", empty)]
    )
    long = np.zeros((1, 1, C.MAX_CODEC_SAMPLES + 1), np.float32)
    message = refusal(grpc_client, "mimi_encoder", [tensor("input_values", long)])
    assert "input 'input_values' has 2880001 samples (120.0 s at 24000 Hz); the limit is 120 s" in message


def _stub_rss_mb(server, model: str) -> int:
    """Resident MB of the python stub serving `model` (the server's process group)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if (
                "triton_python_backend_stub" in command
                and f"/{model}/" in command
                and os.getpgid(int(pid)) == server.pid
            ):
                status = Path(f"/proc/{pid}/status").read_text()
                return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) // 1024
        except (OSError, ProcessLookupError):
            continue
    raise AssertionError(f"no stub process for {model}")


def test_a_120_s_encode_is_served_and_leaves_no_memory_behind(triton_server, grpc_client):
    audio = (0.1 * np.random.default_rng(0).standard_normal((1, 1, C.MAX_CODEC_SAMPLES))).astype(np.float32)
    before = _stub_rss_mb(triton_server, "mimi_encoder")
    for _ in range(2):
        codes = grpc_client.infer("mimi_encoder", [tensor("input_values", audio)], client_timeout=120)
        assert codes.as_numpy("audio_codes").shape == (1, C.NUM_CODEBOOKS, C.MAX_CODEC_FRAMES)
    after = _stub_rss_mb(triton_server, "mimi_encoder")
    # With ONNX Runtime's CPU arena the stub kept ~+680 MB after this (the tiny model).
    assert after - before < 150, (before, after)
