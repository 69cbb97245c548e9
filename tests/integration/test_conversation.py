"""Conversations and long texts against the real tritonserver: the server-built prompt
of a three-turn conversation equals CsmProcessor's (HTTP and gRPC, through csm_prepare),
a long text streams segment after segment and comes back whole from csm_tts, and each
bad conversation is INVALID_ARG while a good request succeeds."""

from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http
from transformers import AutoProcessor
from tritonclient.utils import InferenceServerException

from csm_triton import constants as C
from csm_triton.core import normalize, segments, text_split

from .conftest import slots_in_use
from .test_tts import reference_clip, stream_chunks, tensor, text, tts_inputs

pytestmark = pytest.mark.integration
PROTOCOLS = {"http": http, "grpc": grpc}
TURNS = [("Hello, who is there?", 0, 1.0), ("It is me, your neighbour.", 1, 1.5), ("Oh, come in then!", 0, 0.8)]


@pytest.fixture(params=sorted(PROTOCOLS))
def protocol(request, http_client, grpc_client):
    return PROTOCOLS[request.param], {"http": http_client, "grpc": grpc_client}[request.param]


def texts(values) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


def context_inputs(module, turns=TURNS):
    clips = [reference_clip(seconds, seed=seed) for seed, (_, _, seconds) in enumerate(turns)]
    return [
        tensor(module, "CONTEXT_TEXT", texts([t for t, _, _ in turns])),
        tensor(module, "CONTEXT_SPEAKER", np.array([s for _, s, _ in turns], np.int32)),
        tensor(module, "CONTEXT_AUDIO", np.concatenate(clips)),
        tensor(module, "CONTEXT_AUDIO_LENGTHS", np.array([c.size for c in clips], np.int32)),
        tensor(module, "CONTEXT_SAMPLE_RATE", np.array([C.SAMPLE_RATE], np.int32)),
    ], clips


@pytest.mark.parametrize("speaker", [1, 2])
def test_a_three_turn_prompt_equals_csm_processor(protocol, tiny_checkpoint, speaker):
    module, client = protocol
    inputs, clips = context_inputs(module)
    target = "Sit down, please."
    result = client.infer(
        "csm_prepare",
        [tensor(module, "TEXT", text(target)), tensor(module, "SPEAKER", np.array([speaker], np.int32)), *inputs],
    )
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    conversation = [
        {"role": str(s), "content": [{"type": "text", "text": t}, {"type": "audio", "path": clip}]}
        for (t, s, _), clip in zip(TURNS, clips)
    ]
    conversation.append({"role": str(speaker), "content": [{"type": "text", "text": target}]})
    expected = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"][0]
    input_ids = result.as_numpy("input_ids")
    assert input_ids.tolist() == expected.tolist()
    audio_id = int(result.as_numpy("audio_token_ids")[0])
    assert result.as_numpy("prompt_codes").shape == (int((input_ids == audio_id).sum()), C.NUM_CODEBOOKS)


def test_a_conversation_is_spoken_by_csm_tts_and_csm_tts_stream(grpc_client):
    inputs, _ = context_inputs(grpc)
    spoken = grpc_client.infer(
        "csm_tts",
        [*tts_inputs(grpc, seconds=0.5, reference=False), *inputs, tensor(grpc, "SPEAKER", np.array([1], np.int32))],
    ).as_numpy("AUDIO")
    assert spoken.size == 7 * C.SAMPLES_PER_FRAME
    chunks = stream_chunks(grpc_client, [*tts_inputs(grpc, seconds=0.5, reference=False), *inputs])
    assert sum(len(audio) for _, audio in chunks) == 7 * C.SAMPLES_PER_FRAME
    assert chunks[-1][1].size == 0, "the final response: an empty AUDIO beside FINISH_REASONS"


LONG_TEXT = " ".join(f"This is sentence number {i}, and it goes on for a little while." for i in range(24))
SEGMENT_FRAMES = 7  # MAX_AUDIO_SECONDS 0.5 (random weights never end)


