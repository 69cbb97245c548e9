"""Whether `speed` hits its duration and keeps the pitch (csm_clients.timestretch).

    python -m loadtest.speed_eval [--out loadtest/results]

Speaks a text with espeak-ng in two voices (a low and a high one), resamples it to
24 kHz (soxr, as the clients do), stretches it at 0.25, 0.5, 1.5, 2.0 and 4.0 and
measures, per voice and speed:

- the duration ratio, from the audio itself: the span from the first to the last
  20 ms window within 40 dB of the loudest (what a listener hears as the speech's
  length, so padding or a cut tail cannot fake it), against 1/speed; and the ratio of
  sample counts (exact by construction: the stretcher cuts its output to
  round(input / speed));
- the median F0 before and after: librosa's YIN over the frames within 20 dB of the
  loudest (the voiced core of the speech). pYIN's default voicing model finds no voiced
  frame at all at 4.0 (its switch prior expects voicing to last longer than 4x speech
  lets it), so YIN with an energy gate is the one measure for every speed; a naive
  resampling to 1.5 (a speed-up without pitch correction) is measured too, to show the
  measure catches a pitch shift;
- one core's CPU time per second of input audio;
- the Perth watermark score after the stretch, when the server package can load its
  detector (the stretch runs on watermarked audio: the gateway stretches what csm_tts
  answered).

Then every response format of the OpenAI route, whole and streamed, at speed 2.0,
decoded back (PyAV) to its duration. Writes speed_cpu.md with the machine, the commit
and the command. tests/unit/test_timestretch.py uses the same measures.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from csm_clients.audio import read_audio, resample
from csm_clients.timestretch import TimeStretcher, stretch
from csm_servers.gateway.encoding import FORMATS, StreamEncoder, encode
from loadtest.workload import cpu_model, git_commit

RATE = 24_000
SPEEDS = (0.25, 0.5, 1.5, 2.0, 4.0)
VOICES = {"en": "espeak-ng en (low, ~100 Hz)", "en+f3": "espeak-ng en+f3 (high, ~210 Hz)"}
TEXT = (
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore, "
    "and how are you today? I am fine, thank you very much."
)
_HOP = 256


def espeak_speech(text: str, voice: str, folder: Path) -> np.ndarray:
    """espeak-ng's speech at 24 kHz (it speaks at 22.05 kHz), float32 mono."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is missing: apt-get install -y espeak-ng (make setup-test installs it)")
    path = Path(folder) / f"{voice.replace('+', '_')}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    samples, rate = read_audio(path)
    return resample(samples, rate, RATE)


def median_f0(audio: np.ndarray, rate: int = RATE) -> float:
    """Median YIN F0 (Hz) over the frames within 20 dB of the loudest."""
    import librosa

    f0 = librosa.yin(audio, fmin=60, fmax=500, sr=rate, frame_length=2048, hop_length=_HOP)
    rms = librosa.feature.rms(y=audio, frame_length=2048, hop_length=_HOP)[0][: f0.size]
    return float(np.median(f0[rms >= 0.1 * rms.max()]))


