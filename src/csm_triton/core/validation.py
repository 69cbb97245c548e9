"""Input checks for every public model, in one place, against the limits in
`csm_triton.constants`. Each failure raises `InvalidInput` with a message that
names the input and the rule, which Triton returns to the client as INVALID_ARG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from csm_triton import constants as C
from csm_triton.errors import InvalidInput


def single_string(texts: list[str] | None, name: str, *, required: bool = True) -> str | None:
    """The one string of a text input, its content unchecked: for a door whose input's
    rules (`text`) are checked by the core function it hands the string to."""
    if texts is None:
        if required:
            raise InvalidInput(f"missing required input '{name}'")
        return None
    if len(texts) != 1:
        raise InvalidInput(f"input '{name}' must hold exactly one string, got {len(texts)}")
    return texts[0]


def text(value: str, name: str) -> str:
    """A non-blank string of at most MAX_TEXT_CHARS characters, without NUL."""
    if not value.strip():
        raise InvalidInput(f"input '{name}' is empty")
    if len(value) > C.MAX_TEXT_CHARS:
        raise InvalidInput(f"input '{name}' has {len(value)} characters; the limit is {C.MAX_TEXT_CHARS}")
    if "\x00" in value:
        raise InvalidInput(f"input '{name}' contains a NUL character")
    return value


def single_text(texts: list[str] | None, name: str, *, required: bool = True) -> str | None:
    """Exactly one non-blank string of at most MAX_TEXT_CHARS characters."""
    value = single_string(texts, name, required=required)
    return None if value is None else text(value, name)


def token_count(count: int, name: str) -> None:
    if count > C.MAX_TEXT_TOKENS:
        raise InvalidInput(f"input '{name}' is {count} tokens long; the limit is {C.MAX_TEXT_TOKENS}")


def audio_codes(codes: np.ndarray, name: str, *, max_frames: int = C.MAX_CODEC_FRAMES) -> np.ndarray:
    """Mimi codes shaped [frames, NUM_CODEBOOKS], each in [0, CODEBOOK_SIZE)."""
    if codes.dtype.kind not in "iu":
        raise InvalidInput(f"input '{name}' must be an integer tensor, got {codes.dtype}")
    if codes.ndim != 2 or codes.shape[1] != C.NUM_CODEBOOKS:
        raise InvalidInput(f"input '{name}' must have shape [frames, {C.NUM_CODEBOOKS}], got {list(codes.shape)}")
    if codes.shape[0] > max_frames:
        raise InvalidInput(f"input '{name}' has {codes.shape[0]} frames; the limit is {max_frames}")
    _value_range(codes, name, 0, C.CODEBOOK_SIZE, "codes")
    return codes.astype(np.int64, copy=False)


def token_ids(ids: object, name: str, vocab_size: int) -> np.ndarray:
    """A prompt's token ids: a non-empty 1-D integer tensor, each id a row of the model's
    text embedding. Checked before any work: an id outside it is an index error on the
    CPU, and on CUDA a device-side assert that poisons the whole process; a negative id
    would silently read a row from the end."""
    array = np.asarray(ids)
    if array.dtype.kind not in "iu":
        raise InvalidInput(f"input '{name}' must be an integer tensor, got {array.dtype}")
    if array.ndim != 1 or not array.size:
        raise InvalidInput(f"input '{name}' must be a non-empty 1-D tensor, got shape {list(array.shape)}")
    integers_in_range(array, name, 0, vocab_size)
    return array.astype(np.int64, copy=False)


def count(value: np.ndarray | None, name: str) -> int | None:
    """An optional count (frames, turns): one integer of at least 0; None when absent."""
    if value is None:
        return None
    array = np.asarray(value).reshape(-1)
    if array.size != 1 or array.dtype.kind not in "iu" or int(array[0]) < 0:
        raise InvalidInput(f"input '{name}' must be one integer of at least 0, got {array.tolist()}")
    return int(array[0])


def integers_in_range(array: np.ndarray, name: str, low: int, high: int | None) -> None:
    """Every value in [low, high) (high None: at least low); the message names the
    range, the first value outside it and where it is."""
    array = np.asarray(array)
    outside = array < low if high is None else (array < low) | (array >= high)
    if outside.any():
        where = np.unravel_index(int(np.argmax(outside)), array.shape)
        position = str(where[0]) if len(where) == 1 else str(list(map(int, where)))
        rule = f"be at least {low}" if high is None else f"lie in [{low}, {high})"
        raise InvalidInput(f"input '{name}' must {rule}, got {array[where]} at position {position}")


def _value_range(array: np.ndarray, name: str, low: int, high: int, what: str) -> None:
    if array.size and (array.min() < low or array.max() >= high):
        raise InvalidInput(f"input '{name}' holds {what} outside [{low}, {high}) (from {array.min()} to {array.max()})")


# --- the codec models' inputs (applied by the embedded onnxruntime backend) ----------------
def mimi_codes(codes: np.ndarray, name: str) -> np.ndarray:
    """mimi_decoder's codes, [batch, NUM_CODEBOOKS, frames] (shape and type already checked
    against the config): 1..MAX_CODEC_FRAMES frames of codes in [0, CODEBOOK_SIZE)."""
    if codes.dtype.kind not in "iu":
        raise InvalidInput(f"input '{name}' must be an integer tensor, got {codes.dtype}")
    frames = codes.shape[-1] if codes.ndim else 0
    if frames < 1:
        raise InvalidInput(f"input '{name}' has 0 frames; at least 1 is needed")
    if frames > C.MAX_CODEC_FRAMES:
        raise InvalidInput(
            f"input '{name}' has {frames} frames ({frames / C.FRAME_RATE_HZ:g} s); the limit is "
            f"{C.MAX_CODEC_FRAMES} frames ({C.MAX_CODEC_SECONDS:g} s)"
        )
    _value_range(codes, name, 0, C.CODEBOOK_SIZE, "codes")
    return codes


def mimi_audio(samples: np.ndarray, name: str) -> np.ndarray:
    """mimi_encoder's audio, [batch, 1, samples] at SAMPLE_RATE: 1..MAX_CODEC_SAMPLES
    finite samples."""
    count = samples.shape[-1] if samples.ndim else 0
    if count < 1:
        raise InvalidInput(f"input '{name}' holds no samples")
    if count > C.MAX_CODEC_SAMPLES:
        raise InvalidInput(
            f"input '{name}' has {count} samples ({count / C.SAMPLE_RATE:.1f} s at {C.SAMPLE_RATE} Hz); "
            f"the limit is {C.MAX_CODEC_SECONDS:g} s"
        )
    if not np.isfinite(samples).all():
        raise InvalidInput(f"input '{name}' contains NaN or infinite samples")
    return samples


# The rules a model config can name for an input: `parameters { key: "validate.<input>"
# value: { string_value: "<rule>" } }` (csm_triton.serving.onnxruntime.session).
INPUT_RULES = {"mimi_codes": mimi_codes, "mimi_audio": mimi_audio}


@dataclass(frozen=True)
class SamplingParameters:
    temperature: float = C.DEFAULT_TEMPERATURE
    top_k: int = C.DEFAULT_TOP_K
    seed: int | None = None
    max_audio_seconds: float = C.DEFAULT_MAX_AUDIO_SECONDS

    @property
    def max_frames(self) -> int:
        # Rounded first: FP32 1.36 arrives as 1.3600000143, which must stay 17 frames.
        return max(1, int(np.ceil(round(self.max_audio_seconds * C.FRAME_RATE_HZ, 4))))


def _scalar(value: np.ndarray | None, name: str):
    if value is None:
        return None
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise InvalidInput(f"input '{name}' must hold exactly one value, got {flat.size}")
    return flat[0]


def flag(value: np.ndarray | None, name: str, default: bool) -> bool:
    """An optional BOOL switch (NORMALIZE): one value; absent -> `default`."""
    if value is None:
        return default
    array = np.asarray(value)
    if array.dtype.kind != "b":
        raise InvalidInput(f"input '{name}' must be a BOOL tensor, got {array.dtype}")
    return bool(_scalar(array, name))


SAMPLING_INPUTS = ("TEMPERATURE", "TOP_K", "SEED", "MAX_AUDIO_SECONDS")


def sampling_from_inputs(inputs) -> SamplingParameters:
    """sampling_parameters() of whichever SAMPLING_INPUTS a mapping of inputs holds."""
    return sampling_parameters(*(inputs.get(name) for name in SAMPLING_INPUTS))


def sampling_parameters(temperature=None, top_k=None, seed=None, max_audio_seconds=None) -> SamplingParameters:
    """TEMPERATURE, TOP_K, SEED, MAX_AUDIO_SECONDS (each optional, one value)."""
    params = {}
    value = _scalar(temperature, "TEMPERATURE")
    if value is not None:
        if not np.isfinite(value) or value <= 0 or value > C.MAX_TEMPERATURE:
            raise InvalidInput(f"input 'TEMPERATURE' must be in (0, {C.MAX_TEMPERATURE:g}], got {value}")
        params["temperature"] = max(float(value), C.MIN_TEMPERATURE)  # see constants.MIN_TEMPERATURE
    value = _scalar(top_k, "TOP_K")
    if value is not None:
        if not 1 <= int(value) <= C.CODEBOOK_SIZE:
            raise InvalidInput(f"input 'TOP_K' must be in [1, {C.CODEBOOK_SIZE}], got {value}")
        params["top_k"] = int(value)
    value = _scalar(seed, "SEED")
    if value is not None:
        if int(value) < 0:
            raise InvalidInput(f"input 'SEED' must be >= 0, got {value}")
        params["seed"] = int(value)
    value = _scalar(max_audio_seconds, "MAX_AUDIO_SECONDS")
    if value is not None:
        if not np.isfinite(value) or value <= 0 or value > C.MAX_AUDIO_SECONDS_LIMIT:
            raise InvalidInput(f"input 'MAX_AUDIO_SECONDS' must be in (0, {C.MAX_AUDIO_SECONDS_LIMIT:g}], got {value}")
        params["max_audio_seconds"] = float(value)
    return SamplingParameters(**params)


# --- Voice profiles: voice ids, reference audio, sample rates ----------------------------
def voice_id(value: object, name: str = "VOICE_ID") -> str:
    """A voice id: VOICE_ID_PATTERN as a whole (fullmatch: `$` alone would accept a
    trailing newline). Checked before any file name is built from it."""
    if not isinstance(value, str):
        raise InvalidInput(f"input '{name}' must be a string, got {type(value).__name__}")
    if not C.VOICE_ID_PATTERN.fullmatch(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidInput(
            f"input '{name}' is not a valid voice id: {shown!r}; use 1-64 characters of a-z, 0-9, "
            f"'_' and '-', starting with a letter or digit (pattern {C.VOICE_ID_PATTERN.pattern})"
        )
    return value


def input_sample_rate(value: object, name: str) -> int:
    """One positive integer in [MIN_INPUT_SAMPLE_RATE, MAX_INPUT_SAMPLE_RATE] (a scalar
    or a one-element integer tensor)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise InvalidInput(f"input '{name}' must be an integer tensor, got {value.dtype}")
        if value.size != 1:
            raise InvalidInput(f"input '{name}' must hold exactly one value, got {value.size}")
        value = value.reshape(-1)[0]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidInput(f"input '{name}' must be an integer, got {type(value).__name__}")
    rate = int(value)
    if rate <= 0:
        raise InvalidInput(f"input '{name}' must be a positive sample rate in Hz, got {rate}")
    if not C.MIN_INPUT_SAMPLE_RATE <= rate <= C.MAX_INPUT_SAMPLE_RATE:
        raise InvalidInput(
            f"input '{name}' is {rate} Hz; accepted sample rates are "
            f"{C.MIN_INPUT_SAMPLE_RATE}-{C.MAX_INPUT_SAMPLE_RATE} Hz"
        )
    return rate


