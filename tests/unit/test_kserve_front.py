"""The KServe v2 front without a server: its checks on request JSON against model
configs as Triton reports them, and its proxying against a fake Triton (httpx's
MockTransport): what is refused never reaches Triton, what passes arrives unchanged."""

from __future__ import annotations

import gzip
import json
import zlib

import httpx
import pytest
from fastapi.testclient import TestClient

from csm_servers.gateway.kserve_checks import (
    DEFAULT_MAX_ELEMENTS,
    ModelSpec,
    Refused,
    check_generate,
    check_infer,
    parse_json,
)
from csm_servers.gateway.kserve_front import create_front
from csm_servers.gateway.kserve_limits import DEFAULT_MAX_BODY_BYTES
from csm_triton import constants as C

# Triton's JSON configs (GET /v2/models/{m}/config), trimmed to what the front reads.
WATERMARK_DETECT = {
    "name": "watermark_detect",
    "max_batch_size": 0,
    "input": [
        {"name": "AUDIO", "data_type": "TYPE_FP32", "dims": [-1]},
        {"name": "SAMPLE_RATE", "data_type": "TYPE_INT32", "dims": [1]},
    ],
}
VOICE_DELETE = {
    "name": "voice_delete",
    "max_batch_size": 0,
    "input": [{"name": "VOICE_ID", "data_type": "TYPE_STRING", "dims": [1]}],
}
MIMI_DECODER = {
    "name": "mimi_decoder",
    "max_batch_size": 16,
    "input": [{"name": "audio_codes", "data_type": "TYPE_INT64", "dims": [32, -1]}],
}
CSM_LM = {
    "name": "csm_lm",
    "max_batch_size": 0,
    "input": [
        {"name": "prompt_codes", "data_type": "TYPE_INT64", "dims": [-1, 32]},
        {"name": "TOP_K", "data_type": "TYPE_INT32", "dims": [1]},
        {"name": "SEED", "data_type": "TYPE_INT64", "dims": [1]},
        {"name": "TEMPERATURE", "data_type": "TYPE_FP32", "dims": [1]},
    ],
}
CONFIGS = {config["name"]: config for config in (WATERMARK_DETECT, VOICE_DELETE, MIMI_DECODER, CSM_LM)}
SPEC = {name: ModelSpec.from_config(config) for name, config in CONFIGS.items()}


def _input(name, datatype, shape, data=None, **parameters):
    item = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        item["data"] = data
    if parameters:
        item["parameters"] = parameters
    return item


def refused(spec, header, binary_bytes=0) -> str:
    with pytest.raises(Refused) as caught:
        check_infer(spec, header, binary_bytes)
    assert caught.value.status == 400
    return str(caught.value)


# --- what crashed or stalled Triton 2.51 ------------------------------------------------------
@pytest.mark.parametrize("shape", [[1099511627776], [2147483648], [2**64 - 1]])
def test_a_declared_shape_past_the_limit_is_refused_before_any_data_is_read(shape):
    message = refused(SPEC["watermark_detect"], {"inputs": [_input("AUDIO", "FP32", shape, [0])]})
    assert "input 'AUDIO' of model 'watermark_detect'" in message and f"limit is {DEFAULT_MAX_ELEMENTS}" in message


def test_the_issues_exact_trigger_is_refused_by_its_rank():
    # MAX_AUDIO_SECONDS-style [1, 2^40] against dims [-1]: the wrong rank already.
    message = refused(SPEC["watermark_detect"], {"inputs": [_input("AUDIO", "FP32", [1, 1099511627776], [])]})
    assert "rank 1" in message


def test_a_shape_product_that_wraps_in_64_bits_is_still_refused():
    spec = SPEC["mimi_decoder"]
    assert "limit" in refused(spec, {"inputs": [_input("audio_codes", "INT64", [1, 32, 2**59], [])]})


def test_a_repeated_key_is_refused_because_triton_reads_the_first_and_python_the_last():
    raw = b'{"inputs":[{"name":"AUDIO","datatype":"FP32","shape":[1099511627776],"shape":[1],"data":[0]}]}'
    with pytest.raises(Refused, match="repeats the key 'shape'"):
        parse_json(raw)


