"""csm_prepare: text + voice (a stored VOICE_ID, or inline REFERENCE_AUDIO with its
REFERENCE_TEXT) + optional conversation context -> CSM prompt tensors for csm_lm.

Besides the first prompt (input_ids, prompt_codes) it returns the segments of a long
TEXT (core.segments): every segment's text turn as token ids, its frame budget, and
the audio token ids, so csm_generate and csm_tts_stream chain the segments without a
tokenizer of their own. TEXT is normalized (core.normalize: numbers, money, dates...
as words) sentence by sentence unless NORMALIZE is false; the segments, their budgets
and `normalized_text` (each segment as spoken: csm_tts's NORMALIZED_TEXT) are the
normalized text's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from csm_triton import constants as C
from csm_triton.core import conversation, normalize, segments, text_split, validation
from csm_triton.core.prepare_request import INPUT_NAMES, PrepareRequest, check_sentence_segments
from csm_triton.core.prompt import PromptBuilder, Turn
from csm_triton.core.voice_store import VoiceStore
from csm_triton.core.voices import VoiceResolver
from csm_triton.triton import adapter as triton
from csm_triton.triton.forward import forward_mimi_encoder
from csm_triton.triton.parameters import voice_directory


class PrepareModel(triton.PythonModel):
    def initialize_model(self, args, model_config):
        tokenizer_dir = self.parameters.text("tokenizer_dir", "tokenizer")
        self.prompt_builder = PromptBuilder(Path(triton.model_directory(args)) / tokenizer_dir)
        self.voices = VoiceResolver(VoiceStore(voice_directory(args, self.parameters)), forward_mimi_encoder)
        # Each segment's frame budget (docs/model_config.md): a deployment may bound slow
        # speech tighter or looser than the constants; the tests set it low to keep a
        # 5,000-character text cheap to decode on a CPU.
        self.seconds_per_char = self.parameters.number(
            "segment_seconds_per_char", C.SEGMENT_SECONDS_PER_CHAR, minimum=0.001, maximum=1.0
        )
        self.min_seconds = self.parameters.number(
            "segment_min_seconds", C.SEGMENT_MIN_SECONDS, minimum=1 / C.FRAME_RATE_HZ, maximum=C.MAX_AUDIO_SECONDS_LIMIT
        )
        # The normalizer's FSTs load here (~0.5 s), not on the first request.
        normalize.load()

    def _stored_voice(self, voice_id: str):
        return self.voices.context_reference(voice_id)

    def _speaker(self, asked: PrepareRequest, adapter) -> int:
        """SPEAKER, else a LoRA voice's own default speaker, else the default."""
        if adapter is not None and not asked.speaker_given and adapter.default_speaker is not None:
            return adapter.default_speaker
        return asked.speaker

    def _normalizer(self, asked: PrepareRequest):
        return normalize.normalize_texts if asked.normalize else None

    def handle(self, request):
        # Every input read once, the cheap checks done (PrepareRequest), before any voice
        # is resolved or audio encoded through BLS; PromptBuilder trusts the texts.
        asked = PrepareRequest.from_inputs(triton.present_inputs(request, INPUT_NAMES))
        if asked.pieces is not None:
            return self._rest(asked)
        rest_spoken, rest_raw = [], []
        if asked.head_only:  # csm_tts_stream: the first segment now, the rest while it is spoken
            texts, rest_spoken, rest_raw = text_split.split_head(
                asked.text, normalize=self._normalizer(asked), per_sentence=asked.sentence_segments
            )
        else:
            texts = text_split.split_text(
                asked.text, normalize=self._normalizer(asked), per_sentence=asked.sentence_segments
            )
            if asked.sentence_segments:
                check_sentence_segments(len(texts))
        context = conversation.context_turns(
            **asked.context, lookup_voice=self._stored_voice, encode=forward_mimi_encoder
        )
        adapter = self.voices.adapter_voice(asked.voice_id)  # a LoRA voice: csm_lm generates with its adapter
        speaker = self._speaker(asked, adapter)
        voice = self.voices.resolve(
            voice_id=asked.voice_id,
            reference_audio=asked.reference_audio,
            reference_sample_rate=asked.reference_sample_rate,
            reference_text=asked.reference_text,
        )
        if voice is not None:  # the voice reference is the oldest turn, spoken by SPEAKER
            reference_text, reference_codes = voice
            context.insert(0, Turn(reference_text, speaker, validation.audio_codes(reference_codes, "voice")))
        prepared = self.prompt_builder.conversation(texts, speaker, context)
        # A one-segment text keeps the request's cap (0), unless it is a piece of a longer
        # text (csm_tts_stream's CONTINUE_FROM or a head with a rest), whose segments are
        # budgeted as a long text's.
        budget_all = len(texts) > 1 or asked.budget_every_segment or bool(rest_spoken or rest_raw)
        return {
            "input_ids": prepared.prompt.input_ids,
            "prompt_codes": prepared.prompt.audio_codes,
            **self._segments(texts, prepared.segment_ids, budget_all, adapter),
            "rest_pieces": _strings(rest_raw),
            "rest_spoken_pieces": _strings(rest_spoken),
        }

    def _rest(self, asked: PrepareRequest):
        """The segments of a text's rest alone (its head came before, with the prompt)."""
        texts = text_split.split_pieces(
            asked.pieces,
            normalize=self._normalizer(asked),
            spoken=asked.spoken_pieces,
            per_sentence=asked.sentence_segments,
        )
        if asked.sentence_segments:
            check_sentence_segments(len(texts) + 1)  # the head came first
        adapter = self.voices.adapter_voice(asked.voice_id)
        return {
            "input_ids": np.zeros(0, np.int64),
            "prompt_codes": np.zeros((0, C.NUM_CODEBOOKS), np.int64),
            **self._segments(
                texts, self.prompt_builder.segment_ids(texts, self._speaker(asked, adapter)), True, adapter
            ),
            "rest_pieces": _strings([]),
            "rest_spoken_pieces": _strings([]),
        }

    def _segments(self, texts: list[str], segment_ids: list[np.ndarray], budget_all: bool, adapter):
        budgets = [
            segments.segment_max_frames(t, self.seconds_per_char, self.min_seconds) if budget_all else 0 for t in texts
        ]
        builder = self.prompt_builder
        return {
            "segment_ids": np.concatenate([np.zeros(0, np.int64), *segment_ids]).astype(np.int64),
            "segment_token_counts": np.array([len(ids) for ids in segment_ids], np.int32),
            "segment_max_frames": np.array(budgets, np.int32),
            "audio_token_ids": np.array([builder.audio_id, builder.audio_eos_id], np.int64),
            "normalized_text": _strings(texts),
            "adapter_id": _strings([adapter.voice_id if adapter is not None else ""]),
        }


def _strings(values: list[str]) -> np.ndarray:
    return np.array([value.encode() for value in values], dtype=object)
