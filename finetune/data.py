"""One loader for three dataset layouts, every item checked once.

Layouts (`load_dataset` tells them apart from the path):
  folder    audio files (wav/flac/mp3/ogg, any depth) each beside a same-named .txt
  manifest  a .jsonl or .csv file with `audio` (path, relative to the manifest), `text`
            and optional `speaker`
  hf        a Hugging Face `datasets` dataset saved with save_to_disk, or .parquet files
            (one file or a folder of them) with `audio` and `text` columns: the Elise
            layout. No speaker column means speaker 0; a `speaker` or `source` column
            names the speaker.

Speakers given as integers are kept; names are numbered in sorted order (the mapping is
in the report and the run's manifest). Audio is mixed to mono, resampled to 24 kHz with
csm_triton.core.audio and scaled down only if it clips, exactly as a served reference.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np

from csm_triton import constants as C
from csm_triton.core.audio import peak_normalise, resample

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
MIN_SECONDS = 0.5
DEFAULT_MAX_SECONDS = 20.0
# RMS below which a clip counts as silence (-80 dBFS, a few steps of 16-bit audio).
SILENCE_RMS = 1e-4

# Why an item is skipped; the report counts each.
UNREADABLE = "unreadable audio"
NON_FINITE = "non-finite audio"
SILENT = "silence"
TOO_SHORT = f"shorter than {MIN_SECONDS} s"
TOO_LONG = "longer than the limit"
NO_TRANSCRIPT = "missing transcript"
EMPTY_TRANSCRIPT = "empty transcript"
DUPLICATE = "duplicate"


class DatasetError(Exception):
    """A dataset that cannot be used at all; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Clip:
    """One good item: 24 kHz mono float32 audio, its transcript and speaker id."""

    name: str
    text: str
    speaker: int
    audio: np.ndarray = dataclasses.field(repr=False, compare=False)
    audio_sha256: str  # of the source bytes: the code cache's key

    @property
    def seconds(self) -> float:
        return self.audio.size / C.SAMPLE_RATE


@dataclasses.dataclass
class LoadReport:
    layout: str
    total: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    examples: dict = dataclasses.field(default_factory=dict)  # reason -> first item name
    speakers: dict = dataclasses.field(default_factory=dict)  # source name -> speaker id

    def skip(self, name: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, name)

    @property
    def good(self) -> int:
        return self.total - sum(self.skipped.values())

    def lines(self) -> list[str]:
        lines = [f"{self.layout}: {self.total} items, {self.good} good, {sum(self.skipped.values())} skipped"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count} x {reason} (e.g. {self.examples[reason]})")
        if self.speakers:
            lines.append("  speakers: " + ", ".join(f"{name}={sid}" for name, sid in self.speakers.items()))
        return lines

    def as_dict(self) -> dict:
        return {
            "layout": self.layout,
            "total": self.total,
            "good": self.good,
            "skipped": dict(self.skipped),
            "examples": self.examples,
            "speakers": self.speakers,
        }


@dataclasses.dataclass
class _RawItem:
    name: str
    text: str | None
    speaker: object
    read_bytes: object  # () -> bytes, raising OSError when unreadable


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile

    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return np.ascontiguousarray(samples.mean(axis=1, dtype=np.float32)), int(rate)


# --- the three layouts --------------------------------------------------------------------


def _folder_items(folder: Path) -> list[_RawItem]:
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        transcript = path.with_suffix(".txt")
        text = transcript.read_text(encoding="utf-8", errors="replace") if transcript.is_file() else None
        items.append(_RawItem(path.relative_to(folder).as_posix(), text, None, path.read_bytes))
    return items


def _manifest_rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{path}:{number}: not JSON ({error.msg})") from None
        return rows
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _manifest_items(path: Path) -> list[_RawItem]:
    rows = _manifest_rows(path)
    if rows and not all(isinstance(row, dict) and "audio" in row for row in rows):
        raise DatasetError(f"{path}: every row needs an 'audio' field (and 'text', optional 'speaker')")
    items = []
    for row in rows:
        audio = path.parent / str(row["audio"])
        items.append(_RawItem(str(row["audio"]), row.get("text"), row.get("speaker"), audio.read_bytes))
    return items


