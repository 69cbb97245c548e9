"""The conversation fields of the gateway's speech routes: `speaker` and `context`.

`context` is a list of earlier turns, oldest first, each one of
    {"voice": "<stored voice id>", "speaker": 1}
    {"audio": "<base64 of an audio file>", "text": "what it says", "speaker": 0}
(stored voices before clips: the server's order, conversation.py), read by the client's
parser (csm_clients.context_json) with base64 clips decoded here. Everything is checked
here, before a tensor is built, and a refusal names the body's field the way OpenAI
names one (`context[2].audio`). Decoded clips together are bounded by the gateway's
upload limit, so a JSON body cannot make the gateway hold more than an upload could, and
each clip is judged by its header before it is decoded (audio.read_audio), against its
own limit (MAX_TURN_SECONDS) and what is left of the clips' total
(MAX_CONTEXT_AUDIO_SECONDS): decoding stops as soon as the total is passed, so 16 clips
of 30 s cost no more than 60 s of decoding. The gateway runs `conversation` in a
thread: it decodes.

A speech body (and /clone-voice's `context` field) holds at most MAX_JSON_VALUES JSON
values, counted before it is parsed (`check_json_values`): parsing builds objects many
times the text's size (`{}` is 3 bytes of text, 64 of dict), and pydantic builds one
error per bad element, so `[0,0,...]` of 600 KB once cost half a gigabyte.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from csm_clients.audio import AudioTooLong, read_audio
from csm_clients.context_json import turns_from_json
from csm_clients.conversation import Turn, check_context, check_text
from csm_clients.errors import FieldError, InvalidRequest
from csm_clients.limits import Limits, check_speaker

__all__ = [
    "MAX_JSON_VALUES",
    "ContextTurn",
    "check_json_values",
    "context_from_json",
    "conversation",
    "refused_field",
]

# The most JSON values a speech body may hold: the largest the API takes is ~100 (the
# top-level fields, 16 context turns of 4 fields); base64 clips are one value each.
MAX_JSON_VALUES = 1_000
# Everything up to the next `,` `[` or `{` outside a JSON string (group 1), or to the end:
# strings (kserve_checks' pattern, closed or not) and runs of other bytes, possessively,
# so every match succeeds, nothing is scanned twice and memory stays constant.
_UP_TO_SEPARATOR = re.compile(rb'(?:"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)|[^",\[{]++)*+(?:([,\[{])|\Z)', re.DOTALL)


class ContextTurn(BaseModel):
    """One earlier turn: a stored `voice`, or an `audio` clip (base64 of any file
    libsndfile reads) with its `text`; `speaker` 0-255 (default 0)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt "transcript" is named, not ignored

    text: str | None = None
    speaker: int = 0
    voice: str | None = None
    audio: str | None = None


_TURNS = TypeAdapter(list[ContextTurn])


def check_json_values(raw: bytes | str, field: str) -> None:
    """FieldError when the JSON text `raw` holds more than MAX_JSON_VALUES values, judged
    without parsing it, in time linear in its length and constant memory: every `,` `[`
    and `{` outside a string begins at most one more value, counted up to the limit."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    values = 1
    if data.count(b",") + data.count(b"[") + data.count(b"{") >= MAX_JSON_VALUES:  # else: surely within
        for found in _UP_TO_SEPARATOR.finditer(data):
            values += found.group(1) is not None
            if values > MAX_JSON_VALUES:
                break
    if values > MAX_JSON_VALUES:
        raise FieldError(
            f"{field}: holds more than {MAX_JSON_VALUES:,} JSON values; the gateway accepts at most "
            f"{MAX_JSON_VALUES:,} (a context turn is an object of a few fields, a clip one base64 "
            "string)",
            field,
        )


def context_from_json(value: str | None) -> list[ContextTurn] | None:
    """/clone-voice's `context` form field: the JSON of /v1/audio/speech's `context`."""
    if value is None or not value.strip():
        return None
    check_json_values(value, "context")
    try:
        return _TURNS.validate_json(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"])
        raise FieldError(f"context{where}: {first['msg']}", f"context{where}") from None


# "context turn 3: speaker: ..." (conversation.py) -> context[3].speaker
_TURN_MESSAGE = re.compile(r"^context turn (\d+): (speaker|its text|its clip|the audio|has audio but no text)?")
_TURN_PREFIX = re.compile(r"^context turn (\d+):")
_TURN_FIELDS = {
    "speaker": "speaker",
    "its text": "text",
    "has audio but no text": "text",
    "its clip": "audio",
    "the audio": "audio",
}


def _param(message: str) -> str:
    found = _TURN_MESSAGE.match(message)
    if found:
        field = _TURN_FIELDS.get(found.group(2) or "")
        return f"context[{found.group(1)}]" + (f".{field}" if field else "")
    return "speaker" if message.startswith("speaker:") else "context"


class _Named(io.BytesIO):
    """Clip bytes that libsndfile's errors name by the field (not `<_io.BytesIO ...>`)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __repr__(self) -> str:
        return self.label


