"""csm_tts and csm_tts_stream end to end against the real tritonserver: inline
reference, stored voice, concurrency, reproducibility, streaming and cancellation."""

from __future__ import annotations

import json
import queue
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from csm_triton import constants as C
from csm_triton.core.stream_decoder import snr_db

from .conftest import ADMIN_TOKEN, slots_in_use

pytestmark = pytest.mark.integration
PROTOCOLS = {"http": http, "grpc": grpc}
DTYPES = {np.float32: "FP32", np.int64: "INT64", np.int32: "INT32", np.bool_: "BOOL"}


def tensor(module, name, array):
    array = np.asarray(array)
    item = module.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else DTYPES[array.dtype.type])
    item.set_data_from_numpy(array)
    return item


def text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=object)


def reference_clip(seconds=1.5, seed=0) -> np.ndarray:
    t = np.arange(int(seconds * C.SAMPLE_RATE)) / C.SAMPLE_RATE
    noise = 0.03 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * 150 * t * (1 + 0.3 * t)) + noise).astype(np.float32)


def tts_inputs(module, words="Hello there, how are you?", seconds=1.0, seed=7, voice_id=None, reference=True):
    inputs = [
        tensor(module, "TEXT", text(words)),
        tensor(module, "MAX_AUDIO_SECONDS", np.array([seconds], np.float32)),
        tensor(module, "SEED", np.array([seed], np.int64)),
    ]
    if voice_id is not None:
        inputs.append(tensor(module, "VOICE_ID", text(voice_id)))
    elif reference:
        inputs += [
            tensor(module, "REFERENCE_AUDIO", reference_clip()),
            tensor(module, "REFERENCE_SAMPLE_RATE", np.array([C.SAMPLE_RATE], np.int32)),
            tensor(module, "REFERENCE_TEXT", text("A short reference sentence.")),
        ]
    return inputs


def expected_samples(seconds: float) -> int:
    return int(np.ceil(seconds * C.FRAME_RATE_HZ)) * C.SAMPLES_PER_FRAME


@pytest.fixture(params=sorted(PROTOCOLS))
def protocol(request, http_client, grpc_client):
    return PROTOCOLS[request.param], {"http": http_client, "grpc": grpc_client}[request.param]


@pytest.fixture(scope="module")
def stored_voice(http_client):
    inputs = [
        tensor(http, "VOICE_ID", text("tts-test-voice")),
        tensor(http, "REFERENCE_AUDIO", reference_clip(2.0, seed=1)),
        tensor(http, "REFERENCE_SAMPLE_RATE", np.array([C.SAMPLE_RATE], np.int32)),
        tensor(http, "REFERENCE_TEXT", text("My voice, stored once.")),
    ]
    http_client.infer("voice_register", inputs, headers={C.ADMIN_TOKEN_HEADER: ADMIN_TOKEN})
    return "tts-test-voice"


def test_csm_tts_with_an_inline_reference(protocol):
    module, client = protocol
    result = client.infer("csm_tts", tts_inputs(module))
    audio = result.as_numpy("AUDIO")
    assert audio.dtype == np.float32 and audio.shape == (expected_samples(1.0),)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    assert result.as_numpy("SAMPLE_RATE").tolist() == [C.SAMPLE_RATE]


def test_csm_tts_with_a_stored_voice(protocol, stored_voice):
    module, client = protocol
    audio = client.infer("csm_tts", tts_inputs(module, voice_id=stored_voice, seconds=0.5)).as_numpy("AUDIO")
    assert audio.shape == (expected_samples(0.5),)


def test_same_seed_and_inputs_give_identical_audio_and_another_seed_does_not(grpc_client):
    first = grpc_client.infer("csm_tts", tts_inputs(grpc, seed=11)).as_numpy("AUDIO")
    again = grpc_client.infer("csm_tts", tts_inputs(grpc, seed=11)).as_numpy("AUDIO")
    other = grpc_client.infer("csm_tts", tts_inputs(grpc, seed=12)).as_numpy("AUDIO")
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_four_concurrent_clients_all_succeed(grpc_client):
    answers = queue.Queue()
    for index in range(4):
        grpc_client.async_infer(
            "csm_tts",
            tts_inputs(grpc, words=f"Client number {index}.", seed=index),
            callback=lambda result, error: answers.put((result, error)),
        )
    results = [answers.get(timeout=120) for _ in range(4)]
    assert all(error is None for _, error in results), [str(e) for _, e in results if e]
    assert all(result.as_numpy("AUDIO").shape == (expected_samples(1.0),) for result, _ in results)