def mono_audio(samples: object, name: str) -> np.ndarray:
    """FP32 samples shaped [samples] or [1, samples], non-empty and finite; returned 1-D."""
    if not isinstance(samples, np.ndarray):
        raise InvalidInput(f"input '{name}' must be an FP32 tensor, got {type(samples).__name__}")
    if samples.dtype != np.float32:
        raise InvalidInput(f"input '{name}' must be FP32 audio samples, got {samples.dtype}")
    if not (samples.ndim == 1 or (samples.ndim == 2 and samples.shape[0] == 1)):
        raise InvalidInput(
            f"input '{name}' must be mono: shape [samples] or [1, samples], got {list(samples.shape)} "
            "(mix the channels down before sending)"
        )
    samples = samples.reshape(-1)
    if samples.size == 0:
        raise InvalidInput(f"input '{name}' is empty")
    if not np.isfinite(samples).all():
        raise InvalidInput(f"input '{name}' contains NaN or infinite samples")
    return samples


def reference_duration(sample_count: int, sample_rate: int, name: str) -> float:
    """Seconds of reference audio, within [MIN_REFERENCE_SECONDS, MAX_REFERENCE_SECONDS]."""
    seconds = sample_count / sample_rate
    if seconds < C.MIN_REFERENCE_SECONDS:
        raise InvalidInput(
            f"input '{name}' is {seconds:.2f} s long; a voice reference needs at least {C.MIN_REFERENCE_SECONDS:g} s"
        )
    if seconds > C.MAX_REFERENCE_SECONDS:
        raise InvalidInput(
            f"input '{name}' is {seconds:.2f} s long; the limit for a voice reference is {C.MAX_REFERENCE_SECONDS:g} s"
        )
    return seconds


