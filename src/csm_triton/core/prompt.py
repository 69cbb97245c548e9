"""CSM prompt layout: text turns and audio frames as the model consumes them.

A prompt is a sequence of segments. Each segment is rendered as

    <bos>[speaker]text<eos>                          (a text turn)
    <|AUDIO|> x frames  <|audio_eos|>               (its audio, when it has any)

exactly as `CsmProcessor.apply_chat_template` renders a conversation; the target
utterance is the last, audio-less segment. The audio placeholders are returned
as token ids plus the codes ([frames, 32]) that replace them, so the generation
engine embeds codes directly and no audio is re-encoded per request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from csm_triton import constants as C
from csm_triton.core import validation
from csm_triton.errors import InvalidInput

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation (a voice reference, a context turn, the target); a
    long text's pieces are core.segments'."""

    text: str
    speaker: int = C.DEFAULT_SPEAKER_ID
    audio_codes: np.ndarray | None = None  # [frames, NUM_CODEBOOKS]


@dataclass(frozen=True)
class Prompt:
    input_ids: np.ndarray  # [tokens] int64, audio frames as AUDIO placeholders
    audio_codes: np.ndarray  # [audio placeholder count, NUM_CODEBOOKS] int64


@dataclass(frozen=True)
class ConversationPrompt:
    """The first segment's prompt plus every segment's text turn (core.segments.SegmentChain
    builds the later prompts from these ids and the codes generated before)."""

    prompt: Prompt  # context turns + segment 0's text turn
    segment_ids: list[np.ndarray]  # each segment's <bos>[speaker]text<eos>
    segment_texts: list[str]


def _special_token(config: dict, key: str) -> str:
    value = config[key]
    return value["content"] if isinstance(value, dict) else value


class PromptBuilder:
    """Tokenizes segments with the checkpoint's own tokenizer (no transformers import,
    so the csm_prepare stub starts fast)."""

    def __init__(self, tokenizer_dir: str | Path):
        tokenizer_dir = Path(tokenizer_dir)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        self.bos_id = self._token_id(_special_token(config, "bos_token"))
        self.eos_id = self._token_id(_special_token(config, "eos_token"))
        self.audio_id = self._token_id(C.AUDIO_TOKEN)
        self.audio_eos_id = self._token_id(C.AUDIO_EOS_TOKEN)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no token {token!r}")
        return token_id

    def text_ids(self, text: str, speaker: int = C.DEFAULT_SPEAKER_ID) -> list[int]:
        ids = self.tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False).ids
        return [self.bos_id, *ids, self.eos_id]

    def build(self, turns: list[Turn]) -> Prompt:
        ids: list[int] = []
        codes: list[np.ndarray] = []
        for turn in turns:
            ids += self.text_ids(turn.text, turn.speaker)
            if turn.audio_codes is not None and len(turn.audio_codes):
                ids += [self.audio_id] * len(turn.audio_codes) + [self.audio_eos_id]
                codes.append(np.asarray(turn.audio_codes, dtype=np.int64))
        all_codes = np.concatenate(codes) if codes else np.zeros((0, C.NUM_CODEBOOKS), np.int64)
        return Prompt(np.asarray(ids, dtype=np.int64), all_codes)

    def prepare(
        self, text: str, reference_text: str | None = None, reference_codes: np.ndarray | None = None
    ) -> Prompt:
        """The prompt for one request: an optional voice reference, then the target.

        The texts are trusted (csm_prepare checks TEXT, VoiceResolver REFERENCE_TEXT);
        the token limit is checked here, where the tokenizer is."""
        turns = []
        if reference_codes is not None or reference_text is not None:
            if reference_text is None:
                raise InvalidInput("reference audio was given without 'REFERENCE_TEXT'")
            if reference_codes is None or not len(reference_codes):
                raise InvalidInput("'REFERENCE_TEXT' was given without reference audio")
            codes = validation.audio_codes(reference_codes, "reference_codes")
            turns.append(Turn(reference_text, audio_codes=codes))
        turns.append(Turn(text))
        prompt = self.build(turns)
        text_tokens = int(np.count_nonzero(prompt.input_ids != self.audio_id))
        validation.token_count(text_tokens, "TEXT")
        return prompt

    def segment_ids(self, texts: list[str], speaker: int = C.DEFAULT_SPEAKER_ID) -> list[np.ndarray]:
        """Each segment's text turn as token ids, checked against MAX_TEXT_TOKENS."""
        segment_ids = [np.asarray(self.text_ids(text, speaker), np.int64) for text in texts]
        for ids in segment_ids:
            validation.token_count(len(ids), "TEXT")
        return segment_ids

    def conversation(
        self, texts: list[str], speaker: int = C.DEFAULT_SPEAKER_ID, context: list[Turn] | None = None
    ) -> ConversationPrompt:
        """Context turns (oldest first, the voice reference among them), then the
        target's segments spoken by `speaker`: exactly CsmProcessor.apply_chat_template's
        layout for the same turns. Each segment's text tokens are checked against
        MAX_TEXT_TOKENS, and segment 0's whole prompt against MAX_PROMPT_TOKENS."""
        context = list(context or [])
        segment_ids = self.segment_ids(texts, speaker)
        prompt = self.build([*context, Turn(texts[0], speaker)])
        if len(prompt.input_ids) > C.MAX_PROMPT_TOKENS:
            raise InvalidInput(
                f"the prompt (voice, context turns and text) is {len(prompt.input_ids)} tokens long; the limit is "
                f"{C.MAX_PROMPT_TOKENS} (fewer or shorter context turns, or less context audio)"
            )
        return ConversationPrompt(prompt, segment_ids, list(texts))
