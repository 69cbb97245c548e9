"""Each public model's request and answer, once, for every transport.

A `Call` holds the model name and its inputs as numpy arrays (UPPER_SNAKE names,
docs/api.md) and knows how to read the answer; the sync and async clients, over gRPC or
HTTP, only move it. Optional inputs left as None are not sent: the server's defaults
and limits apply.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from csm_clients.adapters import AdapterFiles
from csm_clients.audio import Reference, Speech
from csm_clients.conversation import Turn, check_text, context_inputs
from csm_clients.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "ADMIN_TOKEN_HEADER",
    "STREAM_MODEL",
    "VOICE_OWNER_HEADER",
    "Call",
    "WatermarkScore",
    "delete_voice",
    "detect_watermark",
    "list_voices",
    "register_adapter",
    "register_voice",
    "speech_from",
    "synthesize",
    "tts_inputs",
]

ADMIN_TOKEN_HEADER = "x-csm-admin-token"  # docs/api.md: voice writes need it
# Who a write is for (a gateway's key id): the voice is stored as theirs, and a deletion
# with it removes only their voices. Without it an admin-token write is the admin's.
VOICE_OWNER_HEADER = "x-csm-voice-owner"
TTS_MODEL = "csm_tts"
STREAM_MODEL = "csm_tts_stream"


@dataclass(frozen=True)
class Call:
    model: str
    inputs: dict[str, np.ndarray]
    parse: Callable[[Any], Any]  # the answer (anything with .as_numpy(name)) -> the value returned
    admin: bool = False  # send the admin token
    owner: str | None = None  # sent as VOICE_OWNER_HEADER


def _text(value: str) -> np.ndarray:
    return np.array([value.encode("utf-8")], dtype=np.object_)


def _reference_inputs(reference: Reference) -> dict[str, np.ndarray]:
    inputs = {
        "REFERENCE_AUDIO": np.ascontiguousarray(reference.samples, dtype=np.float32),
        "REFERENCE_SAMPLE_RATE": np.array([reference.sample_rate], np.int32),
    }
    if reference.transcript is not None:
        inputs["REFERENCE_TEXT"] = _text(reference.transcript)
    return inputs


def tts_inputs(
    text: str,
    voice: str | Reference | None = None,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    max_audio_seconds: float | None = None,
    speaker: int | None = None,
    context: Sequence[Turn] | None = None,
    continue_from: str | None = None,
    normalize: bool | None = None,
    sentence_segments: bool | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, np.ndarray]:
    """csm_tts / csm_tts_stream inputs. `voice`: a stored voice id, an inline Reference,
    or None for the model's default voice; `speaker` and `context`: conversation.py;
    `continue_from` (csm_tts_stream only): "" for the first piece of a text sent in
    pieces, then the CONTINUATION of the piece before; `limits`: the server's (limits.py).
    `normalize` False: the text is spoken as written (the server reads numbers, money,
    dates... as words by default); `sentence_segments` True: each sentence its own
    segment, so SEGMENT_TIMES time sentences."""
    check_text(text, limits=limits)
    inputs = {"TEXT": _text(text)}
    if continue_from is not None:
        inputs["CONTINUE_FROM"] = _text(continue_from)
    if isinstance(voice, Reference):
        inputs.update(_reference_inputs(voice))
    elif voice is not None:
        inputs["VOICE_ID"] = _text(voice)
    optional = {
        "TEMPERATURE": (temperature, np.float32),
        "TOP_K": (top_k, np.int32),
        "SEED": (seed, np.int64),
        "MAX_AUDIO_SECONDS": (max_audio_seconds, np.float32),
        "NORMALIZE": (normalize, bool),
        "SENTENCE_SEGMENTS": (sentence_segments, bool),
    }
    inputs.update({name: np.array([value], dtype) for name, (value, dtype) in optional.items() if value is not None})
    inputs.update(context_inputs(context, speaker, limits))
    return inputs


def _texts(values) -> tuple[str, ...]:
    return tuple(value.decode() if isinstance(value, bytes) else str(value) for value in values)


def speech_from(result) -> Speech:
    reasons, frames = _optional_output(result, "FINISH_REASONS"), _optional_output(result, "SEGMENT_FRAMES")
    continuation = _texts(_optional_output(result, "CONTINUATION"))
    return Speech(
        np.asarray(result.as_numpy("AUDIO"), np.float32),
        int(result.as_numpy("SAMPLE_RATE")[0]),
        _texts(reasons),
        tuple(int(f) for f in frames),
        _texts(_optional_output(result, "NORMALIZED_TEXT")),
        continuation[0] if continuation else None,
        segment_times(_optional_output(result, "SEGMENT_TIMES")),
    )


def segment_times(values) -> tuple[tuple[float, float], ...]:
    """SEGMENT_TIMES [segments, 2] (flattened or not) -> ((start, end), ...) seconds."""
    pairs = np.asarray(values, np.float64).reshape(-1, 2)
    return tuple((float(start), float(end)) for start, end in pairs)


def _optional_output(result, name: str) -> np.ndarray:
    """An output the answer may lack (a stream chunk, an older server): empty then
    (tritonclient's as_numpy gives None for a name the answer does not hold)."""
    value = result.as_numpy(name)
    return np.zeros(0) if value is None else np.ravel(value)


def _json_output(name: str) -> Callable[[Any], Any]:
    def parse(result):
        value = result.as_numpy(name)[0]
        return json.loads(value.decode() if isinstance(value, bytes) else value)

    return parse


def synthesize(text: str, voice: str | Reference | None = None, **sampling) -> Call:
    return Call(TTS_MODEL, tts_inputs(text, voice, **sampling), speech_from)


def register_voice(voice_id: str, reference: Reference, owner: str | None = None) -> Call:
    return Call(
        "voice_register",
        {"VOICE_ID": _text(voice_id), **_reference_inputs(reference)},
        _json_output("VOICE"),
        admin=True,
        owner=owner,
    )


def _blob(data: bytes) -> np.ndarray:
    return np.array([data], dtype=np.object_)


def register_adapter(
    voice_id: str,
    files: AdapterFiles,
    *,
    default_speaker: int | None = None,
    reference: Reference | None = None,
    owner: str | None = None,
) -> Call:
    """voice_register with a LoRA adapter (adapters.read_adapter_folder): its files' bytes
    as they are, an optional default speaker id and an optional reference clip."""
    inputs = {
        "VOICE_ID": _text(voice_id),
        "ADAPTER_CONFIG": _blob(files.config),
        "ADAPTER_WEIGHTS": _blob(files.weights),
    }
    if files.manifest is not None:
        inputs["ADAPTER_MANIFEST"] = _blob(files.manifest)
    if default_speaker is not None:
        inputs["DEFAULT_SPEAKER"] = np.array([default_speaker], np.int32)
    if reference is not None:
        inputs.update(_reference_inputs(reference))
    return Call("voice_register", inputs, _json_output("VOICE"), admin=True, owner=owner)


def list_voices() -> Call:
    return Call("voice_list", {}, _json_output("VOICES"))


def delete_voice(voice_id: str, owner: str | None = None) -> Call:
    return Call("voice_delete", {"VOICE_ID": _text(voice_id)}, _json_output("DELETED"), admin=True, owner=owner)


class WatermarkScore(float):
    """watermark_detect's SCORE in [0, 1] (compares as a float), with its decision
    `watermarked` (the server's WATERMARKED: SCORE >= its threshold, docs/api.md)."""

    watermarked: bool

    def __new__(cls, score: float, watermarked: bool) -> WatermarkScore:
        value = super().__new__(cls, score)
        value.watermarked = bool(watermarked)
        return value

    def __repr__(self) -> str:
        return f"WatermarkScore({float(self):.4f}, watermarked={self.watermarked})"

    __str__ = float.__repr__  # print() shows the number, as before the decision existed


def detect_watermark(audio: np.ndarray, sample_rate: int) -> Call:
    return Call(
        "watermark_detect",
        {"AUDIO": np.ascontiguousarray(audio, dtype=np.float32), "SAMPLE_RATE": np.array([sample_rate], np.int32)},
        lambda result: WatermarkScore(float(result.as_numpy("SCORE")[0]), bool(result.as_numpy("WATERMARKED")[0])),
    )