def _clip(audio: str, index: int, budget: int, seconds_before: float, limits: Limits) -> tuple[np.ndarray, int, int]:
    """The turn's clip, decoded within its own limit and what the clips before it
    (`seconds_before` of audio) left of the total; (its samples, their rate, its bytes)."""
    where = f"context[{index}].audio"
    encoded = re.sub(r"\s+", "", audio)
    if len(encoded) * 3 // 4 > budget:
        raise FieldError(
            f"{where}: the context clips are larger than the gateway's {budget / 2**20:g} MB left for them", where
        )
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(f"{where}: is not base64 (give the bytes of an audio file, base64-encoded)", where) from None
    most, left = limits.MAX_TURN_SECONDS, limits.MAX_CONTEXT_AUDIO_SECONDS - seconds_before
    try:
        # Bounded by one clip's limit and what is left of the total, from the header
        # first: an hour of silence is a few hundred KB of FLAC, well inside the byte
        # budget, and 16 clips of 30 s must not all be decoded to learn they pass 60 s.
        samples, rate = read_audio(_Named(data, where), where, max_seconds=min(most, left), limits=limits)
    except AudioTooLong as error:
        if left >= most:  # the clip's own limit was the bound
            raise FieldError(str(error), where) from None
        if error.by_header and error.seconds > most:  # over both: name the clip's own
            raise FieldError(
                f"{where} is (by its header) {error.seconds:.2f} s long; the limit is {most:g} s", where
            ) from None
        total = seconds_before + error.seconds
        raise FieldError(
            f"context: the context clips hold {'' if error.by_header else 'at least '}{total:.1f} s "
            f"of audio up to {where} ({seconds_before:.1f} s before it); the limit is "
            f"{limits.MAX_CONTEXT_AUDIO_SECONDS:g} s for all clips together (MAX_CONTEXT_AUDIO_SECONDS)",
            "context",
        ) from None
    except InvalidRequest as error:
        raise FieldError(str(error), where) from None
    return samples, rate, len(data)


def conversation(
    input_text: str, speaker: int | None, context: list[ContextTurn] | None, max_clip_bytes: int, limits: Limits
) -> dict:
    """synthesize()'s `speaker` and `context` from the body, checked against the server's
    `limits` (the gateway's client's); FieldError names the field."""
    try:
        check_text(input_text, "TEXT", limits)
    except InvalidRequest as error:
        raise FieldError(f"input: {error}", "input") from None
    if speaker is not None:
        try:
            check_speaker(speaker, "speaker", limits)
        except InvalidRequest as error:
            raise FieldError(str(error), "speaker") from None
    if not context:
        return {"speaker": speaker}
    budget, seconds = max_clip_bytes, 0.0

    def load_clip(index: int, audio: str, text: str | None, turn_speaker: int) -> Turn:
        nonlocal budget, seconds
        samples, rate, size = _clip(audio, index, budget, seconds, limits)
        clip = Turn(text, turn_speaker, samples, rate)
        budget -= size
        seconds += clip.seconds
        return clip

    # The shared parser (csm_clients.context_json): the turns counted before any clip is decoded.
    turns = turns_from_json([turn.model_dump(exclude_none=True) for turn in context], load_clip, limits)
    try:
        check_context(turns, speaker, limits)  # the tensors are built once, when the request is sent
    except InvalidRequest as error:
        message = _TURN_PREFIX.sub(r"context[\1]:", str(error))  # the body's name for the turn
        raise FieldError(message, _param(str(error))) from None
    return {"speaker": speaker, "context": turns}


def refused_field(message: str, voice: str | None, context: list[ContextTurn] | None) -> str | None:
    """The field a Triton refusal is about, when its tensor does not say: an unknown
    voice is `context` when it names a context voice and not the request's `voice`; a
    prompt over its token budget without context turns is the `input`'s (or voice's)."""
    if not context:
        return "input" if message.startswith("the prompt (") or " the prompt (" in message else None
    if "unknown voice" not in message:
        return None
    if voice is not None and f"'{voice}'" in message:
        return "voice"
    named = [index for index, turn in enumerate(context) if turn.voice and f"'{turn.voice}'" in message]
    return f"context[{named[0]}].voice" if named else None