def test_deep_nesting_non_json_constants_and_other_encodings_are_refused():
    with pytest.raises(Refused, match="too deeply"):
        parse_json(b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(Refused, match="NaN"):
        parse_json(b'{"data":[NaN]}')
    with pytest.raises(Refused, match="not UTF-8"):
        parse_json('{"x":"é"}'.encode("latin-1"))
    with pytest.raises(Refused, match="not valid JSON"):
        parse_json(b'{"inputs":[}')


# --- Triton's 500s: every one a 400 naming the problem -------------------------------------
def test_bytes_sent_as_int16_names_the_input_and_both_types():
    message = refused(SPEC["voice_delete"], {"inputs": [_input("VOICE_ID", "INT16", [1], [5])]})
    assert message == "input 'VOICE_ID' of model 'voice_delete' is BYTES; the request says \"INT16\""


@pytest.mark.parametrize(
    "name, datatype, data, expected",
    [
        ("SAMPLE_RATE", "INT32", [99999999999], "integers in [-2147483648, 2147483647], got 99999999999"),
        ("SAMPLE_RATE", "INT32", [1.5], "got 1.5"),
        ("SAMPLE_RATE", "INT32", [True], "got true"),
        ("AUDIO", "FP32", ["x"], 'got "x"'),
        ("AUDIO", "FP32", [1e39], "finite numbers within"),
    ],
)
def test_a_value_the_datatype_cannot_hold_is_refused_instead_of_wrapping_or_failing(name, datatype, data, expected):
    shape = [1] if name == "SAMPLE_RATE" else [len(data)]
    message = refused(SPEC["watermark_detect"], {"inputs": [_input(name, datatype, shape, data)]})
    assert f"input '{name}'" in message and expected in message


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("TOP_K", 2**31, "[-2147483648, 2147483647]"),
        ("SEED", 2**63, "[-9223372036854775808, 9223372036854775807]"),
    ],
)
def test_sampling_integers_past_their_type_are_refused_naming_the_input(name, value, expected):
    datatype = "INT32" if name == "TOP_K" else "INT64"
    message = refused(SPEC["csm_lm"], {"inputs": [_input(name, datatype, [1], [value])]})
    assert f"input '{name}'" in message and expected in message


def test_data_must_hold_exactly_the_declared_elements_nested_or_flat():
    spec = SPEC["mimi_decoder"]
    check_infer(spec, {"inputs": [_input("audio_codes", "INT64", [1, 32, 2], [[[1, 2]] * 32])]})
    check_infer(spec, {"inputs": [_input("audio_codes", "INT64", [1, 32, 2], [1] * 64)]})
    assert "holds 63" in refused(spec, {"inputs": [_input("audio_codes", "INT64", [1, 32, 2], [1] * 63)]})
    assert "'data' must be a JSON array" in refused(
        spec, {"inputs": [_input("audio_codes", "INT64", [1, 32, 1], "abc")]}
    )


@pytest.mark.parametrize(
    "shape, expected",
    [
        ([32, 2], "rank 3: [batch, 32, -1]"),
        ([1, 31, 2], "dimension 1 must be 32"),
        ([17, 32, 1], "batch size 17; the model takes 1 to 16"),
        ([0, 32, 1], "batch size 0"),
        ([1, -32, 1], "'shape' must be an array of integers >= 0"),
    ],
)
def test_rank_fixed_dims_and_batch_size_follow_the_config(shape, expected):
    assert expected in refused(SPEC["mimi_decoder"], {"inputs": [_input("audio_codes", "INT64", shape, [])]})


@pytest.mark.parametrize(
    "header, expected",
    [
        ({"inputs": {"a": 1}}, "'inputs', an array"),
        ({"inputs": [_input("NOPE", "FP32", [1], [0])]}, 'has no input "NOPE" (its inputs: AUDIO, SAMPLE_RATE)'),
        ({"inputs": [_input(5, "FP32", [1], [0])]}, "has no input 5"),
        ({"inputs": [_input("AUDIO", "FP32", [1], [0])] * 2}, "given twice"),
        ({"inputs": [_input("AUDIO", "FP32", [1])]}, "either 'data' or 'parameters.binary_data_size'"),
        ({"inputs": [_input("AUDIO", "FP32", [1], [0], shared_memory_region="r")]}, "shared memory"),
        ({"inputs": [], "id": 5}, "'id' must be a string"),
        ({"inputs": [], "parameters": [1]}, "must be a JSON object, got an array"),
        ({"inputs": [], "parameters": {"priority": "x"}}, "'priority' must be an integer >= 0"),
        ({"inputs": [], "parameters": {"timeout": -1}}, "'timeout' must be an integer >= 0"),
        ({"inputs": [], "parameters": {"sequence_id": -1}}, "'sequence_id' must be an integer >= 0 or a string"),
        ({"inputs": [], "parameters": {"binary_data_output": "x"}}, "'binary_data_output' must be true or false"),
        ({"inputs": [], "parameters": {"mine": [1]}}, "'mine' must be a string, a number or a boolean"),
        ({"inputs": [], "outputs": [{"name": 5}]}, "needs a 'name' string"),
        ({"inputs": [], "outputs": [{"name": "SCORE", "parameters": {"binary_data": "x"}}]}, "'binary_data' must be"),
        ({"inputs": [], "outputs": [{"name": "SCORE", "parameters": {"classification": "x"}}]}, "'classification'"),
    ],
)
def test_malformed_requests_are_refused_with_their_problem_named(header, expected):
    assert expected in refused(SPEC["watermark_detect"], header)


