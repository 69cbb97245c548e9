"""A long text's stream starts on its head: csm_prepare answers the first segment alone,
and the rest's segments are prepared on another thread while the head is spoken
(StreamPipeline._prepare_rest, SegmentChain.rest). Fake stages, no server."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.core.stream_pipeline import StreamPipeline
from csm_triton.errors import InvalidInput
from tests.unit.test_segments import AUDIO, AUDIO_EOS, Sender

HEAD = ("Head one.",)
REST = ("Rest two.", "Rest three.")


def texts(values) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


class HeadThenRest:
    """csm_prepare: the head (one segment) with the rest's sentences, then the rest's
    segments alone, held back until `release` is set (or failing with `rest_error`)."""

    def __init__(self, rest_error: Exception | None = None):
        self.calls, self.release, self.rest_error = [], threading.Event(), rest_error

    def __call__(self, inputs):
        self.calls.append(dict(inputs))
        if "pieces" not in inputs:
            assert inputs["head_only"].tolist() == [True]
            return {
                "input_ids": np.array([1, 2, AUDIO, AUDIO_EOS, 5, 6], np.int64),
                "prompt_codes": np.full((1, C.NUM_CODEBOOKS), 3, np.int64),
                "segment_ids": np.array([5, 6], np.int64),
                "segment_token_counts": np.array([2], np.int32),
                "segment_max_frames": np.array([40], np.int32),
                "audio_token_ids": np.array([AUDIO, AUDIO_EOS], np.int64),
                "normalized_text": texts(HEAD),
                "rest_pieces": texts(["Rest two. ", "Rest 3."]),
                "rest_spoken_pieces": texts([]),
            }
        assert self.release.wait(10), "the rest was waited for before the head's audio went out"
        self.rest_answered_at = time.monotonic()
        if self.rest_error is not None:
            raise self.rest_error
        return {
            "input_ids": np.zeros(0, np.int64),
            "prompt_codes": np.zeros((0, C.NUM_CODEBOOKS), np.int64),
            "segment_ids": np.array([7, 8, 9, 10], np.int64),
            "segment_token_counts": np.array([3, 1], np.int32),
            "segment_max_frames": np.array([50, 38], np.int32),
            "audio_token_ids": np.array([AUDIO, AUDIO_EOS], np.int64),
            "normalized_text": texts(REST),
        }


class ReleasingSender(Sender):
    """Lets the rest's preparation finish only once the first audio went out."""

    def __init__(self, prepare: HeadThenRest, cancel_after=None, releasing=True):
        super().__init__(cancel_after)
        self.prepare, self.releasing = prepare, releasing

    def send(self, outputs):
        super().send(outputs)
        if self.releasing:
            self.prepare.release.set()


def run(prepare, sampling=None, cancel_after=None, releasing=True):
    calls = []

    def generate(inputs, stream_id):
        calls.append(inputs)
        yield np.full((2, C.NUM_CODEBOOKS), len(calls), np.int64)

    sender = ReleasingSender(prepare, cancel_after, releasing)
    StreamPipeline(
        prepare=prepare,
        generate=generate,
        decode=lambda codes: np.repeat(codes[:, 0], 2).astype(np.float32),
        watermark=lambda audio: audio,
        cancel_generation=lambda _: None,
        left_context_frames=0,
    ).run(
        {"TEXT": texts(["whole text"]), "VOICE_ID": texts(["alice"]), "REFERENCE_AUDIO": np.zeros(24000, np.float32)},
        {"SEED": np.array([10], np.int64), **(sampling or {})},
        sender,
        stream_id="s",
    )
    return sender, calls


def test_the_head_is_spoken_before_the_rest_is_prepared_and_the_rest_follows_it():
    prepare = HeadThenRest()
    sender, calls = run(prepare)
    assert sender.finals == ["finish"]
    audio = np.concatenate([out["AUDIO"] for out in sender.sent])
    assert audio.tolist() == [1.0] * 4 + [2.0] * 4 + [3.0] * 4, "head, then both rest segments, in order"
    rest_request = prepare.calls[1]
    assert set(rest_request) == {"TEXT", "VOICE_ID", "pieces", "spoken_pieces", "budget_every_segment"}, (
        "the rest carries the text and the voice id, never the voice's or the context's audio"
    )
    assert rest_request["pieces"].tolist() == [b"Rest two. ", b"Rest 3."] and rest_request["budget_every_segment"]
    assert [c["SEED"].tolist() for c in calls] == [[10], [11], [12]], "the rest's segments keep counting"
    budgets = [round(float(c["MAX_AUDIO_SECONDS"][0]) * C.FRAME_RATE_HZ) for c in calls]
    assert budgets == [40, 50, 38], "the head is a segment of a long text: its own budget, not the request's cap"
    assert calls[1]["input_ids"].tolist().count(AUDIO) == 1 + 2, "segment 1 hears the context and the head"
    final = sender.final_outputs
    assert final["NORMALIZED_TEXT"].tolist() == [t.encode() for t in HEAD + REST]
    assert final["FINISH_REASONS"].tolist() == [b"end_of_speech"] * 3 and final["SEGMENT_FRAMES"].tolist() == [2] * 3


def test_a_cap_reached_on_the_head_still_lists_the_rest_as_not_started():
    sender, calls = run(HeadThenRest(), {"MAX_AUDIO_SECONDS": np.array([0.16], np.float32)})
    assert len(calls) == 1
    assert sender.final_outputs["FINISH_REASONS"].tolist() == [b"max_audio_seconds", b"not_started", b"not_started"]


def test_a_rest_that_cannot_be_prepared_ends_the_stream_with_its_error_after_the_head():
    sender, calls = run(HeadThenRest(InvalidInput("input 'TEXT': segment 2 has too many tokens")))
    assert len(sender.sent) == 1 and len(calls) == 1
    (error,) = sender.finals
    assert isinstance(error, InvalidInput) and "too many tokens" in str(error)


@pytest.mark.timeout(20)
def test_a_client_that_leaves_during_the_head_starts_nothing_more_but_its_rest_call_ends_first():
    """The stream's request must outlive its rest's csm_prepare call: a BLS answer to a
    model that a stopping server has unloaded aborts Triton 2.51."""
    prepare = HeadThenRest()
    threading.Timer(0.5, prepare.release.set).start()  # the rest's call answers 0.5 s later
    sender, calls = run(prepare, cancel_after=1, releasing=False)
    ended_at = time.monotonic()
    assert len(calls) == 1 and sender.finals == ["finish"], "no segment after the client left"
    assert prepare.rest_answered_at <= ended_at
