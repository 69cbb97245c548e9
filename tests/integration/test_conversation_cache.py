"""A conversation that grows by one turn reuses the keys and values of the turns before
(the prefix cache per turn boundary), seen in csm_lm's metrics, and its answer is the
codes a cold run gives with the same SEED, all against the real tritonserver.

The cold run is the same server's: csm_lm asked first with prefix_cache_turns 0, before
anything of this conversation is cached, so it computes every turn and stores none (its
zero reused tokens say so)."""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as grpc
from tritonclient.utils import InferenceServerException

from csm_triton import constants as C

from .test_monitoring import engine_values
from .test_tts import reference_clip, tensor, text

pytestmark = pytest.mark.integration
# Texts no other test sends: the chain's keys hash them, so nothing is cached before.
TURNS = [
    ("Good evening, caching desk speaking.", 0, 1.0),
    ("Evening! I am calling about my order.", 1, 1.2),
    ("Of course, let me look that up.", 0, 0.8),
]
FIRST, SECOND = "Could you give me the number?", "It is four two seven."
SEED, SECONDS = 4242, 0.4
REUSED, HITS, MISSES = (
    "csm_prefix_cache_reused_tokens_total",
    "csm_prefix_cache_hits_total",
    "csm_prefix_cache_misses_total",
)


def context(turns) -> list:
    clips = [reference_clip(seconds, seed=40 + index) for index, (_, _, seconds) in enumerate(turns)]
    return [
        tensor(grpc, "CONTEXT_TEXT", np.array([t.encode() for t, _, _ in turns], dtype=object)),
        tensor(grpc, "CONTEXT_SPEAKER", np.array([s for _, s, _ in turns], np.int32)),
        tensor(grpc, "CONTEXT_AUDIO", np.concatenate(clips)),
        tensor(grpc, "CONTEXT_AUDIO_LENGTHS", np.array([c.size for c in clips], np.int32)),
        tensor(grpc, "CONTEXT_SAMPLE_RATE", np.array([C.SAMPLE_RATE], np.int32)),
    ]


def sampling() -> list:
    return [
        tensor(grpc, "SEED", np.array([SEED], np.int64)),
        tensor(grpc, "MAX_AUDIO_SECONDS", np.array([SECONDS], np.float32)),
    ]


def lm_codes(client, input_ids, prompt_codes, **extra) -> np.ndarray:
    """csm_lm's codes for a prompt, over a gRPC stream (it is decoupled)."""
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = [
        tensor(grpc, "input_ids", input_ids),
        tensor(grpc, "prompt_codes", prompt_codes),
        *sampling(),
        *(tensor(grpc, name, value) for name, value in extra.items()),
    ]
    chunks = []
    try:
        client.async_stream_infer("csm_lm", inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                raise error
            codes = result.as_numpy("codes")  # the final response may hold other outputs only
            if codes is not None:
                chunks.append(codes)
            if result.as_numpy("error") is not None:  # a failure rides on the final response
                raise AssertionError(f"csm_lm failed: {result.as_numpy('error')[0].decode()}")
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return np.concatenate(chunks)
    finally:
        client.stop_stream()


def metrics_after(server, before: dict, expected: dict, timeout: float = 10.0) -> dict:
    """The metrics' growth since `before`, once each reached its expected growth (csm_lm
    sets them just after it answers) or the timeout passed."""
    deadline = time.monotonic() + timeout
    while True:
        now = engine_values(server, before)
        grown = {name: now[name] - before[name] for name in before}
        if all(grown[name] >= value for name, value in expected.items()) or time.monotonic() > deadline:
            return grown
        time.sleep(0.1)


def test_a_conversation_grown_by_one_turn_hits_the_prefix_cache_and_answers_as_a_cold_run(grpc_client, triton_server):
    prepared = grpc_client.infer("csm_prepare", [tensor(grpc, "TEXT", text(SECOND)), *context(TURNS)])
    input_ids, prompt_codes = prepared.as_numpy("input_ids"), prepared.as_numpy("prompt_codes")
    audio_eos = int(prepared.as_numpy("audio_token_ids")[1])
    ends = np.flatnonzero(input_ids == audio_eos) + 1
    assert len(ends) == 3, "one <|audio_eos|> per context turn"

    # The cold run: nothing of this conversation cached, nothing stored.
    before = engine_values(triton_server, (REUSED, HITS, MISSES))
    cold = lm_codes(grpc_client, input_ids, prompt_codes, prefix_cache_turns=np.array([0], np.int32))
    grown = metrics_after(triton_server, before, {MISSES: 1})
    assert grown[REUSED] == 0 and grown[MISSES] >= 1, grown
    assert len(cold) == round(SECONDS * C.FRAME_RATE_HZ)

    # Request 1: the first two turns and a line to speak, as a client sends it.
    audio = grpc_client.infer(
        "csm_tts",
        [
            tensor(grpc, "TEXT", text(FIRST)),
            *context(TURNS[:2]),
            tensor(grpc, "SPEAKER", np.array([1], np.int32)),
            *sampling(),
        ],
    )
    assert audio.as_numpy("AUDIO").size == len(cold) * C.SAMPLES_PER_FRAME

    # Request 2: the same two turns, one more, and new text: the two turns come from the
    # cache, and the codes are the cold run's, to the last one.
    before = engine_values(triton_server, (REUSED, HITS, MISSES))
    warm = grpc_client.infer(
        "csm_generate", [tensor(grpc, "input_ids", input_ids), tensor(grpc, "prompt_codes", prompt_codes), *sampling()]
    )
    grown = metrics_after(triton_server, before, {REUSED: int(ends[1]), HITS: 1})
    assert grown[HITS] >= 1 and grown[REUSED] == ends[1], (grown, ends)
    np.testing.assert_array_equal(warm.as_numpy("audio_codes")[0].T, cold)

    # Asked again through csm_tts: now all three turns are reused.
    before = engine_values(triton_server, (REUSED, HITS, MISSES))
    again = grpc_client.infer("csm_tts", [tensor(grpc, "TEXT", text(SECOND)), *context(TURNS), *sampling()])
    grown = metrics_after(triton_server, before, {REUSED: int(ends[2])})
    assert grown[REUSED] == ends[2], (grown, ends)
    assert again.as_numpy("AUDIO").size == len(cold) * C.SAMPLES_PER_FRAME


def test_a_negative_prefix_cache_turns_is_a_clear_client_error(grpc_client):
    prepared = grpc_client.infer("csm_prepare", [tensor(grpc, "TEXT", text(FIRST))])
    with pytest.raises(InferenceServerException, match="prefix_cache_turns") as refused:
        lm_codes(
            grpc_client,
            prepared.as_numpy("input_ids"),
            prepared.as_numpy("prompt_codes"),
            prefix_cache_turns=np.array([-1], np.int32),
        )
    assert "Traceback" not in str(refused.value)