def test_valid_requests_pass():
    check_infer(
        SPEC["watermark_detect"],
        {
            "id": "r1",
            "parameters": {"priority": 1, "sequence_id": "s", "x-csm-anything": 2.5},
            "inputs": [_input("AUDIO", "FP32", [3], [0, 0.5, -1]), _input("SAMPLE_RATE", "INT32", [1], [24000])],
            "outputs": [{"name": "SCORE", "parameters": {"binary_data": True}}],
        },
    )
    check_infer(SPEC["voice_delete"], {"inputs": [_input("VOICE_ID", "BYTES", [1], ["fox"])]})


# --- the binary extension: the JSON header checked the same way, sizes consistent ----------
def test_binary_inputs_declare_sizes_that_match_their_shapes_and_the_body():
    spec = SPEC["watermark_detect"]
    header = {
        "inputs": [
            _input("AUDIO", "FP32", [4], binary_data_size=16),
            _input("SAMPLE_RATE", "INT32", [1], binary_data_size=4),
        ]
    }
    check_infer(spec, header, binary_bytes=20)
    assert "add up to 20 bytes, but 19" in refused(spec, header, binary_bytes=19)
    huge = {"inputs": [_input("AUDIO", "FP32", [1099511627776], binary_data_size=16)]}
    assert "limit" in refused(spec, huge, 16)
    wrong = {"inputs": [_input("AUDIO", "FP32", [4], binary_data_size=15)]}
    assert "must be exactly 16 bytes" in refused(spec, wrong, 15)
    strings = {"inputs": [_input("VOICE_ID", "BYTES", [1], binary_data_size=3)]}
    assert "at least 4 bytes" in refused(SPEC["voice_delete"], strings, 3)


# --- /generate: keys that name inputs hold a value or a flat array --------------------------
def test_generate_bodies_follow_the_inputs_dims_and_types():
    check_generate(SPEC["voice_delete"], {"VOICE_ID": "fox", "parameters": {"a": 1}, "extra": "x"})
    check_generate(SPEC["mimi_decoder"], {"audio_codes": list(range(64))})
    cases = [
        (SPEC["voice_delete"], {"VOICE_ID": 5}, "values must be strings, got 5"),
        (SPEC["voice_delete"], {"VOICE_ID": None}, "got null"),
        (SPEC["voice_delete"], {"VOICE_ID": ["a", "b"]}, "exactly 1 values, got 2"),
        (SPEC["voice_delete"], {"VOICE_ID": "a", "id": 5}, "'id' must be a string"),
        (SPEC["voice_delete"], {"VOICE_ID": "a", "parameters": [1]}, "must be a JSON object"),
        (SPEC["voice_delete"], {"VOICE_ID": "a", "foo": [1]}, "'foo' must be a string, a number or a boolean"),
        (SPEC["watermark_detect"], {"AUDIO": [[1, 2], [3, 4]]}, "not nested arrays"),
        (SPEC["watermark_detect"], {"SAMPLE_RATE": 99999999999}, "integers in"),
        (SPEC["mimi_decoder"], {"audio_codes": list(range(63))}, "a positive multiple of 32 values, got 63"),
        (SPEC["csm_lm"], {"prompt_codes": list(range(64))}, None),
        ({}, [1], "must be a JSON object"),
    ]
    for spec, body, expected in cases:
        if expected is None:
            check_generate(spec, body)
            continue
        with pytest.raises(Refused) as caught:
            check_generate(spec or SPEC["voice_delete"], body)
        assert expected in str(caught.value), (body, str(caught.value))


