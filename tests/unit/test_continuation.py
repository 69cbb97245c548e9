"""A text that arrives in pieces (csm_tts_stream's CONTINUE_FROM, core.continuation),
with fake stages: the pieces are generated with exactly the inputs the segments of the
one long text get (prompt with the previous segment, seed, frame budget), decoded with
the same left context, so their audio back to back is the long text's; the tail stays
in a bounded store, one use per id; another voice cannot continue a chain."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.core.continuation import ContinuationStore
from csm_triton.core.stream_pipeline import StreamPipeline
from csm_triton.errors import InvalidInput
from tests.unit.test_segments import Sender as SegmentsSender

AUDIO, AUDIO_EOS = 90, 91
CONTEXT_IDS = (1, 2, AUDIO, AUDIO, AUDIO_EOS)
SEGMENTS = ((5, 6), (7, 8, 9), (10,), (11, 12))
BUDGETS = (7, 9, 5, 6)  # frames: several chunks each, a short last one


def prepared(segment_ids, budgets, context_ids=CONTEXT_IDS, context_code=3):
    """csm_prepare's outputs for a text of these segments (budgets as it computes them)."""
    return {
        "input_ids": np.array([*context_ids, *segment_ids[0]], np.int64),
        "prompt_codes": np.full((list(context_ids).count(AUDIO), C.NUM_CODEBOOKS), context_code, np.int64),
        "segment_ids": np.concatenate([np.array(s, np.int64) for s in segment_ids]),
        "segment_token_counts": np.array([len(s) for s in segment_ids], np.int32),
        "segment_max_frames": np.array(budgets, np.int32),
        "audio_token_ids": np.array([AUDIO, AUDIO_EOS], np.int64),
    }


def digest(*arrays) -> int:
    hashed = hashlib.sha256()
    for array in arrays:
        hashed.update(np.ascontiguousarray(array).tobytes())
    return int.from_bytes(hashed.digest()[:4], "little")


class Recorder:
    """A deterministic csm_lm (its codes a function of every input it gets) and a decoder
    whose samples depend on the left context it is given, recording both."""

    def __init__(self):
        self.lm_calls, self.decoded = [], []

    def generate(self, inputs, stream_id):
        self.lm_calls.append({name: np.asarray(value).tolist() for name, value in inputs.items()})
        frames = round(float(np.ravel(inputs["MAX_AUDIO_SECONDS"])[0]) * C.FRAME_RATE_HZ)
        seed = digest(*(np.asarray(inputs[name]) for name in sorted(inputs)))
        codes = np.random.default_rng(seed).integers(0, 2048, (frames, C.NUM_CODEBOOKS))
        first, rest = int(inputs["first_chunk_frames"][0]), int(inputs["chunk_frames"][0])
        yield codes[:first]
        for start in range(first, frames, rest):
            yield codes[start : start + rest]
        return "max_frames"

    def decode(self, codes):
        self.decoded.append(codes[:, 0].tolist())
        per_frame = np.cumsum(codes[:, 0]).astype(np.float32)  # every frame hears those before it
        return np.repeat(per_frame, C.SAMPLES_PER_FRAME)


class Sender(SegmentsSender):
    """tests/unit/test_segments.py's, with the audio of every chunk sent, back to back."""

    def audio(self):
        return np.concatenate([np.zeros(0, np.float32)] + [out["AUDIO"] for out in self.sent])


def pipeline(recorder, store, prepare):
    return StreamPipeline(
        prepare=prepare,
        generate=recorder.generate,
        decode=recorder.decode,
        watermark=lambda audio: audio * 2,
        cancel_generation=lambda _: None,
        first_chunk_frames=2,
        chunk_frames=3,
        left_context_frames=4,
        continuations=store,
    )


SAMPLING = {"SEED": np.array([40], np.int64), "TEMPERATURE": np.array([0.9], np.float32)}


def speak_whole(store=None):
    recorder, sender = Recorder(), Sender()
    pipeline(recorder, store, lambda _: prepared(SEGMENTS, BUDGETS)).run({"TEXT": "x"}, SAMPLING, sender, "whole")
    assert sender.finals == ["finish"]
    return recorder, sender


def speak_in_pieces(store, pieces=((0,), (1,), (2,), (3,)), sampling=SAMPLING):
    recorder, audio, finals, continuation = Recorder(), [], [], ""
    for number, piece in enumerate(pieces):
        segment_ids = [SEGMENTS[i] for i in piece]
        budgets = [BUDGETS[i] for i in piece]
        sender = Sender()
        pipeline(recorder, store, lambda _, ids=segment_ids, frames=budgets: prepared(ids, frames)).run(
            {"TEXT": "x"}, sampling, sender, f"piece-{number}", continuation
        )
        assert sender.finals == ["finish"], sender.finals
        audio.append(sender.audio())
        finals.append(sender.final_outputs)
        continuation = sender.final_outputs["CONTINUATION"][0].decode()
    return recorder, np.concatenate(audio), finals


