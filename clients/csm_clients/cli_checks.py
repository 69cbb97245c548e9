"""csm-tts's command line read into a request, and refused before anything is sent.

Every refusal here is a UsageError or the client's own InvalidRequest: exit code 2 (a
request the server refuses is exit 1). Separate from cli.py, which holds the commands,
their parser and how their answers are written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from csm_clients.conversation import Turn, check_text, check_turn_count, context_inputs
from csm_clients.errors import InvalidRequest
from csm_clients.limits import Limits, check_speaker

__all__ = ["SAMPLING_OPTIONS", "UsageError", "checked_request", "sampling"]

SAMPLING_OPTIONS = {
    "temperature": "--temperature",
    "top_k": "--top-k",
    "seed": "--seed",
    "max_audio_seconds": "--max-audio-seconds",
}


def sampling(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name, None) for name in SAMPLING_OPTIONS}


def text_options(args: argparse.Namespace) -> dict:
    """How the text is read: --no-normalize speaks it as written; --captions asks for one
    segment per sentence, so that each caption is a sentence timed exactly."""
    return {
        "normalize": False if args.no_normalize else None,
        "sentence_segments": True if getattr(args, "captions", None) else None,
    }


class UsageError(Exception):
    """A command line refused before anything is sent: exit code 2."""


def _speaker(value: str, option: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{option}: the speaker must be an integer id, got {value!r}") from None


def _conversation(args, limits: Limits) -> dict:
    """synthesize()/stream()'s speaker and context from the command line, checked as the
    server would check them (its `limits`), before any request."""
    voices, clips = args.context_voice or [], args.context_turn or []
    check_turn_count(len(voices) + len(clips), limits)  # before any clip is read
    context = [Turn.stored_voice(voice_id, _speaker(speaker, "--context-voice")) for speaker, voice_id in voices]
    for speaker, audio, text in clips:
        if not Path(audio).is_file():
            raise UsageError(f"--context-turn: no such audio file: {audio}")
        context.append(Turn.from_file(Path(audio), text, _speaker(speaker, "--context-turn")))
    if args.speaker is not None:
        check_speaker(args.speaker, "--speaker", limits)
    request = {"speaker": args.speaker, "context": context or None}
    context_inputs(request["context"], request["speaker"], limits)  # raises InvalidRequest naming the rule
    return request


def _book(path: Path, limits: Limits) -> str:
    """A UTF-8 text file, spoken in one request (the server splits it into segments)."""
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    if not text:
        raise UsageError(f"{path} has nothing to read")
    try:
        check_text(text, limits=limits)  # the length rule, as for any text
    except InvalidRequest:  # said of the file
        raise UsageError(
            f"{path} has {len(text)} characters; the server's limit for one text is "
            f"{limits.MAX_LONG_TEXT_CHARS} (MAX_LONG_TEXT_CHARS): split the file"
        ) from None
    return text


def checked_request(args, limits: Limits) -> dict:
    """What the command line adds to a synthesize()/stream() call, checked against the
    server's `limits`; {} for other commands."""
    if not hasattr(args, "speaker"):
        return {}
    if args.command == "read":
        args.text = _book(args.book, limits)
    return _conversation(args, limits)