def _hf_items(path: Path) -> list[_RawItem]:
    import datasets

    if path.is_dir() and not any(path.rglob("*.parquet")):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    else:
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
        loaded = datasets.Dataset.from_parquet(files, keep_in_memory=True)
    missing = {"audio", "text"} - set(loaded.column_names)
    if missing:
        raise DatasetError(f"{path}: dataset lacks column(s) {sorted(missing)} (has {loaded.column_names})")
    # Decoded by soundfile here, not by datasets (whose decoder needs torchcodec and ffmpeg).
    loaded = loaded.cast_column("audio", datasets.Audio(decode=False))
    speaker_column = next((c for c in ("speaker", "source") if c in loaded.column_names), None)
    items = []
    for index, row in enumerate(loaded):
        audio = row["audio"] or {}
        name = audio.get("path") or f"row {index}"

        def read(audio=audio, base=path):
            if audio.get("bytes"):
                return audio["bytes"]
            if audio.get("path"):
                file = Path(audio["path"])
                return (file if file.is_absolute() else (base if base.is_dir() else base.parent) / file).read_bytes()
            raise OSError("no audio bytes or path")

        items.append(_RawItem(f"{name}", row["text"], row[speaker_column] if speaker_column else None, read))
    return items


def detect_layout(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() in (".jsonl", ".csv"):
            return "manifest"
        if path.suffix.lower() == ".parquet":
            return "hf"
        raise DatasetError(f"{path}: not a dataset (expected a folder, .jsonl, .csv or .parquet)")
    if not path.is_dir():
        raise DatasetError(f"dataset not found: {path}")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or any(path.rglob("*.parquet")):
        return "hf"
    return "folder"


def _speaker_ids(values: list[object]) -> tuple[list[int], dict]:
    present = [v for v in values if v is not None and str(v).strip() != ""]
    if all(isinstance(v, int) or str(v).strip().isdigit() for v in present):
        return [
            int(str(v).strip()) if v is not None and str(v).strip() != "" else C.DEFAULT_SPEAKER_ID for v in values
        ], {}
    names = sorted({str(v).strip() for v in present})
    mapping = {name: index for index, name in enumerate(names)}
    return [
        mapping.get(str(v).strip(), C.DEFAULT_SPEAKER_ID) if v is not None else C.DEFAULT_SPEAKER_ID for v in values
    ], mapping


def load_dataset(path: str | Path, *, max_seconds: float = DEFAULT_MAX_SECONDS) -> tuple[list[Clip], LoadReport]:
    """Every item of the dataset at `path`, checked once: the good clips and the report.
    Raises DatasetError (one line) when no item is good."""
    path = Path(path).expanduser().resolve()
    layout = detect_layout(path)
    raw = {"folder": _folder_items, "manifest": _manifest_items, "hf": _hf_items}[layout](path)
    report = LoadReport(layout=layout, total=len(raw))
    speakers, report.speakers = _speaker_ids([item.speaker for item in raw])
    clips, seen = [], set()
    for item, speaker in zip(raw, speakers):
        text = " ".join((item.text or "").split()) if item.text is not None else None
        if text is None:
            report.skip(item.name, NO_TRANSCRIPT)
            continue
        if not text:
            report.skip(item.name, EMPTY_TRANSCRIPT)
            continue
        try:
            data = item.read_bytes()
            samples, rate = _decode(data)
        except Exception:  # noqa: BLE001 - any decoder or file error: the item is unreadable, the run goes on
            report.skip(item.name, UNREADABLE)
            continue
        if samples.size == 0 or rate <= 0:
            report.skip(item.name, UNREADABLE)
            continue
        if not np.isfinite(samples).all():
            report.skip(item.name, NON_FINITE)
            continue
        seconds = samples.size / rate
        if seconds < MIN_SECONDS:
            report.skip(item.name, TOO_SHORT)
            continue
        if seconds > max_seconds:
            report.skip(item.name, TOO_LONG)
            continue
        if float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) < SILENCE_RMS:
            report.skip(item.name, SILENT)
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            report.skip(item.name, DUPLICATE)
            continue
        seen.add(digest)
        audio = peak_normalise(resample(samples, rate, C.SAMPLE_RATE))
        clips.append(Clip(item.name, text, speaker, audio, digest))
    if not clips:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(report.skipped.items())) or "no items"
        raise DatasetError(f"no usable item in {path} ({report.total} items: {reasons})")
    return clips, report


def dataset_sha256(clips: list[Clip]) -> str:
    """Identifies the training data: audio bytes, transcripts and speakers, in order."""
    digest = hashlib.sha256()
    for clip in clips:
        digest.update(f"{clip.audio_sha256}\t{clip.speaker}\t{clip.text}\n".encode())
    return digest.hexdigest()
