"""Context turns written as JSON objects, read into `Turn`s: the one parser of a batch
line's `context` (batch.py) and of the gateway's `context` field
(csm_servers.gateway.speech_context).

A turn is {"voice": "<stored voice id>", "speaker": 1} or {"audio": ..., "text": "what it
says", "speaker": 0}. What a turn object may hold, and how many turns a request may have
(counted before any clip is read), is decided here; what `audio` is, and how it becomes
samples, is the caller's: a file beside the batch file, base64 in a request body. The
caller injects that as `load_clip`. Separate from conversation.py, which checks `Turn`s
and builds their tensors whatever they were read from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from csm_clients.conversation import Turn, check_turn_count
from csm_clients.errors import FieldError, InvalidRequest
from csm_clients.limits import DEFAULT_LIMITS, Limits, check_speaker

__all__ = ["TURN_FIELDS", "ClipLoader", "turns_from_json"]

TURN_FIELDS = ("audio", "speaker", "text", "voice")
# (the turn's index, its `audio` as written, its `text` or None, its speaker) -> the Turn
ClipLoader = Callable[[int, Any, str | None, int], Turn]


def turns_from_json(turns: Any, load_clip: ClipLoader, limits: Limits = DEFAULT_LIMITS) -> list[Turn]:
    """The turns of a parsed JSON `context`, oldest first; FieldError names the field
    (`context`, `context[1]`, `context[1].audio`). Clips are loaded in order, so a
    loader may bound what all of them together cost."""
    if not isinstance(turns, list):
        raise FieldError("context: must be a list of turns", "context")
    try:
        check_turn_count(len(turns), limits)
    except InvalidRequest as error:
        raise FieldError(f"context: {error}", "context") from None
    parsed = []
    for index, turn in enumerate(turns):
        where = f"context[{index}]"
        if not isinstance(turn, Mapping) or set(turn) - set(TURN_FIELDS):
            raise FieldError(f"{where}: expected an object with {', '.join(TURN_FIELDS)}", where)
        speaker = turn.get("speaker", 0)
        try:
            check_speaker(speaker, f"{where}.speaker", limits)
        except InvalidRequest as error:
            raise FieldError(str(error), f"{where}.speaker") from None
        if turn.get("voice") is not None and (turn.get("audio") is not None or turn.get("text") is not None):
            raise FieldError(
                f"{where}: give either `voice` (a stored voice, its own transcript and audio) or `audio` "
                "with `text`, not both",
                where,
            )
        if turn.get("voice") is not None:
            parsed.append(Turn.stored_voice(turn["voice"], int(speaker)))
        elif turn.get("audio") is None:
            raise FieldError(
                f"{where}: has no `audio` nor `voice`; every context turn needs the audio of what was said",
                f"{where}.audio",
            )
        else:
            parsed.append(load_clip(index, turn["audio"], turn.get("text"), int(speaker)))
    return parsed
