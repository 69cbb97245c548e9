"""Long texts: sentence splitting, frame budgets, the segment chain, and the stream
pipeline's segment loop (segments in order, each with the previous one as context,
one final response)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.core import segments, text_split
from csm_triton.core.stream_pipeline import StreamPipeline
from csm_triton.errors import InvalidInput

AUDIO, AUDIO_EOS = 90, 91
SENTENCES = ["Mr. Smith went to Washington.", "He arrived at 3 p.m. on Monday!", "Was it raining? ", "Nobody knows."]


def test_a_short_text_is_one_segment_unchanged():
    assert text_split.split_text("  Hello there. How are you? ") == ["  Hello there. How are you? "]


def test_segments_are_whole_sentences_up_to_the_segment_size():
    text = " ".join(SENTENCES * 20)
    parts = text_split.split_text(text, max_chars=100)
    assert len(parts) > 1 and all(len(p) <= 100 for p in parts)
    assert " ".join(parts).split() == text.split(), "nothing lost, nothing reordered"
    # the splitter keeps abbreviations inside their sentence: no segment ends in "Mr." or "p.m."
    assert not any(p.endswith(("Mr.", "p.m.")) for p in parts)
    assert all(p.endswith((".", "!", "?")) for p in parts)


LOADTEST_TEXTS = Path(__file__).resolve().parents[2] / "loadtest" / "data" / "texts.txt"


def test_ordinary_prose_splits_at_the_sentences_pysbd_found():
    # The load tests' texts as one long text: 49 sentences, as pysbd 0.3.4 (the splitter
    # before sentencex) cut them, every line starting one, abbreviations ("Dr.", "a.m.",
    # "$1,249.99", "3.14159") kept inside.
    lines = [
        line.strip() for line in LOADTEST_TEXTS.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    text = " ".join(lines)
    sentences = text_split._sentences(text)
    assert "".join(sentences) == text and len(sentences) == 49
    starts = set(np.cumsum([0] + [len(s) for s in sentences[:-1]]).tolist())
    line_starts = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]]).tolist()
    assert set(line_starts) <= starts
    assert "Good morning, Dr. Nguyễn; your appointment with Ms. Øyelaran is confirmed. " in sentences, (
        "a title before a name is no sentence end (sentencex alone cuts after 'Ms.' here)"
    )


def test_the_windows_change_nothing_on_prose():
    # sentencex sees 2,000 characters at a time: a window's last sentence is looked at
    # again in the next, so a 20,000-character text splits as it would whole.
    text = " ".join(SENTENCES * 400)[: C.MAX_LONG_TEXT_CHARS]
    assert text_split._sentences(text) == text_split._sentences(text, window_chars=len(text))


def test_paragraph_breaks_stay_in_the_text():
    text = "First paragraph ends here.\n\nSecond one starts. And ends!\n\n\nThird."
    sentences = text_split._sentences(text)
    assert "".join(sentences) == text and len(sentences) == 4


def test_the_fallback_scan_cuts_after_terminators_and_closing_quotes():
    text = 'He said "Stop!" Then left... (Quietly.) Done?No. End'
    assert text_split._scan_sentences(text) == ['He said "Stop!" ', "Then left... ", "(Quietly.) ", "Done?No. ", "End"]


def test_a_sentence_longer_than_a_segment_is_cut_at_spaces():
    text = "word " * 200
    parts = text_split.split_text(text, max_chars=50)
    assert all(len(p) <= 50 for p in parts) and " ".join(parts).split() == text.split()


def test_the_frame_budget_follows_the_text_with_a_floor():
    assert segments.segment_max_frames("Hi.") == int(np.ceil(C.SEGMENT_MIN_SECONDS * C.FRAME_RATE_HZ))
    long = "a" * 200
    assert segments.segment_max_frames(long) == int(np.ceil(200 * C.SEGMENT_SECONDS_PER_CHAR * C.FRAME_RATE_HZ))


def prepared(
    context_ids=(1, 2, AUDIO, AUDIO, AUDIO_EOS),
    context_frames=2,
    segment_ids=((5, 6), (7, 8, 9), (10,)),
    budgets=(40, 50, 38),
):
    first = np.array([*context_ids, *segment_ids[0]], np.int64)
    return {
        "input_ids": first,
        "prompt_codes": np.full((context_frames, C.NUM_CODEBOOKS), 3, np.int64),
        "segment_ids": np.concatenate([np.array(s, np.int64) for s in segment_ids]),
        "segment_token_counts": np.array([len(s) for s in segment_ids], np.int32),
        "segment_max_frames": np.array(budgets, np.int32),
        "audio_token_ids": np.array([AUDIO, AUDIO_EOS], np.int64),
    }


def test_each_segment_prompt_holds_the_context_and_the_previous_segment():
    chain = segments.SegmentChain.from_prepared(prepared())
    assert len(chain) == 3
    assert chain.prompt(0)["input_ids"].tolist() == [1, 2, AUDIO, AUDIO, AUDIO_EOS, 5, 6]
    chain.record(0, np.full((3, C.NUM_CODEBOOKS), 7))
    second = chain.prompt(1)
    assert second["input_ids"].tolist() == [
        1,
        2,
        AUDIO,
        AUDIO,
        AUDIO_EOS,
        5,
        6,
        AUDIO,
        AUDIO,
        AUDIO,
        AUDIO_EOS,
        7,
        8,
        9,
    ]
    assert second["prompt_codes"][:, 0].tolist() == [3, 3, 7, 7, 7]
    # placeholders and codes always agree, as the engine requires
    assert (second["input_ids"] == AUDIO).sum() == len(second["prompt_codes"])
    chain.record(1, np.full((1, C.NUM_CODEBOOKS), 8))
    assert chain.prompt(2)["input_ids"].tolist() == [1, 2, AUDIO, AUDIO, AUDIO_EOS, 7, 8, 9, AUDIO, AUDIO_EOS, 10]


def test_frame_caps_seeds_and_the_request_cap():
    chain = segments.SegmentChain.from_prepared(prepared())
    sampling = {"SEED": np.array([5], np.int64), "MAX_AUDIO_SECONDS": np.array([3.5], np.float32)}
    inputs = [chain.lm_inputs(i, sampling, request_max_frames=44) for i in range(3)]
    assert [int(i["SEED"][0]) for i in inputs] == [5, 6, 7]
    from csm_triton.core.validation import sampling_from_inputs

    assert [sampling_from_inputs(i).max_frames for i in inputs] == [40, 44, 38]


def test_a_previous_segment_that_does_not_fit_is_left_out():
    chain = segments.SegmentChain.from_prepared(prepared())
    chain.max_prompt_tokens = 12
    chain.record(0, np.zeros((20, C.NUM_CODEBOOKS)))
    assert chain.prompt(1)["input_ids"].tolist() == [1, 2, AUDIO, AUDIO, AUDIO_EOS, 7, 8, 9]


def test_a_prompt_without_segment_outputs_is_one_segment_with_the_request_cap():
    plain = {"input_ids": np.array([1, 2, 3]), "prompt_codes": np.zeros((0, C.NUM_CODEBOOKS), np.int64)}
    chain = segments.SegmentChain.from_prepared(plain)
    assert len(chain) == 1 and chain.prompt(0)["input_ids"] is plain["input_ids"]
    assert "MAX_AUDIO_SECONDS" not in chain.lm_inputs(0, {}, 99)


class Sender:
    def __init__(self, cancel_after=None):
        self.sent, self.finals, self.cancel_after, self.final_outputs = [], [], cancel_after, None

    def send(self, outputs):
        self.sent.append(outputs)

    def finish(self, outputs=None):
        self.finals.append("finish")
        self.final_outputs = outputs

    def fail(self, error):
        self.finals.append(error)

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after


def segment_pipeline(calls, cancelled):
    def generate(inputs, stream_id):
        calls.append((stream_id, inputs["input_ids"].tolist()))
        index = len(calls) - 1
        for _ in range(2):  # two chunks of two frames, numbered by segment
            yield np.full((2, C.NUM_CODEBOOKS), index + 1, np.int64)

    return StreamPipeline(
        prepare=lambda _: prepared(),
        generate=generate,
        decode=lambda codes: np.repeat(codes[:, 0].astype(np.float32), 2),
        watermark=lambda audio: audio,
        cancel_generation=cancelled.append,
        left_context_frames=0,
    )


def test_the_stream_plays_the_segments_back_to_back_with_one_final():
    calls, cancelled, sender = [], [], Sender()
    segment_pipeline(calls, cancelled).run({"TEXT": "x"}, {}, sender, stream_id="s")
    assert [stream_id for stream_id, _ in calls] == ["s", "s-1", "s-2"]
    audio = np.concatenate([out["AUDIO"] for out in sender.sent])
    assert audio.tolist() == [1.0] * 8 + [2.0] * 8 + [3.0] * 8, "segments in order, nothing lost"
    assert calls[1][1].count(AUDIO) == 2 + 4, "segment 1 hears the context and segment 0's four frames"
    assert sender.finals == ["finish"] and cancelled == []


def test_a_client_that_leaves_mid_text_starts_no_further_segment():
    calls, cancelled, sender = [], [], Sender(cancel_after=3)
    segment_pipeline(calls, cancelled).run({"TEXT": "x"}, {}, sender, stream_id="s")
    assert [stream_id for stream_id, _ in calls] == ["s", "s-1"]
    assert cancelled == ["s-1"] and sender.finals == ["finish"]


def test_the_frame_budget_follows_the_deployment_knobs():
    # csm_prepare's segment_seconds_per_char / segment_min_seconds (docs/model_config.md)
    assert segments.segment_max_frames("a" * 300, seconds_per_char=0.005, min_seconds=0.5) == 19  # 1.5 s
    assert segments.segment_max_frames("Hi.", seconds_per_char=0.005, min_seconds=0.5) == 7  # the floor, 0.5 s


def test_finish_reasons_tell_the_segments_budget_from_the_clients_cap():
    chain = segments.SegmentChain.from_prepared(prepared())  # budgets 40, 50, 38 frames
    sampling = {"MAX_AUDIO_SECONDS": np.array([3.52], np.float32)}  # 44 frames for the whole text
    chain.lm_inputs(0, sampling, request_max_frames=44)
    chain.record(0, np.zeros((40, C.NUM_CODEBOOKS)), "max_frames")  # its own budget, 40
    chain.lm_inputs(1, sampling, request_max_frames=44)
    chain.record(1, np.zeros((4, C.NUM_CODEBOOKS)), "max_frames")  # the client's 4 left
    assert chain.exhausted(sampling, 44)
    assert chain.finish_reasons() == ["max_frames", "max_audio_seconds", "not_started"]
    final = chain.final_outputs()
    assert final["FINISH_REASONS"].tolist() == [b"max_frames", b"max_audio_seconds", b"not_started"]
    assert final["SEGMENT_FRAMES"].tolist() == [40, 4, 0]
    # Where each segment sits in the audio: 80 ms frames back to back; the one never started is empty.
    np.testing.assert_allclose(final["SEGMENT_TIMES"], [[0.0, 3.2], [3.2, 3.52], [3.52, 3.52]], rtol=0, atol=1e-6)


def test_end_of_speech_is_what_csm_lm_said_or_what_the_frames_show():
    chain = segments.SegmentChain.from_prepared(prepared())
    for index, (frames, told) in enumerate([(12, "end_of_speech"), (50, None), (3, None)]):
        chain.lm_inputs(index, {}, request_max_frames=375)
        chain.record(index, np.zeros((frames, C.NUM_CODEBOOKS)), told)
    # untold: a segment that filled its budget (50) stopped there; one that did not, ended
    assert chain.finish_reasons() == ["end_of_speech", "max_frames", "end_of_speech"]


def test_a_one_segment_text_ends_at_the_clients_cap_or_the_default_one():
    plain = {"input_ids": np.array([1, 2, 3]), "prompt_codes": np.zeros((0, C.NUM_CODEBOOKS), np.int64)}
    for sampling, expected in [
        ({}, "max_frames"),
        ({"MAX_AUDIO_SECONDS": np.array([1.0], np.float32)}, "max_audio_seconds"),
    ]:
        chain = segments.SegmentChain.from_prepared(plain)
        chain.lm_inputs(0, sampling, request_max_frames=13)
        chain.record(0, np.zeros((13, C.NUM_CODEBOOKS)), "max_frames")
        assert chain.finish_reasons() == [expected] and chain.segment_frames() == [13]


def test_the_final_response_says_how_every_segment_ended():
    calls, ended = [], []

    def generate(inputs, stream_id):  # csm_lm's reason is the generator's return value
        calls.append(stream_id)
        yield np.full((2, C.NUM_CODEBOOKS), len(calls), np.int64)
        return "end_of_speech" if len(calls) == 2 else "max_frames"

    pipeline = StreamPipeline(
        prepare=lambda _: prepared(),
        generate=generate,
        decode=lambda codes: np.repeat(codes[:, 0].astype(np.float32), 2),
        watermark=lambda audio: audio,
        cancel_generation=lambda _: None,
        left_context_frames=0,
        segments_ended=ended.append,
    )
    sender = Sender()
    pipeline.run({"TEXT": "x"}, {}, sender, stream_id="s")
    final = sender.final_outputs
    assert sender.finals == ["finish"] and final["AUDIO"].size == 0, "an empty AUDIO: clients read it as a chunk"
    assert final["FINISH_REASONS"].tolist() == [b"max_frames", b"end_of_speech", b"max_frames"]
    assert final["SEGMENT_FRAMES"].tolist() == [2, 2, 2]
    assert ended == [["max_frames", "end_of_speech", "max_frames"]], "counted once per stream"


def test_a_stream_cut_by_the_clients_cap_lists_the_segments_never_started():
    calls, sender = [], Sender()
    pipeline = segment_pipeline(calls, [])
    pipeline.run({"TEXT": "x"}, {"MAX_AUDIO_SECONDS": np.array([0.32], np.float32)}, sender, stream_id="s")
    assert [stream_id for stream_id, _ in calls] == ["s"], "4 frames asked, 4 generated: nothing more starts"
    assert sender.final_outputs["FINISH_REASONS"].tolist() == [b"max_audio_seconds", b"not_started", b"not_started"]
    assert sender.final_outputs["SEGMENT_FRAMES"].tolist() == [4, 0, 0]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"segment_ids": np.array([5, 6, 7, -8, 9, 10], np.int64)},
            "'segment_ids' must be at least 0, got -8 at position 3",
        ),
        ({"segment_token_counts": np.array([2, 5, -1], np.int32)}, "'segment_token_counts' must be at least 0"),
        ({"segment_max_frames": np.array([40, -50, 38], np.int32)}, "'segment_max_frames' must be at least 0"),
        ({"audio_token_ids": np.array([AUDIO], np.int64)}, "the segment inputs do not add up"),
        ({"segment_token_counts": np.array([2, 3, 2], np.int32)}, "the segment inputs do not add up"),
        ({"segment_max_frames": np.array([40, 50], np.int32)}, "the segment inputs do not add up"),
    ],
)
def test_segment_inputs_are_checked_whole_before_any_segment_is_generated(change, message):
    # csm_generate is an internal model, but reachable: a bad later segment must be a
    # client error before segment 0 costs a generation, never an internal one after it.
    with pytest.raises(InvalidInput, match=re.escape(message)):
        segments.SegmentChain.from_prepared({**prepared(), **change})
