"""csm_servers.gateway.encoding: every format, whole and streamed, read back by another decoder
(libsndfile through soundfile, or Debian's ffmpeg) to the same duration and rate."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile

from csm_servers.gateway.encoding import FORMATS, StreamEncoder, encode

RATE = 24_000
# Frame-based codecs add an encoder delay / pad the last frame; a streamed MP3 has no
# LAME header to say how much (a seekable file does), and ADTS never has one (1024
# priming samples and the padded last frame are heard).
TOLERANCE_S = {"mp3": 0.08, "aac": 0.1, "opus": 0.03, "flac": 0.001, "wav": 0.001, "pcm": 0.001}


def _ffmpeg(data: bytes, *arguments: str) -> bytes:
    if shutil.which("ffmpeg") is None:
        pytest.fail("Debian's ffmpeg is not installed: run make setup-test")
    return subprocess.run(
        ["ffmpeg", "-v", "error", "-i", "pipe:0", *arguments], input=data, capture_output=True, check=True, timeout=60
    ).stdout


def decode(data: bytes, audio_format: str) -> tuple[float, int]:
    """(seconds, the rate the file declares) read by a decoder that is not PyAV's FFmpeg."""
    if audio_format == "pcm":
        return len(data) / 2 / RATE, RATE
    if audio_format in ("mp3", "opus", "wav"):  # libsndfile reads these, whole or streamed
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
        return samples.shape[0] / rate, rate
    # AAC (ADTS) and FLAC without a total length (a stream): Debian's ffmpeg 5.1.
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=sample_rate,codec_name", "-of", "json", "pipe:0"],
        input=data,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    stream = json.loads(probe)["streams"][0]
    rate = int(stream["sample_rate"])
    pcm = _ffmpeg(data, "-f", "s16le", "-ac", "1", "pipe:1")
    return len(pcm) / 2 / rate, rate


def tone(seconds: float) -> np.ndarray:
    return (0.3 * np.sin(np.arange(int(seconds * RATE)) * 2 * np.pi * 440 / RATE)).astype(np.float32)


@pytest.mark.parametrize("audio_format", sorted(FORMATS))
def test_a_whole_file_decodes_to_its_duration_and_rate(audio_format):
    seconds, rate = decode(encode(tone(1.04), RATE, audio_format), audio_format)
    assert rate == RATE and seconds == pytest.approx(1.04, abs=TOLERANCE_S[audio_format])


@pytest.mark.parametrize("audio_format", sorted(FORMATS))
def test_a_stream_gives_bytes_before_its_end_and_is_one_valid_file(audio_format):
    encoder = StreamEncoder(audio_format, RATE)
    audio = tone(2.0)
    # The pipeline's chunks: 4 frames first, then 12 (320 ms, 960 ms).
    sizes = [1920 * 4] + [1920 * 12] * 3
    parts, start = [], 0
    for size in sizes:
        parts.append(encoder.feed(audio[start : start + size]))
        start += size
    parts.append(encoder.feed(audio[start:]) + encoder.finish())
    assert sum(map(len, parts[:2])) > 0, "nothing left the encoder after the first chunks"
    seconds, rate = decode(b"".join(parts), audio_format)
    assert rate == RATE and seconds == pytest.approx(2.0, abs=TOLERANCE_S[audio_format])


def test_streamed_containers_start_as_streams_a_player_can_open():
    heads = {name: StreamEncoder(name, RATE).feed(tone(0.32)) for name in ("mp3", "opus", "aac", "wav", "flac")}
    assert heads["opus"][:4] == b"OggS" and heads["flac"][:4] == b"fLaC" and heads["wav"][:4] == b"RIFF"
    assert heads["aac"][:2] in (b"\xff\xf1", b"\xff\xf9")  # an ADTS sync word
    assert heads["mp3"][:3] == b"ID3" or heads["mp3"][:2] == b"\xff\xfb"
    # A streamed WAV cannot know its length: both sizes say "unknown".
    assert heads["wav"][4:8] == b"\xff\xff\xff\xff"


def test_pcm_is_raw_little_endian_16_bit_and_clipped():
    data = encode(np.array([0.0, 0.5, -1.0, 2.0], np.float32), RATE, "pcm")
    assert np.frombuffer(data, "<i2").tolist() == [0, 16384, -32767, 32767]
