"""Speech as the bytes of an audio format, whole or as a stream a player can start.

PyAV (FFmpeg's encoders and muxers, bundled in its wheel) writes every compressed
format; nothing here is a hand-written codec. `pcm` is the samples themselves as 16-bit
little-endian integers (OpenAI's raw format), which needs no library.

A `StreamEncoder` takes float32 chunks as they are generated and returns the bytes that
are ready after each one. Streamed formats are written to an output that cannot seek,
so every muxer writes what a stream needs instead of patching a header at the end:
MP3 frames, Ogg pages (Opus), ADTS frames (AAC), a FLAC header without a total length,
a WAV header whose sizes read "unknown" (0xFFFFFFFF, what players take as "until the
end"). `encode` writes the whole answer to a seekable buffer, so WAV and FLAC headers
carry the real length there.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np

__all__ = ["FORMATS", "AudioFormat", "StreamEncoder", "encode"]


@dataclass(frozen=True)
class AudioFormat:
    name: str  # OpenAI's response_format
    media_type: str
    container: str | None  # FFmpeg's muxer; None: raw samples
    codec: str | None
    bit_rate: int | None = None
    muxer_options: tuple[tuple[str, str], ...] = ()


FORMATS: dict[str, AudioFormat] = {
    audio.name: audio
    for audio in (
        AudioFormat("mp3", "audio/mpeg", "mp3", "libmp3lame", 64_000),
        # Opus in Ogg (what OpenAI sends for "opus"); the decoder plays it at 48 kHz, the
        # rate Opus always decodes to, with 24 000 recorded as the input rate.
        # Ogg pages closed every 20 ms of audio (FFmpeg's default waits a second), so each
        # generated chunk leaves the muxer as it is encoded.
        AudioFormat("opus", "audio/ogg", "ogg", "libopus", 32_000, (("page_duration", "20000"),)),
        # AAC in ADTS frames: each frame carries its own header, so a stream can start anywhere.
        AudioFormat("aac", "audio/aac", "adts", "aac", 64_000),
        AudioFormat("flac", "audio/flac", "flac", "flac"),
        AudioFormat("wav", "audio/wav", "wav", "pcm_s16le"),
        AudioFormat("pcm", "audio/pcm", None, None),
    )
}


def _pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class _Drain(io.RawIOBase):
    """What the muxer writes, kept until taken; never seekable (so the output is a stream)."""

    def __init__(self):
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


class StreamEncoder:
    """Float32 mono chunks at `sample_rate` in, encoded bytes out as soon as the muxer has them.

    `feed(chunk)` returns the bytes ready so far (possibly none: encoders hold a frame or
    two), `finish()` the rest; the concatenation is one valid file of `audio_format`."""

    def __init__(self, audio_format: str | AudioFormat, sample_rate: int, *, seekable_output: io.BytesIO | None = None):
        self.format = FORMATS[audio_format] if isinstance(audio_format, str) else audio_format
        self.sample_rate = sample_rate
        self._buffer = seekable_output
        self._drain = _Drain() if seekable_output is None else None
        self._samples = 0
        self._closed = False
        if self.format.container is None:
            return
        self._output = av.open(
            self._buffer if self._buffer is not None else self._drain,
            "w",
            format=self.format.container,
            options=dict(self.format.muxer_options),
        )
        self._stream = self._output.add_stream(self.format.codec, rate=sample_rate, layout="mono")
        if self.format.bit_rate:
            self._stream.bit_rate = self.format.bit_rate
        codec = self._stream.codec_context
        codec.open()  # fixes frame_size (0: any size) before the first frame
        self._resampler = av.AudioResampler(
            format=codec.format.name, layout="mono", rate=sample_rate, frame_size=codec.frame_size or None
        )

    def feed(self, samples: np.ndarray) -> bytes:
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if self._closed:
            raise ValueError("the encoder is finished")
        if samples.size == 0:
            return b""
        if self.format.container is None:
            return _pcm16(samples)
        frame = av.AudioFrame.from_ndarray(np.clip(samples, -1.0, 1.0)[None, :], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._samples
        self._samples += samples.size
        self._encode(self._resampler.resample(frame))
        return self._take()

    def finish(self) -> bytes:
        if self._closed:
            return b""
        self._closed = True
        if self.format.container is None:
            return b""
        self._encode(self._resampler.resample(None))
        self._encode([None])  # flush the encoder
        self._output.close()  # the trailer (Ogg's last page, FLAC's last frame)
        return self._take()

    def close(self) -> None:
        """Releases FFmpeg's contexts of an encoder left unfinished (a client that went away)."""
        if not self._closed and self.format.container is not None:
            self._closed = True
            try:
                self._output.close()
            except (av.FFmpegError, ValueError):
                pass

    def _encode(self, frames) -> None:
        for frame in frames:
            for packet in self._stream.encode(frame):
                self._output.mux(packet)

    def _take(self) -> bytes:
        return self._drain.take() if self._drain is not None else b""


def encode(samples: np.ndarray, sample_rate: int, audio_format: str | AudioFormat) -> bytes:
    """A whole answer in one format, headers with their real lengths."""
    buffer = io.BytesIO()
    encoder = StreamEncoder(audio_format, sample_rate, seekable_output=buffer)
    head = encoder.feed(samples) + encoder.finish()
    return head if encoder.format.container is None else buffer.getvalue()