def test_a_clients_max_audio_seconds_caps_a_long_text_as_a_whole(grpc_client, triton_server):
    # A long text is split into segments; a client's MAX_AUDIO_SECONDS bounds all of them
    # together (docs/api.md), so with 0.5 s only the first segment is spoken, streamed in
    # its usual first-chunk-then-rest schedule, and the KV slots are freed afterwards.
    # (The segment chain itself: tests/unit/test_segments.py.)
    assert len(text_split.split_text(LONG_TEXT)) >= 3
    chunks = stream_chunks(grpc_client, tts_inputs(grpc, words=LONG_TEXT, seconds=0.5))
    sizes = [len(audio) // C.SAMPLES_PER_FRAME for _, audio in chunks]
    assert sizes == [C.STREAM_FIRST_CHUNK_FRAMES, SEGMENT_FRAMES - C.STREAM_FIRST_CHUNK_FRAMES, 0]
    deadline = time.monotonic() + 30
    while slots_in_use(triton_server) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slots_in_use(triton_server) == 0


def test_csm_tts_caps_a_long_text_at_max_audio_seconds(protocol):
    module, client = protocol
    result = client.infer("csm_tts", tts_inputs(module, words=LONG_TEXT, seconds=0.5))
    assert result.as_numpy("AUDIO").shape == (SEGMENT_FRAMES * C.SAMPLES_PER_FRAME,)
    # The final response says so: the client's cap ended segment 0, the others never began.
    count = len(text_split.split_text(LONG_TEXT, normalize=normalize.normalize_texts))  # as csm_prepare splits
    assert [r.decode() if isinstance(r, bytes) else r for r in result.as_numpy("FINISH_REASONS")] == [
        segments.MAX_AUDIO_SECONDS
    ] + [segments.NOT_STARTED] * (count - 1)
    assert result.as_numpy("SEGMENT_FRAMES").tolist() == [SEGMENT_FRAMES] + [0] * (count - 1)


def test_a_short_text_has_one_finish_reason(grpc_client):
    result = grpc_client.infer("csm_tts", tts_inputs(grpc, seconds=0.5, reference=False))
    assert result.as_numpy("FINISH_REASONS").tolist() == [segments.MAX_AUDIO_SECONDS.encode()]
    assert result.as_numpy("SEGMENT_FRAMES").tolist() == [SEGMENT_FRAMES]


LONG_TURN = " ".join(["words that take tokens"] * 90)[: C.MAX_TEXT_CHARS]
BAD_CONVERSATIONS = {
    "lengths that do not add up": ({"CONTEXT_AUDIO_LENGTHS": np.array([100], np.int32)}, "adds up to 100"),
    "more turns than allowed": (
        {"CONTEXT_TEXT": texts(["turn"] * (C.MAX_CONTEXT_TURNS + 1))},
        f"the limit is {C.MAX_CONTEXT_TURNS}",
    ),
    "negative speaker": ({"SPEAKER": np.array([-1], np.int32)}, "speaker id -1"),
    "huge speaker": ({"SPEAKER": np.array([2**31 - 1], np.int32)}, "speaker ids are 0-"),
    "huge context speaker": ({"CONTEXT_SPEAKER": np.array([9999], np.int32)}, "speaker id 9999"),
    "unknown context voice": (
        {"CONTEXT_VOICE_ID": texts(["nobody-at-all"]), "CONTEXT_SPEAKER": np.zeros(2, np.int32)},
        "unknown voice 'nobody-at-all'",
    ),
    "only punctuation": ({"TEXT": text(" ?!… -- ")}, "only punctuation"),
    "only whitespace": ({"TEXT": text(" \t \n ")}, "input 'TEXT' is empty"),
    "context over the token budget": (
        {
            "CONTEXT_TEXT": texts([LONG_TURN] * 4),
            "CONTEXT_SPEAKER": np.zeros(4, np.int32),
            "CONTEXT_AUDIO": np.tile(reference_clip(1.0), 4),
            "CONTEXT_AUDIO_LENGTHS": np.full(4, C.SAMPLE_RATE, np.int32),
        },
        f"the limit is {C.MAX_PROMPT_TOKENS}",
    ),
}


def generate_stream_error(server, inputs) -> tuple[int, str]:
    """csm_tts_stream over HTTP generate_stream (SSE), which carries the error's status
    (a gRPC stream carries only its message): (HTTP status, message)."""
    body = {
        name: (value.tolist() if value.dtype != object else [v.decode() for v in value.reshape(-1)])
        for name, value in inputs.items()
    }
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/csm_tts_stream/generate_stream",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def bad_conversation(case) -> tuple[dict[str, np.ndarray], str]:
    """(a good one-turn conversation's inputs with the case's changes, the message expected)."""
    overrides, message = BAD_CONVERSATIONS[case]
    clip = reference_clip(1.0, seed=0)
    inputs = {
        "TEXT": text("Hello there, how are you?"),
        "MAX_AUDIO_SECONDS": np.array([0.5], np.float32),
        "SEED": np.array([7], np.int64),
        "CONTEXT_TEXT": texts(["A turn."]),
        "CONTEXT_SPEAKER": np.zeros(1, np.int32),
        "CONTEXT_AUDIO": clip,
        "CONTEXT_AUDIO_LENGTHS": np.array([clip.size], np.int32),
        "CONTEXT_SAMPLE_RATE": np.array([C.SAMPLE_RATE], np.int32),
    }
    return {**inputs, **overrides}, message


@pytest.mark.parametrize("case", sorted(BAD_CONVERSATIONS))
def test_bad_conversation_is_invalid_arg_while_a_good_request_succeeds(grpc_client, triton_server, case):
    inputs, message = bad_conversation(case)
    # A good csm_tts request and a good csm_tts_stream in flight meanwhile, on the same server.
    answers, streamed = queue.Queue(), queue.Queue()
    grpc_client.async_infer(
        "csm_tts",
        tts_inputs(grpc, seconds=0.5, reference=False),
        callback=lambda result, error: answers.put((result, error)),
    )
    good_stream = grpc.InferenceServerClient(triton_server.grpc_url)
    good_stream.start_stream(callback=lambda result, error: streamed.put((result, error)))
    try:
        good_stream.async_stream_infer(
            "csm_tts_stream", tts_inputs(grpc, seconds=0.5, reference=False), enable_empty_final_response=True
        )
        for model in ("csm_tts", "csm_prepare"):
            model_inputs = [
                tensor(grpc, name, value)
                for name, value in inputs.items()
                if model == "csm_tts" or name not in ("MAX_AUDIO_SECONDS", "SEED")
            ]
            with pytest.raises(InferenceServerException) as failure:
                grpc_client.infer(model, model_inputs)
            assert failure.value.status() == "StatusCode.INVALID_ARGUMENT", failure.value
            assert message in failure.value.message() and "Traceback" not in failure.value.message()
        # csm_tts_stream: over a gRPC stream the message (the stream carries no status) ...
        with pytest.raises(InferenceServerException) as failure:
            stream_chunks(grpc_client, [tensor(grpc, name, value) for name, value in inputs.items()])
        assert message in failure.value.message(), failure.value
        assert "Traceback" not in failure.value.message() and "internal error" not in failure.value.message()
        # ... and over HTTP generate_stream the status too: 400, a client error
        status, body = generate_stream_error(triton_server, inputs)
        assert status == 400 and message in body and "Traceback" not in body, (status, body)
        audio = []
        while True:
            result, error = streamed.get(timeout=120)
            assert error is None, error
            audio.append(result.as_numpy("AUDIO"))
            flag = result.get_response().parameters.get("triton_final_response")
            if flag is not None and flag.bool_param:
                break
        assert sum(a.size for a in audio if a is not None) == SEGMENT_FRAMES * C.SAMPLES_PER_FRAME
    finally:
        good_stream.stop_stream()
        good_stream.close()
    result, error = answers.get(timeout=120)
    assert error is None and result.as_numpy("AUDIO").size
