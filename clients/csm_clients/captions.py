"""Captions from a synthesis: one cue per segment of the text, timed by the server's
SEGMENT_TIMES (where each segment's speech starts and ends in the audio, exact to the
sample) and worded by NORMALIZED_TEXT (the segment as it was spoken). SubRip (.srt) and
WebVTT (.vtt), the two formats players and browsers read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["FORMATS", "captions", "write_captions"]

FORMATS = ("srt", "vtt")


def _stamp(seconds: float, separator: str) -> str:
    milliseconds = max(0, round(seconds * 1000))
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{separator}{millis:03d}"


def captions(times: Sequence[tuple[float, float]], texts: Sequence[str], kind: str, *, speed: float = 1.0) -> str:
    """The cues of the segments that made audio (an empty segment has none). `speed`:
    the audio was played back that many times faster (the `speed` option), so every time
    is divided by it."""
    if kind not in FORMATS:
        raise ValueError(f"captions must be one of {', '.join(FORMATS)}, not {kind!r}")
    if len(times) != len(texts):
        raise ValueError(f"{len(times)} segment times for {len(texts)} segment texts")
    separator = "," if kind == "srt" else "."
    cues = []
    for (start, end), text in zip(times, texts):
        if end <= start:
            continue
        span = f"{_stamp(start / speed, separator)} --> {_stamp(end / speed, separator)}"
        number = f"{len(cues) + 1}\n" if kind == "srt" else ""
        cues.append(f"{number}{span}\n{' '.join(text.split())}\n")
    header = "WEBVTT\n\n" if kind == "vtt" else ""
    return header + "\n".join(cues)


def write_captions(path: Path, times, texts, *, speed: float = 1.0) -> Path:
    """Writes captions to `path`, in the format its suffix names (.srt or .vtt)."""
    kind = Path(path).suffix.lower().lstrip(".")
    Path(path).write_text(captions(times, texts, kind, speed=speed), encoding="utf-8")
    return Path(path)