def speech_seconds(audio: np.ndarray, rate: int = RATE) -> float:
    """First to last 20 ms window within 40 dB of the loudest window, in seconds."""
    window = rate // 50
    frames = audio[: audio.size // window * window].reshape(-1, window)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    loud = np.flatnonzero(rms >= 0.01 * rms.max())
    return (loud[-1] - loud[0] + 1) * window / rate


def decoded_seconds(data: bytes, audio_format: str) -> float:
    if audio_format == "pcm":
        return len(data) / 2 / RATE
    import av

    samples, rate = 0, None
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    return samples / rate


def _streamed(audio: np.ndarray, audio_format: str, speed: float) -> bytes:
    """What the OpenAI route streams: the pipeline's chunks (4 frames, then 12)."""
    encoder, stretcher = StreamEncoder(audio_format, RATE), TimeStretcher(speed, RATE)
    sizes = [1920 * 4] + [1920 * 12] * (audio.size // (1920 * 12) + 1)
    parts, start = [], 0
    for size in sizes:
        parts.append(encoder.feed(stretcher.push(audio[start : start + size])))
        start += size
    parts.append(encoder.feed(stretcher.flush()) + encoder.finish())
    return b"".join(parts)


def _watermarker():
    """(Perth's Watermarker, the served threshold), or (None, None) where it cannot load."""
    try:
        from csm_triton.constants import WATERMARK_THRESHOLD
        from csm_triton.core.watermark import Watermarker

        return Watermarker("cpu"), WATERMARK_THRESHOLD
    except Exception as error:  # noqa: BLE001 - the server package or Perth's weights missing: no column
        print(f"watermark column left out: {type(error).__name__}: {error}", file=sys.stderr)
        return None, None


def measure(folder: Path) -> tuple[list[dict], list[dict]]:
    watermarker, threshold = _watermarker()
    rows, naive = [], []
    for voice in VOICES:
        original = espeak_speech(TEXT, voice, folder)
        marked = watermarker.apply(original, RATE) if watermarker else original
        f0, span = median_f0(original), speech_seconds(original)
        naive.append((voice, f0, median_f0(naive_speed_up(original, 1.5))))
        for speed in SPEEDS:
            started = time.process_time()
            stretched = stretch(original, RATE, speed)
            cpu = time.process_time() - started
            measured = speech_seconds(stretched) / span
            row = {
                "voice": voice,
                "speed": speed,
                "expected": 1 / speed,
                "measured": measured,
                "duration_error": 100 * (measured * speed - 1),
                "samples_ratio": stretched.size / original.size,
                "f0_original": f0,
                "f0_stretched": median_f0(stretched),
                "cpu_ms_per_s": 1000 * cpu / (original.size / RATE),
                "input_seconds": original.size / RATE,
            }
            row["f0_error"] = 100 * (row["f0_stretched"] / f0 - 1)
            if watermarker:
                row["watermark"] = watermarker.detect(stretch(marked, RATE, speed), RATE).score
                row["watermark_before"] = watermarker.detect(marked, RATE).score
                row["watermark_threshold"] = threshold
            rows.append(row)
    speech = espeak_speech(TEXT, "en", folder)
    expected = round(speech.size / 2.0) / RATE
    formats = [
        {
            "format": name,
            "expected": expected,
            "whole": decoded_seconds(encode(stretch(speech, RATE, 2.0), RATE, name), name),
            "streamed": decoded_seconds(_streamed(speech, name, 2.0), name),
        }
        for name in FORMATS
    ]
    return rows, formats, naive


def naive_speed_up(audio: np.ndarray, speed: float, rate: int = RATE) -> np.ndarray:
    """Resampled so that played at `rate` it is `speed` times faster: pitch up by `speed` too."""
    return resample(audio, round(rate * speed), rate)


def report(rows: list[dict], formats: list[dict], naive: list[tuple[str, float, float]], command: str) -> str:
    watermark = "watermark" in rows[0]
    lines = [
        "# `speed`: duration and pitch after the time-stretch (CPU)",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; "
        f"commit `{git_commit()}`; command: `{command}`",
        f'- input: espeak-ng speaking "{TEXT}" ({rows[0]["input_seconds"]:.2f} s in the low voice), '
        "resampled to 24 kHz; stretched by csm_clients.timestretch (FFmpeg's atempo through PyAV; two "
        "chained below 0.5 and above 2.0)",
        "- measured ratio: speech span after / before (first to last 20 ms window within 40 dB of the loudest); "
        "samples ratio: output samples / input samples (cut to round(input / speed) by construction)",
        "- F0: median YIN F0 over the frames within 20 dB of the loudest (pYIN's default voicing model finds no "
        "voiced frame in 4.0's output); the same measure of a naive 1.5x resample (no pitch correction): "
        + "; ".join(
            f"`{voice}` {before:.1f} -> {after:.1f} Hz ({100 * (after / before - 1):+.1f} %)"
            for voice, before, after in naive
        ),
        "- CPU: one core's process time of `stretch` (graph set-up included) per second of input"
        + (
            "; watermark: Perth's score (csm_triton.core.watermark, as watermark_detect) of the watermarked input "
            f"after the stretch, watermarked when >= {rows[0]['watermark_threshold']:g} (WATERMARK_THRESHOLD; "
            f"before the stretch: {min(row['watermark_before'] for row in rows):.3f} or more)"
            if watermark
            else ""
        ),
        "",
        "| voice | speed | expected duration ratio | measured ratio | error % | samples ratio | median F0 original (Hz) "
        "| median F0 stretched (Hz) | F0 error % | CPU ms per s of input |"
        + (" watermark score after |" if watermark else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if watermark else ""),
    ]
    for row in rows:
        lines.append(
            f"| {row['voice']} | {row['speed']:g} | {row['expected']:.4f} | {row['measured']:.4f} | "
            f"{row['duration_error']:+.2f} | {row['samples_ratio']:.5f} | {row['f0_original']:.1f} | "
            f"{row['f0_stretched']:.1f} | {row['f0_error']:+.2f} | {row['cpu_ms_per_s']:.2f} |"
            + (f" {row['watermark']:.3f} |" if watermark else "")
        )
    lines += [
        "",
        "Voices: " + "; ".join(f"`{key}` = {name}" for key, name in VOICES.items()) + ".",
        "",
        "## Every response format at speed 2.0, decoded back (PyAV)",
        "",
        "Whole: `encode` of the stretched clip; streamed: the OpenAI route's path, the pipeline's chunks "
        "(320 ms, then 960 ms) through one TimeStretcher and one StreamEncoder. MP3 and AAC pad their last "
        "frame and carry encoder delay (docs/api.md: up to ~50-70 ms); Opus decodes at 48 kHz.",
        "",
        "| format | expected s | whole, decoded s | streamed, decoded s |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {row['format']} | {row['expected']:.3f} | {row['whole']:.3f} | {row['streamed']:.3f} |" for row in formats
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        rows, formats, naive = measure(Path(folder))
    command = "python -m loadtest.speed_eval" + (
        " " + shlex.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ""
    )
    text = report(rows, formats, naive, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed_cpu.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
