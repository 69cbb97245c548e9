"""What text normalization costs csm_prepare: milliseconds per 300-character segment, and
the total for a 20,000-character text normalized sentence by sentence.

    python -m loadtest.normalize_bench [--repeats 5] [--out loadtest/results]

The texts are the load tests' (loadtest/data/texts.txt: commands, prose, numbers, dates,
money, times, names) cut into segments as csm_prepare cuts them; a dense case (a number
in almost every word) and plain prose (nothing to normalize) bound them. Each figure is
the median of --repeats runs on a warm normalizer (its load, once per process, is
reported apart). Writes normalize_cpu.md under --out.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

from csm_triton import constants as C
from csm_triton.core import normalize, text_split
from loadtest import workload

TEXTS = Path(__file__).resolve().parent / "data" / "texts.txt"
DENSE = (
    "On 2026-12-06 at 10:45 a.m., 3 of 12 items cost $5.30, 25% off 1,250 kg; call 555-123-4567 "
    "or mail a.b@example.com by Jan. 3rd, 2027; 2 1/2 hours at 60 mph is 150 miles, 72°F. "
)
# Not speech but a text a client may send: numbers and nothing else, the worst case per character.
NUMBER_SOUP = " ".join(str((n * 7919) % 100_000) for n in range(1, 400)) + ". "
PROSE = (
    "The quick brown fox jumps over the lazy dog, and then, having made its point, trots off into the "
    "woods without a backward glance. "
)


def corpus() -> str:
    lines = [line.strip() for line in TEXTS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return " ".join(lines)


def repeat_to(text: str, chars: int) -> str:
    return (text * (chars // len(text) + 1))[:chars].rsplit(" ", 1)[0]


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def per_segment(text: str, repeats: int) -> dict:
    """ms per 300 characters over the segments of `text` (each timed alone)."""
    pieces = text_split.split_text(text)
    figures = sorted(
        median_seconds(lambda p=p: normalize.normalize_text(p), repeats) * 1000 * 300 / len(p) for p in pieces
    )
    return {
        "segments": len(pieces),
        "median": statistics.median(figures),
        "p95": figures[min(len(figures) - 1, int(0.95 * len(figures)))],
        "max": figures[-1],
    }


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def whole_text(text: str, repeats: int) -> dict:
    """The split with and without normalization, and the first segment's share."""
    warnings = Warnings()
    logging.getLogger(normalize.__name__).addHandler(warnings)
    try:
        plain = median_seconds(lambda: text_split.split_text(text), repeats)
        normalized = median_seconds(lambda: text_split.split_text(text, normalize=normalize.normalize_texts), repeats)
    finally:
        logging.getLogger(normalize.__name__).removeHandler(warnings)
    stops = [m for m in warnings.messages if "budget" in m or "would pass" in m]
    return {
        "chars": len(text),
        "split_ms": plain * 1000,
        "normalized_split_ms": normalized * 1000,
        "normalize_ms": (normalized - plain) * 1000,
        # what csm_tts_stream's first audio waits for: the head split and normalized alone
        "head_ms": median_seconds(lambda: text_split.split_head(text, normalize=normalize.normalize_texts), repeats)
        * 1000,
        "segments": len(text_split.split_text(text, normalize=normalize.normalize_texts)),
        "stopped": stops[-1].removeprefix("text normalization ") if stops else "no",
    }


def report_markdown(r: dict) -> str:
    rows = "\n".join(
        f"| {name} | {s['segments']} | {s['median']:.1f} | {s['p95']:.1f} | {s['max']:.1f} |"
        for name, s in r["segment"].items()
    )
    whole = "\n".join(
        f"| {name} | {w['chars']:,} | {w['segments']} | {w['split_ms']:.0f} | {w['normalized_split_ms']:.0f}"
        f" | {w['normalize_ms']:.0f} | {w['normalize_ms'] * 300 / w['chars']:.1f} | {w['head_ms']:.1f}"
        f" | {w['stopped']} |"
        for name, w in r["whole"].items()
    )
    return f"""# Text normalization on the CPU (csm_triton.core.normalize, wetext 0.1.8)

- machine: {r["machine"]}; commit `{r["commit"]}`; command: `{r["command"]}`
- median of {r["repeats"]} runs each; the normalizer's load (once per process, at csm_prepare's load): {r["load_ms"]:.0f} ms
- load average (1 min) before / after: {r["load_before"]:.2f} / {r["load_after"]:.2f} (other work shared the cores)

## Per segment (each segment of up to {C.SEGMENT_MAX_CHARS} characters normalized alone)

| text | segments | ms per 300 characters, median | p95 | max |
|---|---|---|---|---|
{rows}

## A whole text, normalized sentence by sentence as csm_prepare does

| text | characters | segments (normalized) | split alone, ms | split + normalization, ms | normalization, ms | per 300 characters, ms | head (split_head), ms: before a stream's first audio | stopped early |
|---|---|---|---|---|---|---|---|---|
{whole}

"load tests' texts" is loadtest/data/texts.txt (49 sentences: commands, prose, money, dates,
times, phone numbers, names) repeated; "dense" has a number, amount, date, unit or address in
nearly every word ({len(DENSE)} characters, repeated); "plain prose" has nothing to normalize
(a regex scan, the text unchanged); "number soup" is five-digit numbers and nothing else, one
"sentence" per {C.SEGMENT_MAX_CHARS} characters: no speech, the worst case per character (wetext
reads digits at ~0.3 ms a character here, words at ~0.1). Only the words that need it, with up
to two words of context that can change their reading (not plain lowercase words), go to
wetext, so the cost follows the numbers in a text, not its length. For csm_tts (one
answer with all the audio) csm_prepare normalizes every sentence before it answers: the
whole-text figure. csm_tts_stream asks for the head alone (text_split.split_head: the first
segment, its sentences split and normalized alone) and for the rest while the head is
spoken, so the head figure is what normalization adds before a stream's first audio; the
head and the rest make the same segments as the whole split (tests/unit/test_text_split_head.py).
A normalized first segment holds at most {text_split.HEAD_MAX_DIGITS} digits as written
(text_split.HEAD_MAX_DIGITS), which bounds the head of a text of numbers too.
A request's normalization
stops after {C.NORMALIZE_BUDGET_SECONDS:g} s or when the normalized text would pass
{C.NORMALIZED_TEXT_MAX_CHARS:,} characters, and the rest is spoken as written ("stopped early": which,
in the last run). The machine was shared with other work: the load average above says how
far these figures sit above an idle machine's.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    if normalize.load() is None:
        print("wetext could not be loaded", file=sys.stderr)
        return 1
    load_ms = (time.perf_counter() - started) * 1000
    texts = {"load tests' texts": corpus(), "dense": DENSE, "plain prose": PROSE, "number soup": NUMBER_SOUP}
    long_texts = {name: repeat_to(text, C.MAX_LONG_TEXT_CHARS) for name, text in texts.items()}
    report = {
        "machine": workload.machine(),
        "commit": workload.commit(),
        "command": "python -m loadtest.normalize_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "repeats": args.repeats,
        "load_ms": load_ms,
        "segment": {
            name: per_segment(text if name == "load tests' texts" else repeat_to(text, 3000), args.repeats)
            for name, text in texts.items()
        },
        "whole": {name: whole_text(text, args.repeats) for name, text in long_texts.items()},
    }
    report["load_before"], report["load_after"] = load_before, os.getloadavg()[0]
    markdown = report_markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "normalize_cpu.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
