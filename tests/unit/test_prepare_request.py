"""csm_prepare's request read once (core.prepare_request): the cheap checks, each naming
its input, before anything touches a voice or the encoder."""

from __future__ import annotations

import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.core.prepare_request import CLIENT_INPUTS, INPUT_NAMES, PrepareRequest
from csm_triton.errors import InvalidInput


def texts(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


def test_a_plain_request_reads_as_its_defaults():
    asked = PrepareRequest.from_inputs({"TEXT": texts("Hello there.")})
    assert (
        asked.text,
        asked.speaker,
        asked.speaker_given,
        asked.normalize,
        asked.budget_every_segment,
        asked.voice_id,
    ) == ("Hello there.", C.DEFAULT_SPEAKER_ID, False, True, False, None)
    assert asked.context["texts"] is None and asked.context["voice_ids"] is None


def test_every_input_is_read_and_the_voice_and_context_pass_through_untouched():
    audio = np.zeros(2400, np.float32)
    asked = PrepareRequest.from_inputs(
        {
            "TEXT": texts("Hi."),
            "SPEAKER": np.array([3], np.int32),
            "NORMALIZE": np.array([False]),
            "SENTENCE_SEGMENTS": np.array([True]),
            "VOICE_ID": texts("alice"),
            "REFERENCE_TEXT": texts("a clip"),
            "CONTEXT_TEXT": texts("one", "two"),
            "CONTEXT_VOICE_ID": texts("bob"),
            "CONTEXT_AUDIO": audio,
            "budget_every_segment": np.array([True]),
        }
    )
    assert (asked.speaker, asked.speaker_given, asked.normalize, asked.budget_every_segment) == (3, True, False, True)
    assert asked.sentence_segments
    assert (asked.voice_id, asked.reference_text) == ("alice", "a clip")
    assert asked.context["texts"] == ["one", "two"] and asked.context["voice_ids"] == ["bob"]
    assert asked.context["audio"] is audio


@pytest.mark.parametrize(
    "inputs, named",
    [
        ({}, "TEXT"),
        ({"TEXT": texts("...")}, "TEXT"),  # nothing to speak
        ({"TEXT": texts("Hi."), "SPEAKER": np.array([C.MAX_SPEAKER_ID + 1], np.int32)}, "SPEAKER"),
        ({"TEXT": texts("Hi."), "NORMALIZE": np.array([1], np.int32)}, "NORMALIZE"),
        ({"TEXT": texts("Hi."), "SENTENCE_SEGMENTS": np.array([True, False])}, "SENTENCE_SEGMENTS"),
        ({"TEXT": texts("Hi."), "VOICE_ID": texts(" ")}, "VOICE_ID"),
        ({"TEXT": np.array([b"\xff\xfe"], dtype=object)}, "TEXT"),  # not UTF-8
    ],
)
def test_a_bad_cheap_input_is_refused_by_name(inputs, named):
    with pytest.raises(InvalidInput, match=named):
        PrepareRequest.from_inputs(inputs)


def test_the_stream_forwards_what_a_client_may_send_and_adds_only_its_own_inputs():
    assert set(INPUT_NAMES) - set(CLIENT_INPUTS) == {"budget_every_segment", "head_only", "pieces", "spoken_pieces"}
    assert {"TEXT", "SPEAKER", "VOICE_ID", "CONTEXT_AUDIO"} <= set(CLIENT_INPUTS)


def test_a_rest_request_carries_its_pieces_and_a_flood_of_them_is_refused():
    asked = PrepareRequest.from_inputs(
        {"TEXT": texts("Rest."), "pieces": texts("Two. ", "Three."), "spoken_pieces": texts("one, ")}
    )
    assert (asked.pieces, asked.spoken_pieces, asked.head_only) == (["Two. ", "Three."], ["one, "], False)
    assert PrepareRequest.from_inputs({"TEXT": texts("Rest."), "spoken_pieces": texts("x")}).pieces == []
    flood = texts(*["a" * 1000] * (C.NORMALIZED_TEXT_MAX_CHARS // 1000 + 1))
    with pytest.raises(InvalidInput, match="pieces"):
        PrepareRequest.from_inputs({"TEXT": texts("Rest."), "pieces": flood})


def test_sentence_segments_are_refused_past_their_count_before_any_work():
    many = "Go. " * (C.MAX_SENTENCE_SEGMENTS + 1)
    with pytest.raises(InvalidInput, match=f"more than {C.MAX_SENTENCE_SEGMENTS} sentences.*SENTENCE_SEGMENTS"):
        PrepareRequest.from_inputs({"TEXT": texts(many), "SENTENCE_SEGMENTS": np.array([True])})
    assert not PrepareRequest.from_inputs({"TEXT": texts(many)}).sentence_segments  # packed: no such limit
    enough = "Go. " * C.MAX_SENTENCE_SEGMENTS
    assert PrepareRequest.from_inputs({"TEXT": texts(enough), "SENTENCE_SEGMENTS": np.array([True])}).sentence_segments