def test_a_text_in_pieces_is_the_long_text_sample_for_sample():
    store = ContinuationStore()
    whole_recorder, whole = speak_whole()
    pieces_recorder, audio, finals = speak_in_pieces(store)
    # csm_lm got the very same inputs per segment: prompt (context, previous segment and
    # its codes), SEED + segment number, the segment's budget, the prefix-cache bound
    whole_calls = [{k: v for k, v in call.items()} for call in whole_recorder.lm_calls]
    assert pieces_recorder.lm_calls == whole_calls
    assert [call["SEED"] for call in whole_calls] == [[40], [41], [42], [43]]
    # and the decoder the same left context across the joins between pieces
    assert pieces_recorder.decoded == whole_recorder.decoded
    np.testing.assert_array_equal(audio, whole.audio())
    assert [final["FINISH_REASONS"].tolist() for final in finals] == [[b"max_frames"]] * 4
    assert [final["SEGMENT_FRAMES"].tolist() for final in finals] == [[b] for b in BUDGETS]
    assert len(store) == 1, "only the last piece's tail is left, the others were used"


def test_pieces_of_several_segments_chain_the_same_way():
    _, whole = speak_whole()
    _, audio, _ = speak_in_pieces(ContinuationStore(), pieces=((0, 1), (2,), (3,)))
    np.testing.assert_array_equal(audio, whole.audio())


def test_a_one_segment_text_without_continue_from_keeps_the_request_cap_and_seed():
    recorder, sender = Recorder(), Sender()
    plain = prepared(SEGMENTS[:1], (0,))  # csm_prepare's 0: the request's own cap
    sampling = {**SAMPLING, "MAX_AUDIO_SECONDS": np.array([0.4], np.float32)}
    pipeline(recorder, ContinuationStore(), lambda _: plain).run({"TEXT": "x"}, sampling, sender, "plain")
    assert recorder.lm_calls[0]["SEED"] == [40] and "CONTINUATION" not in sender.final_outputs


def test_a_continuation_is_good_for_one_piece():
    store = ContinuationStore()
    _, _, finals = speak_in_pieces(store, pieces=((0,),))
    used = finals[0]["CONTINUATION"][0].decode()
    store.take(used)
    with pytest.raises(InvalidInput, match="used already"):
        store.take(used)


@pytest.mark.parametrize("name", ["x", "../../etc", "a" * 65, "ünïcode-ünïcode-ünïcode"])
def test_a_malformed_id_is_refused_by_name(name):
    with pytest.raises(InvalidInput, match="'CONTINUE_FROM' is not a continuation id"):
        ContinuationStore().take(name)


def test_the_store_drops_the_oldest_past_its_count_and_any_past_its_age():
    now = [0.0]
    store = ContinuationStore(max_entries=2, ttl_s=10, clock=lambda: now[0])
    _, _, finals = speak_in_pieces(store, pieces=((0,),))
    tail = store.take(finals[0]["CONTINUATION"][0].decode())
    first, second, third = (store.put(tail) for _ in range(3))
    with pytest.raises(InvalidInput, match="dropped for newer ones"):
        store.take(first)
    assert store.take(second) is tail
    now[0] = 10.5
    with pytest.raises(InvalidInput, match="older than 10 s"):
        store.take(third)
    assert len(store) == 0


def test_another_voice_cannot_continue_a_chain():
    store = ContinuationStore()
    _, _, finals = speak_in_pieces(store, pieces=((0,),))
    other_voice = prepared(SEGMENTS[1:2], BUDGETS[1:2], context_code=4)
    sender = Sender()
    pipeline(Recorder(), store, lambda _: other_voice).run(
        {"TEXT": "x"}, SAMPLING, sender, "other", finals[0]["CONTINUATION"][0].decode()
    )
    assert len(sender.finals) == 1 and isinstance(sender.finals[0], InvalidInput)
    assert "another voice" in str(sender.finals[0])


def test_an_unknown_continuation_is_refused_before_any_work():
    prepared_calls = []
    sender = Sender()
    pipeline(Recorder(), ContinuationStore(), prepared_calls.append).run(
        {"TEXT": "x"}, SAMPLING, sender, "unknown", "A" * 32
    )
    assert isinstance(sender.finals[0], InvalidInput) and prepared_calls == []


def test_a_piece_the_client_left_leaves_no_tail():
    store = ContinuationStore()
    sender = Sender(cancel_after=1)
    pipeline(Recorder(), store, lambda _: prepared(SEGMENTS[:1], BUDGETS[:1])).run(
        {"TEXT": "x"}, SAMPLING, sender, "left", ""
    )
    assert sender.final_outputs is None and len(store) == 0


def test_the_clients_cap_bounds_the_whole_chain():
    cap = {"MAX_AUDIO_SECONDS": np.array([(BUDGETS[0] + 2) / C.FRAME_RATE_HZ], np.float32)}
    store = ContinuationStore()
    _, audio, finals = speak_in_pieces(store, pieces=((0,), (1,), (2,)), sampling={**SAMPLING, **cap})
    assert [final["SEGMENT_FRAMES"].tolist() for final in finals] == [[BUDGETS[0]], [2], [0]]
    assert [final["FINISH_REASONS"].tolist() for final in finals] == [
        [b"max_frames"],
        [b"max_audio_seconds"],
        [b"not_started"],
    ]
    assert audio.size == (BUDGETS[0] + 2) * C.SAMPLES_PER_FRAME


def test_a_pipeline_without_a_store_refuses_continue_from():
    sender = Sender()
    pipeline(Recorder(), None, lambda _: prepared(SEGMENTS[:1], BUDGETS[:1])).run(
        {"TEXT": "x"}, SAMPLING, sender, "nostore", ""
    )
    assert len(sender.finals) == 1 and isinstance(sender.finals[0], ValueError)