def test_an_input_with_two_variable_dims_cannot_go_through_generate():
    spec = ModelSpec.from_config({"name": "m", "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, -1]}]})
    with pytest.raises(Refused, match="more than one variable dimension"):
        check_generate(spec, {"x": [1, 2]})


# --- the limits cover everything the service accepts ------------------------------------------
def test_the_fronts_limits_admit_the_largest_inputs_the_service_documents():
    reference = int(C.MAX_REFERENCE_SECONDS * C.MAX_INPUT_SAMPLE_RATE)  # 30 s at 192 kHz
    assert DEFAULT_MAX_ELEMENTS >= max(
        reference,
        C.MAX_CODEC_SAMPLES,
        C.NUM_CODEBOOKS * C.MAX_CODEC_FRAMES,
        int(C.MAX_WATERMARK_SECONDS * C.SAMPLE_RATE),
    )
    assert DEFAULT_MAX_BODY_BYTES >= 4 * max(reference, C.MAX_CODEC_SAMPLES) + 4096  # FP32, binary, one item
    check_infer(
        SPEC["watermark_detect"],
        {"inputs": [_input("AUDIO", "FP32", [reference], binary_data_size=4 * reference)]},
        4 * reference,
    )


# --- the proxy, against a fake Triton -------------------------------------------------------
class FakeTriton:
    """Answers config requests from CONFIGS and records everything else it receives."""

    def __init__(self):
        self.received: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.split("/")
        if request.url.path.endswith("/config"):
            config = CONFIGS.get(parts[3])
            if config is None:
                return httpx.Response(404, json={"error": f"Request for unknown model: '{parts[3]}' is not found"})
            return httpx.Response(200, json=config)
        self.received.append(request)
        if request.url.path.endswith("/generate_stream"):
            return httpx.Response(
                200, content=b'data: {"SCORE":[0.5]}\n\n', headers={"content-type": "text/event-stream"}
            )
        return httpx.Response(
            200,
            json={"model_name": parts[3], "outputs": []},
            headers={"inference-header-content-length": "7", "x-not-passed": "1"},
        )


@pytest.fixture
def triton():
    return FakeTriton()


@pytest.fixture
def front(triton):
    with TestClient(
        create_front("triton:8000", transport=httpx.MockTransport(triton), max_body_bytes=1 << 20)
    ) as client:
        yield client


def _body(spec_name="watermark_detect", shape=(1099511627776,)):
    return {"inputs": [_input("AUDIO", "FP32", list(shape), [0] * (1 if shape[0] > 4 else shape[0]))]}


def test_a_refused_request_never_reaches_triton(front, triton):
    answer = front.post("/v2/models/watermark_detect/infer", json=_body())
    assert answer.status_code == 400 and "limit" in answer.json()["error"]
    assert triton.received == []


def test_a_valid_request_is_forwarded_with_its_headers_and_the_answer_comes_back(front, triton):
    body = json.dumps(_body(shape=(2,))).encode()
    answer = front.post(
        "/v2/models/watermark_detect/versions/1/infer",
        content=body,
        headers={"x-csm-admin-token": "t", "accept-encoding": "gzip", "content-type": "application/json"},
    )
    assert answer.status_code == 200 and answer.json()["model_name"] == "watermark_detect"
    assert answer.headers["inference-header-content-length"] == "7" and "x-not-passed" not in answer.headers
    (sent,) = triton.received
    assert sent.url.path == "/v2/models/watermark_detect/versions/1/infer" and sent.content == body
    assert sent.headers["x-csm-admin-token"] == "t" and sent.headers["accept-encoding"] == "identity"


def test_a_compressed_body_is_checked_inflated_and_a_bomb_is_refused(front, triton):
    good = gzip.compress(json.dumps(_body(shape=(2,))).encode())
    answer = front.post("/v2/models/watermark_detect/infer", content=good, headers={"content-encoding": "gzip"})
    assert answer.status_code == 200 and "content-encoding" not in triton.received[0].headers
    bomb = gzip.compress(b" " * (4 << 20))
    answer = front.post("/v2/models/watermark_detect/infer", content=bomb, headers={"content-encoding": "gzip"})
    assert answer.status_code == 413 and "inflates past" in answer.json()["error"]
    answer = front.post("/v2/models/watermark_detect/infer", content=b"{}", headers={"content-encoding": "br"})
    assert answer.status_code == 400 and len(triton.received) == 1
    # Inflated as it arrives: a stream cut short is refused, not forwarded in part.
    answer = front.post("/v2/models/watermark_detect/infer", content=good[:-12], headers={"content-encoding": "gzip"})
    assert answer.status_code == 400 and "ends early" in answer.json()["error"] and len(triton.received) == 1
    deflated = zlib.compress(json.dumps(_body(shape=(2,))).encode())
    answer = front.post("/v2/models/watermark_detect/infer", content=deflated, headers={"content-encoding": "deflate"})
    assert answer.status_code == 200 and triton.received[-1].content == zlib.decompress(deflated)


def test_an_oversized_body_is_refused_with_413(front, triton):
    answer = front.post("/v2/models/watermark_detect/infer", content=b" " * ((1 << 20) + 1))
    assert answer.status_code == 413 and triton.received == []


def test_binary_requests_are_split_at_the_header_length(front, triton):
    header = json.dumps({"inputs": [_input("AUDIO", "FP32", [2], binary_data_size=8)]}).encode()
    body = header + b"\0" * 8
    answer = front.post(
        "/v2/models/watermark_detect/infer", content=body, headers={"inference-header-content-length": str(len(header))}
    )
    assert answer.status_code == 200 and triton.received[0].content == body
    answer = front.post(
        "/v2/models/watermark_detect/infer", content=body, headers={"inference-header-content-length": "99999"}
    )
    assert answer.status_code == 400 and "Inference-Header-Content-Length" in answer.json()["error"]


def test_unknown_models_get_tritons_own_answer_and_configs_are_fetched_once(front, triton, monkeypatch):
    # csm_tts is served by the front (a public model) but not by this fake Triton.
    answer = front.post("/v2/models/csm_tts/infer", json={"inputs": []})
    assert answer.status_code == 404 and "unknown model" in answer.json()["error"]
    fetched = []
    front.app.state.front._specs.clear()
    original = front.app.state.front.client.get

    async def counting(path, **kwargs):
        fetched.append(path)
        return await original(path, **kwargs)

    monkeypatch.setattr(front.app.state.front.client, "get", counting)
    for _ in range(3):
        assert front.post("/v2/models/watermark_detect/infer", json=_body(shape=(2,))).status_code == 200
    assert fetched == ["/v2/models/watermark_detect/config"]


def test_generate_stream_is_relayed_and_generate_is_checked(front, triton):
    answer = front.post("/v2/models/watermark_detect/generate_stream", json={"AUDIO": [0.0, 0.1], "SAMPLE_RATE": 24000})
    assert answer.status_code == 200 and answer.text.startswith("data: ")
    answer = front.post("/v2/models/voice_delete/generate", json={"VOICE_ID": 5})
    assert answer.status_code == 400 and "must be strings" in answer.json()["error"]


def test_only_the_kserve_inference_routes_are_served(front, triton):
    assert front.get("/v2/health/ready").status_code == 200
    assert triton.received[-1].url.path == "/v2/health/ready"
    for method, path in (
        ("POST", "/v2/repository/models/csm_lm/unload"),
        ("POST", "/v2/systemsharedmemory/register"),
        ("GET", "/v2/logging"),
        ("POST", "/v2/models/csm_lm/trace/setting"),
    ):
        answer = front.request(method, path)
        assert answer.status_code in (404, 405) and len(triton.received) == 1, path
    assert front.get("/v2/models/mimi_decoder/versions/abc/config").status_code == 404


def test_an_unreachable_triton_is_a_503():
    def down(request):
        raise httpx.ConnectError("refused", request=request)

    with TestClient(create_front("triton:8000", transport=httpx.MockTransport(down))) as client:
        answer = client.post("/v2/models/watermark_detect/infer", json={"inputs": []})
        assert answer.status_code == 503 and "not reachable" in answer.json()["error"]


def test_the_fronts_own_header_reaches_triton_over_the_clients(triton):
    app = create_front("triton:8000", transport=httpx.MockTransport(triton), triton_headers={"Triton-Front-Key": "k"})
    with TestClient(app) as client:
        body = json.dumps(_body(shape=(2,)))
        assert (
            client.post(
                "/v2/models/watermark_detect/infer", content=body, headers={"triton-front-key": "guess"}
            ).status_code
            == 200
        )
    assert triton.received[0].headers["triton-front-key"] == "k"


def test_a_model_list_keeps_the_internal_models_out_of_reach(triton):
    app = create_front("triton:8000", transport=httpx.MockTransport(triton), models=["watermark_detect"])
    with TestClient(app) as client:
        assert client.post("/v2/models/watermark_detect/infer", json=_body(shape=(2,))).status_code == 200
        for path in ("/v2/models/mimi_decoder/infer", "/v2/models/mimi_decoder/config"):
            answer = client.post(path, json={}) if path.endswith("infer") else client.get(path)
            assert answer.status_code == 404 and "not served by this front" in answer.json()["error"]
    assert len(triton.received) == 1
