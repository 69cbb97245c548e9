"""Long texts: split at sentence boundaries, generated segment after segment.

CSM keeps a voice by conditioning on audio it has heard, so a long text is spoken as
a chain: segment i's prompt is the request's context (voice reference, context turns),
then segment i-1 as a turn with the codes just generated for it, then segment i's text.
This module holds the pure parts: each segment's frame budget, and `SegmentChain`,
which builds the next prompt from the previous segment's codes with token ids only
(csm_prepare tokenized every segment once, so the generators need no tokenizer) and is
the one segment loop of both generators. The split itself is core.text_split's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from csm_triton import constants as C
from csm_triton.core import validation
from csm_triton.core.continuation import ChainTail, context_digest
from csm_triton.errors import InvalidInput

__all__ = ["segment_max_frames", "SegmentChain", "SEGMENT_OUTPUTS", "FINISH_REASONS"]

# csm_prepare's outputs that describe the segments (beside input_ids and prompt_codes).
SEGMENT_OUTPUTS = ("segment_ids", "segment_token_counts", "segment_max_frames", "audio_token_ids", "adapter_id")
# How each segment of a text ended, as the final response of csm_tts / csm_tts_stream
# says (FINISH_REASONS, docs/api.md): the model's end frame; the segment's own frame
# budget (or, for a one-segment text without MAX_AUDIO_SECONDS, the default cap); the
# client's MAX_AUDIO_SECONDS, which bounds the whole text; or never started because
# that was used up by the segments before.
END_OF_SPEECH, MAX_FRAMES, MAX_AUDIO_SECONDS, NOT_STARTED = (
    "end_of_speech",
    "max_frames",
    "max_audio_seconds",
    "not_started",
)
FINISH_REASONS = (END_OF_SPEECH, MAX_FRAMES, MAX_AUDIO_SECONDS, NOT_STARTED)
# The counter csm_generate and csm_tts_stream keep of those endings, one series a reason.
SEGMENTS_METRIC = (
    "csm_segments_total",
    f"Segments of texts (a text of up to {C.SEGMENT_MAX_CHARS} characters is one), by how each "
    "ended: end_of_speech, "
    "max_frames (its own frame budget), max_audio_seconds (the client's cap), not_started",
)
# One segment's generation for SegmentChain.speak: (index, csm_lm inputs) -> (codes,
# csm_lm's finish reason) or None when the client left.
SEGMENTS_DO_NOT_ADD_UP = (
    "the segment inputs do not add up (segment_ids, segment_token_counts, segment_max_frames, audio_token_ids, "
    "input_ids)"
)
GenerateSegment = Callable[[int, dict], "tuple[np.ndarray, str | None] | None"]


def segment_max_frames(
    text: str, seconds_per_char: float = C.SEGMENT_SECONDS_PER_CHAR, min_seconds: float = C.SEGMENT_MIN_SECONDS
) -> int:
    """The frames a segment may take: `seconds_per_char` per character, at least
    `min_seconds` (csm_prepare's config parameters, defaulting to the constants), so a
    segment that never emits its end frame stops at a sane length (random or confused
    weights)."""
    seconds = max(min_seconds, len(text) * seconds_per_char)
    return max(1, math.ceil(round(seconds * C.FRAME_RATE_HZ, 4)))


def _as_int(array, dtype=np.int64) -> np.ndarray:
    return np.asarray(array).reshape(-1).astype(dtype, copy=False)


def _checked_segments(prepared) -> tuple[list[np.ndarray], list[int | None], np.ndarray]:
    """(each segment's text turn ids, its frame budget or None, the audio token ids) from
    csm_prepare's outputs, checked: they are inputs of csm_generate too."""
    counts = _as_int(prepared["segment_token_counts"])
    flat = _as_int(prepared["segment_ids"])
    audio_ids = _as_int(prepared["audio_token_ids"])
    frames = _as_int(prepared["segment_max_frames"])
    # Checked whole before the first segment is generated: a bad later segment must
    # not cost the earlier ones' work. (Each prompt's ids, segment 0's input_ids
    # first, are checked against the vocabulary by csm_lm's engine, which alone knows it.)
    for name, values in (
        ("segment_ids", flat),
        ("audio_token_ids", audio_ids),
        ("segment_token_counts", counts),
        ("segment_max_frames", frames),
    ):
        validation.integers_in_range(values, name, 0, None)
    if counts.sum() != len(flat) or len(frames) != len(counts) or len(audio_ids) != 2:
        raise InvalidInput(SEGMENTS_DO_NOT_ADD_UP)
    segments = np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []
    # 0: no budget from the text (a one-segment text keeps the request's own cap)
    return segments, [int(v) or None for v in frames], audio_ids


@dataclass
class SegmentChain:
    """The prompts of one request's segments, the previous segment's audio included.

    Built from csm_prepare's outputs: `input_ids` is segment 0's whole prompt (context
    + segment 0's text turn), `prompt_codes` the context's codes, `segment_ids` the
    text turn of every segment back to back (`segment_token_counts` each), and
    `audio_token_ids` the ids of <|AUDIO|> and <|audio_eos|>. A request without the
    segment outputs is one segment with the request's own frame cap.
    """

    context_ids: np.ndarray
    context_codes: np.ndarray
    segment_ids: list[np.ndarray]
    max_frames: list[int | None]
    audio_id: int = -1
    audio_eos_id: int = -1
    max_prompt_tokens: int = C.MAX_PROMPT_TOKENS
    _previous: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _generated_frames: int = field(default=0, repr=False)
    # per segment once generated: its frames, and how it ended (FINISH_REASONS)
    _frames: dict[int, int] = field(default_factory=dict, repr=False)
    _reasons: dict[int, str] = field(default_factory=dict, repr=False)
    # per segment once asked for: (its frame cap, whether the client's MAX_AUDIO_SECONDS set it)
    _caps: dict[int, tuple[int, bool]] = field(default_factory=dict, repr=False)
    # segment 0's prompt as csm_prepare sent it, passed on untouched
    first_prompt: dict | None = field(default=None, repr=False)
    # A piece of a text that arrives in pieces (core.continuation): its segments are
    # numbered after the `first_segment` spoken before it, and budgeted as a long text's.
    chained: bool = field(default=False, repr=False)
    first_segment: int = field(default=0, repr=False)
    # The LoRA adapter voice every segment is generated with (csm_prepare's adapter_id); "": none.
    adapter_id: str = field(default="", repr=False)
    # The segments of the text's rest, when csm_prepare answered its head alone: called
    # (it may wait) once the known segments are spoken, its answer given to `extend`.
    rest: Callable[[], Mapping[str, np.ndarray]] | None = field(default=None, repr=False)

    @classmethod
    def from_prepared(cls, prepared) -> SegmentChain:
        first = {"input_ids": prepared["input_ids"], "prompt_codes": prepared["prompt_codes"]}
        input_ids = _as_int(prepared["input_ids"])
        codes = np.asarray(prepared["prompt_codes"], dtype=np.int64).reshape(-1, C.NUM_CODEBOOKS)
        adapter = np.asarray(prepared.get("adapter_id", [b""]), dtype=object).reshape(-1)
        adapter_id = adapter[0].decode(errors="replace") if isinstance(adapter[0], bytes) else str(adapter[0])
        if adapter_id:  # csm_prepare's own output, checked all the same: it is an input of csm_generate
            validation.voice_id(adapter_id, "adapter_id")
        if "segment_ids" not in prepared:
            return cls(input_ids, codes, [np.zeros(0, np.int64)], [None], first_prompt=first, adapter_id=adapter_id)
        segments, budgets, audio_ids = _checked_segments(prepared)
        counts = [len(ids) for ids in segments]
        if not counts or counts[0] > len(input_ids):
            raise InvalidInput(SEGMENTS_DO_NOT_ADD_UP)
        audio_id, audio_eos_id = (int(v) for v in audio_ids)
        return cls(
            input_ids[: len(input_ids) - counts[0]],
            codes,
            segments,
            budgets,
            audio_id,
            audio_eos_id,
            first_prompt=first,
            adapter_id=adapter_id,
        )

    def __len__(self) -> int:
        return len(self.segment_ids)

    def prompt(self, index: int) -> dict[str, np.ndarray]:
        """Segment `index`'s input_ids and prompt_codes (after `record(index - 1, ...)`)."""
        if index == 0 and self.first_prompt is not None and self._previous is None:
            return dict(self.first_prompt)
        ids = [self.context_ids]
        codes = [self.context_codes]
        if self._previous is not None:  # segment index - 1, or a continued chain's last one
            previous_ids, previous_codes = self._previous
            turn = np.concatenate(
                [previous_ids, np.full(len(previous_codes), self.audio_id, np.int64), [self.audio_eos_id]]
            )
            fits = len(self.context_ids) + len(turn) + len(self.segment_ids[index]) <= self.max_prompt_tokens
            if fits:  # else: the context alone keeps the voice, and the prompt fits
                ids.append(turn)
                codes.append(previous_codes)
        ids.append(self.segment_ids[index])
        return {
            "input_ids": np.concatenate(ids).astype(np.int64),
            "prompt_codes": np.ascontiguousarray(np.concatenate(codes).astype(np.int64)),
        }

    def _cap(self, index: int, request_max_frames: int, client_cap: bool) -> tuple[int, bool]:
        """(the cap, whether it is the client's MAX_AUDIO_SECONDS rather than the segment's
        own budget that sets it)."""
        budget = self.max_frames[index]
        if budget is None:  # a one-segment text: the request's cap, the client's if it gave one
            return request_max_frames, client_cap
        cap = min(budget, request_max_frames)
        if client_cap:
            cap = min(cap, request_max_frames - self._generated_frames)
        return cap, client_cap and cap < budget

    def exhausted(self, sampling, request_max_frames: int) -> bool:
        """True once a client-given MAX_AUDIO_SECONDS is used up: start no further segment.
        (Without it, each segment's own budget bounds the text.)"""
        return "MAX_AUDIO_SECONDS" in sampling and self._generated_frames >= request_max_frames

    def lm_inputs(self, index: int, sampling, request_max_frames: int) -> dict[str, np.ndarray]:
        """csm_lm's inputs for segment `index`: its prompt, the sampling inputs, and for a
        multi-segment text the segment's frame cap and its own seed (SEED + index, so the
        segments do not all replay one random draw)."""
        inputs = {**sampling, **self.prompt(index)}
        if self.adapter_id:
            inputs["ADAPTER_ID"] = np.array([self.adapter_id.encode()], dtype=object)
        cap = self._caps[index] = self._cap(index, request_max_frames, "MAX_AUDIO_SECONDS" in sampling)
        if self.max_frames[index] is not None or self.chained:  # a segment of a longer text: its own budget
            inputs["MAX_AUDIO_SECONDS"] = max_audio_seconds(cap[0])
            if "SEED" in sampling:
                number = self.first_segment + index
                inputs["SEED"] = np.asarray(sampling["SEED"]).reshape(-1)[:1].astype(np.int64) + number
        if index or self.first_segment:  # the prefix cache keeps the request's own turns, not the generated segment
            turns = np.count_nonzero(self.context_ids == self.audio_eos_id)
            inputs["prefix_cache_turns"] = np.array([turns], np.int32)
        return inputs

    def speak(
        self, sampling, request_max_frames: int, generate: GenerateSegment, *, stop: Callable[[], bool] = lambda: False
    ) -> bool:
        """The one segment loop, csm_generate's and csm_tts_stream's: each segment's csm_lm
        inputs go to `generate(index, inputs)`, which answers the segment's codes and
        csm_lm's finish reason (None: the client left), recorded in turn. No segment
        starts once `stop()` holds or a client's MAX_AUDIO_SECONDS is used up (a
        continued chain's cap counts its earlier pieces). False when the client left."""
        index = 0
        while index < len(self) or self._extend_with_rest():
            if index and stop():
                return False
            if (index or self.first_segment) and self.exhausted(sampling, request_max_frames):
                break
            ended = generate(index, self.lm_inputs(index, sampling, request_max_frames))
            if ended is None:
                return False
            self.record(index, *ended)
            index += 1
        self._extend_with_rest()  # a cap reached first: the rest's segments are reported not started
        return True

    def extend(self, prepared) -> None:
        """The segments of the text's rest (csm_prepare's answer to its pieces), after these."""
        segments, budgets, _ = _checked_segments(prepared)
        self.segment_ids += segments
        self.max_frames += budgets

    def _extend_with_rest(self) -> bool:
        """Whether the rest (asked for once) brought more segments."""
        if self.rest is None:
            return False
        rest, self.rest = self.rest, None
        known = len(self)
        self.extend(rest())
        return len(self) > known

    def record(self, index: int, codes: np.ndarray, lm_reason: str | None = None) -> None:
        """The codes generated for segment `index` (the next segment's context), and how
        csm_lm said the generation ended (its FinishReason value, None when not told)."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, C.NUM_CODEBOOKS)
        self._generated_frames += len(codes)
        self._previous = (self.segment_ids[index], codes) if len(codes) else None
        self._frames[index] = len(codes)
        cap, client_cap = self._caps.get(index, (None, False))
        if lm_reason is None:  # not told: a generation that filled its cap stopped there
            lm_reason = MAX_FRAMES if cap is not None and len(codes) >= cap else END_OF_SPEECH
        if lm_reason == MAX_FRAMES:
            self._reasons[index] = MAX_AUDIO_SECONDS if client_cap else MAX_FRAMES
        else:
            self._reasons[index] = lm_reason

    def finish_reasons(self) -> list[str]:
        """How every segment ended, in order (NOT_STARTED: never generated)."""
        return [self._reasons.get(index, NOT_STARTED) for index in range(len(self))]

    def segment_frames(self) -> list[int]:
        """The frames generated for every segment, in order (0: never generated)."""
        return [self._frames.get(index, 0) for index in range(len(self))]

    def tail(self, decoder_history: np.ndarray) -> ChainTail:
        """Where this chain stopped, for the next piece of its text (core.continuation)."""
        ids, codes = self._previous if self._previous is not None else (None, None)
        return ChainTail(
            context_digest(self.context_ids, self.context_codes, self.adapter_id),
            self.first_segment + len(self),
            self._generated_frames,
            ids,
            None if codes is None else codes.astype(np.int16),
            np.asarray(decoder_history, np.int16),
        )

    def continue_from(self, tail: ChainTail) -> None:
        """Speak this request's segments after `tail`'s, as the next segments of one text."""
        if tail.context != context_digest(self.context_ids, self.context_codes, self.adapter_id):
            raise InvalidInput(
                "input 'CONTINUE_FROM' continues a text spoken with another voice or other "
                "context turns: send the same VOICE_ID, reference and context with every piece"
            )
        self.chained, self.first_segment, self._generated_frames = True, tail.segments, tail.generated_frames
        if tail.previous_ids is not None and tail.previous_codes is not None:
            self._previous = (tail.previous_ids, tail.previous_codes.astype(np.int64))

    def segment_times(self) -> np.ndarray:
        """[segments, 2] float32: where each segment's speech starts and ends in this
        response's audio, in seconds (the frames before it x 80 ms; a segment never started
        is empty, at the end). Exact to the sample: the audio is the frames decoded back to
        back, 1920 samples each."""
        ends = np.cumsum(self.segment_frames(), dtype=np.int64) * C.SAMPLES_PER_FRAME / C.SAMPLE_RATE
        starts = np.concatenate([[0.0], ends[:-1]])
        return np.stack([starts, ends], axis=1).astype(np.float32).reshape(-1, 2)

    def final_outputs(self) -> dict[str, np.ndarray]:
        """FINISH_REASONS, SEGMENT_FRAMES and SEGMENT_TIMES of the final response, one per segment."""
        return {
            "FINISH_REASONS": np.array([r.encode() for r in self.finish_reasons()], dtype=object),
            "SEGMENT_FRAMES": np.array(self.segment_frames(), np.int32),
            "SEGMENT_TIMES": self.segment_times(),
        }


def max_audio_seconds(frames: int) -> np.ndarray:
    """MAX_AUDIO_SECONDS that csm_lm turns back into exactly `frames` frames."""
    return np.array([frames / C.FRAME_RATE_HZ], np.float32)