# --- Audio samples for the watermark models ----------------------------------------------
def audio_samples(
    samples: object,
    name: str,
    *,
    sample_rate: int = C.SAMPLE_RATE,
    min_samples: int = 0,
    max_seconds: float = C.MAX_WATERMARK_SECONDS,
) -> np.ndarray:
    """FP32 mono samples shaped [samples] or with leading dims of 1 ([1, samples],
    [1, 1, samples] as mimi_decoder emits them); finite; at least `min_samples` and at
    most `max_seconds` long at `sample_rate`. Returned 1-D (a view, not a copy)."""
    if not isinstance(samples, np.ndarray):
        raise InvalidInput(f"input '{name}' must be an FP32 tensor, got {type(samples).__name__}")
    if samples.dtype != np.float32:
        raise InvalidInput(f"input '{name}' must be FP32 audio samples, got {samples.dtype}")
    if samples.ndim == 0 or any(size != 1 for size in samples.shape[:-1]):
        raise InvalidInput(
            f"input '{name}' must be mono audio shaped [samples] or [1, samples], got {list(samples.shape)}"
        )
    samples = samples.reshape(-1)
    if samples.size < min_samples:
        raise InvalidInput(
            f"input '{name}' has {samples.size} samples; at least {min_samples} "
            f"({min_samples / sample_rate:.3g} s at {sample_rate} Hz) are needed"
        )
    max_samples = int(max_seconds * sample_rate)
    if samples.size > max_samples:
        raise InvalidInput(
            f"input '{name}' has {samples.size} samples ({samples.size / sample_rate:.1f} s at "
            f"{sample_rate} Hz); the limit is {max_seconds:g} s"
        )
    if not np.isfinite(samples).all():
        raise InvalidInput(f"input '{name}' contains NaN or infinite samples")
    return samples


def decode_utf8(array: np.ndarray, name: str) -> list[str]:
    """A BYTES tensor as UTF-8 strings, one per element."""
    texts = []
    for item in array.reshape(-1):
        raw = item if isinstance(item, (bytes, bytearray)) else str(item).encode()
        try:
            texts.append(bytes(raw).decode("utf-8"))
        except UnicodeDecodeError as error:
            raise InvalidInput(f"input '{name}' is not valid UTF-8 (byte {error.start})") from None
    return texts
