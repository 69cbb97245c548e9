"""Batch synthesis: many lines of text to WAV files, N requests in flight at once.

Input: JSON lines (.jsonl) or CSV with a header (.csv); one item per line or row:

    {"id": "greeting", "text": "Hello!", "voice": "alice", "seed": 1}
    {"text": "Cloned inline.", "reference_audio": "me.wav", "reference_text": "What me.wav says."}

`text` is required; `id` names the output file (default: the line number, `line-0003`);
`voice` is a stored voice; `reference_audio` (relative to the input file) with
`reference_text` an inline one; `temperature`, `top_k`, `seed`, `max_audio_seconds` and
`speaker` are passed on. A JSON line may carry a conversation's earlier turns, oldest
first (conversation.Turn; stored voices before clips):

    {"text": "Fine, thanks.", "speaker": 1, "context": [{"voice": "alice", "speaker": 1},
     {"audio": "question.wav", "text": "How are you?", "speaker": 0}]}
 Resumable: an item whose `<id>.wav` exists is skipped, and files appear
only when complete. A bad item (unreadable line, refused request) is reported and the
others go on.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from csm_clients.async_client import AsyncVoiceCloner
from csm_clients.audio import Reference
from csm_clients.context_json import turns_from_json
from csm_clients.conversation import Turn
from csm_clients.errors import CsmClientError, FieldError
from csm_clients.limits import DEFAULT_LIMITS, Limits

__all__ = ["BatchItem", "BatchSummary", "read_items", "run_batch"]

_SAMPLING = {"temperature": float, "top_k": int, "seed": int, "max_audio_seconds": float, "speaker": int}
_FIELDS = {"id", "text", "voice", "reference_audio", "reference_text", "context", *_SAMPLING}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a file name on any system


@dataclass
class BatchItem:
    line: int
    id: str
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set when the line itself is unusable

    def request(self, base: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[str, dict[str, Any]]:
        """(text, keyword arguments of synthesize), its context checked against the server's
        `limits`; raises ValueError or CsmClientError."""
        values = {key: value for key, value in self.fields.items() if value not in (None, "")}
        unknown = sorted(set(values) - _FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
        if not isinstance(values.get("text"), str):
            raise ValueError("field 'text' is required")
        kwargs = {name: _number(name, values[name], cast) for name, cast in _SAMPLING.items() if name in values}
        if "reference_audio" in values:
            if "voice" in values:
                raise ValueError("give either 'voice' or 'reference_audio', not both")
            kwargs["voice"] = Reference.from_file(base / values["reference_audio"], values.get("reference_text"))
        elif "voice" in values:
            kwargs["voice"] = values["voice"]
        if "context" in values:
            kwargs["context"] = _context(values["context"], base, limits)
        return values["text"], kwargs


def _context(turns: Any, base: Path, limits: Limits) -> list[Turn]:
    """A line's `context` (context_json.py), each clip a file relative to the input file;
    what the turns hold is checked by the client (conversation.py) and the server."""

    def load_clip(index: int, audio: Any, text: str | None, speaker: int) -> Turn:
        if not isinstance(audio, str):
            where = f"context[{index}].audio"
            raise FieldError(f"{where}: must be the path of an audio file (relative to the input file)", where)
        return Turn.from_file(base / audio, text, speaker)

    return turns_from_json(turns, load_clip, limits)


def _number(name: str, value: Any, cast: type) -> int | float:
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"field '{name}' must be a number, got {value!r}") from None


def _item(line: int, fields: Any, seen: set[str]) -> BatchItem:
    if not isinstance(fields, dict):
        return BatchItem(line, f"line-{line:04d}", error="expected a JSON object")
    item_id = str(fields.get("id") or f"line-{line:04d}")
    item = BatchItem(line, item_id, fields)
    if not _SAFE_ID.match(item_id):
        item.error = f"id {item_id!r} is not a usable file name (letters, digits, '.', '_', '-')"
    elif item_id in seen:
        item.error = f"id {item_id!r} appears twice"
    seen.add(item_id)
    return item


def read_items(path: Path) -> list[BatchItem]:
    """Every item of a .jsonl or .csv file, unusable lines included (with `error` set)."""
    seen: set[str] = set()
    with open(path, newline="", encoding="utf-8") as handle:
        if path.suffix.lower() == ".csv":
            return [_item(number, row, seen) for number, row in enumerate(csv.DictReader(handle), start=2)]
        items = []
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                items.append(_item(number, json.loads(text), seen))
            except json.JSONDecodeError as error:
                items.append(BatchItem(number, f"line-{number:04d}", error=f"not JSON: {error.msg}"))
        return items


@dataclass
class BatchSummary:
    items: int = 0
    written: int = 0
    skipped: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    failures: list[tuple[BatchItem, str]] = field(default_factory=list)

    @property
    def real_time_factor(self) -> float | None:
        """Wall time per second of audio written (below 1: faster than real time)."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else None

    def table(self) -> str:
        rtf = self.real_time_factor
        rows = [
            ("items", str(self.items)),
            ("written", str(self.written)),
            ("skipped (already done)", str(self.skipped)),
            ("failed", str(len(self.failures))),
            ("audio seconds", f"{self.audio_seconds:.2f}"),
            ("wall time (s)", f"{self.wall_seconds:.2f}"),
            ("real-time factor", "-" if rtf is None else f"{rtf:.3f}"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        if self.failures:
            lines.append("failures:")
            lines += [f"  line {item.line} ({item.id}): {reason}" for item, reason in self.failures]
        return "\n".join(lines)


class _Progress:
    """A one-line bar on a terminal; one line per finished item otherwise."""

    def __init__(self, total: int, stream: TextIO):
        self.total, self.done, self.stream = total, 0, stream
        self.live = stream.isatty()

    def advance(self, item: BatchItem, outcome: str) -> None:
        self.done += 1
        filled = int(30 * self.done / max(self.total, 1))
        bar = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}"
        if self.live:
            self.stream.write(f"\r{bar} {item.id}: {outcome}\033[K" + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(f"{bar} {item.id}: {outcome}\n")
        self.stream.flush()


def _write_atomically(speech, target: Path) -> None:
    partial = target.with_name(f".{target.stem}.partial.wav")  # never taken for a finished item
    speech.save(partial)
    os.replace(partial, target)


async def run_batch(
    input_path: Path, out_dir: Path, cloner: AsyncVoiceCloner, *, concurrency: int = 4, progress: TextIO | None = None
) -> BatchSummary:
    """Synthesize every item of `input_path` into `out_dir`; progress goes to stderr."""
    items = read_items(input_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = BatchSummary(items=len(items))
    bar = _Progress(len(items), progress or sys.stderr)
    slots = asyncio.Semaphore(max(1, concurrency))
    limits = await cloner.limits()

    async def one(item: BatchItem) -> None:
        target = out_dir / f"{item.id}.wav"
        if item.error is None and target.exists():
            summary.skipped += 1
            return bar.advance(item, "skipped (exists)")
        try:
            if item.error is not None:
                raise ValueError(item.error)
            async with slots:  # reference clips too are read only when their turn comes
                text, kwargs = item.request(input_path.parent, limits)
                speech = await cloner.synthesize(text, **kwargs)
            _write_atomically(speech, target)
        except (ValueError, CsmClientError) as error:
            summary.failures.append((item, str(error)))
            return bar.advance(item, "failed")
        summary.written += 1
        summary.audio_seconds += speech.seconds
        bar.advance(item, f"{speech.seconds:.2f} s")

    started = time.perf_counter()
    await asyncio.gather(*(one(item) for item in items))
    summary.wall_seconds = time.perf_counter() - started
    summary.failures.sort(key=lambda failure: failure[0].line)
    return summary