def test_csm_tts_is_callable_with_plain_kserve_json(triton_server):
    body = {
        "inputs": [
            {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["Plain JSON, as curl sends it."]},
            {"name": "MAX_AUDIO_SECONDS", "datatype": "FP32", "shape": [1], "data": [0.5]},
        ]
    }
    request = urllib.request.Request(
        f"http://{triton_server.http_url}/v2/models/csm_tts/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        outputs = {o["name"]: o for o in json.load(response)["outputs"]}
    assert outputs["AUDIO"]["shape"] == [expected_samples(0.5)]
    assert outputs["SAMPLE_RATE"]["data"] == [C.SAMPLE_RATE]


def test_csm_tts_output_carries_the_watermark_and_the_raw_decode_does_not(grpc_client):
    words, seed = "Is this audio watermarked?", 21
    audio = grpc_client.infer("csm_tts", tts_inputs(grpc, words=words, seconds=2.0, seed=seed, reference=False))
    # The same generation without the watermark step: csm_prepare -> csm_generate -> mimi_decoder.
    prompt = grpc_client.infer("csm_prepare", [tensor(grpc, "TEXT", text(words))])
    codes = grpc_client.infer(
        "csm_generate",
        [
            tensor(grpc, "input_ids", prompt.as_numpy("input_ids")),
            tensor(grpc, "prompt_codes", prompt.as_numpy("prompt_codes")),
            tensor(grpc, "MAX_AUDIO_SECONDS", np.array([2.0], np.float32)),
            tensor(grpc, "SEED", np.array([seed], np.int64)),
        ],
    ).as_numpy("audio_codes")
    raw = grpc_client.infer("mimi_decoder", [tensor(grpc, "audio_codes", codes)]).as_numpy("audio_values")[0, 0]

    def score(samples):
        return float(
            grpc_client.infer(
                "watermark_detect",
                [
                    tensor(grpc, "AUDIO", samples),
                    tensor(grpc, "SAMPLE_RATE", np.array([C.SAMPLE_RATE], np.int32)),
                ],
            ).as_numpy("SCORE")[0]
        )

    assert raw.shape == audio.as_numpy("AUDIO").shape
    assert score(audio.as_numpy("AUDIO")) >= 0.9
    assert score(raw) <= 0.1


def stream_chunks(client, inputs, stop_after=None):
    """(arrival time, AUDIO) per chunk over a gRPC stream; stops early (cancelling) after
    `stop_after` chunks."""
    arrivals = queue.Queue()
    client.start_stream(callback=lambda result, error: arrivals.put((time.perf_counter(), result, error)))
    chunks = []
    try:
        client.async_stream_infer("csm_tts_stream", inputs, enable_empty_final_response=True)
        while True:
            arrived, result, error = arrivals.get(timeout=120)
            if error is not None:
                raise error
            final = result.get_response().parameters.get("triton_final_response")
            if result.get_response().outputs:
                chunks.append((arrived, result.as_numpy("AUDIO")))
            if (final is not None and final.bool_param) or (stop_after and len(chunks) >= stop_after):
                break
    finally:
        client.stop_stream(cancel_requests=stop_after is not None)
    return chunks


def test_stream_sends_audio_before_generation_ends_and_matches_the_offline_result(grpc_client):
    offline = grpc_client.infer("csm_tts", tts_inputs(grpc, seconds=3.0, seed=5)).as_numpy("AUDIO")
    chunks = stream_chunks(grpc_client, tts_inputs(grpc, seconds=3.0, seed=5))
    sizes = [len(audio) for _, audio in chunks]
    assert len(chunks) >= 3 and sizes[0] == C.STREAM_FIRST_CHUNK_FRAMES * C.SAMPLES_PER_FRAME
    assert chunks[-1][0] - chunks[0][0] > 0.05, "the first chunk came well before the last"
    streamed = np.concatenate([audio for _, audio in chunks])
    assert streamed.shape == offline.shape
    assert snr_db(offline, streamed) >= 30.0


def test_stream_over_http_generate_stream(triton_server):
    body = json.dumps({"TEXT": "Streaming over server-sent events.", "MAX_AUDIO_SECONDS": 1.0}).encode()
    request = urllib.request.Request(
        f"http://{triton_server.http_url}/v2/models/csm_tts_stream/generate_stream",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
    audio = [np.asarray(event["AUDIO"], np.float32) for event in events if "AUDIO" in event]
    assert len(audio) >= 2 and sum(map(len, audio)) == expected_samples(1.0)


def test_csm_tts_and_the_stream_return_the_text_as_spoken(grpc_client, triton_server):
    words = "It costs $5.30 on Jan. 3rd."
    as_written = grpc_client.infer(
        "csm_tts",
        tts_inputs(grpc, words=words, seconds=0.2, reference=False) + [tensor(grpc, "NORMALIZE", np.array([False]))],
    )
    assert as_written.as_numpy("NORMALIZED_TEXT").tolist() == [words.encode()]
    body = json.dumps({"TEXT": words, "MAX_AUDIO_SECONDS": 0.2}).encode()
    request = urllib.request.Request(
        f"http://{triton_server.http_url}/v2/models/csm_tts_stream/generate_stream",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        events = [json.loads(line[5:]) for line in response if line.startswith(b"data:")]
    # (generate_stream sends a one-element tensor as its value)
    assert events[-1]["NORMALIZED_TEXT"] == "It costs five dollars and thirty cents on the third of january."


def test_a_bad_stream_request_is_refused_as_a_client_error(grpc_client):
    with pytest.raises(InferenceServerException) as failure:
        stream_chunks(grpc_client, tts_inputs(grpc, voice_id="no-such-voice"))
    assert "unknown voice 'no-such-voice'" in failure.value.message()
    assert "internal error" not in failure.value.message()


def test_closing_a_stream_midway_frees_its_slot(grpc_client, triton_server):
    chunks = stream_chunks(grpc_client, tts_inputs(grpc, seconds=60.0, seed=1), stop_after=1)
    assert len(chunks) == 1
    deadline = time.monotonic() + 30
    while slots_in_use(triton_server) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slots_in_use(triton_server) == 0


BAD_TTS_INPUTS = {
    "empty text": ({"TEXT": text("  ")}, "'TEXT' is empty"),
    "text over the limit": ({"TEXT": text("a" * (C.MAX_LONG_TEXT_CHARS + 1))}, f"the limit is {C.MAX_LONG_TEXT_CHARS}"),
    "invalid UTF-8": ({"TEXT": np.array([b"caf\xe9"], dtype=object)}, "not valid UTF-8"),
    "temperature zero": ({"TEMPERATURE": np.array([0.0], np.float32)}, "'TEMPERATURE' must be in"),
    "temperature NaN": ({"TEMPERATURE": np.array([np.nan], np.float32)}, "'TEMPERATURE' must be in"),
    "top-k zero": ({"TOP_K": np.array([0], np.int32)}, "'TOP_K' must be in [1, 2048]"),
    "top-k too large": ({"TOP_K": np.array([4096], np.int32)}, "'TOP_K' must be in [1, 2048]"),
    "max seconds zero": ({"MAX_AUDIO_SECONDS": np.array([0.0], np.float32)}, "'MAX_AUDIO_SECONDS' must be in"),
    "max seconds too long": ({"MAX_AUDIO_SECONDS": np.array([1e4], np.float32)}, "'MAX_AUDIO_SECONDS' must be in"),
    "unknown voice": ({"VOICE_ID": text("no-such-voice")}, "unknown voice"),
    "empty reference audio": (dict(REFERENCE=np.zeros(0, np.float32)), "REFERENCE_AUDIO"),
    "NaN in reference audio": (dict(REFERENCE=np.full(24_000, np.nan, np.float32)), "REFERENCE_AUDIO"),
    "infinite reference audio": (dict(REFERENCE=np.full(24_000, np.inf, np.float32)), "REFERENCE_AUDIO"),
    "reference audio too long": (dict(REFERENCE=np.zeros(24_000 * 31, np.float32) + 0.1), "REFERENCE_AUDIO"),
    "stereo-shaped reference audio": (dict(REFERENCE=np.zeros((2, 24_000), np.float32)), "REFERENCE_AUDIO"),
    "sample rate zero": (dict(RATE=0), "REFERENCE_SAMPLE_RATE"),
    "absurd sample rate": (dict(RATE=10**9), "REFERENCE_SAMPLE_RATE"),
    "reference audio without transcript": (dict(TRANSCRIPT=None), "'REFERENCE_AUDIO' needs 'REFERENCE_TEXT'"),
    "voice id and reference audio": (dict(ALSO_VOICE_ID=text("someone")), "not both"),
    "path in voice id": ({"VOICE_ID": text("../x")}, "VOICE_ID"),
}


@pytest.mark.parametrize("case", sorted(BAD_TTS_INPUTS))
def test_bad_tts_input_gets_a_clear_error_while_a_good_request_succeeds(grpc_client, case):
    overrides, message = BAD_TTS_INPUTS[case]
    answers = queue.Queue()
    grpc_client.async_infer(
        "csm_tts",
        tts_inputs(grpc, seconds=0.5, reference=False),
        callback=lambda result, error: answers.put((result, error)),
    )
    inputs = {i.name(): i for i in tts_inputs(grpc, seconds=0.5, reference=False)}
    if {"REFERENCE", "RATE", "TRANSCRIPT", "ALSO_VOICE_ID"} & set(overrides):  # an inline reference, altered
        reference = {
            "REFERENCE_AUDIO": overrides.get("REFERENCE", reference_clip()),
            "REFERENCE_SAMPLE_RATE": np.array([overrides.get("RATE", C.SAMPLE_RATE)], np.int32),
            "REFERENCE_TEXT": overrides.get("TRANSCRIPT", text("A reference.")),
        }
        inputs.update({name: tensor(grpc, name, value) for name, value in reference.items() if value is not None})
        overrides = {"VOICE_ID": overrides["ALSO_VOICE_ID"]} if "ALSO_VOICE_ID" in overrides else {}
    inputs.update({name: tensor(grpc, name, value) for name, value in overrides.items()})
    with pytest.raises(InferenceServerException) as failure:
        grpc_client.infer("csm_tts", list(inputs.values()))
    result, error = answers.get(timeout=120)
    assert error is None and result.as_numpy("AUDIO").size
    assert message in failure.value.message() and "Traceback" not in failure.value.message()
