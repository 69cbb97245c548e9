"""How a stream of csm_tts_stream begins, carries audio and ends, with fake stages (no
server): chunks in order, decoded with left context and watermarked; one final
response whatever fails; a client that leaves stops generation and frees its slot."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.core.stream_pipeline import StreamPipeline
from csm_triton.errors import InvalidInput

CONTEXT = 3
CHUNK_SIZES = (2, 4, 4, 4)
STREAM_ID = "csm-stream-test"


def make_chunks(sizes=CHUNK_SIZES):
    """Chunks of codes whose frames are numbered 0, 1, 2, ... in every codebook."""
    frames = np.arange(sum(sizes))[:, None].repeat(C.NUM_CODEBOOKS, axis=1)
    return np.split(frames, np.cumsum(sizes)[:-1])


def decode_frame_numbers(codes):
    """Samples that say which frame they came from."""
    return np.repeat(codes[:, 0].astype(np.float32), C.SAMPLES_PER_FRAME)


class RecordingSender:
    def __init__(self, cancel_after=None, send_raises=None):
        self.sent, self.finals = [], []
        self.cancel_after = cancel_after
        self.send_raises = send_raises

    def send(self, outputs):
        if self.send_raises is not None:
            raise self.send_raises
        self.sent.append(outputs)

    def finish(self, outputs=None):
        self.finals.append(("finish", None))
        self.final_outputs = outputs

    def fail(self, error):
        self.finals.append(("fail", error))

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after

    def audio(self):
        return [outputs["AUDIO"] for outputs in self.sent]


class FakeGenerator:
    """csm_lm's code stream: records what it was asked, how far it was read and whether
    it was closed."""

    def __init__(self, chunks, fail_at=None):
        self.chunks, self.fail_at = chunks, fail_at
        self.inputs = self.stream_id = None
        self.pulled = 0
        self.stream = None

    def __call__(self, inputs, stream_id):
        self.inputs, self.stream_id = inputs, stream_id
        self.stream = self._stream()
        return self.stream

    def _stream(self):
        for index, chunk in enumerate(self.chunks):
            if index == self.fail_at:
                raise RuntimeError("csm_lm: out of KV slots")
            self.pulled += 1
            yield chunk

    @property
    def closed(self):
        return inspect.getgeneratorstate(self.stream) == inspect.GEN_CLOSED


class Stages:
    def __init__(self, chunks=None, fail_at=None):
        self.prompt = {"input_ids": np.array([[1, 2, 3]]), "prompt_codes": np.zeros((1, 0, 33), np.int64)}
        self.generator = FakeGenerator(make_chunks() if chunks is None else chunks, fail_at)
        self.decoded, self.watermarked, self.cancelled, self.errors = [], [], [], []

    def prepare(self, inputs):
        assert "TEXT" in inputs
        return self.prompt

    def decode(self, codes):
        self.decoded.append(codes.copy())
        return decode_frame_numbers(codes)

    def watermark(self, samples):
        self.watermarked.append(samples)
        return samples + 1000.0  # visible in what the client gets

    def cancel_generation(self, stream_id):
        self.cancelled.append(stream_id)

    def pipeline(self, **overrides):
        stages = dict(
            prepare=self.prepare,
            generate=self.generator,
            decode=self.decode,
            watermark=self.watermark,
            cancel_generation=self.cancel_generation,
            first_chunk_frames=2,
            chunk_frames=4,
            left_context_frames=CONTEXT,
            log_error=self.errors.append,
        )
        return StreamPipeline(**{**stages, **overrides})


def run(stages, sender=None, **overrides):
    sender = sender or RecordingSender()
    stages.pipeline(**overrides).run(
        {"TEXT": np.array([b"Hello."], dtype=object)},
        {"TEMPERATURE": np.array([0.9], np.float32)},
        sender,
        stream_id=STREAM_ID,
    )
    return sender


def test_chunks_arrive_in_order_decoded_with_left_context_and_watermarked():
    stages = Stages()
    sender = run(stages)

    assert sender.finals == [("finish", None)]
    expected = [decode_frame_numbers(chunk) + 1000.0 for chunk in make_chunks()]
    assert len(sender.audio()) == len(expected)
    for got, want in zip(sender.audio(), expected):
        np.testing.assert_array_equal(got, want)
    assert all(outputs["SAMPLE_RATE"].tolist() == [C.SAMPLE_RATE] for outputs in sender.sent)
    # The decoder sees up to CONTEXT frames already streamed, then the new ones.
    assert [d[:, 0].tolist() for d in stages.decoded] == [
        [0, 1],
        [0, 1, 2, 3, 4, 5],
        [3, 4, 5, 6, 7, 8, 9],
        [7, 8, 9, 10, 11, 12, 13],
    ]
    assert stages.cancelled == [], "a stream that ran to its end has no slot left to free"


def test_the_generator_gets_the_prompt_the_sampling_and_the_chunk_schedule():
    stages = Stages()
    run(stages, first_chunk_frames=5, chunk_frames=7)
    inputs = stages.generator.inputs
    assert stages.generator.stream_id == STREAM_ID
    assert inputs["input_ids"] is stages.prompt["input_ids"]
    assert inputs["TEMPERATURE"].tolist() == pytest.approx([0.9])
    assert inputs["first_chunk_frames"].tolist() == [5] and inputs["chunk_frames"].tolist() == [7]


def test_each_stream_gets_its_own_id_when_none_is_given():
    ids = []
    for _ in range(2):
        stages = Stages()
        stages.pipeline().run({"TEXT": np.array([b"Hi."], dtype=object)}, {}, RecordingSender())
        ids.append(stages.generator.stream_id)
    assert ids[0] != ids[1] and all(i.startswith("csm-stream-") for i in ids)


def failing(message, error_type=RuntimeError):
    def stage(*_):
        raise error_type(message)

    return stage


@pytest.mark.parametrize(
    "stage, message",
    [
        ("prepare", "unknown voice 'nobody'"),
        ("decode", "mimi_decoder: out of memory"),
        ("watermark", "watermark: model not ready"),
    ],
)
def test_a_failing_stage_ends_the_stream_with_one_fail_carrying_its_message(stage, message):
    stages = Stages()
    sender = run(stages, **{stage: failing(message)})
    assert len(sender.finals) == 1
    kind, error = sender.finals[0]
    assert kind == "fail" and str(error) == message
    assert sender.sent == []


def test_a_client_error_of_prepare_stays_a_client_error():
    sender = run(Stages(), prepare=failing("input 'TEXT' is empty", InvalidInput))
    assert [(kind, type(error)) for kind, error in sender.finals] == [("fail", InvalidInput)]


def test_a_generator_failing_midway_ends_with_one_fail_after_the_audio_so_far():
    stages = Stages(fail_at=2)
    sender = run(stages)
    assert len(sender.audio()) == 2
    assert [(kind, str(error)) for kind, error in sender.finals] == [("fail", "csm_lm: out of KV slots")]


def test_a_decoder_failing_midway_stops_generation_and_frees_the_slot():
    stages = Stages()
    calls = []

    def decode_twice_then_fail(codes):
        calls.append(codes)
        if len(calls) == 3:
            raise RuntimeError("mimi_decoder: out of memory")
        return decode_frame_numbers(codes)

    sender = run(stages, decode=decode_twice_then_fail)
    assert len(sender.audio()) == 2
    assert [(kind, str(error)) for kind, error in sender.finals] == [("fail", "mimi_decoder: out of memory")]
    assert stages.generator.closed and stages.cancelled == [STREAM_ID]


@pytest.mark.parametrize("chunks_sent", [0, 1, 2])
def test_a_client_that_leaves_stops_generation_and_gets_one_final(chunks_sent):
    stages = Stages()
    sender = run(stages, RecordingSender(cancel_after=chunks_sent))

    assert len(sender.audio()) == chunks_sent
    assert sender.finals == [("finish", None)]
    assert stages.generator.pulled == chunks_sent, "no chunk is pulled once the client has left"
    assert stages.generator.closed
    assert stages.cancelled == [STREAM_ID]


def test_a_failing_cancel_is_logged_and_does_not_add_a_final():
    stages = Stages()
    sender = run(stages, RecordingSender(cancel_after=1), cancel_generation=failing("csm_lm: not ready"))
    assert sender.finals == [("finish", None)]
    assert any("csm_lm: not ready" in line for line in stages.errors)


def test_a_send_that_raises_ends_the_stream_with_one_final_and_frees_the_slot():
    stages = Stages()
    sender = run(stages, RecordingSender(send_raises=ConnectionError("client gone")))
    assert [(kind, str(error)) for kind, error in sender.finals] == [("fail", "client gone")]
    assert stages.generator.pulled == 1 and stages.generator.closed
    assert stages.cancelled == [STREAM_ID]


def test_a_final_call_that_raises_is_not_followed_by_another():
    class FinalRaises(RecordingSender):
        def finish(self, outputs=None):
            super().finish(outputs)
            raise ConnectionError("client gone")

    stages = Stages()
    sender = run(stages, FinalRaises())
    assert sender.finals == [("finish", None)]
    assert any("client gone" in line for line in stages.errors)


def test_an_empty_generation_ends_with_one_finish_and_no_audio():
    stages = Stages(chunks=[])
    sender = run(stages)
    assert sender.sent == [] and sender.finals == [("finish", None)]
