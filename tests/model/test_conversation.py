"""Speakers and context turns: the prompt equals CsmProcessor.apply_chat_template's for
the same conversation, and every bad conversation is a clear InvalidInput."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, CsmForConditionalGeneration

from csm_triton import constants as C
from csm_triton.core import conversation
from csm_triton.core.prompt import Turn
from csm_triton.errors import InvalidInput

# (text, speaker, seconds of audio); CSM's template gives every context turn audio
TURNS = [
    ("Hello, who is there?", 0, 1.0),
    ("It is me, your neighbour.", 1, 1.5),
    ("Oh, come in then!", 0, 0.8),
    ("Thank you, 42 times over.", 2, 0.7),
]
TARGET = ("Sit down, please.", 1)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return AutoProcessor.from_pretrained(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def encode(tiny_checkpoint):
    codec = CsmForConditionalGeneration.from_pretrained(tiny_checkpoint).codec_model.eval()

    def encode(samples: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return codec.encode(torch.from_numpy(samples)[None, None]).audio_codes[0].T.numpy()

    return encode


def clip(seconds: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * C.SAMPLE_RATE)) / C.SAMPLE_RATE
    noise = 0.05 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * 200 * t * (1 + t)) + noise).astype(np.float32)


def no_voices(voice_id):
    raise InvalidInput(f"unknown voice '{voice_id}'")


def hf_conversation(turns, target, clips):
    messages = []
    for (text, speaker, _), audio in zip(turns, clips):
        content = [{"type": "text", "text": text}]
        if audio is not None:
            content.append({"type": "audio", "path": audio})
        messages.append({"role": str(speaker), "content": content})
    messages.append({"role": str(target[1]), "content": [{"type": "text", "text": target[0]}]})
    return messages


def peak_normalised(audio):
    return (audio / np.abs(audio).max()).astype(np.float32) if audio is not None else None


@pytest.mark.parametrize("turn_count", [1, 2, 3, 4])
def test_context_prompt_equals_csm_processor(turn_count, builder, processor, encode):
    turns = TURNS[:turn_count]
    clips = [clip(seconds, seed) for seed, (_, _, seconds) in enumerate(turns)]
    context = conversation.context_turns(
        texts=[t for t, _, _ in turns],
        speakers=np.array([s for _, s, _ in turns], np.int32),
        audio=np.concatenate(clips),
        audio_lengths=np.array([c.size for c in clips], np.int32),
        sample_rate=np.array([C.SAMPLE_RATE], np.int32),
        lookup_voice=no_voices,
        encode=encode,
    )
    prepared = builder.conversation([TARGET[0]], TARGET[1], context)

    # The server peak-normalises a clip before encoding; the placeholder count depends
    # only on the length, so the processor gets the same clips.
    expected = processor.apply_chat_template(
        hf_conversation(turns, TARGET, [peak_normalised(c) for c in clips]), tokenize=True, return_dict=True
    )
    assert prepared.prompt.input_ids.tolist() == expected["input_ids"][0].tolist()
    placeholders = int((prepared.prompt.input_ids == builder.audio_id).sum())
    assert placeholders == len(prepared.prompt.audio_codes) == int((expected["input_ids"][0] == builder.audio_id).sum())


def test_speaker_changes_the_prompt_as_the_template_does(builder, processor):
    for speaker in (0, 3):
        prepared = builder.conversation(["Hi there."], speaker, [])
        expected = processor.apply_chat_template(
            hf_conversation([], ("Hi there.", speaker), []), tokenize=True, return_dict=True
        )["input_ids"][0]
        assert prepared.prompt.input_ids.tolist() == expected.tolist()


def test_stored_voices_come_first_then_inline_turns(builder):
    codes = np.ones((5, C.NUM_CODEBOOKS), np.int64)
    context = conversation.context_turns(
        texts=["Inline turn."],
        speakers=np.array([4, 1], np.int32),
        voice_ids=["alice"],
        audio=clip(1.0, 0),
        audio_lengths=np.array([C.SAMPLE_RATE], np.int32),
        sample_rate=np.array([C.SAMPLE_RATE], np.int32),
        lookup_voice=lambda v: ("Alice speaking.", codes),
        encode=fake_encode,
    )
    assert [(t.text, t.speaker) for t in context] == [("Alice speaking.", 4), ("Inline turn.", 1)]
    prepared = builder.conversation(["Target."], 0, context)
    expected = builder.build(
        [Turn("Alice speaking.", 4, codes), Turn("Inline turn.", 1, fake_encode(clip(1.0, 0))), Turn("Target.")]
    )
    assert prepared.prompt.input_ids.tolist() == expected.input_ids.tolist()


def fake_encode(samples):
    return np.zeros((int(np.ceil(samples.size / C.SAMPLES_PER_FRAME)), C.NUM_CODEBOOKS), np.int64)


BAD_CONTEXTS = {
    "lengths that do not add up": (
        dict(
            texts=["a b"],
            audio=np.zeros(1000, np.float32),
            audio_lengths=np.array([999], np.int32),
            sample_rate=np.array([24000], np.int32),
        ),
        "adds up to 999",
    ),
    "one length per turn": (
        dict(
            texts=["a", "b"],
            audio=np.zeros(1000, np.float32),
            audio_lengths=np.array([1000], np.int32),
            sample_rate=np.array([24000], np.int32),
        ),
        "1 values for 2",
    ),
    "too many turns": (dict(texts=["turn"] * (C.MAX_CONTEXT_TURNS + 1)), f"limit is {C.MAX_CONTEXT_TURNS}"),
    "negative speaker": (dict(texts=["a"], speakers=np.array([-1], np.int32)), "speaker id -1"),
    "huge speaker": (dict(texts=["a"], speakers=np.array([10**6], np.int32)), "speaker id 1000000"),
    "speaker count": (dict(texts=["a"], speakers=np.array([0, 1], np.int32)), "2 values for 1"),
    "turn without audio": (dict(texts=["a"]), "needs 'CONTEXT_AUDIO'"),
    "empty turn audio": (
        dict(
            texts=["a", "b"],
            audio=np.zeros(1000, np.float32),
            audio_lengths=np.array([1000, 0], np.int32),
            sample_rate=np.array([24000], np.int32),
        ),
        "every context turn needs audio",
    ),
    "unknown context voice": (dict(voice_ids=["nobody"]), "unknown voice 'nobody'"),
    "punctuation only": (
        dict(
            texts=["?! ... --"],
            audio=np.zeros(24000, np.float32),
            audio_lengths=np.array([24000], np.int32),
            sample_rate=np.array([24000], np.int32),
        ),
        "only punctuation",
    ),
    "audio without rate": (
        dict(texts=["a"], audio=np.zeros(24000, np.float32), audio_lengths=np.array([24000], np.int32)),
        "CONTEXT_SAMPLE_RATE",
    ),
    "too much context audio": (
        dict(
            texts=["a"] * 3,
            audio=np.zeros(24000 * 63, np.float32),
            audio_lengths=np.array([24000 * 21] * 3, np.int32),
            sample_rate=np.array([24000], np.int32),
        ),
        "the limit is 60 s",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTEXTS))
def test_bad_context_is_refused(case):
    inputs, message = BAD_CONTEXTS[case]
    with pytest.raises(InvalidInput) as failure:
        conversation.context_turns(**inputs, lookup_voice=no_voices, encode=fake_encode)
    assert message in str(failure.value)


@pytest.mark.parametrize(
    "value, message",
    [
        (np.array([-3], np.int32), "speaker id -3"),
        (np.array([C.MAX_SPEAKER_ID + 1], np.int32), "speaker ids are 0-"),
        (np.array([1, 2], np.int32), "exactly one value"),
    ],
)
def test_bad_speaker_is_refused(value, message):
    with pytest.raises(InvalidInput) as failure:
        conversation.speaker_id(value)
    assert message in str(failure.value)


@pytest.mark.parametrize("text", ["   ", "?!...", " — … ¿¡ "])
def test_text_without_anything_to_say_is_refused(text):
    with pytest.raises(InvalidInput):
        conversation.spoken_text(text, "TEXT")


def test_a_prompt_over_the_token_budget_is_refused(builder):
    codes = np.zeros((C.MAX_PROMPT_TOKENS, C.NUM_CODEBOOKS), np.int64)
    with pytest.raises(InvalidInput) as failure:
        builder.conversation(["Target."], 0, [Turn("Long context.", 0, codes)])
    assert f"the limit is {C.MAX_PROMPT_TOKENS}" in str(failure.value)
